"""Zero points per amplifier, fitted per tile and band: synthetic recovery and truth checks.

The simulated WCS and mask products are written here from the truth (same formats as the
astrometry and mask stages), and the detections by the detect stage's own task, so these tests
do not depend on the astrometry and mask stages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ks4release.errors import InputError
from ks4release.reduction.detect import DetectSettings, run_detect
from ks4release.reduction.zeropoint import VEGA_TO_AB, CcdGeometry, ZeropointSettings, ZpFlag
from ks4release.reduction.zeropoint_tile import (
    ExposureStars,
    fit_tile_zeropoints,
    link_stars,
    read_exposure_stars,
    run_exposure_stars,
    run_tile_zeropoints,
    select_tie_detections,
    stellar_half_light_radii,
)
from ks4release.simulate import SimulationConfig, plan_survey, write_exposure, write_sky

AMPS_576 = tuple((i * 72, (i + 1) * 72) for i in range(8))
#: The issue's requirement: per amplifier, RMS over Y of fitted minus true zp(y).
REQUIRED_RMS_MAG = 0.01
CCD_576 = CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0)


# --------------------------------------------------------------------------------------------
# Helpers shared with test_scale.py


def write_truth_inputs(survey: Path, stem: str, work: Path,
                       failed_ccd: str = "") -> tuple[Path, Path]:
    """``<work>/<stem>_wcs.fits`` (true TAN-SIP WCS + ASTOK) and ``_mask.fits`` (DR1 bits).

    ``failed_ccd`` gets ``ASTOK = F``.
    """
    work.mkdir(parents=True, exist_ok=True)
    wcs_list = fits.HDUList([fits.PrimaryHDU()])
    mask_list = fits.HDUList([fits.PrimaryHDU()])
    with fits.open(survey / "truth" / "masks" / f"{stem}_mask.fits") as truth:
        for hdu in truth[1:]:
            name = hdu.header["EXTNAME"]
            header = fits.Header([c for c in hdu.header.cards if c.keyword not in
                                  ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT",
                                   "GCOUNT", "EXTNAME")])
            header["ASTOK"] = (name != failed_ccd, "astrometry passed the quality criterion")
            wcs_list.append(fits.ImageHDU(header=header, name=name))
            mask_list.append(fits.ImageHDU(data=(hdu.data & 15).astype(np.uint8), name=name))
    wcs_path, mask_path = work / f"{stem}_wcs.fits", work / f"{stem}_mask.fits"
    wcs_list.writeto(wcs_path, overwrite=True)
    mask_list.writeto(mask_path, overwrite=True)
    return wcs_path, mask_path


def exposure_row(survey: Path, stem: str):
    """The truth row of one exposure (file, site, seeing, ...)."""
    table = Table.read(survey / "truth" / "exposures.parquet")
    return table[table["stem"] == stem][0]


def truth_rms_along_y(fit: Table, truth: Table, pivot: float) -> np.ndarray:
    """Per fitted amplifier: RMS over Y of (fitted zp(y) - true zp(y) - c_true * pivot).

    ``c_true * pivot`` is the colour-term convention offset: our zero points hold for a star of
    colour ``pivot`` ((V-I)_AB), the simulator's for colour 0.
    """
    y = np.linspace(0.0, 1.0, 101)
    out = np.empty(len(fit))
    for i, row in enumerate(fit):
        t = truth[(truth["ccd"] == row["ccd"]) & (truth["amp"] == row["amp"])][0]
        diff = ((row["zp_y0"] + row["zp_slope"] * y) - (t["zp_y0"] + t["zp_slope"] * y)
                - t["colour_term"] * pivot)
        out[i] = float(np.sqrt(np.mean(diff ** 2)))
    return out


def predicted_rms(fit: Table) -> np.ndarray:
    """RMS over Y expected from the reported errors (zp_y0 and slope errors, no covariance)."""
    return np.sqrt(np.asarray(fit["zp_y0_err"]) ** 2 + np.asarray(fit["zp_slope_err"]) ** 2 / 3)


def measure_truth_inputs(survey: Path, stem: str, work: Path, failed_ccd: str = "",
                         mask: bool = True) -> Path:
    """Detect and measure the tie stars of one simulated exposure (true WCS and mask, written
    by :func:`write_truth_inputs`); returns ``<work>/<stem>_zpstars.ecsv``."""
    wcs, mask_file = write_truth_inputs(survey, stem, work, failed_ccd)
    exposure = survey / exposure_row(survey, stem)["file"]
    sources = work / f"{stem}_sources.parquet"
    if not sources.exists():
        run_detect(exposure, mask_file, sources, DetectSettings())
    out = work / f"{stem}_zpstars{'' if mask else '_nomask'}.ecsv"
    run_exposure_stars(exposure=exposure, mask=mask_file if mask else "", sources=sources,
                       wcs=wcs, out_path=out, settings=ZeropointSettings())
    return out


def fit_tile(survey: Path, stems: list[str], work: Path, failed_ccd: str = ""
             ) -> dict[str, tuple[Table, Table]]:
    """Detect, then run the tile/band zero-point task on simulated exposures of one tile.

    Returns stem -> (fitted table, its truth rows); writes ``<work>/<stem>_zp.ecsv``.
    """
    stars = [measure_truth_inputs(survey, stem, work, failed_ccd) for stem in stems]
    outs = [work / f"{stem}_zp.ecsv" for stem in stems]
    run_tile_zeropoints(stars=stars, gaia_xp=survey / "refcat" / "gaia_xp.parquet",
                        out_paths=outs, settings=ZeropointSettings())
    truth = Table.read(survey / "truth" / "zeropoints.parquet")
    return {stem: (Table.read(out, format="ascii.ecsv"),
                   truth[truth["file"] == exposure_row(survey, stem)["file"]])
            for stem, out in zip(stems, outs, strict=True)}


def fit_exposure(survey: Path, stem: str, work: Path, failed_ccd: str = "") -> tuple[Table, Table]:
    """The zero-point task on one exposure alone (a tile/band of one); (fit, its truth rows)."""
    return fit_tile(survey, [stem], work, failed_ccd)[stem]


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_vega_to_ab_are_the_published_offsets():
    assert VEGA_TO_AB == {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}


@pytest.mark.parametrize("field, value", [
    ("aperture_r50", 0.0), ("correction_factor", 1.0), ("saturation_fraction", 1.5),
    ("prior_amp_offset_mag", -0.1), ("min_stars_amp", -1), ("error_floor_mag", -0.001),
    ("tie_match_arcsec", 0.0), ("tie_max_size_ratio", 0.5), ("tie_min_snr", -1.0),
    ("prior_star_colour", 0.0), ("apcorr_min_snr", -5.0)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ZeropointSettings(**{field: value})


def _exposure(stem: str, site: str, stars: Table, ccds=(CCD_576,)) -> ExposureStars:
    return ExposureStars(stem=stem, band="V", site=site, tile="T", ccds=tuple(ccds),
                         stars=stars, meta={"exposure": f"{stem}.fits"})


def _sky(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sky positions on a 10-arcsec grid (never within a linking radius of each other)."""
    cells = rng.choice(40 * 40, n, replace=False)
    return 10.0 + (cells % 40) * 10.0 / 3600, -60.0 + (cells // 40) * 10.0 / 3600


def _synthetic(rng, zp_y0, zp_slope, colour_term, n_per_amp, noise, pivot=0.4,
               ccd="KK", gain=1.0) -> tuple[Table, Table]:
    """One exposure's stars on a 576 x 576 CCD with the module's zero-point model, all anchored.

    Returns (stars, reference): the reference holds every star's true magnitude and colour.
    """
    n = 8 * n_per_amp
    amp = np.repeat(np.arange(8), n_per_amp)
    y = rng.uniform(0, 576, n)
    colour = rng.uniform(-0.2, 2.0, n)
    mag = rng.uniform(15.0, 18.0, n)
    zp = np.asarray(zp_y0)[amp] + np.asarray(zp_slope)[amp] * y / 576
    m_inst = (mag - zp - colour_term * (colour - pivot) + rng.normal(0, noise, n)
              + 2.5 * np.log10(gain))
    ra, dec = _sky(n, rng)
    stars = Table({"ccd": np.full(n, ccd), "amp": amp + 1, "x": amp * 72 + 36.0, "y": y,
                   "ra": ra, "dec": dec, "m_inst": m_inst, "m_inst_err": np.full(n, noise),
                   "use": np.ones(n, bool)})
    reference = Table({"ra": ra, "dec": dec, "mag": mag, "mag_err": np.full(n, 0.001),
                       "colour": colour})
    return stars, reference


@hsettings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), base=st.floats(25.0, 31.0),
       slope=st.floats(-0.1, 0.1), colour_term=st.floats(-0.05, 0.05))
