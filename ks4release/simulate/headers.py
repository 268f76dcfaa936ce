"""FITS headers of the raw exposures (the pipeline's input format) and of the truth masks.

Cards are written one by one, every card with a comment that carries its unit, so the files
are byte-identical for the same inputs (no DATE or CHECKSUM cards) and the WCS is a CD matrix,
never PC/CDELT pairs.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ks4release.camera import CCD, N_AMPLIFIERS
from ks4release.projection import tan_wcs_header
from ks4release.simulate.masks import mask_bit_descriptions
from ks4release.simulate.plan import ExposurePlan

__all__ = ["primary_header", "ccd_header", "wcs_cards", "mask_primary_header", "ORIGIN"]

#: ORIGIN card of every simulated file.
ORIGIN = "ks4release simulate"


def primary_header(exposure: ExposurePlan, scale: float, seed: int) -> fits.Header:
    """Primary header of a raw exposure: what, where, when (no data)."""
    h = fits.Header()
    h["TILE"] = (exposure.tile, "KS4 grid tile name")
    h["FILTER"] = (exposure.band, "filter (B, V, R, I)")
    h["EXPTIME"] = (exposure.exptime_s, "[s] exposure time")
    h["MJD-OBS"] = (exposure.mjd, "[d] MJD (UTC) at start of exposure")
    h["DATE-OBS"] = (Time(exposure.mjd, format="mjd", scale="utc").isot,
                     "[UTC] date and time at start of exposure")
    h["OBSERVAT"] = (exposure.site, "KMTNet site (CTIO, SSO, SAAO)")
    h["DITHER"] = (exposure.dither, "dither point of the tile (1-4)")
    h["RA"] = (exposure.ra_deg, "[deg] nominal pointing centre RA (ICRS)")
    h["DEC"] = (exposure.dec_deg, "[deg] nominal pointing centre Dec (ICRS)")
    h["CAMSCALE"] = (scale, "[1] camera scale (1 = full-size CCDs)")
    h["ORIGIN"] = (ORIGIN, "file creator")
    h["SIMSEED"] = (seed, "simulation seed")
    return h


def wcs_cards(w: WCS, header: fits.Header) -> None:
    """Write ``w`` (TAN, optionally with SIP) as CD-matrix cards into ``header``."""
    for card in tan_wcs_header(w).cards:
        header[card.keyword] = (card.value, card.comment)


def ccd_header(ccd: CCD, w: WCS) -> fits.Header:
    """Image-extension header of one CCD: name, approximate WCS, electronics, amplifiers."""
    h = fits.Header()
    h["EXTNAME"] = (ccd.name, "CCD name")
    wcs_cards(w, h)
    h["GAIN"] = (ccd.gain_e_per_adu, "[e-/adu] detector gain")
    h["RDNOISE"] = (ccd.read_noise_e, "[e-] read noise")
    h["SATURATE"] = (ccd.saturation_adu, "[adu] saturation level; pixels clipped here")
    h["BUNIT"] = ("adu", "pixel unit (debiased, flat-fielded, sky kept)")
    h["NAMPS"] = (N_AMPLIFIERS, "number of readout amplifiers")
    for amp in ccd.amplifiers:
        h[f"AMPSEC{amp.index + 1}"] = (f"[{amp.x_start + 1}:{amp.x_stop},1:{ccd.ny}]",
                                       "[pix] amplifier section (1-based, inclusive)")
    return h


def mask_primary_header(exposure: ExposurePlan, seed: int) -> fits.Header:
    """Primary header of a truth mask file: which exposure, and the bit layout."""
    h = fits.Header()
    h["FILENAME"] = (exposure.rel_path, "raw exposure file")
    h["ORIGIN"] = (ORIGIN, "file creator")
    h["SIMSEED"] = (seed, "simulation seed")
    for value, text in mask_bit_descriptions().items():
        h[f"MASKB{int(np.log2(value))}"] = (value, text)
    return h
