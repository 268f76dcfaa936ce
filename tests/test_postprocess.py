"""Post-processing of the tile catalogs (DR1 3.2) measured against the tiny survey's truth.

Detections are made here with sep (SExtractor-like settings, 1.5 sigma, 9 px, default.conv) on
the ``tiny_coadds`` co-adds, so that these tests measure post-processing alone. CLASS_STAR is
taken from the truth (0.98 for a matched star, 0.05 otherwise) so that the bias-correction tests
do not depend on the stellarity network; magnitudes are the fluxes on the co-adds' ZP = 30 with
one zero point per aperture fitted to the true magnitudes of 16-19 mag stars, standing in for the
ZP maps of ``apply_zp_maps`` (which calibrate every aperture to total magnitudes).
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import astropy.units as u
import numpy as np
import pandas as pd
import pytest
import sep
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from factories import grid_wcs, rectangle_vertices
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import maximum_filter

from ks4release.camera import CCD_NAMES
from ks4release.layout import coadd_exposures_path, coadd_path
from ks4release.reduction.coadd_maps import FOOTPRINT_VERTICES_PER_SIDE
from ks4release.reduction.postprocess import (
    PostprocessSettings,
    auto_bias_correction,
    bias_curve,
    coverage_columns,
    flag_spurious,
    kron_loss_correction,
    moffat_kron_fraction,
)

_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
# Radii of the 3, 5 and 10 arcsec diameter apertures at 0.4 arcsec/px.
_APERTURE_RADII_PX = {"aper3": 3.75, "aper5": 6.25, "aper10": 12.5}
_TRUTH_RADIUS_ARCSEC = 1.0
# True stars brighter than this saturate the tiny co-adds (MAG_AUTO off by > 0.1 mag).
_SATURATED_MAG = 16.0


def _quiet_wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


def _detect(image: np.ndarray, ndith: np.ndarray, mask: np.ndarray, wcs: WCS, band: str
            ) -> Table:
    """sep detection and AUTO / APER5 photometry with the contract's column names.

    FLAGS: 1 and 2 from sep, 4 (saturated) where the co-add mask has a bleed bit (2) within
    3 px of the centre, 16 where the 5" aperture is truncated or holds masked pixels.
    """
    data = np.ascontiguousarray(image, dtype=np.float32).copy()
    bad = (ndith == 0) | ~np.isfinite(data)
    data[bad] = 0.0
    background = sep.Background(data, mask=bad, bw=64, bh=64)
    sub, rms = data - background.back(), background.rms()
    objects, segmap = sep.extract(sub, 1.5, err=rms, mask=bad, minarea=9, filter_kernel=_KERNEL,
                                  filter_type="conv", deblend_cont=5e-5, segmentation_map=True)
    x, y, a, b, theta = (objects[k] for k in ("x", "y", "a", "b", "theta"))
    ids = np.arange(1, len(objects) + 1)
    kron, _ = sep.kron_radius(sub, x, y, a, b, theta, 6.0, mask=bad, segmap=segmap, seg_id=ids)
    flux_auto, err_auto, _ = sep.sum_ellipse(sub, x, y, a, b, theta, np.maximum(2.5 * kron, 3.5),
                                             err=rms, mask=bad, subpix=5, segmap=segmap,
                                             seg_id=ids)
    apertures = {name: sep.sum_circle(sub, x, y, radius, err=rms, mask=bad, subpix=5)
                 for name, radius in _APERTURE_RADII_PX.items()}
    flag5 = apertures["aper5"][2]
    ra, dec = wcs.all_pix2world(x, y, 0)
    b = band.lower()
    bleed = maximum_filter((mask & 2) > 0, size=7)
    iy = np.clip(np.rint(y).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip(np.rint(x).astype(int), 0, mask.shape[1] - 1)
    flags = ((objects["flag"] & 3) | np.where(bleed[iy, ix], 4, 0)
             | np.where(flag5 & (sep.APER_TRUNC | sep.APER_HASMASKED), 16, 0))
    return Table({"number": ids.astype(np.int32), "x_image": x + 1.0, "y_image": y + 1.0,
                  "ra": ra, "dec": dec, f"flux_auto_{b}": flux_auto, f"fluxerr_auto_{b}": err_auto,
                  **{f"flux_{name}_{b}": apertures[name][0] for name in apertures},
                  **{f"fluxerr_{name}_{b}": apertures[name][1] for name in apertures},
                  f"flags_{b}": flags.astype(np.int16)})


def _truth_match(table: Table, truth: pd.DataFrame) -> np.ndarray:
    """Index of the nearest true source within 1 arcsec, -1 for none."""
    det = SkyCoord(np.asarray(table["ra"]) * u.deg, np.asarray(table["dec"]) * u.deg)
    true = SkyCoord(truth.ra.to_numpy() * u.deg, truth.dec.to_numpy() * u.deg)
    index, distance, _ = det.match_to_catalog_sky(true)
    return np.where(distance.arcsec < _TRUTH_RADIUS_ARCSEC, index, -1)


def _references(coadds: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    refs = [pd.read_parquet(coadds["refcat"][name]) for name in ("gaia_dr3", "delve_dr2")]
    return [(r.ra.to_numpy(), r.dec.to_numpy()) for r in refs]


@pytest.fixture(scope="module")
def truth(tiny_coadds) -> pd.DataFrame:
    return pd.read_parquet(tiny_coadds["survey"] / "truth" / "sources.parquet")


@pytest.fixture(scope="module")
def coadd_data(tiny_coadds) -> dict:
    """band -> (image, ndith, mask, header, wcs) of the tiny co-adds."""
    out = {}
    for band in tiny_coadds["bands"]:
        image, header = fits.getdata(coadd_path(tiny_coadds["release"], tiny_coadds["tile"], band,
                                                "coadd"), header=True)
        ndith, mask = (fits.getdata(coadd_path(tiny_coadds["release"], tiny_coadds["tile"], band,
                                               kind)) for kind in ("ndith", "mask"))
        out[band] = (image, ndith, mask, header, _quiet_wcs(header))
    return out


@pytest.fixture(scope="module")
def detections(coadd_data, truth) -> dict:
    """band -> (sep detections, index of the true source or -1)."""
    out = {}
    for band, (image, ndith, mask, _, wcs) in coadd_data.items():
        table = _detect(image, ndith, mask, wcs, band)
        out[band] = (table, _truth_match(table, truth))
    return out


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("match_radius_arcsec", 0.0), ("dbscan_eps_deg", -1.0),
                                          ("dbscan_min_samples", 0), ("edge_px", -1.0),
                                          ("bias_aperture", "auto"),
                                          ("bias_bin_max_mag", 0.1),
                                          ("bias_class_star_min", 1.5),
                                          ("bias_max_aperture_err", -0.01)])
def test_configreject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PostprocessSettings(**{field: value})


# --- 3.2.1 spurious sources ---------------------------------------------------------------------


def _spurious_scores(match: np.ndarray, flagged: np.ndarray) -> tuple[int, int, int, int]:
    """(spurious removed, spurious, real removed, real)."""
    spurious = match < 0
    return (int((flagged & spurious).sum()), int(spurious.sum()), int((flagged & ~spurious).sum()),
            int((~spurious).sum()))


def test_spurious_cleaning_against_truth(tiny_coadds, detections):
    """>= 90% of the detections without a true source within 1" are removed, <= 0.5% of real ones.

    The tiny co-adds have hundreds of spurious detections (a satellite trail, a stray-light
    ring, the raised background of the chip-gap strips covered by fewer exposures). DBSCAN's
    eps read as arcmin (0.03' = 1.8") would remove ~5% of them and fail here.
    """
    config = PostprocessSettings(remove_spurious=False)
    references = _references(tiny_coadds)
    totals = np.zeros(4, dtype=int)
    for band, (table, match) in detections.items():
        flagged_table, stats = flag_spurious(table, references, band, config)
        flagged = np.asarray(flagged_table[f"ssflag_{band.lower()}"]) == 1
        scores = _spurious_scores(match, flagged)
        print(f"{band}: {stats.as_dict()}; spurious removed {scores[0]}/{scores[1]}, "
              f"real removed {scores[2]}/{scores[3]}")
        totals += scores
    assert totals[1] >= 100, f"too few spurious detections for the statistic: {totals[1]}"
    assert totals[0] >= 0.9 * totals[1], f"spurious removed {totals[0]}/{totals[1]}"
    assert totals[2] <= 0.005 * totals[3], f"real removed {totals[2]}/{totals[3]}"


def test_removal_counts_and_fdr(tiny_coadds, detections):
    """Default settings drop the flagged rows; FDR = removed / initial; SSCOUNT_30 by brute
    force."""
    table, _ = detections["I"]
    references = _references(tiny_coadds)
    kept, stats = flag_spurious(table, references, "I", PostprocessSettings())
    flagged, _ = flag_spurious(table, references, "I", PostprocessSettings(remove_spurious=False))
    spurious = np.asarray(flagged["ssflag_i"]) == 1
    assert len(kept) == len(table) - spurious.sum() == len(table) - stats.flagged
    assert stats.fdr == pytest.approx(spurious.sum() / len(table))
    assert np.all(kept["ssflag_i"] == 0)
    removed = SkyCoord(np.asarray(table["ra"])[spurious] * u.deg,
                       np.asarray(table["dec"])[spurious] * u.deg)
    for row in kept:
        here = SkyCoord(row["ra"] * u.deg, row["dec"] * u.deg)
        assert row["sscount_30_i"] == int((here.separation(removed).arcsec < 30.0).sum())


def test_dual_mode_copies_the_detection_band_decision(tiny_coadds, detections):
    table, _ = detections["I"]
    out, stats = flag_spurious(table, _references(tiny_coadds), "I",
                               PostprocessSettings(remove_spurious=False), copy_to=("V",))
    assert stats.band == "i"
    assert np.array_equal(out["ssflag_i"], out["ssflag_v"])
    assert np.array_equal(out["sscount_30_i"], out["sscount_30_v"])


def test_no_references_and_empty_catalog():
    config = PostprocessSettings(remove_spurious=False)
    empty = Table({"ra": np.zeros(0), "dec": np.zeros(0)})
    out, stats = flag_spurious(empty, [], "V", config)
    assert len(out) == 0 and stats.fdr == 0.0 and "ssflag_v" in out.colnames
    # Two unmatched detections 36 arcsec apart cluster; a third 0.5 deg away stays.
    table = Table({"ra": [10.0, 10.0, 10.5], "dec": [-30.0, -29.99, -30.0]})
    out, stats = flag_spurious(table, [], "V", config)
    assert list(out["ssflag_v"]) == [1, 1, 0] and stats.clusters == 1
    # A reference counterpart within 1.1 arcsec takes a source out of the candidates.
    out, _ = flag_spurious(table, [(np.array([10.0]), np.array([-30.0002]))], "V", config)
    assert list(out["ssflag_v"]) == [0, 0, 0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60))
def test_flags_do_not_depend_on_row_order(seed, n):
    rng = np.random.default_rng(seed)
    table = Table({"ra": 359.95 + rng.uniform(0.0, 0.1, n) % 360.0,
                   "dec": -62.0 + rng.uniform(-0.05, 0.05, n)})
    table["ra"] = table["ra"] % 360.0
    ref = (np.asarray(table["ra"][: n // 3]), np.asarray(table["dec"][: n // 3]))
    config = PostprocessSettings(remove_spurious=False, dbscan_eps_deg=0.01)
    out, _ = flag_spurious(table, [ref], "I", config)
    order = rng.permutation(n)
    shuffled, _ = flag_spurious(table[order], [ref], "I", config)
    assert np.array_equal(np.asarray(out["ssflag_i"])[order], shuffled["ssflag_i"])
    assert np.array_equal(np.asarray(out["sscount_30_i"])[order], shuffled["sscount_30_i"])


# --- 3.2.2 exposure contributions ---------------------------------------------------------------


def _true_coverage(survey, exposures_json: dict, ra: np.ndarray, dec: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Truth NDITH and min/max/mean MJD: exposures whose true CCD footprint holds the position."""
    mjd_of = pd.read_parquet(survey / "truth" / "exposures.parquet").set_index("stem")["mjd"]
    covering, mjds = [], []
    for exposure in exposures_json["exposures"]:
        if not exposure["ok"]:
            continue
        inside = np.zeros(len(ra), dtype=bool)
        with fits.open(survey / "truth" / "masks" / f"{exposure['stem']}_mask.fits") as hdul:
            for name in exposure["ccds"]:
                ny, nx = hdul[name].data.shape
                x, y = _quiet_wcs(hdul[name].header).all_world2pix(ra, dec, 0)
                inside |= (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        covering.append(inside)
        mjds.append(mjd_of[exposure["stem"]])
    covering, mjds = np.array(covering), np.array(mjds)[:, None]
    ndith = covering.sum(axis=0)
    with np.errstate(invalid="ignore"):
        low = np.where(covering, mjds, np.inf).min(axis=0)
        high = np.where(covering, mjds, -np.inf).max(axis=0)
        mean = (covering * mjds).sum(axis=0) / ndith
    return ndith, low, high, mean


def _corners_only(exposures_json: dict) -> dict:
    """The exposures JSON with only the four corners of every CCD footprint (straight sides)."""
    out = json.loads(json.dumps(exposures_json))
    for exposure in out["exposures"]:
        for name, vertices in exposure["ccds"].items():
            exposure["ccds"][name] = vertices[::FOOTPRINT_VERTICES_PER_SIDE]
    return out


def _agreement(survey, exposures: dict, got: Table, b: str, ra: np.ndarray, dec: np.ndarray
               ) -> tuple[float, float]:
    """Fractions of non-EDGE rows whose NDITH and whose three MJDs equal the truth at (ra, dec)."""
    ndith, low, high, mean = _true_coverage(survey, exposures, ra, dec)
    inner = ~np.asarray(got[f"edge_{b}"])
    same_ndith = np.asarray(got[f"ndith_{b}"]) == ndith
    same_mjd = np.ones(len(got), dtype=bool)
    for name, values in (("min_mjd", low), ("max_mjd", high), ("mean_mjd", mean)):
        column = got[f"{name}_{b}"]
        same_mjd &= np.where(ndith > 0, np.isclose(column.filled(np.nan), values, rtol=0,
                                                   atol=1e-6), np.asarray(column.mask))
    return (same_ndith & inner).sum() / inner.sum(), (same_mjd & inner).sum() / inner.sum()


@pytest.mark.parametrize("band", ["V", "I"])
def test_coverage_columns_against_truth(tiny_coadds, coadd_data, detections, truth, band):
    """NDITH and MJDs against the true CCD footprints, for the real sources not flagged EDGE.

    * At the detected position: 100% with the co-add's footprints (16 vertices per side) and
      >= 99% with their four corners only (straight sides miss the field distortion's bow, up
      to 1.6 px on a demo chip).
    * At the true position (the issue's definition): >= 98%; the misses lie within the
      detection's centroid error (0.3 px median, up to ~2 px for faint galaxies) of a CCD edge,
      which no footprint geometry can fix (measured: 98.5-99.0%).
    """
    table, match = detections[band]
    image, _, _, _, wcs = coadd_data[band]
    release = tiny_coadds["release"]
    exposures = json.loads(coadd_exposures_path(release, tiny_coadds["tile"], band).read_text())
    b = band.lower()
    real = match >= 0
    true = truth.iloc[match[real]]
    results = {}
    for label, footprints in (("4 corners", _corners_only(exposures)),
                              ("as written", exposures)):
        out = coverage_columns(table, footprints, band, edge_px=PostprocessSettings().edge_px,
                               shape=image.shape, wcs=wcs)
        got = out[real]
        assert (~np.asarray(got[f"edge_{b}"])).sum() >= 0.8 * real.sum()
        assert np.all(np.asarray(got[f"ndith_{b}"])[np.asarray(got[f"edge_{b}"])] == 1)
        for where, (ra, dec) in (("detected", (np.asarray(got["ra"]), np.asarray(got["dec"]))),
                                 ("true", (true.ra.to_numpy(), true.dec.to_numpy()))):
            results[label, where] = _agreement(tiny_coadds["survey"], footprints, got, b, ra, dec)
            print(f"{band} {label}, {where} position: NDITH = truth for "
                  f"{results[label, where][0]:.2%}, MJDs for {results[label, where][1]:.2%}")
    assert min(results["4 corners", "detected"]) >= 0.99
    assert min(results["as written", "detected"]) == 1.0
    assert min(results["4 corners", "true"]) >= 0.98
    assert min(results["as written", "true"]) >= 0.98
    # EDGE wherever the co-add border is within edge_px.
    x, y = np.asarray(out["x_image"]), np.asarray(out["y_image"])
    ny, nx = image.shape
    near = np.minimum.reduce([x - 0.5, nx + 0.5 - x, y - 0.5, ny + 0.5 - y]) < 10.0
    assert np.all(np.asarray(out[f"edge_{b}"])[near])


def _square_json(k: int, half_deg: float, mjd0: float) -> dict:
    corners = [[360.0 - half_deg, -half_deg], [half_deg, -half_deg], [half_deg, half_deg],
               [360.0 - half_deg, half_deg]]
    return {"exposures": [{"stem": f"e{i}", "mjd": mjd0 + i, "ok": True, "ccds": {"KK": corners},
                           "excluded_ccds": {}} for i in range(k)]
            + [{"stem": "bad", "mjd": 1.0, "ok": False, "ccds": {"KK": corners},
                "excluded_ccds": {}}]}


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 6), x=st.floats(1.0, 400.0), y=st.floats(1.0, 400.0),
       mjd0=st.floats(50000.0, 60000.0))