def test_fit_recovers_injected_zeropoints_within_errors(seed, base, slope, colour_term):
    """Any injected per-amp zp_y0 / zp_slope comes back within 5 sigma of its reported error.

    (5 sigma: 17 comparisons x 25 examples per run must not fail by chance; 400 seeds gave a
    worst case of 3.6 sigma with the per-exposure fit, which this one reduces to.)
    """
    rng = np.random.default_rng(seed)
    zp_y0 = base + rng.normal(0, 0.01, 8)
    zp_slope = np.clip(slope + rng.normal(0, 0.02, 8), -0.1, 0.1)
    stars, reference = _synthetic(rng, zp_y0, zp_slope, colour_term, n_per_amp=40, noise=0.01)
    s = ZeropointSettings(error_floor_mag=0.0)
    fit = fit_tile_zeropoints([_exposure("e1", "CTIO", stars)], reference, s)["e1"]
    assert np.all(np.abs(fit["zp_y0"] - zp_y0) < 5 * fit["zp_y0_err"])
    assert np.all(np.abs(fit["zp_slope"] - zp_slope) < 5 * fit["zp_slope_err"])
    assert abs(fit["colour_term"][0] - colour_term) < 5 * fit["colour_term_err"][0]
    # Identifiable (40 stars per amplifier): within the 0.01 mag RMS along Y.
    y = np.linspace(0, 1, 101)[:, None]
    diff = (fit["zp_y0"] + fit["zp_slope"] * y) - (zp_y0 + zp_slope * y)
    assert np.all(np.sqrt(np.mean(np.asarray(diff) ** 2, axis=0)) <= 0.01)
    assert np.all(fit["n_stars"] >= 37) and np.all(fit["flag"] == 0)


