"""A release folder made from a simulated survey's truth, for tests of the stages after the co-add.

:func:`write_scaled_from_truth` writes the scaled exposures and DR1 masks that the zero-point,
scale and mask stages would write, straight from the truth: raw data minus the true sky, times
``10**(0.4 * (30 - zp(y)))`` per amplifier, with the true TAN-SIP WCS and the DR1 bits (1, 2, 4,
8) of the truth masks, saturated cores (truth bit 64) as bit 2 as the mask stage marks them, and
each CCD's ``PSFR50`` from the exposure's true seeing (the simulator's Moffat, beta 3), and the
scale stage's ``GAIN`` (e- per scaled count), ``RDNOISE`` and ``SKYLEVEL`` (the true sky, scaled),
and the true colour term (``ZPCOLT``) at the pivot colour 0 (``ZPCOLPIV``) of the true zero points.
Tests of the co-add and of what follows it then start from exact inputs and measure their own
stage alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from ks4release.camera import CCD_NAMES
from ks4release.layout import mask_path, scaled_path

__all__ = ["dr1_bits", "moffat_r50_px", "quiet_wcs", "write_scaled_from_truth"]


def quiet_wcs(header: fits.Header) -> WCS:
    """The WCS of ``header`` without astropy's warnings about fixed keywords."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


def dr1_bits(truth_bits: np.ndarray) -> np.ndarray:
    """The DR1 mask (uint8) of a truth mask: bits 1, 2, 4, 8, and saturated cores (truth bit
    64) as bit 2, as the mask stage marks pixels at the saturation level."""
    return ((truth_bits & 15) | np.where(truth_bits & 64, 2, 0)).astype(np.uint8)


def moffat_r50_px(fwhm_arcsec: float, header: fits.Header, beta: float = 3.0) -> float:
    """Half-light radius (px of the CCD ``header``'s WCS) of the simulator's Moffat PSF, as the
    zero-point stage's ``PSFR50`` gives it."""
    scale = float(np.mean(proj_plane_pixel_scales(quiet_wcs(header).celestial))) * 3600.0
    alpha = fwhm_arcsec / scale / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return float(alpha * np.sqrt(2.0 ** (1.0 / (beta - 1.0)) - 1.0))


def write_scaled_from_truth(survey: Path, release: Path, band: str) -> list[str]:
    """Scaled exposures and DR1 masks of one band from the truth (see module docstring)."""
    exposures = pd.read_parquet(survey / "truth" / "exposures.parquet")
    zps = pd.read_parquet(survey / "truth" / "zeropoints.parquet")
    stems = []
    for _, exp in exposures[exposures.band == band].iterrows():
        with fits.open(survey / exp.file) as raw, \
                fits.open(survey / "truth" / "masks" / f"{exp.stem}_mask.fits") as truth:
            scaled = fits.HDUList([fits.PrimaryHDU(header=raw[0].header.copy())])
            scaled[0].header["ZPCOLPIV"] = 0.0
            masks = fits.HDUList([fits.PrimaryHDU()])
            for name in CCD_NAMES:
                data = raw[name].data.astype(np.float64) - exp[f"sky_adu_{name}"]
                ny = data.shape[0]
                rows = np.arange(ny)[:, None]
                factors = []
                for _, amp in zps[(zps.file == exp.file) & (zps.ccd == name)].iterrows():
                    zp = amp.zp_y0 + amp.zp_slope * rows / ny
                    data[:, amp.x_start:amp.x_stop] *= 10 ** (0.4 * (30.0 - zp))
                    factors.append(10 ** (0.4 * (30.0 - amp.zp_y0 - 0.5 * amp.zp_slope)))
                factor = float(np.median(factors))
                header = quiet_wcs(truth[name].header).to_header(relax=True)
                header["EXTNAME"] = name
                header["ASTOK"] = True
                header["GAIN"] = raw[name].header["GAIN"] / factor
                header["RDNOISE"] = raw[name].header["RDNOISE"]
                header["SKYLEVEL"] = exp[f"sky_adu_{name}"] * factor
                header["SATURATE"] = raw[name].header["SATURATE"]
                header["PSFR50"] = moffat_r50_px(exp.seeing_fwhm_arcsec, header)
                header["ZPCOLT"] = float(zps[zps.file == exp.file].colour_term.iloc[0])
                scaled.append(fits.ImageHDU(data.astype(np.float32), header))
                masks.append(fits.ImageHDU(dr1_bits(truth[name].data),
                                           fits.Header([("EXTNAME", name)])))
        for path, hdul in ((scaled_path(release, exp.stem), scaled),
                           (mask_path(release, exp.stem), masks)):
            path.parent.mkdir(parents=True, exist_ok=True)
            hdul.writeto(path)
        stems.append(exp.stem)
    return stems
