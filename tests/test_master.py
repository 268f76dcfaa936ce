"""idual_master and single_master built from generated tile catalogs, measured against truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from catalog_factories import (
    make_tiles,
    make_truth,
    observe_dual,
    observe_single,
    write_dual_catalogs,
    write_sfd_maps,
    write_single_catalogs,
)
from scipy.spatial import cKDTree

from ks4release.errors import InputError
from ks4release.projection import unit_vectors
from ks4release.publish.link import link_detections
from ks4release.publish.master import MasterSettings, build_idual_master, build_single_master
from ks4release.publish.schema_check import check_catalog
from ks4release.schemas import catalog_schema
from ks4release.sfd import SfdMapMissingWarning

ARCSEC = 1.0 / 3600.0
SETTINGS = MasterSettings()


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Truth, tiles, generated tile catalogs and both master catalogs (SFD maps configured)."""
    root = tmp_path_factory.mktemp("master")
    truth = make_truth(8000, seed=11)
    tiles = make_tiles()
    dual = observe_dual(truth, tiles, seed=12)
    single = observe_single(truth, tiles, seed=13,
                            bands_of={"T00": ("b", "v", "r", "i"), "T10": ("v", "r", "i"),
                                      "T01": ("b", "v", "r", "i"), "T11": ("b", "v", "r", "i")})
    north, south = write_sfd_maps(root / "sfd",
                                  lambda glon, glat: 0.02 + 0.0 * glon + 0.001 * np.abs(glat))
    settings = dataclasses.replace(SETTINGS, sfd_ngp=str(north), sfd_sgp=str(south),
                                   chunk_rows=1500)
    dual_paths = write_dual_catalogs(root / "release", dual)
    single_paths = write_single_catalogs(root / "release", single)
    build_idual_master(dual_paths, root / "idual_master.parquet", settings)
    build_single_master(single_paths, root / "single_master.parquet", settings)
    return {"root": root, "truth": truth, "tiles": tiles, "dual": dual, "single": single,
            "dual_paths": dual_paths, "single_paths": single_paths, "settings": settings,
            "idual": pq.read_table(root / "idual_master.parquet"),
            "single_master": pq.read_table(root / "single_master.parquet")}


def _in_overlaps(survey) -> np.ndarray:
    truth = survey["truth"]
    n_tiles = sum(t.contains(truth.ra, truth.dec).astype(int) for t in survey["tiles"])
    return n_tiles >= 2


def _isolated(truth, radius_arcsec: float) -> np.ndarray:
    tree = cKDTree(unit_vectors(truth.ra, truth.dec))
    chord = 2 * np.sin(np.radians(radius_arcsec * ARCSEC) / 2)
    return np.array([len(n) == 1 for n in tree.query_ball_point(unit_vectors(truth.ra, truth.dec),
                                                                 chord)])


def _passing_ids(observations, band_of) -> np.ndarray:
    ids = []
    for key, cols in observations.items():
        band = band_of(key)
        keep = ((cols[f"snr_{band}"] > SETTINGS.snr_min)
                & (cols[f"flags_{band}"] < SETTINGS.flags_max))
        ids.append(cols["truth_id"][keep].astype(int))
    return np.unique(np.concatenate(ids))


def _rows_near(table, truth, rows, radius_arcsec: float) -> np.ndarray:
    tree = cKDTree(unit_vectors(table["ra"].to_numpy(), table["dec"].to_numpy()))
    chord = 2 * np.sin(np.radians(radius_arcsec * ARCSEC) / 2)
    hits = tree.query_ball_point(unit_vectors(truth.ra[rows], truth.dec[rows]), chord)
    return np.array([len(h) for h in hits])


@pytest.mark.parametrize("catalog", ["idual", "single_master"])
def test_overlap_sources_appear_exactly_once(survey, catalog):
    truth = survey["truth"]
    if catalog == "idual":
        detected = _passing_ids(survey["dual"], lambda key: SETTINGS.detection_band)
    else:
        detected = _passing_ids(survey["single"], lambda key: key[1])
    wanted = np.zeros(len(truth.ids), bool)
    wanted[detected] = True
    # Sources with another true source within 1.6" (twice the band-merge radius) are
    # ambiguous to count by position; they are covered by the no-merge test below.
    rows = np.flatnonzero(wanted & _in_overlaps(survey) & _isolated(truth, 1.6))
    counts = _rows_near(survey[catalog], truth, rows, 0.5)
    fraction = np.mean(counts == 1)
    print(f"{catalog}: {fraction:.4%} of {len(rows)} overlap sources appear exactly once "
          f"(missing {np.sum(counts == 0)}, duplicated {np.sum(counts > 1)})")
    assert len(rows) > 500
    assert fraction >= 0.995


