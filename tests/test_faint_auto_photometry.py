"""MAG_AUTO of faint point sources against truth: measured by the photometry, corrected for the
light outside their Kron ellipses by :func:`kron_loss_correction`, and compared with bright stars.

At low S/N a star's Kron ellipse shrinks and misses more of the PSF's wings than a bright star's
(whose loss the AUTO zero point absorbs); the correction restores that light from a Moffat model
of the PSF. Here about 1,200 faint and 200 bright Moffat stars (FWHM 4 px, beta 3) are injected
at known positions and fluxes on white noise and on noise correlated as a LANCZOS3 resampling
correlates a co-add's, and the faint stars' median MAG_AUTO - true is compared with the bright
stars'. The noise in a fixed circle of 2 FWHM around each true position is taken off FLUX_AUTO
first (a control variate: zero on average, it shares most of the Kron ellipse's noise), which
brings the medians' standard errors from ~0.002 to ~0.0006 mag, so that a 0.004 mag tolerance
can be held.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from ks4release.reduction.moffat import integrated_moffat
from ks4release.reduction.photometry import measure_single
from ks4release.reduction.postprocess import kron_loss_correction
from ks4release.reduction.stellarity import DEFAULT_NNW, read_nnw
from ks4release.settings import PhotometrySettings, PostprocessSettings

PIXEL_ARCSEC, SEEING_ARCSEC, BETA = 0.4, 1.6, 3.0
FWHM_PX = SEEING_ARCSEC / PIXEL_ARCSEC
SIDE, STEP, STAMP_HALF = 1056, 48, 23
FAINT_SNR = (24.0, 100.0)       # true S/N (optimal weighting) of the faint stars, log-uniform
BRIGHT_SNR, BRIGHT_SHARE = 400.0, 0.15
CONTROL_RADIUS_PX = 2.0 * FWHM_PX
ZP = 30.0


def _header() -> fits.Header:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, -60.0]
    wcs.wcs.crpix = [(SIDE + 1) / 2] * 2
    wcs.wcs.cd = np.array([[-PIXEL_ARCSEC / 3600, 0.0], [0.0, PIXEL_ARCSEC / 3600]])
    header = wcs.to_header()
    header["SEEING"] = SEEING_ARCSEC
    header["PSFBETA"] = BETA
    header["TILE"] = "9999.999-60"
    return header


def _lanczos3_kernel() -> np.ndarray:
    """The filter of a LANCZOS3 resampling half a pixel off in x and y (the shift that
    correlates neighbouring pixels most), scaled to keep white noise's variance."""
    taps = np.arange(-3, 3) + 0.5
    weights = np.sinc(taps) * np.sinc(taps / 3.0)
    kernel = np.outer(weights, weights) / weights.sum() ** 2
    return kernel / math.sqrt(float((kernel ** 2).sum()))


def _noise(rng: np.random.Generator, correlated: bool) -> np.ndarray:
    """Noise of unit variance per pixel: white, or filtered by :func:`_lanczos3_kernel` as a
    co-add's resampled noise is."""
    if not correlated:
        return rng.standard_normal((SIDE, SIDE))
    return fftconvolve(rng.standard_normal((SIDE + 5, SIDE + 5)), _lanczos3_kernel(),
                       mode="valid")