def test_fit_pools_amps_without_stars_and_flags_them():
    """An amplifier without stars gets its CCD's model and the NO_STARS flag; gains enter."""
    rng = np.random.default_rng(3)
    zp_y0, zp_slope = np.full(8, 28.0), np.full(8, 0.05)
    kk, ref_kk = _synthetic(rng, zp_y0, zp_slope, 0.0, n_per_amp=30, noise=0.005)
    keep = kk["amp"] != 4
    kk, ref_kk = kk[keep], ref_kk[keep]
    # gain 2 e-/ADU: 2x fewer ADU, zp 0.75 mag lower
    mm, ref_mm = _synthetic(rng, zp_y0, zp_slope, 0.0, n_per_amp=30, noise=0.005, ccd="MM",
                            gain=2.0)
    ref_mm["dec"] += 0.2
    mm["dec"] += 0.2
    geoms = [CCD_576, CcdGeometry(name="MM", ny=576, amplifiers=AMPS_576, gain=2.0,
                                  dead_amps=(6,)),
             CcdGeometry(name="NN", ny=576, amplifiers=AMPS_576, gain=1.0, astrometry_ok=False)]
    exposure = _exposure("e1", "CTIO", vstack([kk, mm]), geoms)
    fit = fit_tile_zeropoints([exposure], vstack([ref_kk, ref_mm]), ZeropointSettings())["e1"]
    kk4 = fit[(fit["ccd"] == "KK") & (fit["amp"] == 4)][0]
    assert kk4["flag"] & ZpFlag.NO_STARS and kk4["n_stars"] == 0
    assert abs(kk4["zp_y0"] - 28.0) < 0.01 and abs(kk4["zp_slope"] - 0.05) < 0.02
    mm_rows = fit[fit["ccd"] == "MM"]
    assert np.allclose(mm_rows["zp_y0"][mm_rows["amp"] != 4], 28.0 - 2.5 * np.log10(2.0),
                       atol=0.01)
    assert mm_rows[mm_rows["amp"] == 6]["flag"][0] & ZpFlag.DEAD
    nn = fit[fit["ccd"] == "NN"]
    assert np.all(nn["flag"] & ZpFlag.NO_ASTROMETRY)
    # NN has no stars: it falls back on the exposure zero point through its gain (1.0).
    assert np.all(np.abs(nn["zp_y0"] + 0.5 * nn["zp_slope"] - 28.025) < 0.15)
    assert np.all(nn["zp_y0_err"] > 4 * kk4["zp_y0_err"])