def test_linking_never_merges_true_sources_more_than_1_arcsec_apart(survey):
    truth = survey["truth"]
    ra, dec, tile, tid = [], [], [], []
    for code, cols in enumerate(survey["dual"].values()):
        keep = (cols["snr_i"] > SETTINGS.snr_min) & (cols["flags_i"] < SETTINGS.flags_max)
        ra.append(cols["ra"][keep])
        dec.append(cols["dec"][keep])
        tile.append(np.full(keep.sum(), code))
        tid.append(cols["truth_id"][keep].astype(int))
    ra, dec, tile, tid = map(np.concatenate, (ra, dec, tile, tid))
    labels = link_detections(ra, dec, tile, SETTINGS.link_radius_arcsec)
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
    worst = 0.0
    for members in np.split(tid[order], starts[1:]):
        ids = np.unique(members)
        if len(ids) > 1:
            vec = unit_vectors(truth.ra[ids], truth.dec[ids])
            sep = np.degrees(np.arccos(np.clip(vec @ vec.T, -1, 1))).max() * 3600
            worst = max(worst, sep)
    print(f"largest separation of true sources merged into one group: {worst:.3f} arcsec")
    assert worst <= 1.0
    # ... and every true source lands in exactly one group.
    groups_per_source = np.bincount(np.unique(np.c_[tid, labels], axis=0)[:, 0])
    assert groups_per_source.max() == 1


def _robust_sigma(x: np.ndarray) -> float:
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def test_master_magnitudes_agree_with_truth_as_well_as_tile_catalogs(survey):
    truth, table = survey["truth"], survey["idual"]
    tree = cKDTree(unit_vectors(table["ra"].to_numpy(), table["dec"].to_numpy()))
    rows = np.flatnonzero(_in_overlaps(survey) & _isolated(truth, 1.6) & (truth.mags["i"] < 21))
    dist, idx = tree.query(unit_vectors(truth.ra[rows], truth.dec[rows]))
    matched = dist < 2 * np.sin(np.radians(0.5 * ARCSEC) / 2)
    master = table["mag_auto_i"].to_numpy(zero_copy_only=False)[idx[matched]]
    master_resid = master - truth.mags["i"][rows[matched]]
    tile_resid = []
    wanted = set(rows[matched].tolist())
    for cols in survey["dual"].values():
        keep = np.array([t in wanted for t in cols["truth_id"].astype(int)])
        keep &= (cols["snr_i"] > SETTINGS.snr_min) & (cols["flags_i"] < SETTINGS.flags_max)
        true_mags = truth.mags["i"][cols["truth_id"][keep].astype(int)]
        tile_resid.append(cols["mag_auto_i"][keep] - true_mags)
    tile_resid = np.concatenate(tile_resid)
    print("mag_auto_i - truth, overlap sources I < 21: master sigma "
          f"{_robust_sigma(master_resid):.4f}"
          f" (median {np.median(master_resid):+.4f}), tile catalogs sigma "
          f"{_robust_sigma(tile_resid):.4f} (median {np.median(tile_resid):+.4f})")
    assert _robust_sigma(master_resid) <= _robust_sigma(tile_resid)
    assert abs(np.median(master_resid)) < 0.01


def test_catalogs_pass_the_schema_checker(survey):
    for name in ("idual_master", "single_master"):
        report = check_catalog(survey["root"] / f"{name}.parquet", name)
        assert report.ok, report.summary()


