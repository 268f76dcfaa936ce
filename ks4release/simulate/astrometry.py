"""True (TAN-SIP) and approximate (plain TAN) WCS of every CCD of an exposure.

Each CCD's WCS has its reference pixel on the optical axis (``CRPIX = 1 - x0_px, 1 - y0_px``),
so one distortion polynomial describes the whole focal plane, as in the ``.ahead`` models. The
``.ahead`` TPV terms are dominated by a cubic radial (barrel) term, ``dxi = -0.01 xi r^2``
(degrees), i.e. about 100 arcsec at the corner of the real 2 x 2 deg field. Its size in pixels
scales with the camera: at scale ``s`` the displacement at the same *fractional* focal-plane
position is ``s`` times the real one, so the SIP coefficient is ``k / s^2``.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS

from ks4release.camera import CCD, PIXEL_SCALE_ARCSEC

__all__ = ["AHEAD_CUBIC_DEG", "sip_coefficient", "true_wcs", "approx_wcs"]

#: Cubic radial distortion of the .ahead models, d(xi) = AHEAD_CUBIC_DEG * xi * r^2 (degrees).
AHEAD_CUBIC_DEG = -0.01


def sip_coefficient(scale: float, distortion_scale: float = 1.0) -> float:
    """SIP coefficient ``k`` of ``du = k u (u^2 + v^2)`` (pixels) for a camera at ``scale``."""
    p_deg = PIXEL_SCALE_ARCSEC / 3600.0
    return distortion_scale * AHEAD_CUBIC_DEG * p_deg**2 / scale**2


def _cd_matrix(rotation_deg: float) -> np.ndarray:
    """CD matrix (deg/px) of a camera rotated by ``rotation_deg``; RA axis flipped (CD1_1 < 0)."""
    p = PIXEL_SCALE_ARCSEC / 3600.0
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return p * np.array([[-c, s], [s, c]])


def _base_wcs(ccd: CCD, ra_deg: float, dec_deg: float, rotation_deg: float) -> WCS:
    """TAN WCS of one CCD with CRPIX on the optical axis (shared by both WCS kinds)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [1.0 - ccd.x0_px, 1.0 - ccd.y0_px]
    w.wcs.cd = _cd_matrix(rotation_deg)
    w.wcs.radesys = "ICRS"
    w.wcs.cunit = ["deg", "deg"]
    return w


def approx_wcs(ccd: CCD, ra_deg: float, dec_deg: float) -> WCS:
    """The header WCS: plain TAN at the nominal pointing, unrotated, no distortion."""
    return _base_wcs(ccd, ra_deg, dec_deg, 0.0)


def true_wcs(ccd: CCD, ra_deg: float, dec_deg: float, rotation_deg: float, k: float) -> WCS:
    """The true WCS: TAN at the true pointing and rotation plus the cubic SIP distortion ``k``."""
    from astropy.wcs import Sip

    w = _base_wcs(ccd, ra_deg, dec_deg, rotation_deg)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    # du = k u (u^2 + v^2): A_3_0 = A_1_2 = k; dv = k v (u^2 + v^2): B_0_3 = B_2_1 = k.
    a[3, 0] = a[1, 2] = k
    b[0, 3] = b[2, 1] = k
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    return w