def test_fit_rejects_outliers():
    rng = np.random.default_rng(5)
    stars, reference = _synthetic(rng, np.full(8, 27.0), np.zeros(8), 0.02, n_per_amp=20,
                                  noise=0.01)
    stars["m_inst"][::17] -= 0.5  # blends: too bright
    fit = fit_tile_zeropoints([_exposure("e1", "CTIO", stars)], reference,
                              ZeropointSettings())["e1"]
    assert fit.meta["n_stars_clipped"] >= len(stars[::17])
    assert np.all(np.abs(fit["zp_y0"] - 27.0) < 0.02)


def test_fit_needs_an_anchor():
    rng = np.random.default_rng(0)
    stars, reference = _synthetic(rng, np.zeros(8), np.zeros(8), 0.0, 3, 0.01)
    with pytest.raises(ValueError, match="no Gaia XP star"):
        fit_tile_zeropoints([_exposure("e1", "CTIO", stars)], reference[:0],
                            ZeropointSettings())


def test_fit_rejects_unknown_amplifier():
    rng = np.random.default_rng(1)
    stars, reference = _synthetic(rng, np.zeros(8), np.zeros(8), 0.0, 3, 0.01)
    stars["amp"][0] = 0
    with pytest.raises(ValueError, match="unknown CCD/amplifier"):
        fit_tile_zeropoints([_exposure("e1", "CTIO", stars)], reference, ZeropointSettings())


