"""The gnomonic (tangent-plane) projection shared by the simulator and the astrometry.

Also its FITS form: :func:`tan_wcs_header` writes a TAN or TAN-SIP WCS with a CD matrix (no
PC/CDELT pairs, which Hipsgen misreads; see tools.md).

Standard coordinates (xi, eta) are the intermediate world coordinates of a FITS TAN projection
whose CRVAL is the tangent point: xi grows towards the east (RA), eta towards the north.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = ["chord", "gnomonic", "inverse_gnomonic", "tan_wcs_header", "unit_vectors"]


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Cartesian unit vectors (n, 3) of positions in degrees: distances between them (chords)
    do not care about RA = 0 or the poles, so KD-trees over them match positions anywhere."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.column_stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)])


def chord(angle_arcsec: float) -> float:
    """Chord length on the unit sphere of a great-circle angle in arcsec."""
    return 2.0 * math.sin(math.radians(angle_arcsec / 3600.0) / 2.0)


def gnomonic(ra0_deg: float, dec0_deg: float, ra_deg: np.ndarray, dec_deg: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (xi, eta) in degrees of (ra, dec) about the tangent point.

    xi grows towards the east (RA), eta towards the north; these are the intermediate world
    coordinates of a FITS TAN projection whose CRVAL is the tangent point.
    """
    a0, d0 = math.radians(ra0_deg), math.radians(dec0_deg)
    a, d = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def inverse_gnomonic(ra0_deg: float, dec0_deg: float, xi_deg: np.ndarray, eta_deg: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of standard coordinates about the tangent point; RA in [0, 360)."""
    a0, d0 = math.radians(ra0_deg), math.radians(dec0_deg)
    xi, eta = np.radians(np.asarray(xi_deg, float)), np.radians(np.asarray(eta_deg, float))
    denom = math.cos(d0) - eta * math.sin(d0)
    ra = a0 + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _sip_cards(header: fits.Header, name: str, coeffs: np.ndarray, min_order: int,
               what: str) -> None:
    """``{name}_ORDER`` and the non-zero coefficients of order >= ``min_order``."""
    order = coeffs.shape[0] - 1
    header[f"{name}_ORDER"] = (order, f"{what} SIP polynomial order")
    for p in range(order + 1):
        for q in range(order + 1 - p):
            if p + q >= min_order and coeffs[p, q] != 0.0:
                header[f"{name}_{p}_{q}"] = (float(coeffs[p, q]), f"{what} SIP coefficient")


def tan_wcs_header(w: WCS) -> fits.Header:
    """FITS cards of a TAN or TAN-SIP WCS with a CD matrix (no PC/CDELT; see tools.md)."""
    sip = w.sip is not None
    suffix = "-SIP" if sip else ""
    h = fits.Header()
    h["CTYPE1"] = ("RA---TAN" + suffix, "gnomonic projection" + (" + SIP" if sip else ""))
    h["CTYPE2"] = ("DEC--TAN" + suffix, "gnomonic projection" + (" + SIP" if sip else ""))
    h["CUNIT1"] = ("deg", "unit of CRVAL1 and CD1_*")
    h["CUNIT2"] = ("deg", "unit of CRVAL2 and CD2_*")
    h["CRVAL1"] = (float(w.wcs.crval[0]), "[deg] RA at the reference pixel")
    h["CRVAL2"] = (float(w.wcs.crval[1]), "[deg] Dec at the reference pixel")
    h["CRPIX1"] = (float(w.wcs.crpix[0]), "[pix] reference pixel, axis 1 (1-based)")
    h["CRPIX2"] = (float(w.wcs.crpix[1]), "[pix] reference pixel, axis 2 (1-based)")
    cd = w.wcs.cd if w.wcs.has_cd() else w.pixel_scale_matrix
    for i in range(2):
        for j in range(2):
            h[f"CD{i + 1}_{j + 1}"] = (float(cd[i, j]), "[deg/pix] linear transformation")
    h["RADESYS"] = ("ICRS", "celestial reference frame")
    if sip:
        _sip_cards(h, "A", w.sip.a, 2, "forward")
        _sip_cards(h, "B", w.sip.b, 2, "forward")
        if w.sip.ap is not None:
            _sip_cards(h, "AP", w.sip.ap, 0, "inverse")
            _sip_cards(h, "BP", w.sip.bp, 0, "inverse")
    return h
