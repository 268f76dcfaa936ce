"""Single-epoch detection with sep: synthetic images with known stars, and the demo survey."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from ks4release.errors import InputError
from ks4release.exposure import CcdInfo
from ks4release.layout import sources_path
from ks4release.reduction.detect import (
    SOURCE_COLUMNS,
    DetectSettings,
    detect_ccd,
    read_mask,
    run_detect,
)
from ks4release.simulate.sky import positions_at

SHAPE = (200, 240)
FWHM_PX = 5.0
SATURATION = 50000.0


def _info(shape=SHAPE) -> CcdInfo:
    width = shape[1] // 8
    return CcdInfo(name="KK", shape=shape, gain=1.5, read_noise=9.0, saturation=SATURATION,
                   amplifiers=tuple((i * width, (i + 1) * width) for i in range(8)),
                   center_ra=0.0, center_dec=-62.0)


def _image(stars: list[tuple[float, float, float]], seed: int = 0) -> np.ndarray:
    """Sky 1000 ADU + Gaussian stars (x, y, total flux) + noise, clipped at SATURATION."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    sigma = FWHM_PX / 2.3548
    img = np.full(SHAPE, 1000.0)
    for x, y, flux in stars:
        img += flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2)
                                                       / (2 * sigma**2))
    img = rng.poisson(img / 1.5) * 1.5 + rng.normal(0.0, 6.0, SHAPE)
    return np.minimum(img, SATURATION).astype(np.float32)


STARS = [(40.3, 50.7, 2e5), (120.55, 60.2, 1e5), (200.1, 150.9, 5e4), (80.8, 160.35, 3e5)]


def test_settings_validation_names_the_field():
    with pytest.raises(ValueError, match="thresh_sigma"):
        DetectSettings(thresh_sigma=0.0)
    with pytest.raises(ValueError, match="mask_bits"):
        DetectSettings(mask_bits=300)


def test_windowed_centroids_fluxes_and_fwhm_of_known_stars():
    table = detect_ccd(_image(STARS), np.zeros(SHAPE, np.uint8), _info(), DetectSettings())
    assert table.colnames == [c[0] for c in SOURCE_COLUMNS]
    tree = cKDTree(np.column_stack([table["x"], table["y"]]))
    for x, y, flux in STARS:
        dist, i = tree.query([x, y])
        assert dist < 0.05, (x, y, dist)
        row = table[i]
        assert row["flags"] == 0
        assert row["amp"] == int(x // (SHAPE[1] // 8))
        # 5 arcsec aperture = 6.33 px radius holds 1 - exp(-r^2 / 2 sigma^2) of a Gaussian.
        sigma = FWHM_PX / 2.3548
        frac = 1 - np.exp(-(2.5 / 0.3949) ** 2 / (2 * sigma**2))
        assert row["flux"] == pytest.approx(frac * flux / 1.0, rel=0.03)
        assert row["flux_auto"] == pytest.approx(flux, rel=0.06)
        assert row["fwhm_px"] == pytest.approx(FWHM_PX, rel=0.1)
        assert row["snr"] > 50
        assert 0 < row["x_err"] < 0.1
    assert table["x"].unit == u.pix and table["flux"].unit == u.adu


def test_saturated_star_is_flagged():
    stars = STARS + [(150.2, 120.4, 5e7)]
    table = detect_ccd(_image(stars), np.zeros(SHAPE, np.uint8), _info(), DetectSettings())
    i = int(np.argmin(np.hypot(table["x"] - 150.2, table["y"] - 120.4)))
    assert table["flags"][i] & 4
    others = [int(np.argmin(np.hypot(table["x"] - x, table["y"] - y))) for x, y, _ in STARS]
    assert not np.any(np.asarray(table["flags"][others]) & 4)


def test_masked_pixels_hide_a_star_and_set_imaflags():
    bits = np.zeros(SHAPE, np.uint8)
    bits[40:62, 30:52] = 8  # the whole first star: a dead amplifier
    bits[58:61, 118:121] = 1  # a cosmic-ray mark on the edge of the second star
    table = detect_ccd(_image(STARS), bits, _info(), DetectSettings())
    assert np.min(np.hypot(table["x"] - 40.3, table["y"] - 50.7)) > 5
    i = int(np.argmin(np.hypot(table["x"] - 120.55, table["y"] - 60.2)))
    assert table["imaflags"][i] & 1
    assert table["flags"][i] & 1


def test_no_source_gives_an_empty_table_with_every_column():
    rng = np.random.default_rng(1)
    flat = (1000.0 + rng.normal(0, 5.0, SHAPE)).astype(np.float32)
    table = detect_ccd(flat, np.zeros(SHAPE, np.uint8), _info(),
                       DetectSettings(thresh_sigma=50.0))
    assert len(table) == 0
    assert table.colnames == [c[0] for c in SOURCE_COLUMNS]


def test_read_mask(tmp_path):
    assert not read_mask("", "KK", (4, 5)).any()
    path = tmp_path / "mask.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 5), np.uint8), name="KK")]
                 ).writeto(path)
    assert read_mask(path, "KK", (4, 5)).sum() == 20
    with pytest.raises(InputError, match="no mask extension 'MM'"):
        read_mask(path, "MM", (4, 5))
    with pytest.raises(InputError, match="mask shape"):
        read_mask(path, "KK", (5, 5))