@hsettings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), n_exp=st.integers(1, 5))
def test_link_stars_recovers_every_star_seen_twice(seed, n, n_exp):
    """Jittered detections (< 0.3") of stars 10" apart link into one star each; a star seen in
    one exposure only, or twice in one exposure, is not linked."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = _sky(n, rng)
    truth = np.concatenate([np.arange(n)] * n_exp)
    exposure = np.repeat(np.arange(n_exp), n)
    seen = rng.random(truth.size) < 0.7
    truth, exposure = truth[seen], exposure[seen]
    jitter = rng.uniform(-0.2, 0.2, (2, truth.size)) / 3600
    ra = ra0[truth] + jitter[0] / np.cos(np.radians(dec0[truth]))
    dec = dec0[truth] + jitter[1]
    star = link_stars(ra, dec, exposure, 1.0)
    for t in range(n):
        mine = star[truth == t]
        if mine.size >= 2:
            assert np.all(mine == mine[0]) and mine[0] >= 0
            assert np.all(truth[star == mine[0]] == t)
        else:
            assert np.all(mine == -1)
    doubled = link_stars(np.r_[ra, ra[:1]], np.r_[dec, dec[:1]], np.r_[exposure, exposure[:1]],
                         1.0)
    assert np.all(doubled[np.r_[truth, truth[:1]] == truth[0]] == -1) if truth.size else True


def _dithered_survey(rng, n_exp, sites, n_star, anchored_fraction, noise):
    """Exposures of one CCD seeing the same stars at random rows and amplifiers (dithers).

    Every exposure has its own per-amp zp_y0 and zp_slope and its site's colour term; only
    ``anchored_fraction`` of the stars are in the reference. Returns (exposures, reference,
    truth per stem as (zp_y0, zp_slope, colour_term)).
    """
    colour_terms = {"CTIO": 0.02, "SAAO": 0.04, "SSO": -0.03}
    ra, dec = _sky(n_star, rng)
    mag = rng.uniform(15.0, 18.5, n_star)
    colour = rng.uniform(-0.2, 2.0, n_star)
    exposures, truth = [], {}
    for e in range(n_exp):
        site = sites[e % len(sites)]
        zp_y0 = 28.0 + rng.normal(0, 0.1) + rng.normal(0, 0.01, 8)
        zp_slope = np.clip(rng.uniform(-0.1, 0.1) + rng.normal(0, 0.02, 8), -0.1, 0.1)
        ct = colour_terms[site]
        on = rng.random(n_star) < 0.8
        amp = rng.integers(0, 8, on.sum())
        y = rng.uniform(0, 576, on.sum())
        m_inst = (mag[on] - zp_y0[amp] - zp_slope[amp] * y / 576 - ct * (colour[on] - 0.4)
                  + rng.normal(0, noise, on.sum()))
        stars = Table({"ccd": np.full(on.sum(), "KK"), "amp": amp + 1, "x": amp * 72 + 36.0,
                       "y": y, "ra": ra[on], "dec": dec[on], "m_inst": m_inst,
                       "m_inst_err": np.full(on.sum(), noise), "use": np.ones(on.sum(), bool)})
        exposures.append(_exposure(f"e{e}", site, stars))
        truth[f"e{e}"] = (zp_y0, zp_slope, ct)
    anchored = rng.random(n_star) < anchored_fraction
    reference = Table({"ra": ra[anchored], "dec": dec[anchored], "mag": mag[anchored],
                       "mag_err": np.full(anchored.sum(), 0.01), "colour": colour[anchored]})
    return exposures, reference, truth


def _rms_errors(fits_: dict[str, Table], truth: dict) -> np.ndarray:
    y = np.linspace(0, 1, 101)[:, None]
    out = []
    for stem, fit in fits_.items():
        zp_y0, zp_slope, _ = truth[stem]
        diff = (fit["zp_y0"] + fit["zp_slope"] * y) - (zp_y0 + zp_slope * y)
        out.append(np.sqrt(np.mean(np.asarray(diff) ** 2, axis=0)))
    return np.concatenate(out)


@pytest.mark.parametrize("sites, gain", [(("CTIO",), 0.9), (("CTIO", "SAAO"), 0.95)])
@hsettings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_tile_fit_ties_exposures_through_unanchored_stars(sites, gain, seed):
    """6 exposures, 1 star in 10 anchored: the common stars carry the amplifier pattern; errors
    are honest and smaller than fitting each exposure alone (by ``gain``: with two sites the
    unknown colours of the stars without Gaia XP cost part of it; seed 0 gives 0.0023 against
    0.0061 with one site, 0.0030 against 0.0062 with two)."""
    rng = np.random.default_rng(seed)
    exposures, reference, truth = _dithered_survey(rng, 6, sites, 300, 0.1, 0.01)
    s = ZeropointSettings()
    together = fit_tile_zeropoints(exposures, reference, s)
    alone = {e.stem: fit_tile_zeropoints([e], reference, s)[e.stem] for e in exposures}
    err_together, err_alone = _rms_errors(together, truth), _rms_errors(alone, truth)
    assert np.median(err_together) < gain * np.median(err_alone)
    assert np.max(err_together) <= 2 * REQUIRED_RMS_MAG
    for stem, fit in together.items():
        assert np.all(np.abs(fit["zp_y0"] + 0.5 * fit["zp_slope"]
                             - (truth[stem][0] + 0.5 * truth[stem][1]))
                      < 5 * np.hypot(fit["zp_y0_err"], 0.5 * fit["zp_slope_err"]))
        assert abs(fit["colour_term"][0] - truth[stem][2]) < 5 * fit["colour_term_err"][0]
        assert fit.meta["tile_exposures"] == [e.stem for e in exposures]


# --------------------------------------------------------------------------------------------
# Against the truth of simulated surveys


@pytest.fixture(scope="module")
def tiny_tile_fits(tiny_survey, tmp_path_factory) -> dict[str, dict[str, tuple[Table, Table]]]:
    """The tile/band fit of each band of ``tiny_survey`` (band -> stem -> (fit, truth))."""
    exposures = Table.read(tiny_survey / "truth" / "exposures.parquet")
    work = tmp_path_factory.mktemp("zp_tiny")
    return {band: fit_tile(tiny_survey, [str(s) for s in exposures["stem"]
                                         [exposures["band"] == band]], work)
            for band in ("V", "I")}


def test_tiny_survey_tile_fit_against_truth(tiny_survey, tiny_tile_fits):
    """1/16 scale, 4-5 exposures per band: honest errors and what the demo's stars allow.

    Measured (seed 1): median per-amp RMS along Y 0.020 (V, 4 CTIO exposures) and 0.024 (I,
    CTIO and SAAO), max 0.06-0.07 (the per-exposure fit of session 1: ~0.03). The issue's 0.01
    per amplifier is out of reach at this scale (see the xfail below).
    """
    for band, fits_ in tiny_tile_fits.items():
        rms_all = []
        for stem, (fit, truth) in fits_.items():
            live = (np.asarray(fit["flag"]) & ZpFlag.DEAD) == 0
            rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])
            assert np.all(rms[live] <= 3.0 * predicted_rms(fit)[live]), stem
            rms_all.append(rms[live])
            assert fit.meta["band"] == band and fit.meta["site"] in ("CTIO", "SAAO", "SSO")
            assert fit.meta["tile_exposures"] == list(fits_)
            assert fit["zp_y0"].unit == "mag" and "zp_y0 + zp_slope * y / ny" in fit.meta["model"]
            dead = fit[(fit["ccd"] == "NN") & (fit["amp"] == 6)][0]
            assert dead["flag"] & ZpFlag.DEAD and dead["n_stars"] == 0
        assert np.median(np.concatenate(rms_all)) <= 0.03, band


@pytest.mark.xfail(strict=True, reason="issue 4's 0.01 mag per amplifier: at 1/16 scale an "
                   "exposure holds ~1 usable star per amplifier; even with every star's true "
                   "magnitude known the demo's fit misses it (median 0.014-0.018, max 0.05-0.13)")
def test_tiny_survey_every_amp_within_requirement(tiny_tile_fits):
    for fits_ in tiny_tile_fits.values():
        for stem, (fit, truth) in fits_.items():
            live = (np.asarray(fit["flag"]) & ZpFlag.DEAD) == 0
            rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
            assert np.all(rms <= REQUIRED_RMS_MAG), (stem, np.round(np.sort(rms)[-5:], 4))


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 1/4-scale survey (seed 1, BVRI) with one B exposure from each of CTIO, SAAO and SSO.

    Only those three exposures are rendered (~15 s), once per session: test_scale.py reuses
    them (a marker file says the survey is complete). At 1/4 scale an amplifier strip holds
    0-10 usable Gaia XP stars.
    """
    base = tmp_path_factory.getbasetemp() / "zp_three_sites"
    root, done = base / "survey", base / "complete.txt"
    cfg = SimulationConfig(scale=0.25, bands=("B", "V", "R", "I"), seed=1)
    chosen = {}
    for e in plan_survey(cfg).exposures:
        chosen.setdefault(e.site, e)
    if not done.exists():
        sources = write_sky(cfg, root)
        for e in chosen.values():
            write_exposure(e, sources, cfg, root)
        done.write_text("\n".join(e.stem for e in chosen.values()))
    return root, [e.stem for e in chosen.values()]


