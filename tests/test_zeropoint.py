"""Zero-point fit per amplifier against Gaia XP: synthetic recovery and comparison with truth.

The simulated WCS and mask products are written here from the truth (same formats as the
astrometry and mask stages), so these tests do not depend on those stages.
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
from ks4release.reduction.zeropoint import (
    VEGA_TO_AB,
    CcdGeometry,
    ZeropointSettings,
    ZpFlag,
    fit_zeropoints,
    run_zeropoint,
)
from ks4release.simulate import SimulationConfig, plan_survey, write_exposure, write_sky

AMPS_576 = tuple((i * 72, (i + 1) * 72) for i in range(8))
#: The issue's requirement: per amplifier, RMS over Y of fitted minus true zp(y).
REQUIRED_RMS_MAG = 0.01


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


def fit_exposure(survey: Path, stem: str, work: Path, failed_ccd: str = "") -> tuple[Table, Table]:
    """Run the zero-point task on one simulated exposure; (fit, its truth rows)."""
    wcs, mask = write_truth_inputs(survey, stem, work, failed_ccd)
    row = exposure_row(survey, stem)
    out = work / f"{stem}_zp.ecsv"
    run_zeropoint(survey / row["file"], mask, wcs, survey / "refcat" / "gaia_xp.parquet", out,
                  ZeropointSettings())
    truth = Table.read(survey / "truth" / "zeropoints.parquet")
    return Table.read(out, format="ascii.ecsv"), truth[truth["file"] == row["file"]]


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_vega_to_ab_are_the_published_offsets():
    assert VEGA_TO_AB == {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}


@pytest.mark.parametrize("field, value", [
    ("aperture_r50", 0.0), ("correction_factor", 1.0), ("saturation_fraction", 1.5),
    ("prior_amp_offset_mag", -0.1), ("min_stars_amp", -1), ("error_floor_mag", -0.001)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ZeropointSettings(**{field: value})


def _synthetic_stars(rng, zp_y0, zp_slope, colour_term, n_per_amp, noise, pivot=0.4):
    """Star lists on one 576 x 576 CCD with the zero-point model of the module docstring."""
    rows = []
    for a in range(8):
        y = rng.uniform(0, 576, n_per_amp)
        colour = rng.uniform(-0.2, 2.0, n_per_amp)
        m_ref = rng.uniform(15.0, 18.0, n_per_amp)
        zp = zp_y0[a] + zp_slope[a] * y / 576
        m_inst = m_ref - zp - colour_term * (colour - pivot) + rng.normal(0, noise, n_per_amp)
        for k in range(n_per_amp):
            rows.append(("KK", a + 1, y[k], m_inst[k], noise, m_ref[k], 0.0, colour[k]))
    return Table(rows=rows, names=("ccd", "amp", "y", "m_inst", "m_inst_err", "m_ref",
                                   "m_ref_err", "colour"))


@hsettings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), base=st.floats(25.0, 31.0),
       slope=st.floats(-0.1, 0.1), colour_term=st.floats(-0.05, 0.05))
def test_fit_recovers_injected_zeropoints_within_errors(seed, base, slope, colour_term):
    """Any injected per-amp zp_y0 / zp_slope comes back within 5 sigma of its reported error.

    (5 sigma: 17 comparisons x 25 examples per run must not fail by chance; 400 seeds gave a
    worst case of 3.6 sigma.)
    """
    rng = np.random.default_rng(seed)
    zp_y0 = base + rng.normal(0, 0.01, 8)
    zp_slope = np.clip(slope + rng.normal(0, 0.02, 8), -0.1, 0.1)
    stars = _synthetic_stars(rng, zp_y0, zp_slope, colour_term, n_per_amp=40, noise=0.01)
    s = ZeropointSettings(error_floor_mag=0.0)
    fit = fit_zeropoints(stars, [CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0)],
                         s)
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
    stars = _synthetic_stars(rng, zp_y0, zp_slope, 0.0, n_per_amp=30, noise=0.005)
    stars = stars[stars["amp"] != 4]
    other = stars.copy()
    other["ccd"] = "MM"
    other["m_inst"] += 2.5 * np.log10(2.0)  # gain 2 e-/ADU: 2x fewer ADU, zp 0.75 mag lower
    geoms = [CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0),
             CcdGeometry(name="MM", ny=576, amplifiers=AMPS_576, gain=2.0, dead_amps=(6,)),
             CcdGeometry(name="NN", ny=576, amplifiers=AMPS_576, gain=1.0, astrometry_ok=False)]
    fit = fit_zeropoints(vstack([stars, other]), geoms, ZeropointSettings())
    kk4 = fit[(fit["ccd"] == "KK") & (fit["amp"] == 4)][0]
    assert kk4["flag"] & ZpFlag.NO_STARS and kk4["n_stars"] == 0
    assert abs(kk4["zp_y0"] - 28.0) < 0.01 and abs(kk4["zp_slope"] - 0.05) < 0.02
    mm = fit[fit["ccd"] == "MM"]
    assert np.allclose(mm["zp_y0"][mm["amp"] != 4], 28.0 - 2.5 * np.log10(2.0), atol=0.01)
    assert mm[mm["amp"] == 6]["flag"][0] & ZpFlag.DEAD
    nn = fit[fit["ccd"] == "NN"]
    assert np.all(nn["flag"] & ZpFlag.NO_ASTROMETRY)
    # NN has no stars: it falls back on the exposure zero point through its gain (1.0).
    assert np.all(np.abs(nn["zp_y0"] + 0.5 * nn["zp_slope"] - 28.025) < 0.15)
    assert np.all(nn["zp_y0_err"] > 5 * kk4["zp_y0_err"])


def test_fit_rejects_outliers():
    rng = np.random.default_rng(5)
    stars = _synthetic_stars(rng, np.full(8, 27.0), np.zeros(8), 0.02, n_per_amp=20,
                             noise=0.01)
    stars["m_inst"][::17] -= 0.5  # blends: too bright
    fit = fit_zeropoints(stars, [CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0)],
                         ZeropointSettings())
    assert fit.meta["n_stars_clipped"] >= len(stars[::17])
    assert np.all(np.abs(fit["zp_y0"] - 27.0) < 0.02)


def test_fit_needs_stars():
    empty = _synthetic_stars(np.random.default_rng(0), np.zeros(8), np.zeros(8), 0.0, 0, 0.01)
    with pytest.raises(ValueError, match="no usable reference star"):
        fit_zeropoints(empty, [CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0)],
                       ZeropointSettings())


# --------------------------------------------------------------------------------------------
# Against the truth of simulated surveys


def test_tiny_survey_zeropoints_against_truth(tiny_survey, tmp_path):
    """1/16 scale: 5-20 usable XP stars per exposure; what is identifiable is met, honestly.

    Per amplifier the 0.01 mag requirement cannot be met here (most 72-px strips hold no XP
    star); we check that the reported errors are honest (truth within 3x of the predicted RMS),
    that the exposure-level zero point is right (median over amps), and the file's content.
    """
    exposures = Table.read(tiny_survey / "truth" / "exposures.parquet")
    medians = []
    for stem in exposures["stem"]:
        fit, truth = fit_exposure(tiny_survey, str(stem), tmp_path)
        live = (np.asarray(fit["flag"]) & ZpFlag.DEAD) == 0
        rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])
        assert np.all(rms[live] <= 3.0 * predicted_rms(fit)[live]), stem
        medians.append(np.median(rms[live]))
        assert fit.meta["band"] in ("V", "I") and fit.meta["site"] in ("CTIO", "SAAO", "SSO")
        assert fit["zp_y0"].unit == "mag" and "zp_y0 + zp_slope * y / ny" in fit.meta["model"]
        dead = fit[(fit["ccd"] == "NN") & (fit["amp"] == 6)][0]
        assert dead["flag"] & ZpFlag.DEAD and dead["n_stars"] == 0
    assert np.median(medians) <= 0.03


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
    """Every site: colour term, honest errors, median per-amp RMS, well-constrained amps."""
    sites = set()
    for site, fit, truth, live in _site_fits(three_sites, tmp_path):
        sites.add(site)
        rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
        assert abs(fit["colour_term"][0] - truth["colour_term"][0]) < 0.015, site
        assert np.all(rms <= 2.0 * predicted_rms(fit)[live]), site
        assert np.median(rms) <= 0.015, site
        assert fit.meta["n_stars_used"] >= 80, site
    assert sites == {"CTIO", "SAAO", "SSO"}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 4's 0.01 mag per amplifier needs more Gaia XP "
                   "stars per amplifier than a 1/4-scale strip holds (0-10); see report")
def test_three_sites_every_amp_within_requirement(three_sites, tmp_path):
    for site, fit, truth, live in _site_fits(three_sites, tmp_path):
        rms = truth_rms_along_y(fit, truth, fit.meta["colour_pivot"])[live]
        assert np.all(rms <= REQUIRED_RMS_MAG), (site, np.round(np.sort(rms)[-5:], 4))


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
    wcs = tmp_path / f"{stem}_wcs.fits"
    out = tmp_path / "nomask_zp.ecsv"
    run_zeropoint(tiny_survey / exposure_row(tiny_survey, stem)["file"], "", wcs,
                  tiny_survey / "refcat" / "gaia_xp.parquet", out, ZeropointSettings())
    plain = Table.read(out, format="ascii.ecsv")
    assert not np.any(np.asarray(plain["flag"]) & ZpFlag.DEAD)
    assert abs(np.median(plain["zp_y0"]) - np.median(masked["zp_y0"])) < 0.01


def test_wcs_file_without_astok_is_an_input_error(tiny_survey, tmp_path):
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][0])
    wcs, mask = write_truth_inputs(tiny_survey, stem, tmp_path)
    with fits.open(wcs, mode="update") as hdul:
        del hdul["NN"].header["ASTOK"]
    with pytest.raises(InputError, match="'NN': ASTOK is missing"):
        run_zeropoint(tiny_survey / exposure_row(tiny_survey, stem)["file"], mask, wcs,
                      tiny_survey / "refcat" / "gaia_xp.parquet", tmp_path / "x.ecsv",
                      ZeropointSettings())
    assert not (tmp_path / "x.ecsv").exists()


def test_fit_rejects_unknown_amplifier():
    stars = _synthetic_stars(np.random.default_rng(1), np.zeros(8), np.zeros(8), 0.0, 3, 0.01)
    stars["amp"][0] = 0
    with pytest.raises(ValueError, match="unknown CCD/amplifier"):
        fit_zeropoints(stars, [CcdGeometry(name="KK", ny=576, amplifiers=AMPS_576, gain=1.0)],
                       ZeropointSettings())