def test_point_inside_k_identical_polygons_has_ndith_k(k, x, y, mjd0):
    """Square footprints larger than the 400 px co-add: NDITH = k inside, EDGE near the border."""
    table = Table({"x_image": [x], "y_image": [y]})
    out = coverage_columns(table, _square_json(k, 0.1, mjd0), "R", edge_px=10.0,
                           shape=(400, 400), wcs=grid_wcs(400))
    border = min(x - 0.5, 400.5 - x, y - 0.5, 400.5 - y) < 10.0
    assert bool(out["edge_r"][0]) == (border or k == 0)
    assert out["ndith_r"][0] == (1 if border or k == 0 else k)
    if k:
        assert out["min_mjd_r"][0] == pytest.approx(mjd0)
        assert out["max_mjd_r"][0] == pytest.approx(mjd0 + k - 1)
        assert out["mean_mjd_r"][0] == pytest.approx(mjd0 + (k - 1) / 2)
    else:
        assert out["mean_mjd_r"].mask[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), per_side=st.sampled_from([1, 4, 16]))
def test_ndith_counts_the_exposures_whose_ccds_hold_the_source(seed, per_side):
    """Exposures of 1-4 CCD rectangles each, scattered over a 400 px co-add: with edge_px = 0 a
    source's NDITH and MJDs are those of the exposures with a CCD holding it, EDGE (NDITH 1)
    where none does; the CCDs' vertices per side do not matter for straight sides."""
    rng = np.random.default_rng(seed)
    wcs = grid_wcs(400)
    exposures, boxes, mjds = [], [], []
    for i in range(int(rng.integers(1, 6))):
        ccds, mine = {}, []
        for name in CCD_NAMES[:int(rng.integers(1, 5))]:
            x0, y0 = rng.uniform(-50.0, 350.0, 2)
            x1, y1 = x0 + rng.uniform(20.0, 200.0), y0 + rng.uniform(20.0, 200.0)
            ccds[name] = rectangle_vertices(wcs, x0, y0, x1, y1, per_side)
            mine.append((x0, y0, x1, y1))
        exposures.append({"stem": f"e{i}", "mjd": 58000.0 + 10 * i, "ok": True, "ccds": ccds,
                          "excluded_ccds": {}})
        boxes.append(mine)
        mjds.append(58000.0 + 10 * i)
    x, y = rng.uniform(1.0, 400.0, 300), rng.uniform(1.0, 400.0, 300)
    covering = np.array([np.any([(x > b[0]) & (x < b[2]) & (y > b[1]) & (y < b[3])
                                 for b in mine], axis=0) for mine in boxes])
    margin = np.min([np.minimum.reduce([np.abs(x - b[0]), np.abs(x - b[2]), np.abs(y - b[1]),
                                        np.abs(y - b[3])]) for mine in boxes for b in mine], axis=0)
    keep = margin > 1e-6  # not on a side (either answer is right there)
    table = Table({"x_image": x[keep], "y_image": y[keep]})
    covering = covering[:, keep]
    out = coverage_columns(table, {"exposures": exposures}, "v", edge_px=0.0, shape=(400, 400),
                           wcs=wcs)
    count = covering.sum(axis=0)
    assert np.array_equal(np.asarray(out["edge_v"]), count == 0)
    assert np.array_equal(np.asarray(out["ndith_v"]), np.maximum(count, 1))
    held = count > 0
    mean = (np.array(mjds) @ covering)[held] / count[held]
    assert np.allclose(out["mean_mjd_v"].filled(np.nan)[held], mean, rtol=0, atol=1e-9)
    assert np.all(out["min_mjd_v"].mask[~held])