def _field(rng: np.random.Generator, correlated: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise of unit variance, the image (noise plus stars) and the stars (x, y, flux,
    bright) on a grid of STEP px, each off its pixel centre by a random fraction."""
    centres = np.arange(STEP // 2, SIDE - STEP // 2 + 1, STEP)
    cx, cy = (v.ravel() for v in np.meshgrid(centres, centres))
    bright = rng.random(cx.size) < BRIGHT_SHARE
    snr = np.where(bright, BRIGHT_SNR, np.exp(rng.uniform(*np.log(FAINT_SNR), cx.size)))
    noise_area = 1.0 / float((integrated_moffat(STAMP_HALF, FWHM_PX, BETA) ** 2).sum())
    flux = snr * math.sqrt(noise_area)
    dx, dy = rng.uniform(-0.5, 0.5, (2, cx.size))
    noise = _noise(rng, correlated)
    image = noise.copy()
    h = STAMP_HALF
    for i in range(cx.size):
        image[cy[i] - h:cy[i] + h + 1, cx[i] - h:cx[i] + h + 1] += \
            flux[i] * integrated_moffat(h, FWHM_PX, BETA, dx[i], dy[i])
    return noise, image.astype(np.float32), np.column_stack([cx + dx, cy + dy, flux, bright])


#: Known: on correlated noise the faint stars come out brighter after the correction, -0.017 at
#: measured S/N 15-20, -0.007 at 20-28 and -0.004 at 33-46. On white noise they read -0.007 at S/N
#: 15-24, -0.005 at 24-33 and -0.001 at 33-70 (-0.003 over S/N 24-100, hence the 0.004 below),
#: on a sky the neighbour model's second mesh puts 0.004 sigma above the true one (the first
#: mesh: 0.0075; with the sources detected again on the co-add less the model, 0.011, which
#: read -0.002, -0.001 and +0.003 and hid most of this).
#: Their Kron ellipses are drawn by the same noise they sum, and correlated noise moves them
#: more. The kernel here is the worst case, one exposure shifted by half a pixel (neighbouring
#: pixels' noise correlated by 0.26); the demo co-adds' noise, a median of several exposures
#: at different shifts, is correlated by 0.06-0.08, close to white, but a co-add's NDITH = 1
#: edges can come near it. The release calibrates that bias on its own co-adds with artificial
#: stars (``auto-noise`` stage, tests/test_artificial_stars.py); this test checks the Kron
#: loss correction alone.
NOISE_BIAS = pytest.mark.xfail(strict=True, reason="the Kron ellipse's noise bias on "
                               "correlated noise, -0.006 mag over S/N 24-100, is not corrected")


@pytest.fixture(scope="module", params=["white", pytest.param("lanczos3", marks=NOISE_BIAS)])
def injected(request: pytest.FixtureRequest) -> Table:
    """The injected stars found within 1.5 px, FLAGS < 4: their true and measured values, the
    control variate's noise taken off FLUX_AUTO (MAG_AUTO at ZP 30)."""
    network = read_nnw(DEFAULT_NNW)
    settings = PhotometrySettings(back_size_px=64)
    rng = np.random.default_rng(20261128)
    rows = []
    for _ in range(3):
        noise, image, stars = _field(rng, request.param == "lanczos3")
        table = measure_single(image, np.zeros(image.shape, np.uint8), _header(), "I",
                               settings, network)
        control, _, _ = sep.sum_circle(noise, stars[:, 0], stars[:, 1], CONTROL_RADIUS_PX,
                                       subpix=5)
        x, y = np.asarray(table["x_image"]) - 1.0, np.asarray(table["y_image"]) - 1.0
        for (sx, sy, flux, bright), c in zip(stars, control):
            distance = np.hypot(x - sx, y - sy)
            i = int(np.argmin(distance))
            if distance[i] > 1.5 or table["flags_i"][i] >= 4:
                continue
            rows.append({"true_mag": ZP - 2.5 * math.log10(flux), "bright": bool(bright),
                         "mag_auto_i": ZP - 2.5 * math.log10(table["flux_auto_i"][i] - c),
                         **{f"{k}_i": table[f"{k}_i"][i] for k in
                            ("a_image", "b_image", "theta_image", "kron_radius", "snr",
                             "class_star", "flags")}})
    return Table(rows=rows)


def _faint_offset(mag: np.ndarray, table: Table) -> float:
    """Median (mag - true) of the faint stars less that of the bright ones."""
    delta = mag - np.asarray(table["true_mag"])
    bright = np.asarray(table["bright"])
    return float(np.median(delta[~bright]) - np.median(delta[bright]))


def test_kron_loss_correction_puts_faint_stars_on_the_bright_stars_scale(injected):
    """Raw MAG_AUTO of S/N 24-100 stars reads >= 0.01 mag fainter than the bright stars' (their
    ellipses shrank); after the correction the offset is within 0.004 mag."""
    assert (~np.asarray(injected["bright"])).sum() > 1000
    assert np.asarray(injected["bright"]).sum() > 150
    raw = _faint_offset(np.asarray(injected["mag_auto_i"]), injected)
    corrected, info = kron_loss_correction(injected, "I", SEEING_ARCSEC, PIXEL_ARCSEC,
                                           PostprocessSettings(),
                                           targets=np.ones(len(injected), dtype=bool),
                                           psf_beta=BETA)
    assert info["applied"]
    offset = _faint_offset(np.asarray(corrected["mag_auto_i"]), injected)
    assert raw > 0.01
    assert abs(offset) < 0.004, (raw, offset)