def _site_fits(three_sites, tmp_path):
    root, stems = three_sites
    for stem in stems:
        fit, truth = fit_exposure(root, stem, tmp_path)
        live = (np.asarray(fit["flag"]) & ZpFlag.DEAD) == 0
        yield exposure_row(root, stem)["site"], fit, truth, live


@pytest.mark.slow
def test_three_sites_zeropoints_against_truth(three_sites, tmp_path):
    """Every site, each exposure fitted alone: colour term, honest errors, median per-amp RMS."""
    sites = set()
    for site, fit, truth, live in _site_fits(three_sites, tmp_path):
        sites.add(site)
        rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
        assert abs(fit["colour_term"][0] - truth["colour_term"][0]) < 0.015, site
        # Honest errors: a 2-sigma excursion is allowed for one amplifier in 20 (seed 1 has one
        # of 93 at 2.0 sigma: CCD KK amplifier 6 of the CTIO exposure, 2 stars).
        ratio = rms / predicted_rms(fit)[live]
        assert np.mean(ratio > 2.0) <= 0.05 and np.all(ratio <= 3.0), (site, np.sort(ratio)[-3:])
        assert np.median(rms) <= 0.015, site
        assert fit.meta["n_stars_used"] >= 80, site
    assert sites == {"CTIO", "SAAO", "SSO"}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 4's 0.01 mag per amplifier needs more Gaia XP "
                   "stars per amplifier than a 1/4-scale strip of a single exposure holds "
                   "(0-10); see report")