def test_end_of_coverage_is_edge():
    """Sources within edge_px of the end of the footprints (inside the co-add) are EDGE."""
    half = 100 * 0.4 / 3600  # footprint 200 px wide, centred on a 400 px co-add
    table = Table({"x_image": [200.5, 200.5 + 95.0, 200.5 + 120.0],
                   "y_image": [200.5, 200.5, 200.5]})
    out = coverage_columns(table, _square_json(3, half, 58000.0), "B", edge_px=10.0,
                           shape=(400, 400), wcs=grid_wcs(400))
    assert list(out["edge_b"]) == [False, True, True]
    assert list(out["ndith_b"]) == [3, 1, 1]
    assert list(out["min_mjd_b"].mask) == [False, False, True]


# --- 3.2.3 MAG_AUTO bias correction -------------------------------------------------------------


def _calibrated(table: Table, match: np.ndarray, truth: pd.DataFrame, band: str) -> Table:
    """Magnitudes (one ZP per aperture from 16-19 mag true stars) and CLASS_STAR from the truth."""
    b = band.lower()
    out = table.copy()
    star = np.zeros(len(out), dtype=bool)
    star[match >= 0] = (truth.type.to_numpy()[match[match >= 0]] == "star")
    true_mag = np.full(len(out), np.nan)
    true_mag[match >= 0] = truth[f"mag_{band}"].to_numpy()[match[match >= 0]]
    out[f"class_star_{b}"] = np.where(star, 0.98, 0.05)
    out["true_mag"] = true_mag
    out["true_star"] = star
    for aperture in ("auto", *_APERTURE_RADII_PX):
        flux = np.asarray(out[f"flux_{aperture}_{b}"], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(flux > 0, -2.5 * np.log10(flux) + 30.0, np.nan)
        bright = (star & (true_mag > _SATURATED_MAG) & (true_mag < 19.0) & np.isfinite(raw)
                  & (out[f"flags_{b}"] == 0))
        out[f"mag_{aperture}_{b}"] = raw + np.median(true_mag[bright] - raw[bright])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"magerr_{aperture}_{b}"] = 1.0857 * np.asarray(
                out[f"fluxerr_{aperture}_{b}"], dtype=float) / flux
    return out


