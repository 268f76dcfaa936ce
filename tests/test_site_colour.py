"""The sites' colour terms taken out of a co-add's sources (reduction/site_colour.py).

The sources are made as the module's model has a co-add of several sites show them: in each
exposure a source of true magnitude m and colour c has the flux of ``m - k_e (c - p_e)`` at ZP
30, and the co-add holds the mean over the exposures that cover it. The correction must give
back the flux of m from the V and I fluxes alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table
from factories import grid_wcs, rectangle_vertices
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ks4release.errors import InputError
from ks4release.reduction.moffat import moffat_enclosed_fraction
from ks4release.reduction.site_colour import (
    colour_offsets,
    dual_colours,
    site_colour_correction,
    source_colours,
)
from ks4release.settings import MapSettings

SIZE = 400
BETA = 3.0


def _survey(rng: np.random.Generator, n_exposures: int) -> tuple[dict, list[tuple], np.ndarray,
                                                                 np.ndarray]:
    """Exposures of one CCD rectangle each with random colour terms and pivots: the exposures
    JSON, the rectangles (x0, y0, x1, y1), the terms and the pivots."""
    wcs = grid_wcs(SIZE)
    exposures, boxes = [], []
    terms = rng.uniform(-0.05, 0.05, n_exposures)
    pivots = rng.uniform(0.3, 1.2, n_exposures)
    for i in range(n_exposures):
        x0, y0 = rng.uniform(-100.0, 250.0, 2)
        x1, y1 = x0 + rng.uniform(100.0, 400.0), y0 + rng.uniform(100.0, 400.0)
        boxes.append((x0, y0, x1, y1))
        exposures.append({"stem": f"e{i}", "mjd": 58000.0 + i, "ok": True, "site": "CTIO",
                          "ccds": {"KK": rectangle_vertices(wcs, x0, y0, x1, y1, 4)},
                          "excluded_ccds": {}, "colour_term": float(terms[i]),
                          "colour_pivot": float(pivots[i])})
    return {"exposures": exposures}, boxes, terms, pivots


def _with_terms(exposures: dict, terms: np.ndarray) -> dict:
    """The same exposures with other colour terms (another band's co-add of the same dithers)."""
    return {"exposures": [dict(e, colour_term=float(t))
                          for e, t in zip(exposures["exposures"], terms, strict=True)]}


def _covering(boxes: list[tuple], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(exposures, sources): the rectangles holding each point, all where none does."""
    cover = np.array([(x > b[0]) & (x < b[2]) & (y > b[1]) & (y < b[3]) for b in boxes])
    cover[:, ~cover.any(axis=0)] = True
    return cover


def _measured(rng: np.random.Generator, boxes, terms, pivots, n: int) -> tuple[Table, dict]:
    """A dual-mode measurement table of ``n`` sources as the co-add of the exposures shows them
    (noiseless), and their truth (``mag_v``, ``mag_i``, ``colour``). ``terms``: the exposures'
    colour terms, one array for both bands or a dict per band letter."""
    x, y = rng.uniform(5.0, SIZE - 5.0, n), rng.uniform(5.0, SIZE - 5.0, n)
    mag_i = rng.uniform(15.0, 21.0, n)
    colour = rng.uniform(-0.3, 3.0, n)
    mag_v = mag_i + colour
    cover = _covering(boxes, x, y)
    terms = terms if isinstance(terms, dict) else {"v": terms, "i": terms}
    fwhm = {"v": rng.uniform(1.0, 2.2, n), "i": rng.uniform(1.0, 2.2, n)}
    ra, dec = grid_wcs(SIZE).wcs_pix2world(x, y, 1)
    table = Table({"x_image": x, "y_image": y, "ra": ra % 360.0, "dec": dec})
    for b, mag in (("v", mag_v), ("i", mag_i)):
        offsets = np.where(cover, terms[b][:, None] * (colour[None, :] - pivots[:, None]), np.nan)
        total = np.nanmean(10 ** (-0.4 * (mag[None, :] - 30.0 - offsets)), axis=0)
        table[f"psf_fwhm_{b}"] = fwhm[b]
        table.meta[f"psf_beta_{b}"] = BETA
        for kind, share in (("auto", 0.95), ("aper3", 0.7), ("aper5", None), ("aper10", 0.99)):
            flux = total * (moffat_enclosed_fraction(fwhm[b], BETA, 5.0) if share is None
                            else share)
            table[f"flux_{kind}_{b}"] = flux
            table[f"fluxerr_{kind}_{b}"] = 1e-3 * flux
    return table, {"mag_v": mag_v, "mag_i": mag_i, "colour": colour}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n_exposures=st.integers(1, 7), same=st.booleans())
def test_correction_gives_back_the_reference_magnitudes(seed, n_exposures, same, tmp_path):
    """The corrected V and I magnitudes are the true ones when the V and I co-adds carry the
    same colour terms; with other terms in I the measured colour is off by the difference of
    the two co-adds' offsets, and the magnitudes by at most the largest term times that. Every
    flux column and its error are scaled alike."""
    rng = np.random.default_rng(seed)
    exposures, boxes, terms, pivots = _survey(rng, n_exposures)
    terms = {"v": terms, "i": terms if same else rng.uniform(-0.05, 0.05, n_exposures)}
    table, truth = _measured(rng, boxes, terms, pivots, 200)
    total = {b: table[f"flux_auto_{b}"] / 0.95 for b in ("v", "i")}
    colour_error = np.abs(-2.5 * np.log10(total["v"] / total["i"]) - truth["colour"])
    for b in ("v", "i"):
        path = tmp_path / f"exposures_{b}.json"  # rewritten for every example
        path.write_text(json.dumps(_with_terms(exposures, terms[b])))
        out, done = site_colour_correction(table, b.upper(), dual=table, exposures_path=path,
                                           wcs=grid_wcs(SIZE), settings=MapSettings())
        assert done.applied and done.n_corrected == len(table)
        assert done.colour_terms == {f"e{i}": pytest.approx(t) for i, t in enumerate(terms[b])}
        error = np.abs(30.0 - 2.5 * np.log10(out[f"flux_auto_{b}"] / 0.95) - truth[f"mag_{b}"])
        assert np.all(error <= np.max(np.abs(terms[b])) * colour_error + 1e-9)
        if same:
            assert np.all(error < 1e-9)
        for kind in ("auto", "aper3", "aper5", "aper10"):
            ratio = out[f"flux_{kind}_{b}"] / table[f"flux_{kind}_{b}"]
            assert np.allclose(ratio, out[f"flux_auto_{b}"] / table[f"flux_auto_{b}"])
            assert np.allclose(out[f"fluxerr_{kind}_{b}"] / table[f"fluxerr_{kind}_{b}"], ratio)
    assert np.array_equal(out["x_image"], table["x_image"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_exposures=st.integers(1, 6))
def test_offset_is_the_mean_flux_factor_over_the_covering_exposures(seed, n_exposures):
    rng = np.random.default_rng(seed)
    exposures, boxes, terms, pivots = _survey(rng, n_exposures)
    x, y = rng.uniform(1.0, SIZE, 300), rng.uniform(1.0, SIZE, 300)
    margin = np.min([np.minimum.reduce([np.abs(x - b[0]), np.abs(x - b[2]), np.abs(y - b[1]),
                                        np.abs(y - b[3])]) for b in boxes], axis=0)
    x, y = x[margin > 1e-6], y[margin > 1e-6]
    colour = np.where(rng.random(x.size) < 0.2, np.nan, rng.uniform(-0.5, 4.0, x.size))
    delta, found = colour_offsets(np.column_stack([x, y]), colour, exposures, grid_wcs(SIZE))
    cover = _covering(boxes, x, y)
    expected = np.array([2.5 * np.log10(np.mean(10 ** (0.4 * terms[c] * (k - pivots[c]))))
                         if np.isfinite(k) else 0.0 for c, k in zip(cover.T, colour, strict=True)])
    assert np.allclose(delta, expected, rtol=0, atol=1e-12)
    assert list(found) == [f"e{i}" for i in range(n_exposures)]


def test_colours_take_out_the_seeing_and_respect_snr_and_range():
    """(V-I) from the 5" fluxes with each band's enclosed fraction divided out; a band below
    colour_min_snr gives no colour, colours beyond the range are clipped."""
    fwhm_v, fwhm_i = np.array([1.0, 2.4, 1.5, 1.5, 1.5]), np.array([2.4, 1.0, 1.5, 1.5, 1.5])
    true_colour = np.array([0.8, 0.8, 0.8, 6.0, -2.0])
    ee_v, ee_i = (moffat_enclosed_fraction(f, BETA, 5.0) for f in (fwhm_v, fwhm_i))
    flux_i = np.full(5, 1000.0)
    flux_v = flux_i * 10 ** (-0.4 * true_colour)
    dual = Table({"flux_aper5_v": flux_v * ee_v, "flux_aper5_i": flux_i * ee_i,
                  "fluxerr_aper5_v": flux_v * ee_v / np.array([50, 50, 4, 50, 50]),
                  "fluxerr_aper5_i": flux_i * ee_i / 50, "psf_fwhm_v": fwhm_v,
                  "psf_fwhm_i": fwhm_i}, meta={"psf_beta_v": BETA, "psf_beta_i": BETA})
    colour = dual_colours(dual, MapSettings(colour_min_snr=5.0))
    assert colour[:2] == pytest.approx([0.8, 0.8], abs=1e-9)
    assert np.isnan(colour[2])
    assert colour[3:] == pytest.approx([4.0, -0.5])


def test_a_dual_row_without_colour_lends_none_and_no_position_matches_nothing():
    """The nearest dual row decides, even without a colour of its own (V too faint): its
    neighbour 0.6" away does not lend one; rows without a finite position match nothing."""
    wcs = grid_wcs(SIZE)
    ra, dec = wcs.wcs_pix2world([100.0, 101.5, 300.0], [100.0, 100.0, 300.0], 1)
    dual = Table({"ra": [ra[0] % 360, ra[1] % 360, np.nan], "dec": [dec[0], dec[1], dec[2]],
                  "flux_aper5_v": [10.0, 100.0, 100.0], "flux_aper5_i": [100.0, 100.0, 100.0],
                  "fluxerr_aper5_v": [5.0, 1.0, 1.0], "fluxerr_aper5_i": [1.0, 1.0, 1.0]})
    single = Table({"ra": [ra[0] % 360, ra[1] % 360, np.nan, ra[2] % 360],
                    "dec": [dec[0], dec[1], 0.0, dec[2]]})
    colour = source_colours(single, dual, MapSettings())
    assert np.isnan(colour[0]) and colour[1] == pytest.approx(0.0)
    assert np.isnan(colour[2]) and np.isnan(colour[3])
    assert np.array_equal(source_colours(dual, dual, MapSettings()), dual_colours(
        dual, MapSettings()), equal_nan=True)


def test_single_mode_sources_take_the_nearest_dual_colour():
    wcs = grid_wcs(SIZE)
    ra, dec = wcs.wcs_pix2world([100.0, 200.0], [100.0, 200.0], 1)
    dual = Table({"ra": ra % 360, "dec": dec, "flux_aper5_v": [100.0, 100.0],
                  "flux_aper5_i": [100.0, 251.18864315], "fluxerr_aper5_v": [1.0, 1.0],
                  "fluxerr_aper5_i": [1.0, 1.0]})
    # 0.8" and 1.6" from the first dual source (0.4" pixels), 0.4" from the second
    x, y = np.array([102.0, 104.0, 201.0]), np.array([100.0, 100.0, 200.0])
    sra, sdec = wcs.wcs_pix2world(x, y, 1)
    single = Table({"ra": sra % 360, "dec": sdec})
    colour = source_colours(single, dual, MapSettings(colour_match_arcsec=1.0))
    assert colour[0] == pytest.approx(0.0, abs=1e-9) and np.isnan(colour[1])
    assert colour[2] == pytest.approx(1.0, abs=1e-6)


def test_without_dual_table_nothing_changes(tmp_path):
    table = Table({"x_image": [1.0], "y_image": [1.0], "flux_auto_r": [5.0]})
    out, done = site_colour_correction(table, "R", dual=None, exposures_path=tmp_path / "none",
                                       wcs=grid_wcs(SIZE), settings=MapSettings())
    assert out is table and not done.applied and "dual" in done.reason
    assert done.as_dict() == {"applied": False, "reason": done.reason}


def test_exposures_without_colour_terms_name_the_file(tmp_path):
    rng = np.random.default_rng(3)
    exposures, boxes, terms, pivots = _survey(rng, 2)
    table, _ = _measured(rng, boxes, terms, pivots, 5)
    del exposures["exposures"][1]["colour_term"]
    path = tmp_path / "0000.000-62_R_exposures.json"
    path.write_text(json.dumps(exposures))
    with pytest.raises(InputError, match="0000.000-62_R_exposures.json.*'e1'.*colour_term"):
        site_colour_correction(table, "R", dual=table, exposures_path=path, wcs=grid_wcs(SIZE),
                               settings=MapSettings())