def test_three_sites_every_amp_within_requirement(three_sites, tmp_path):
    for site, fit, truth, live in _site_fits(three_sites, tmp_path):
        rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
        assert np.all(rms <= REQUIRED_RMS_MAG), (site, np.round(np.sort(rms)[-5:], 4))


@pytest.fixture(scope="module")
def crowded_field(tmp_path_factory) -> tuple[Path, str]:
    """One CTIO B exposure of a 1/4-scale survey with 24 times the demo's star counts (~45
    sources per arcmin2 in all; DR1's dense validation tile 0294 holds 54, the demo ~10)."""
    root = tmp_path_factory.mktemp("zp_crowded") / "survey"
    cfg = SimulationConfig(scale=0.25, bands=("B",), seed=1, star_density_factor=24.0)
    exposure = next(e for e in plan_survey(cfg).exposures if e.site == "CTIO")
    write_exposure(exposure, write_sky(cfg, root), cfg, root)
    return root, exposure.stem


@pytest.mark.slow
def test_crowded_field_zeropoints_against_truth(crowded_field, tmp_path):
    """In a crowded field the wings of neighbours lift the background mesh and fill the
    curve-of-growth aperture: before the background was measured without the sources and the
    large aperture had to be free of neighbours, the zero points were 0.15 mag off (aperture
    correction 1.21 instead of ~1.05). Measured now: median per-amp RMS 0.006, max 0.012."""
    root, stem = crowded_field
    fit, truth = fit_exposure(root, stem, tmp_path)
    live = (np.asarray(fit["flag"]) & ZpFlag.DEAD) == 0
    rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
    assert 1.02 < fit.meta["apcorr"] < 1.07 and fit.meta["n_apcorr"] >= 50
    assert np.median(rms) <= REQUIRED_RMS_MAG and rms.max() <= 2 * REQUIRED_RMS_MAG
    assert np.all(rms <= 3.0 * predicted_rms(fit)[live])
    assert abs(fit["colour_term"][0] - truth["colour_term"][0]) < 0.015