def _stars_to(truth: pd.DataFrame, band: str, mag_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the true stars brighter than ``mag_max``: a deep Gaia-like point-source
    list (Gaia DR3 reaches G ~ 21)."""
    stars = truth[(truth.type == "star") & (truth[f"mag_{band}"] < mag_max)]
    return stars.ra.to_numpy(), stars.dec.to_numpy()


def _binned_bias(mag: np.ndarray, true_mag: np.ndarray) -> dict[float, float]:
    """Median of mag - true per 0.5 mag bin of the true magnitude (bins with >= 3 sources)."""
    return {lo: median for lo, (median, _) in _binned_bias_and_error(mag, true_mag).items()}


def _binned_bias_and_error(mag: np.ndarray, true_mag: np.ndarray
                           ) -> dict[float, tuple[float, float]]:
    """Per 0.5 mag bin: median of mag - true and its standard error (1.2533 x the robust
    sigma / sqrt(n))."""
    edges = np.arange(np.floor(np.nanmin(true_mag) * 2) / 2, np.nanmax(true_mag) + 0.5, 0.5)
    out = {}
    for lo in edges:
        sel = (true_mag >= lo) & (true_mag < lo + 0.5) & np.isfinite(mag)
        if sel.sum() >= 3:
            delta = mag[sel] - true_mag[sel]
            sigma = 1.4826 * np.median(np.abs(delta - np.median(delta)))
            out[float(lo)] = (float(np.median(delta)), 1.2533 * sigma / math.sqrt(sel.sum()))
    return out


@pytest.mark.parametrize("band", ["V", "I"])
def test_bias_correction_against_truth(tiny_coadds, coadd_data, detections, truth, band):
    """Median(MAG_AUTO - true) of S/N > 20 point sources per 0.5 mag bin, before and after.

    The survey's own Gaia XP (G < 17.65) leaves ~15 clean isolated stars in the tiny tile: too
    few for a curve in I, two nodes in V. With an XP-like list of every true star to 21 mag the
    correction must not raise the inverse-variance weighted mean |bias| over the bins by more
    than 0.002 mag, nor any bin by more than 0.02 mag, each plus twice its standard error: the
    faint bins hold 3-10 stars of S/N 20-40 (measured: V 0.0074 -> 0.0056, I 0.0070 -> 0.0088,
    standard errors 0.0018 and 0.0037; the curve, from AUTO against the aperture, finds I's
    faint stars 0.02 mag faint where the truth finds them unbiased).
    """
    table, match = detections[band]
    b = band.lower()
    measured = _calibrated(table, match, truth, band)
    maglim = coadd_data[band][3]["MAGLIM"]
    true_snr = 5.0 * 10 ** (-0.4 * (measured["true_mag"] - maglim))
    point = (np.asarray(measured["true_star"]) & (true_snr > 20)
             & (np.asarray(measured["true_mag"]) > _SATURATED_MAG))
    before_err = _binned_bias_and_error(np.asarray(measured[f"mag_auto_{b}"])[point],
                                        np.asarray(measured["true_mag"])[point])
    before = {lo: median for lo, (median, _) in before_err.items()}
    config = PostprocessSettings()
    xp = Table.read(tiny_coadds["refcat"]["gaia_xp"])
    with_mag = np.isfinite(np.asarray(xp[f"{b}_jkc_mag"], dtype=float))
    survey_corrected, survey_curve = auto_bias_correction(
        measured, (np.asarray(xp["ra"])[with_mag], np.asarray(xp["dec"])[with_mag]), band,
        config)
    survey_after = _binned_bias(np.asarray(survey_corrected[f"mag_auto_{b}"])[point],
                                np.asarray(measured["true_mag"])[point])
    print(f"{band} with the survey's Gaia XP: {survey_curve.n_stars} stars, applied "
          f"{survey_curve.applied} {survey_curve.reason} nodes {np.round(survey_curve.mag, 2)} "
          f"offsets {np.round(survey_curve.offset, 4)}; mean |bias| after "
          f"{np.mean(np.abs(list(survey_after.values()))):.4f}")
    corrected, curve = auto_bias_correction(measured, _stars_to(truth, band, 21.0), band,
                                            config)
    after = _binned_bias(np.asarray(corrected[f"mag_auto_{b}"])[point],
                         np.asarray(measured["true_mag"])[point])
    print(f"{band} deep XP-like: {curve.n_stars} stars, nodes {np.round(curve.mag, 2)} "
          f"offsets {np.round(curve.offset, 4)}")
    for lo in before:
        print(f"  {lo:5.1f}-{lo + 0.5:4.1f}: before {before[lo]:+.4f} after {after[lo]:+.4f}")
    assert curve.applied
    # a bin's own median is uncertain, and so is the curve's from as few stars
    assert all(abs(after[lo]) <= abs(before[lo]) + 0.02 + 2 * before_err[lo][1]
               for lo in before)
    # |bias| averaged over the bins with inverse-variance weights (the faint bins, 3-10 stars
    # of S/N 20-40, would otherwise decide it), and the standard error of that mean
    weight = {lo: 1.0 / max(err, 1e-3) ** 2 for lo, (_, err) in before_err.items()}
    total = sum(weight.values())
    mean_before = sum(weight[lo] * abs(before[lo]) for lo in before) / total
    mean_after = sum(weight[lo] * abs(after[lo]) for lo in before) / total
    mean_error = 1.0 / math.sqrt(total)
    print(f"  weighted mean |bias|: before {mean_before:.4f} after {mean_after:.4f} "
          f"(standard error {mean_error:.4f})")
    assert mean_after <= mean_before + 0.002 + 2 * mean_error
    # Extended sources keep MAG_AUTO.
    galaxy = (np.asarray(measured[f"class_star_{b}"]) < 0.5)
    assert np.array_equal(np.asarray(corrected[f"mag_auto_{b}"])[galaxy],
                          np.asarray(measured[f"mag_auto_{b}"])[galaxy], equal_nan=True)


def test_bias_curve_recovers_a_known_trend():
    rng = np.random.default_rng(5)
    mag = rng.uniform(14.0, 18.0, 2000)
    trend = 0.02 - 0.01 * (mag - 14.0)
    aper = mag - trend + rng.normal(0.0, 0.003, mag.size)
    curve = bias_curve(mag, aper, "v", PostprocessSettings())
    assert curve.applied
    widths = np.diff(curve.mag)
    assert np.all(widths > 0.1) and np.all(widths < 0.3)
    probe = np.linspace(14.3, 17.7, 30)
    assert np.allclose(curve(probe), 0.02 - 0.01 * (probe - 14.0), atol=0.003)


def test_noisy_aperture_magnitudes_shape_no_node():
    """Calibration stars whose MAG_APER error exceeds bias_max_aperture_err make no node: their
    aperture magnitudes carry the background's error (here 0.1 mag faint), which the curve
    would otherwise hand on to MAG_AUTO. Beyond the last node the curve holds its value."""
    rng = np.random.default_rng(3)
    n = 400
    mag = np.sort(rng.uniform(16.0, 21.0, n))
    faint = mag > 19.5
    table = Table({"ra": 10.0 + np.arange(n) * 0.01, "dec": np.full(n, -30.0),
                   "mag_auto_v": mag, "mag_aper10_v": mag + np.where(faint, 0.1, 0.0),
                   "magerr_aper10_v": np.where(faint, 0.05, 0.005),
                   "class_star_v": np.full(n, 0.99), "flags_v": np.zeros(n, dtype=np.int16)})
    positions = (np.asarray(table["ra"]), np.asarray(table["dec"]))
    capped, curve = auto_bias_correction(table, positions, "V", PostprocessSettings())
    assert curve.applied and curve.mag.max() < 19.5
    assert np.allclose(capped["mag_auto_v"], mag)
    uncapped, curve = auto_bias_correction(table, positions, "V",
                                           PostprocessSettings(bias_max_aperture_err=0.0))
    assert curve.mag.max() > 20.5
    assert np.median(np.asarray(uncapped["mag_auto_v"])[mag > 20.5] - mag[mag > 20.5]) \
        == pytest.approx(0.1, abs=0.01)


def test_too_few_stars_leave_mag_auto_and_log_why(caplog):
    rng = np.random.default_rng(1)
    n = 6
    table = Table({"ra": 10.0 + np.arange(n) * 0.01, "dec": np.full(n, -30.0),
                   "mag_auto_v": rng.uniform(15, 17, n), "mag_aper10_v": rng.uniform(15, 17, n),
                   "magerr_aper10_v": np.full(n, 0.002), "class_star_v": np.full(n, 0.99),
                   "flags_v": np.zeros(n, dtype=np.int16)})
    positions = (np.asarray(table["ra"]), np.asarray(table["dec"]))
    with caplog.at_level(logging.INFO, logger="ks4release.reduction.postprocess"):
        out, curve = auto_bias_correction(table, positions, "V", PostprocessSettings())
    assert not curve.applied and "bias_min_stars" in curve.reason
    assert np.array_equal(out["mag_auto_v"], table["mag_auto_v"])
    assert "not applied" in caplog.text


@settings(max_examples=20, deadline=None)
@given(fwhm=st.floats(3.0, 8.0), beta=st.floats(2.0, 5.0), radius=st.floats(2.0, 6.0))
def test_moffat_kron_fraction_of_a_circle_is_the_analytic_enclosed_light(fwhm, beta, radius):
    """A Kron 'ellipse' with a = b = 1 px and factor r is a circle of radius r; a Moffat profile
    holds 1 - (1 + r^2/alpha^2)^(1 - beta) of its light inside it (for circles of 6 px and more,
    as Kron apertures are: pixel integration blurs the profile by a pixel and moves light out,
    up to 0.0033 at 6 px and 0.006 at 4.5 px with FWHM 3 px and beta 2, which failed)."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    fraction = moffat_kron_fraction(np.array([1.0]), np.array([1.0]), np.array([0.0]),
                                    np.array([radius * fwhm]), fwhm, beta)
    expected = 1.0 - (1.0 + (radius * fwhm / alpha) ** 2) ** (1.0 - beta)
    assert fraction[0] == pytest.approx(expected, abs=5e-3)