def truth_dr1_mask(survey, stem: str, out) -> None:
    """A mask file with DR1's bits (1|2|4|8) from the truth masks (the masks stage stand-in)."""
    with fits.open(survey / "truth" / "masks" / f"{stem}_mask.fits") as hdul:
        hdus = [fits.PrimaryHDU()] + [fits.ImageHDU((h.data & 15).astype(np.uint8), name=h.name)
                                      for h in hdul[1:]]
    fits.HDUList(hdus).writeto(out)


def test_run_detect_on_the_demo_survey_matches_true_positions(tiny_survey, tmp_path):
    exposure = sorted((tiny_survey / "raw").rglob("*_V_01.fits"))[0]
    stem = exposure.stem
    mask = tmp_path / "mask.fits"
    truth_dr1_mask(tiny_survey, stem, mask)
    out = sources_path(tmp_path, stem)
    run_detect(exposure, mask, out, DetectSettings())
    table = Table.read(out)
    assert table.colnames == [c[0] for c in SOURCE_COLUMNS]
    assert table["x"].description.startswith("Windowed centroid x")
    assert set(table["ccd"]) == {"KK", "MM", "NN", "TT"}
    assert table.meta["exposure"] == exposure.name and table.meta["band"] == "V"
    truth = Table.read(tiny_survey / "truth" / "sources.parquet")
    ra, dec = positions_at(truth, table.meta["mjd"])
    star = np.asarray(truth["type"]) == "star"
    dx, dy = [], []
    with fits.open(tiny_survey / "truth" / "masks" / f"{stem}_mask.fits") as hdul:
        for ccd in ("KK", "MM", "NN", "TT"):
            xt, yt = WCS(hdul[ccd].header).all_world2pix(ra, dec, 0)
            rows = table[(table["ccd"] == ccd) & (table["snr"] > 50) & (table["flags"] == 0)]
            dist, i = cKDTree(np.column_stack([xt, yt])).query(
                np.column_stack([rows["x"], rows["y"]]))
            sel = (dist < 1.0) & star[i]
            dx.append(np.asarray(rows["x"])[sel] - xt[i[sel]])
            dy.append(np.asarray(rows["y"])[sel] - yt[i[sel]])
    dx, dy = np.concatenate(dx), np.concatenate(dy)
    assert dx.size >= 10
    assert np.sqrt(np.mean(dx**2)) < 0.06 and np.sqrt(np.mean(dy**2)) < 0.06


def test_reported_position_errors_match_the_scatter_over_noise_realisations():
    """x_err and y_err (ERRX2WIN) predict how far the windowed centroid of a faint star moves
    between noise realisations; the isophotal barycentre's error, reported before, was about
    half of it at S/N 10-20."""
    stars = [(20.3 + 45 * i, 50.7 + 45 * (i % 3), 5000.0) for i in range(5)]
    dx, dy, ex, ey, snr = [], [], [], [], []
    for seed in range(40):
        table = detect_ccd(_image(stars, seed=seed), np.zeros(SHAPE, np.uint8), _info(),
                           DetectSettings())
        dist, i = cKDTree(np.column_stack([table["x"], table["y"]])).query(
            [(x, y) for x, y, _ in stars])
        found = dist < 2.0
        rows = table[i[found]]
        dx.append(np.asarray(rows["x"]) - np.array([x for x, _, _ in stars])[found])
        dy.append(np.asarray(rows["y"]) - np.array([y for _, y, _ in stars])[found])
        ex.append(np.asarray(rows["x_err"]))
        ey.append(np.asarray(rows["y_err"]))
        snr.append(np.asarray(rows["snr"]))
    dx, dy, ex, ey = (np.concatenate(a) for a in (dx, dy, ex, ey))
    assert dx.size >= 150 and 8 < np.median(np.concatenate(snr)) < 25
    for d, e in ((dx, ex), (dy, ey)):
        z = d / e
        assert 0.8 < np.std(z) < 1.25, np.std(z)


def test_extraction_limits_allow_objects_larger_than_seps_default():
    """One object of ~400,000 pixels above threshold (a halo of 250 px sigma) stops sep at its
    default 300,000-pixel stack; with kmtnet.sex's stack it is extracted. The stack never
    exceeds the image (sep allocates it up front)."""
    import sep

    from ks4release.reduction.sep_objects import KMTNET_PIXEL_STACK, set_extraction_limits

    yy, xx = np.mgrid[:1200, :1200]
    image = (np.random.default_rng(1).normal(0.0, 1.0, yy.shape)
             + 50.0 * np.exp(-((xx - 600) ** 2 + (yy - 600) ** 2) / (2 * 250.0**2)))
    image = image.astype(np.float32)
    default = sep.get_extract_pixstack()
    try:
        sep.set_extract_pixstack(300_000)
        with pytest.raises(Exception, match="pixel buffer full"):
            sep.extract(image, 3.0, err=1.0)
        set_extraction_limits(image.size)
        assert sep.get_extract_pixstack() == min(KMTNET_PIXEL_STACK, image.size)
        assert len(sep.extract(image, 3.0, err=1.0)) >= 1
        set_extraction_limits(100)
        assert sep.get_extract_pixstack() == 100
    finally:
        sep.set_extract_pixstack(default)  # sep's limits are process-wide