def test_single_master_nulls_non_observations_and_errors(survey):
    table = survey["single_master"]
    ndith_b = table["ndith_b"].to_numpy(zero_copy_only=False)
    mag_b_null = table["mag_auto_b"].is_null().to_numpy(zero_copy_only=False)
    # Tile T10 was not observed in B: sources only on T10 have ndith_b = 0 and no B magnitude.
    not_observed = ndith_b == 0
    assert not_observed.sum() > 100
    assert mag_b_null[not_observed].all()
    # Observed in B but too faint there: null magnitude, ndith unknown (no NDITH map given).
    assert (mag_b_null & np.isnan(ndith_b)).sum() > 100
    assert not np.any(~mag_b_null & ~(ndith_b > 0))
    raerr = table["raerr"].to_numpy()
    assert np.all((raerr > 0) & (raerr < 0.1))


def test_single_master_reads_ndith_maps_for_non_detections(survey, tmp_path):
    from astropy.io import fits
    from astropy.wcs import WCS

    tile = survey["tiles"][0]
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [tile.ra, tile.dec]
    wcs.wcs.crpix = [500.5, 500.5]
    wcs.wcs.cdelt = [-0.4 / 3600 * 2, 0.4 / 3600 * 2]
    ndith_map = tmp_path / f"{tile.name}_B_ndith.fits"
    fits.PrimaryHDU(np.full((1000, 1000), 7, np.int16), header=wcs.to_header()).writeto(ndith_map)
    paths = [p for p in survey["single_paths"] if p.name.startswith(tile.name)]
    build_single_master(paths, tmp_path / "single.parquet", survey["settings"],
                        ndith_maps=(ndith_map,))
    table = pq.read_table(tmp_path / "single.parquet")
    mag_b_null = table["mag_auto_b"].is_null().to_numpy(zero_copy_only=False)
    ndith_b = table["ndith_b"].to_numpy(zero_copy_only=False)
    assert mag_b_null.sum() > 100
    assert np.all(ndith_b[mag_b_null] == 7)


def test_derived_columns(survey):
    table = survey["idual"]
    ids = table["coadd_object_id"].to_numpy()
    assert np.all(np.diff(ids) > 0)  # sorted, unique
    np.testing.assert_array_equal(ids >> 35, table["healpix_index"].to_numpy())
    ebv = table["ebmv_sfd"].to_numpy()
    assert np.all((ebv > 0.02) & (ebv < 0.02 + 0.001 * 90))
    assert np.all(np.abs(table["glat"].to_numpy()) < 90)
    assert table.schema.field("ra").metadata[b"unit"] == b"deg"
    assert table.schema.names == list(catalog_schema("idual_master").names)


def test_rebuild_with_shuffled_inputs_gives_identical_catalog(survey, tmp_path):
    rng = np.random.default_rng(0)
    shuffled = {}
    for tile, cols in survey["dual"].items():
        order = rng.permutation(len(cols["ra"]))
        shuffled[tile] = {k: v[order] for k, v in cols.items()}
    paths = write_dual_catalogs(tmp_path, dict(reversed(list(shuffled.items()))))
    out = tmp_path / "again.parquet"
    build_idual_master(paths[::-1], out, survey["settings"])
    again = pq.read_table(out)
    assert again.equals(survey["idual"])


def test_no_sfd_map_warns_and_leaves_ebmv_null(survey, tmp_path):
    out = tmp_path / "idual.parquet"
    with pytest.warns(SfdMapMissingWarning, match="ebmv_sfd is null"):
        build_idual_master(survey["dual_paths"][:1], out, SETTINGS)
    table = pq.read_table(out)
    assert table["ebmv_sfd"].null_count == table.num_rows > 0


def test_bad_inputs_are_named(survey, tmp_path):
    with pytest.raises(InputError, match="single-mode"):
        build_single_master(survey["dual_paths"], tmp_path / "x.parquet", SETTINGS)
    table = pq.read_table(survey["dual_paths"][0]).drop(["flags_i"])
    bad = tmp_path / "T99_dual.parquet"
    pq.write_table(table, bad)
    with pytest.raises(InputError, match="T99_dual.parquet.*flags_i"):
        build_idual_master([bad], tmp_path / "y.parquet", survey["settings"])


@pytest.mark.parametrize("field, value", [
    ("link_radius_arcsec", 0.0), ("band_merge_order", ("i", "r", "v")), ("detection_band", "z"),
    ("flags_max", 0), ("chunk_rows", 0), ("sfd_ngp", "a.fits"),
])
def test_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        MasterSettings(**{field: value})