def test_kron_loss_correction_brightens_sources_with_small_ellipses():
    """Bright stars with the usual ellipse set the reference; a faint point source whose
    ellipse shrank gets brighter by the light its ellipse misses, an unchanged one stays."""
    n = 30
    a = np.r_[np.full(n, 3.0), 2.0, 3.0]
    table = Table({"ra": 10.0 + np.arange(n + 2) * 0.01, "dec": np.full(n + 2, -30.0),
                   "mag_auto_v": np.r_[np.full(n, 17.0), 21.5, 21.5],
                   "a_image_v": a, "b_image_v": a, "theta_image_v": np.zeros(n + 2),
                   "kron_radius_v": np.full(n + 2, 3.5), "snr_v": np.r_[np.full(n, 500.0), 8, 8],
                   "class_star_v": np.full(n + 2, 0.98), "flags_v": np.zeros(n + 2, np.int16)})
    targets = np.ones(n + 2, dtype=bool)
    out, info = kron_loss_correction(table, "V", 1.9, 0.4, PostprocessSettings(),
                                     targets=targets)
    assert info["applied"] and info["reference_stars"] == n
    fractions = moffat_kron_fraction(np.array([3.0, 2.0]), np.array([3.0, 2.0]), np.zeros(2),
                                     np.full(2, 3.5), 1.9 / 0.4, 3.0)
    expected = 21.5 + 2.5 * np.log10(fractions[1] / fractions[0])
    assert out["mag_auto_v"][n] == pytest.approx(expected, abs=1e-6) and expected < 21.5 - 0.01
    assert out["mag_auto_v"][n + 1] == pytest.approx(21.5)
    untouched, _ = kron_loss_correction(table, "V", 1.9, 0.4,
                                        PostprocessSettings(kron_loss_compact=False),
                                        targets=np.zeros(n + 2, dtype=bool))
    assert np.array_equal(np.asarray(untouched["mag_auto_v"]), np.asarray(table["mag_auto_v"]))
    # not a target (CLASS_STAR too low), but its ellipse shrank: corrected as a point source;
    # one with a larger ellipse than the stars' (a galaxy) is not
    wide = table.copy()
    wide["a_image_v"][n + 1] = wide["b_image_v"][n + 1] = 4.0
    compact, info = kron_loss_correction(wide, "V", 1.9, 0.4, PostprocessSettings(),
                                         targets=np.zeros(n + 2, dtype=bool))
    assert info["corrected"] == info["corrected_compact"] == 1
    assert compact["mag_auto_v"][n] == pytest.approx(expected, abs=1e-6)
    assert compact["mag_auto_v"][n + 1] == pytest.approx(21.5)
    # a measured PSF index replaces the configured one: broader wings (beta 2) lose more
    broad, info = kron_loss_correction(table, "V", 1.9, 0.4, PostprocessSettings(),
                                       targets=targets, psf_beta=2.0)
    fractions = moffat_kron_fraction(np.array([3.0, 2.0]), np.array([3.0, 2.0]), np.zeros(2),
                                     np.full(2, 3.5), 1.9 / 0.4, 2.0)
    assert info["psf_beta"] == 2.0
    assert broad["mag_auto_v"][n] == pytest.approx(21.5 + 2.5 * np.log10(fractions[1]
                                                                         / fractions[0]))
    assert broad["mag_auto_v"][n] < out["mag_auto_v"][n]
    # the calibrated noise bias is added to the corrected sources only
    noisy, _ = kron_loss_correction(table, "V", 1.9, 0.4, PostprocessSettings(),
                                    targets=np.r_[np.ones(n + 1, dtype=bool), False],
                                    noise_term=np.full(n + 2, 0.02))
    assert noisy["mag_auto_v"][n] == pytest.approx(out["mag_auto_v"][n] + 0.02)
    assert noisy["mag_auto_v"][n + 1] == pytest.approx(21.5)
    with pytest.raises(ValueError, match="beta"):
        kron_loss_correction(table, "V", 1.9, 0.4, PostprocessSettings(), targets=targets,
                             psf_beta=1.0)
