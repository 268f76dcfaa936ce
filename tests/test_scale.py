"""Scaled exposures: ZP = 30 per amplifier and row, fitted WCS, coefficient cards, truth check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_zeropoint import (
    exposure_row,
    fit_exposure,
    three_sites,  # noqa: F401, F811  (the shared survey fixture)
    write_truth_inputs,
)
from truth_release import moffat_r50_px

from ks4release.exposure import read_ccd
from ks4release.reduction.scale import ScaleSettings, run_scale, scale_factors
from ks4release.reduction.zeropoint import (
    ZeropointSettings,
    aperture_correction,
    instrumental_mags,
    measure_stars,
    read_mask_ccd,
)
from ks4release.simulate import positions_at

AMPS = tuple((i * 72, (i + 1) * 72) for i in range(8))


@hsettings(max_examples=30, deadline=None)
@given(zp=st.lists(st.floats(20.0, 32.0), min_size=8, max_size=8),
       slope=st.lists(st.floats(-0.2, 0.2), min_size=8, max_size=8),
       row=st.integers(0, 575), amp=st.integers(0, 7))
def test_scale_factors_bring_every_amp_and_row_to_the_target(zp, slope, row, amp):
    """A pixel of flux 10**(-0.4 (m - zp(y))) ADU scales to 10**(-0.4 (m - 30))."""
    factor = scale_factors((576, 576), AMPS, np.array(zp), np.array(slope), 30.0)
    zp_row = zp[amp] + slope[amp] * row / 576
    adu = 10 ** (-0.4 * (20.0 - zp_row))
    x = AMPS[amp][0] + 5
    assert np.isclose(adu * factor[row, x], 10 ** (-0.4 * (20.0 - 30.0)), rtol=1e-9)


def test_scale_factors_check_lengths():
    with pytest.raises(ValueError, match="8 amplifiers"):
        scale_factors((576, 576), AMPS, np.zeros(7), np.zeros(8), 30.0)


@pytest.mark.parametrize("field, value", [("zp_target", 0.0), ("background_box_px", 4),
                                          ("background_filter", 0),
                                          ("background_mask_sigma", -1.0),
                                          ("background_grow_px", -1)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ScaleSettings(**{field: value})


def _scale(survey: Path, stem: str, work: Path, failed_ccd: str = "") -> tuple[Path, Table]:
    fit_exposure(survey, stem, work, failed_ccd)
    wcs, mask = work / f"{stem}_wcs.fits", work / f"{stem}_mask.fits"
    if failed_ccd:
        write_truth_inputs(survey, stem, work, failed_ccd)
    out = work / "scaled" / f"{stem}.fits"
    run_scale(survey / exposure_row(survey, stem)["file"], mask, wcs, work / f"{stem}_zp.ecsv",
              out, ScaleSettings())
    return out, Table.read(work / f"{stem}_zp.ecsv", format="ascii.ecsv")


def test_scaled_file_format(tiny_survey, tmp_path):
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][0])
    out, zp = _scale(tiny_survey, stem, tmp_path, failed_ccd="TT")
    raw_file = tiny_survey / exposure_row(tiny_survey, stem)["file"]
    seeing = float(exposure_row(tiny_survey, stem)["seeing_fwhm_arcsec"])
    with fits.open(out) as hdul, fits.open(raw_file) as raw:
        assert hdul[0].header["ZPTARGET"] == 30.0
        assert hdul[0].header["TILE"] == raw[0].header["TILE"]
        assert hdul[0].header["ZPFILE"] == f"{stem}_zp.ecsv"
        assert [h.name for h in hdul[1:]] == ["KK", "MM", "NN", "TT"]
        for hdu in hdul[1:]:
            h = hdu.header
            assert h["BITPIX"] == -32 and hdu.data.shape == (576, 576)
            assert h["CTYPE1"] == "RA---TAN-SIP" and "A_ORDER" in h
            assert h["ASTOK"] is (hdu.name != "TT")
            assert h["XTCORR"] is False  # these masks (truth's DR1 bits) record no crosstalk model
            rows = zp[zp["ccd"] == hdu.name]
            for r in rows:
                i = r["amp"]
                assert h[f"ZPA{i}"] == pytest.approx(r["zp_y0"])
                assert h[f"ZPB{i}"] == pytest.approx(r["zp_slope"])
                assert h[f"ZPAERR{i}"] > 0 and h[f"ZPBERR{i}"] > 0
                assert "[mag]" in h.comments[f"ZPA{i}"]
            factor = 10 ** (0.4 * (30.0 - rows["zp_y0"]))
            raw_h = raw[hdu.name].header
            assert h["GAIN"] == pytest.approx(raw_h["GAIN"] / np.median(factor), rel=0.1)
            assert h["SATURATE"] < raw_h["SATURATE"] * factor.max()
            assert h["SKYLEVEL"] > 0
            WCS(h)  # a usable celestial WCS for SWarp
            phot = zp.meta["photometry"].get(hdu.name)
            if phot is not None:  # the PSF size the co-add passes on to CLASS_STAR's seeing map
                assert h["PSFR50"] == pytest.approx(phot["r50_px"])
                assert "[pix]" in h.comments["PSFR50"]
                assert h["PSFR50"] == pytest.approx(moffat_r50_px(seeing, h), rel=0.15)


def test_scaled_pixels_are_background_subtracted_raw_times_factor(tiny_survey, tmp_path):
    stem = str(Table.read(tiny_survey / "truth" / "exposures.parquet")["stem"][1])
    out, zp = _scale(tiny_survey, stem, tmp_path)
    raw_file = tiny_survey / exposure_row(tiny_survey, stem)["file"]
    data, _ = read_ccd(raw_file, "KK")
    with fits.open(out) as hdul:
        scaled = hdul["KK"].data.astype(float)
        sky = hdul["KK"].header["SKYLEVEL"]
    kk = zp[zp["ccd"] == "KK"]
    factor = scale_factors(data.shape, AMPS, np.asarray(kk["zp_y0"]), np.asarray(kk["zp_slope"]),
                           30.0)
    # Undo the scaling: what remains is the raw image minus a smooth background.
    back = data - scaled / factor
    assert np.median(back * factor) == pytest.approx(sky, rel=0.02)
    assert np.std(np.diff(back, axis=1)) < 1.0  # smooth: no pixel noise left in it


def _truth_check(survey: Path, stem: str, work: Path) -> tuple[float, int, float]:
    """Median of (30 - 2.5 log10 flux) - (m_AB - c (V-I - pivot)) over isolated stars.

    Returns (median offset, number of stars, median zp_y0 error of the fit).
    """
    out, zp = _scale(survey, stem, work)
    row = exposure_row(survey, stem)
    band = str(row["band"])
    sources = Table.read(survey / "truth" / "sources.parquet")
    stars = sources[(sources["type"] == "star") & (sources[f"mag_{band}"] > 16.0)
                    & (sources[f"mag_{band}"] < 19.5)]
    ra, dec = positions_at(stars, row["mjd"])
    pivot, c_fit = zp.meta["colour_pivot"], zp["colour_term"][0]
    tables, truth_mags = [], []
    with fits.open(out) as hdul:
        for hdu in hdul[1:]:
            x, y = WCS(hdu.header).all_world2pix(ra, dec, 0, quiet=True)
            ny, nx = hdu.data.shape
            on = (x > 0) & (x < nx - 1) & (y > 0) & (y < ny - 1)
            bad = read_mask_ccd(work / f"{stem}_mask.fits", hdu.name, hdu.data.shape)
            t, _ = measure_stars(hdu.data, bad, x[on], y[on], gain=hdu.header["GAIN"],
                                 saturation=hdu.header["SATURATE"], settings=ZeropointSettings())
            keep = np.asarray(t["cut"]) == 0
            tables.append(t[keep])
            s = stars[on][keep]
            colour = np.asarray(s["mag_V"]) - np.asarray(s["mag_I"])
            truth_mags.append(np.asarray(s[f"mag_{band}"]) - c_fit * (colour - pivot))
    measured = vstack(tables)
    apcorr, _ = aperture_correction(measured, min_snr=50.0)
    mag, _ = instrumental_mags(measured, apcorr)
    diff = 30.0 + mag - np.concatenate(truth_mags)
    return (float(np.nanmedian(diff)), int(np.isfinite(diff).sum()),
            float(np.median(zp["zp_y0_err"])))


def test_scaled_photometry_matches_truth_tiny(tiny_survey, tmp_path):
    """1/16 scale: the offset stays within the fit's own error (2-8 XP stars per exposure)."""
    exposures = Table.read(tiny_survey / "truth" / "exposures.parquet")
    for stem in exposures["stem"][[0, 4]]:  # a V and an I exposure
        offset, n, zp_err = _truth_check(tiny_survey, str(stem), tmp_path)
        assert n >= 8, stem
        assert abs(offset) <= max(0.01, 2.0 * zp_err), (stem, offset, n, zp_err)


@pytest.mark.slow
def test_scaled_photometry_matches_truth_three_sites(three_sites, tmp_path):  # noqa: F811
    """1/4 scale, CTIO, SAAO, SSO: median offset of ~200 isolated stars within 0.01 mag."""
    root, stems = three_sites
    for stem in stems:
        offset, n, _ = _truth_check(root, stem, tmp_path)
        assert n >= 100, stem
        assert abs(offset) <= 0.01, (stem, exposure_row(root, stem)["site"], offset, n)
