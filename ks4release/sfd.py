"""E(B-V) from the Schlegel, Finkbeiner & Davis (1998) dust maps, read from local files.

SFD distribute the reddening map as two FITS images in Lambert zenithal equal-area projection
(``GLON-ZEA``/``GLAT-ZEA``), one per Galactic hemisphere: ``SFD_dust_4096_ngp.fits`` (``b >=
0``, header ``LAM_NSGP = 1``) and ``SFD_dust_4096_sgp.fits`` (``b < 0``, ``LAM_NSGP = -1``), each
with ``LAM_SCAL`` pixels from the pole to the equator. :class:`SfdMap` reads the two files, maps
Galactic positions to pixels with their WCS and interpolates bilinearly between pixel centres
(as the ``dustmaps`` package does by default). The release configures the two paths; without
them the catalogs' ``ebmv_sfd`` is null and :class:`SfdMapMissingWarning` says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.ndimage import map_coordinates

from ks4release.errors import InputError

__all__ = ["SfdMap", "SfdMapMissingWarning", "ebmv_sfd"]


class SfdMapMissingWarning(UserWarning):
    """No SFD map is configured: E(B-V) is left null."""


class SfdMap:
    """The two hemispheres of the SFD (1998) E(B-V) map.

    Parameters
    ----------
    ngp_path, sgp_path : path-like
        The northern (``LAM_NSGP = 1``) and southern (``LAM_NSGP = -1``) Galactic hemisphere
        files.

    Raises
    ------
    InputError
        When a file is unreadable, has no image, or its ``LAM_NSGP`` is not the hemisphere it is
        given for.
    """

    def __init__(self, ngp_path: str | Path, sgp_path: str | Path) -> None:
        self._maps = {1: _read_hemisphere(Path(ngp_path), 1),
                      -1: _read_hemisphere(Path(sgp_path), -1)}

    def ebv(self, glon_deg: np.ndarray, glat_deg: np.ndarray) -> np.ndarray:
        """E(B-V) in magnitudes at Galactic positions (float64 array)."""
        glon = np.asarray(glon_deg, dtype=np.float64)
        glat = np.asarray(glat_deg, dtype=np.float64)
        out = np.full(glon.shape, np.nan)
        for sign, (data, wcs) in self._maps.items():
            sel = glat >= 0 if sign == 1 else glat < 0
            if not np.any(sel):
                continue
            x, y = wcs.wcs_world2pix(glon[sel], glat[sel], 0)
            out[sel] = map_coordinates(data, [y, x], order=1, mode="nearest")
        return out


def _read_hemisphere(path: Path, sign: int) -> tuple[np.ndarray, WCS]:
    try:
        with fits.open(path) as hdul:
            header = hdul[0].header
            data = hdul[0].data
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the SFD map ({exc})") from exc
    if data is None or data.ndim != 2:
        raise InputError(path, "the SFD map has no 2-d image in its primary HDU")
    nsgp = header.get("LAM_NSGP")
    if nsgp != sign:
        hemisphere = "northern (LAM_NSGP = 1)" if sign == 1 else "southern (LAM_NSGP = -1)"
        raise InputError(path, f"LAM_NSGP is {nsgp!r}; expected the {hemisphere} map",
                         key="LAM_NSGP")
    return np.asarray(data, dtype=np.float64), WCS(header)


def ebmv_sfd(glon_deg: np.ndarray, glat_deg: np.ndarray, ngp_path: str,
             sgp_path: str) -> np.ndarray:
    """E(B-V) at Galactic positions, or NaN with a :class:`SfdMapMissingWarning` without maps.

    Parameters
    ----------
    glon_deg, glat_deg : ndarray
        Galactic positions, deg.
    ngp_path, sgp_path : str
        The two SFD files; both empty means not configured.
    """
    if not ngp_path and not sgp_path:
        warnings.warn("no SFD dust map configured: ebmv_sfd is null", SfdMapMissingWarning,
                      stacklevel=2)
        return np.full(np.shape(glon_deg), np.nan)
    if not ngp_path or not sgp_path:
        raise ValueError("configure both SFD hemisphere files (ngp and sgp) or neither")
    return SfdMap(ngp_path, sgp_path).ebv(glon_deg, glat_deg)
