"""The gnomonic (tangent-plane) projection shared by the simulator and the astrometry.

Standard coordinates (xi, eta) are the intermediate world coordinates of a FITS TAN projection
whose CRVAL is the tangent point: xi grows towards the east (RA), eta towards the north.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gnomonic", "inverse_gnomonic"]


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