def test_failed_astrometry_ccd_is_not_used(tiny_survey, tmp_path):
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][0])
    fit, _ = fit_exposure(tiny_survey, stem, tmp_path, failed_ccd="MM")
    mm = fit[fit["ccd"] == "MM"]
    assert np.all(mm["flag"] & ZpFlag.NO_ASTROMETRY) and np.all(mm["n_stars"] == 0)
    assert "MM" not in fit.meta["photometry"]


def test_runs_without_a_mask(tiny_survey, tmp_path):
    """``mask=""``: no pixel is excluded; the fit agrees with the masked one at exposure level."""
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][1])
    masked, _ = fit_exposure(tiny_survey, stem, tmp_path)
    out = tmp_path / "nomask_zp.ecsv"
    stars = measure_truth_inputs(tiny_survey, stem, tmp_path, mask=False)
    run_tile_zeropoints(stars=[stars], gaia_xp=tiny_survey / "refcat" / "gaia_xp.parquet",
                        out_paths=[out], settings=ZeropointSettings())
    plain = Table.read(out, format="ascii.ecsv")
    assert not np.any(np.asarray(plain["flag"]) & ZpFlag.DEAD)
    assert abs(np.median(plain["zp_y0"]) - np.median(masked["zp_y0"])) < 0.01


def test_wcs_file_without_astok_is_an_input_error(tiny_survey, tmp_path):
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][0])
    fit_exposure(tiny_survey, stem, tmp_path)
    wcs = tmp_path / f"{stem}_wcs.fits"
    with fits.open(wcs, mode="update") as hdul:
        del hdul["NN"].header["ASTOK"]
    with pytest.raises(InputError, match="'NN': ASTOK is missing"):
        run_exposure_stars(exposure=tiny_survey / exposure_row(tiny_survey, stem)["file"],
                           mask=tmp_path / f"{stem}_mask.fits",
                           sources=tmp_path / f"{stem}_sources.parquet", wcs=wcs,
                           out_path=tmp_path / "x.ecsv", settings=ZeropointSettings())
    assert not (tmp_path / "x.ecsv").exists()


def test_mismatched_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="one entry per exposure"):
        run_tile_zeropoints(stars=[tmp_path / "a_zpstars.ecsv"], gaia_xp=tmp_path / "xp.parquet",
                            out_paths=[], settings=ZeropointSettings())


def test_stars_file_without_its_meta_is_an_input_error(tmp_path):
    path = tmp_path / "e1_zpstars.ecsv"
    Table({"x": [1.0]}).write(path, format="ascii.ecsv")
    with pytest.raises(InputError, match="e1_zpstars.ecsv.*meta key 'stem' is missing"):
        read_exposure_stars(path)


def test_stellar_half_light_radius_resists_galaxies_and_sparse_ccds():
    """The stellar locus, not a median: on a CCD with 12 bright stars and 8 galaxies it is the
    stars' radius; a CCD with two bright detections (one a galaxy) gets the exposure's."""
    rng = np.random.default_rng(3)
    star_kk = rng.normal(3.0, 0.03, 12)
    galaxy_kk = rng.uniform(3.6, 8.0, 8)
    sizes = np.concatenate([star_kk, galaxy_kk, [3.02, 7.5]])
    ccds = ["KK"] * 20 + ["MM"] * 2
    detections = Table({"ccd": ccds, "snr": np.full(22, 80.0), "flux_radius": sizes,
                        "flags": np.zeros(22, int), "imaflags": np.zeros(22, int)})
    radii = stellar_half_light_radii(detections, ZeropointSettings())
    assert radii["KK"] == pytest.approx(3.0, abs=0.03)
    assert radii["MM"] == pytest.approx(3.0, abs=0.04)  # the exposure's, not 5.26
    assert np.median(sizes[20:]) > 5.0
    keep = select_tie_detections(detections, ZeropointSettings())
    assert keep[:12].all() and not keep[12:20].any() and list(keep[20:]) == [True, False]
