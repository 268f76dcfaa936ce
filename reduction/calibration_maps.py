"""Zero-point and alignment maps of a co-add, in the KS4 toolkit's ``.npy`` map format.

DR1 corrects each co-add's photometry with a 2D zero-point map measured against Gaia XP
synthetic photometry, and publishes with it an astrometric alignment map against Gaia DR3. The
KS4 team's public toolkit (jmk5040/KMTNet_ToO, ``pipe/KMTNet_REF_functions.py``) fixes the format
that users already have code for, and this module writes exactly that:

* ``<release>/maps/<tile>/zp_map_{tile}_{BAND}_{mode}_{aperture}.npy`` (full zero point, mag),
  ``zperr_map_...`` (its standard deviation, mag) and ``pstar_map_...`` (stars used), for
  ``mode`` in ``single``/``dual`` and ``aperture`` in ``APER3``, ``APER5``, ``APER10``, ``AUTO``;
* ``align_map_{tile}_{BAND}_{mode}.npy`` (median Gaia match separation, arcsec), ``alerr_map_...``
  (its standard deviation, arcsec) and ``astar_map_...`` (stars used);
* ours, beside them: ``zp_tile_{tile}_{BAND}_{mode}.json``, the tile-wide zero point of each
  aperture (``zp``, ``zperr``, ``nstar``; see "Calibration" below), which the toolkit's format
  has no place for.

The band is upper case as in the toolkit (it takes the co-add's ``FILTER`` keyword) and the field
is the tile name (the toolkit's ``load_map`` documents fields like ``"1234.567-89"``). Arrays are
float64 of shape ``(n_x_bins, n_y_bins)``, indexed ``map[x_bin, y_bin]``.

Binning (see :func:`lookup`): ``x_bin = floor(X_IMAGE / bin_px)`` with SExtractor's 1-based
``X_IMAGE``, clipped to ``[0, n_bins - 1]``, as the toolkit's ``get_map_value_for_target``
(``X_IMAGE // bin_size``, clipped) does, so a user's existing look-up code finds the bin the map
was measured in. A full-size co-add is 22000 px with 400 px ZP bins (55 x 55) and 200 px
alignment bins (110 x 110); a co-add of another size keeps the number of bins:
``bin_px = round(400 * size / 22000)`` (ZP) and ``round(200 * size / 22000)`` (alignment), and
``n_bins = ceil(size / bin_px)`` (the 1368 px demo co-add: 25 px ZP bins, 55 x 55; 12 px
alignment bins, 114 x 114).

Zero-point map (DR1 / toolkit rule): detections matched one-to-one to Gaia XP stars within
``match_radius_arcsec``; stars with ``class_star > 0.8``, ``flags == 0``, ``imaflags_iso == 0``
(ours: bit 1, an exposure's cosmic rays or crosstalk left out of the median, allowed by
``star_mask_bits_allowed``), positive flux and AB reference magnitude (``m_Vega + VEGA_TO_AB``)
in 14-19. Each bin's value is the median of ``m_ref - m_inst`` (``m_inst = -2.5 log10(flux)``)
after 2-sigma clipping around the median until nothing changes, ``zperr`` the standard deviation
of the kept values, ``pstar`` their number; a bin without stars holds 30 and 0 (and 0 stars),
exactly as DR1 publishes it. The tile-wide zero point of an aperture is the same rule applied to
all the selected stars of the tile at once (``tile_zp``, ``tile_zperr`` = standard deviation of
the kept values, ``tile_nstar``; 30, 0 and 0 when the tile has none). Alignment map: detections
matched to Gaia DR3 (G 14-20) with the same star cuts and S/N >= 21.7 (the toolkit's
``MAGERR_AUTO < 0.05``), median and standard deviation of the separations in arcsec without
clipping; empty bins hold 0.

Shrinkage (``[maps] zp_shrinkage``, on by default; ours): a bin's median of 1-3 stars carries
each star's colour term, blend or XP error, 0.01-0.03 mag and up to 0.3 mag for a star blended
with a galaxy, while the zero point itself varies far less over a demo tile. Each bin's median
is therefore pulled toward the tile-wide zero point by the share of its departure that its star
count explains as noise (:func:`_shrink_towards_tile`: a random-effects model whose spatial
variance is estimated from the tile's own bins, with outlying bins left out of the estimate
and given the tile's value; it is 0, every bin the tile's value, unless Cochran's Q test finds
the bins differing beyond their noise). Where the bins show real structure with enough stars
per bin (a full-size co-add, or the 3" aperture's loss that follows the local seeing) the
medians stay nearly as they are; ``zperr`` and ``pstar`` keep DR1's meaning. On the demo
release (1-star bins) the AUTO and APER10 maps went from 0.011-0.068 to 0.0034-0.0097 mag RMS
(0.005 with the Q test) about the injected residual (whose own RMS is 0.003-0.005);
``zp_shrinkage = false`` gives DR1's maps.

Local aperture loss (``[maps] local_aperture_correction``, on by default; ours): a median
co-add's PSF changes with the exposures that made each pixel, and the light a 3" or 5" circle
misses with it: on the demo the 3" loss scatters 0.03-0.16 mag over a tile, correlated
0.7-0.99 with the stars' FWHM. DR1's per-bin values carry that loss of their own stars, and a
source elsewhere (or in an empty bin) gets another PSF's. Here each Gaia XP star's APER3/5/10
zero point has its own loss against the co-add's SEEING taken out (:func:`aperture_loss_mag`:
a Moffat of index PSFBETA and FWHM ``psf_fwhm_{b}``, the photometry's seeing map), so the maps
hold for the co-add's typical PSF, and :func:`apply_zp_maps` gives each source its own loss
back. On the demo release the APER5 maps went from 0.004-0.013 to 0.004-0.007 mag RMS about the
injected residual and the APER3 maps from 0.004-0.023 to 0.004-0.013, and the worst 0.5 mag
bin of MAG_APER5 - true of S/N > 20 stars from 0.016-0.043 to 0.013-0.035 mag. AUTO is left
alone (the catalog stage corrects its Kron loss). The sidecar JSON says which PSF the maps
hold for (``reference_fwhm_arcsec``, ``psf_beta``).

Site colour terms (``[maps] site_colour_correction``, on by default; ours): before the maps are
measured, every source's fluxes have the sites' colour terms taken out by its (V-I) colour
(:mod:`.site_colour`), so that the maps hold for Gaia XP's system rather than for the median
colour of their few stars; the sidecar JSON records it (``site_colour_correction``) and the
catalog stage corrects the sources the same way before it calibrates them. DR1 left the sites'
colour terms in its co-adds and names them its primary photometric limitation.

Calibration (:func:`apply_zp_maps`): a source takes the zero point and error of its bin when the bin
holds stars (``pstar > 0``), and the tile-wide zero point and error of the aperture otherwise (for
the error see the end of this paragraph). An empty bin's 30 is the co-adds' nominal zero point,
right for total fluxes but not for an aperture: on the demo co-adds the tile-wide zero point of
APER3 is 0.45-0.7 mag, APER5 0.13-0.28 mag and AUTO 0.01-0.08 mag below 30, and only 4-12 of the
3025 bins of a tile hold a selected star (~98% of the sources lie in empty bins), so calibrating
with the empty bins' 30 made the median magnitude of true 15-20 mag stars 0.43-0.65 (APER3),
0.11-0.27 (APER5) and 0.01-0.13 (AUTO) mag too faint per tile and band; with the tile-wide value it
is within -0.02..+0.08 mag (median over tile-bands 0.00). The ``.npy`` maps stay in DR1's format, so
a user of the published maps reproduces this from them and the JSON. A tile without any usable star
falls back to 30 and 0, with a logged warning naming the tile and band. The error of a source in a
one-star bin is the tile's ``tile_zperr``, not the bin's ``zperr`` (0: the standard deviation of one
value): with 0 the Gaia XP stars of the demo's B co-adds, their own bins' only stars, carried errors
of 0.001-0.005 mag while scattering 0.013 mag about the truth (11 times their errors), and the
masters' weighted medians trusted them most.

Windows: the toolkit measures each alignment bin from the stars in a 1000 px square centred on
the 200 px bin (5 bins wide) and each ZP bin from its own 400 px bin; :class:`MapSettings` keeps
those as ``align_window_bins = 5`` and ``zp_window_bins = 1``. A wider ZP window is a documented
option: a full-size tile has ~3 Gaia XP stars per 400 px bin, while a co-add shrunk by the demo's
camera scale keeps 55 x 55 bins over 1/256 of the area (~26 XP stars per tile, so nearly every bin
is empty); ``zp_window_bins`` then trades resolution for stars (each bin from the stars of a
square ``zp_window_bins`` bins wide, centred on it). The tile-wide zero point does not depend on
the window.

What the toolkit has that this module has not: the ``FWHM`` aperture (a seeing-diameter aperture
in the toolkit's SExtractor run). The measurement table has no seeing-aperture flux column, so no
FWHM map is made. Two known slips of the toolkit are not copied: it indexes the 110-bin alignment
map with 55-bin indices, and compares a separation in degrees with an alignment value in arcsec
when it cuts ZP matches at ``max(0.5", align_map)``; here the ZP matches use one plain radius.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import MaskedColumn, Table
from scipy.stats import chi2

from ks4release.atomic import atomic_path, atomic_write_text, ensure_inside
from ks4release.errors import InputError, StageError
from ks4release.layout import coadd_exposures_path, coadd_path, tile_refcat_path
from ks4release.reduction.coadd_maps import coadd_wcs
from ks4release.reduction.moffat import moffat_enclosed_fraction
from ks4release.reduction.photometry import read_measured
from ks4release.reduction.site_colour import site_colour_correction
from ks4release.reduction.zeropoint import VEGA_TO_AB
from ks4release.refcat.formats import read_refcat
from ks4release.settings import MapSettings
from ks4release.survey import REFERENCE_ZEROPOINT

__all__ = [
    "APERTURES",
    "FULL_ALIGN_BIN_PX",
    "FULL_COADD_SIZE_PX",
    "FULL_ZP_BIN_PX",
    "MODES",
    "AlignMap",
    "MapSettings",
    "ZpMap",
    "align_maps",
    "apply_zp_maps",
    "lookup",
    "map_bin_px",
    "map_paths",
    "maps_dir",
    "read_maps",
    "run_maps",
    "write_maps",
    "zp_maps",
    "zp_tile_path",
]

logger = logging.getLogger(__name__)

#: Apertures with a ZP map, in the toolkit's spelling (no FWHM: see the module docstring).
APERTURES = ("APER3", "APER5", "APER10", "AUTO")
#: Detection modes: ``single`` (detection in the band itself) and ``dual`` (detection on I).
MODES = ("single", "dual")
#: Side of a full-size KS4 co-add, px (0.4"/px).
FULL_COADD_SIZE_PX = 22000
#: ZP-map bin of a full-size co-add, px (55 x 55 bins).
FULL_ZP_BIN_PX = 400
#: Alignment-map bin of a full-size co-add, px (110 x 110 bins).
FULL_ALIGN_BIN_PX = 200

_BANDS = ("B", "V", "R", "I")
#: 2.5 / ln(10): magnitude error per unit of relative flux error.
_MAG_PER_REL_FLUX = 2.5 / math.log(10.0)
#: Circle diameters of the toolkit's aperture names, arcsec.
APERTURE_DIAMETER_ARCSEC = {"APER3": 3.0, "APER5": 5.0, "APER10": 10.0}
#: Value of an empty ZP-map bin (the co-adds' nominal zero point), as the toolkit writes it.
_EMPTY_ZP = REFERENCE_ZEROPOINT


@dataclass(frozen=True, kw_only=True)
class ZpMap:
    """The zero-point map of one aperture and its tile-wide zero point.

    ``zp`` (mag), ``zperr`` (mag) and ``pstar`` (stars) are arrays of shape
    ``(n_x_bins, n_y_bins)`` indexed ``[x_bin, y_bin]`` in DR1's format (an empty bin holds 30,
    0 and 0); ``bin_px`` is the bin side in co-add pixels. ``tile_zp`` (mag), ``tile_zperr``
    (mag) and ``tile_nstar`` are the tile-wide zero point, its standard deviation and the stars
    kept, which :func:`apply_zp_maps` uses for sources in empty bins (30, 0 and 0 when the tile
    has no usable star). ``spatial_rms`` (mag) is the bin-to-bin variation of the zero point
    found beyond the stars' noise when the bins were shrunk toward ``tile_zp`` (NaN: not
    estimated). ``reference_fwhm_arcsec`` and ``psf_beta``: the PSF (Moffat) the zero points
    hold for when the stars' local aperture losses were taken out (:func:`aperture_loss_mag`;
    NaN: they were not, the values hold for each star's own PSF as DR1's).
    ``colour_corrected``: the maps were measured on fluxes with the sites' colour terms taken
    out (:mod:`.site_colour`); the sources they calibrate need the same correction first.
    """

    zp: np.ndarray
    zperr: np.ndarray
    pstar: np.ndarray
    bin_px: int
    tile_zp: float
    tile_zperr: float
    tile_nstar: int
    spatial_rms: float = math.nan
    reference_fwhm_arcsec: float = math.nan
    psf_beta: float = math.nan
    colour_corrected: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tile_zp) and math.isfinite(self.tile_zperr)
                and self.tile_zperr >= 0):
            raise ValueError(f"tile_zp and tile_zperr must be finite and tile_zperr >= 0, got "
                             f"{self.tile_zp} and {self.tile_zperr}")
        if self.tile_nstar < 0:
            raise ValueError(f"tile_nstar must be >= 0, got {self.tile_nstar}")


@dataclass(frozen=True)
class AlignMap:
    """The alignment map: ``align`` and ``alerr`` (arcsec), ``astar`` (stars); as :class:`ZpMap`."""

    align: np.ndarray
    alerr: np.ndarray
    astar: np.ndarray
    bin_px: int


# --- bins --------------------------------------------------------------------------------------


def map_bin_px(coadd_size_px: int, full_bin_px: int) -> int:
    """Bin side for a co-add of ``coadd_size_px``: ``round(full_bin_px * size / 22000)``, >= 1."""
    if coadd_size_px < 1:
        raise ValueError(f"coadd_size_px must be >= 1, got {coadd_size_px}")
    return max(1, round(full_bin_px * coadd_size_px / FULL_COADD_SIZE_PX))


def _n_bins(shape: tuple[int, int], bin_px: int) -> tuple[int, int]:
    """``(n_x_bins, n_y_bins)`` covering a co-add of numpy ``shape`` ``(ny, nx)``."""
    if bin_px < 1:
        raise ValueError(f"bin_px must be >= 1, got {bin_px}")
    ny, nx = shape
    if nx < 1 or ny < 1:
        raise ValueError(f"shape must be positive (ny, nx), got {shape}")
    return math.ceil(nx / bin_px), math.ceil(ny / bin_px)


def lookup(map_array: np.ndarray, x_image: np.ndarray, y_image: np.ndarray,
           bin_px: int) -> np.ndarray:
    """Map values at 1-based pixel positions: ``map[x_bin, y_bin]``.

    ``x_bin = floor(x_image / bin_px)`` clipped to ``[0, n_x_bins - 1]`` (likewise y): the
    toolkit's ``X_IMAGE // bin_size`` with its clipping, so positions beyond the last bin (the
    co-add's last partial bin, or off the image) take the nearest edge bin.

    Raises
    ------
    ValueError
        When a coordinate is not finite, or ``bin_px`` < 1.
    """
    x = np.asarray(x_image, dtype=float)
    y = np.asarray(y_image, dtype=float)
    if bin_px < 1:
        raise ValueError(f"bin_px must be >= 1, got {bin_px}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x_image and y_image must be finite to look up a map bin")
    ix = _bin_index(x, bin_px, map_array.shape[0])
    iy = _bin_index(y, bin_px, map_array.shape[1])
    return map_array[ix, iy]


def _bin_index(coord: np.ndarray, bin_px: int, n_bins: int) -> np.ndarray:
    """Clipped bin index of 1-based pixel coordinates (see :func:`lookup`)."""
    return np.clip(np.floor(coord / bin_px), 0, n_bins - 1).astype(np.intp)


def _window_members(coord: np.ndarray, bin_px: int, n_bins: int,
                    window_bins: float) -> np.ndarray:
    """``(n_bins, n_points)`` booleans: which points fall in each bin's window along one axis.

    Bin ``k`` spans ``[k, k + 1)`` in units of ``coord / bin_px``; its window extends that by
    ``(window_bins - 1) / 2`` bins on each side. The first and last windows are open towards
    the image edges, so that with ``window_bins = 1`` a point belongs to exactly the bin
    :func:`lookup` gives it.
    """
    u_pos = coord / bin_px
    half = (window_bins - 1.0) / 2.0
    lo = np.arange(n_bins) - half
    hi = np.arange(n_bins) + 1.0 + half
    lo[0], hi[-1] = -np.inf, np.inf
    return (u_pos[None, :] >= lo[:, None]) & (u_pos[None, :] < hi[:, None])


def _binned(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], bin_px: int,
            window_bins: float) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(ix, iy, members)`` for every bin whose window holds at least one point."""
    n_x, n_y = _n_bins(shape, bin_px)
    in_x = _window_members(x, bin_px, n_x, window_bins)
    in_y = _window_members(y, bin_px, n_y, window_bins)
    for ix in np.flatnonzero(in_x.any(axis=1)):
        for iy in np.flatnonzero(in_y.any(axis=1)):
            members = np.flatnonzero(in_x[ix] & in_y[iy])
            if members.size:
                yield ix, iy, members


def _clipped(values: np.ndarray, sigma: float) -> np.ndarray:
    """Values kept by iterated clipping at ``sigma`` standard deviations around the median."""
    kept = values
    while kept.size > 2:
        deviation = np.abs(kept - np.median(kept))
        keep = deviation <= sigma * np.std(kept)
        if keep.all():
            break
        kept = kept[keep]
    return kept


# --- matching and star selection ----------------------------------------------------------------


def _column(table: Table, name: str, what: str) -> np.ndarray:
    """A column as a float array with masked entries as NaN; ValueError naming it if absent."""
    if name not in table.colnames:
        raise ValueError(f"{what} has no column {name!r}")
    col = table[name]
    if hasattr(col, "filled"):  # masked: NaN there (as float first, for integer columns)
        return np.asarray(col.astype(float).filled(np.nan), dtype=float)
    return np.asarray(col, dtype=float)


def _match(ra: np.ndarray, dec: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
           radius_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches of detections to reference stars within ``radius_arcsec``.

    Each reference star takes its nearest detection; when several take the same detection only
    the closest pair is kept. Returns ``(i_det, i_ref, separation_arcsec)``.
    """
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0))
    ok_det = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    ok_ref = np.flatnonzero(np.isfinite(ref_ra) & np.isfinite(ref_dec))
    if ok_det.size == 0 or ok_ref.size == 0:
        return empty
    det = SkyCoord(ra[ok_det] * u.deg, dec[ok_det] * u.deg)
    ref = SkyCoord(ref_ra[ok_ref] * u.deg, ref_dec[ok_ref] * u.deg)
    if ok_det.size == 1:  # astropy's matcher needs two or more catalogue points
        nearest = np.zeros(ok_ref.size, np.intp)
        sep = ref.separation(det[0]).arcsec
    else:
        nearest, sep2d, _ = ref.match_to_catalog_sky(det)
        sep = sep2d.arcsec
    close = np.flatnonzero(sep <= radius_arcsec)
    order = close[np.lexsort((sep[close], nearest[close]))]
    first = np.ones(order.size, bool)
    first[1:] = nearest[order][1:] != nearest[order][:-1]
    keep = np.sort(order[first])
    return ok_det[nearest[keep]], ok_ref[keep], sep[keep]


def _clean_stars(table: Table, b: str, settings: MapSettings) -> np.ndarray:
    """Booleans: class_star above the cut, flags == 0 and no IMAFLAGS_ISO bit but the allowed
    ones (``star_mask_bits_allowed``) in band ``b``."""
    what = "the measurement table"
    imaflags = _column(table, f"imaflags_iso_{b}", what)
    known = np.isfinite(imaflags)
    allowed = np.zeros(imaflags.shape, dtype=bool)
    allowed[known] = (imaflags[known].astype(np.int64) & ~settings.star_mask_bits_allowed) == 0
    return ((_column(table, f"class_star_{b}", what) > settings.class_star_min)
            & (_column(table, f"flags_{b}", what) == 0) & allowed)


def _check_band(band: str) -> str:
    """The catalog suffix (b v r i) of an upper-case band; ValueError otherwise."""
    if band not in _BANDS:
        raise ValueError(f"band must be one of {', '.join(_BANDS)}, got {band!r}")
    return band.lower()


def _flux_column(aperture: str, b: str) -> str:
    """Name of the flux column of a toolkit aperture name: ``APER5`` -> ``flux_aper5_v``."""
    return f"flux_{aperture.lower()}_{b}"


# --- maps --------------------------------------------------------------------------------------


def zp_maps(table: Table, xp: Table, band: str, *, bin_px: int, shape: tuple[int, int],
            settings: MapSettings) -> dict[str, ZpMap]:
    """Zero-point maps of every aperture of one band (see the module docstring for the rule).

    Parameters
    ----------
    table : Table
        The measurement table (``x_image``, ``y_image``, ``ra``, ``dec``, ``flux_{aperture}_{b}``,
        ``class_star_{b}``, ``flags_{b}``, ``imaflags_iso_{b}``).
    xp : Table
        Gaia XP stars: ``ra``, ``dec``, ``{b}_jkc_mag`` (Vega) and, when
        ``settings.require_xp_flag``, ``{b}_jkc_flag``.
    band : str
        ``B``, ``V``, ``R`` or ``I``.
    bin_px : int
        Bin side, co-add px (:func:`map_bin_px` with :data:`FULL_ZP_BIN_PX`).
    shape : tuple of int
        The co-add's numpy shape ``(ny, nx)``.
    settings : MapSettings

    Returns
    -------
    dict
        Aperture name (:data:`APERTURES`) -> :class:`ZpMap`.
    """
    b = _check_band(band)
    ref_mag = _column(xp, f"{b}_jkc_mag", "the Gaia XP table") + VEGA_TO_AB[band]
    usable = (ref_mag > settings.ref_mag_min) & (ref_mag < settings.ref_mag_max)
    if settings.require_xp_flag:
        usable &= _column(xp, f"{b}_jkc_flag", "the Gaia XP table") == 1
    i_det, i_ref, _ = _match(_column(table, "ra", "the measurement table"),
                             _column(table, "dec", "the measurement table"),
                             np.where(usable, _column(xp, "ra", "the Gaia XP table"), np.nan),
                             _column(xp, "dec", "the Gaia XP table"),
                             settings.match_radius_arcsec)
    clean = _clean_stars(table, b, settings)[i_det]
    i_det, i_ref = i_det[clean], i_ref[clean]
    x = _column(table, "x_image", "the measurement table")[i_det]
    y = _column(table, "y_image", "the measurement table")[i_det]
    psf = _local_psf(table, b) if settings.local_aperture_correction else None
    maps = {}
    for aperture in APERTURES:
        flux = _column(table, _flux_column(aperture, b), "the measurement table")[i_det]
        good = np.isfinite(flux) & (flux > 0) & np.isfinite(x) & np.isfinite(y)
        zp_star = ref_mag[i_ref][good] + 2.5 * np.log10(flux[good])
        reference = {}
        if psf is not None and aperture in APERTURE_DIAMETER_ARCSEC:
            fwhm, reference_fwhm, beta = psf
            zp_star = zp_star + aperture_loss_mag(fwhm[i_det][good], reference_fwhm, beta,
                                                  APERTURE_DIAMETER_ARCSEC[aperture])
            reference = {"reference_fwhm_arcsec": reference_fwhm, "psf_beta": beta}
        maps[aperture] = replace(_zp_map(x[good], y[good], zp_star, shape=shape, bin_px=bin_px,
                                         settings=settings), **reference)
    return maps


def aperture_loss_mag(fwhm_arcsec: np.ndarray, reference_fwhm_arcsec: float, beta: float,
                      diameter_arcsec: float) -> np.ndarray:
    """How much fainter a point source's magnitude in a circle of ``diameter_arcsec`` is under
    a Moffat PSF of FWHM ``fwhm_arcsec`` than under one of ``reference_fwhm_arcsec`` (same
    index ``beta``): ``-2.5 log10(EE(fwhm) / EE(reference))`` with the enclosed fraction
    :func:`moffat_enclosed_fraction`. 0 where the FWHM is not positive.

    A median co-add's PSF changes with the exposures that made each pixel (chip gaps, dithers
    of other seeing, masked data): on the demo the 3" aperture's loss scatters 0.03-0.16 mag
    over a tile, correlated 0.7-0.99 with the stars' FWHM, so that a map bin or the tile's
    value calibrates a star under another PSF by that much.
    """
    if not (reference_fwhm_arcsec > 0 and beta > 1 and diameter_arcsec > 0):
        raise ValueError(f"need a positive reference FWHM, beta > 1 and a positive diameter, "
                         f"got {reference_fwhm_arcsec}, {beta} and {diameter_arcsec}")
    fwhm = np.asarray(fwhm_arcsec, dtype=np.float64)
    usable = np.isfinite(fwhm) & (fwhm > 0)
    loss = np.zeros(fwhm.shape)
    loss[usable] = -2.5 * np.log10(
        moffat_enclosed_fraction(fwhm[usable], beta, diameter_arcsec)
        / moffat_enclosed_fraction(np.float64(reference_fwhm_arcsec), beta, diameter_arcsec))
    return loss


def _local_psf(table: Table, b: str) -> tuple[np.ndarray, float, float] | None:
    """Each object's PSF FWHM (``psf_fwhm_{b}``), the co-add's SEEING (``meta["seeing_{b}"]``,
    where the coverage is typical) and PSFBETA (``meta["psf_beta_{b}"]``) of a measurement
    table; None when one is missing (a table without the seeing map)."""
    reference, beta = table.meta.get(f"seeing_{b}"), table.meta.get(f"psf_beta_{b}")
    if f"psf_fwhm_{b}" not in table.colnames or not isinstance(reference, (int, float)) \
            or not isinstance(beta, (int, float)) or not (reference > 0 and beta > 1):
        return None
    return _column(table, f"psf_fwhm_{b}", "the measurement table"), float(reference), float(beta)


def _zp_map(x: np.ndarray, y: np.ndarray, zp_star: np.ndarray, *, shape: tuple[int, int],
            bin_px: int, settings: MapSettings) -> ZpMap:
    """One aperture's map from per-star zero points at 1-based positions."""
    n_x, n_y = _n_bins(shape, bin_px)
    zp = np.full((n_x, n_y), _EMPTY_ZP)
    zperr = np.zeros((n_x, n_y))
    pstar = np.zeros((n_x, n_y))
    for ix, iy, members in _binned(x, y, shape, bin_px, settings.zp_window_bins):
        kept = _clipped(zp_star[members], settings.clip_sigma)
        zp[ix, iy] = np.median(kept)
        zperr[ix, iy] = np.std(kept)
        pstar[ix, iy] = kept.size
    tile = _clipped(zp_star, settings.clip_sigma)
    if tile.size == 0:
        return ZpMap(zp=zp, zperr=zperr, pstar=pstar, bin_px=bin_px, tile_zp=_EMPTY_ZP,
                     tile_zperr=0.0, tile_nstar=0)
    tile_zp, tile_zperr = float(np.median(tile)), float(np.std(tile))
    spatial_rms = math.nan
    star_scatter = float(mad_std(zp_star)) if zp_star.size >= 3 else 0.0
    if settings.zp_shrinkage and star_scatter > 0:
        spatial_rms = _shrink_towards_tile(zp, pstar, tile_zp, star_scatter**2)
    return ZpMap(zp=zp, zperr=zperr, pstar=pstar, bin_px=bin_px, tile_zp=tile_zp,
                 tile_zperr=tile_zperr, tile_nstar=int(tile.size), spatial_rms=spatial_rms)


def _shrink_towards_tile(zp: np.ndarray, pstar: np.ndarray, tile_zp: float,
                         star_var: float) -> float:
    """Pull the bins holding stars toward the tile's zero point, in place; return the spatial RMS.

    Random-effects model of a bin's median ``m_k = tile_zp + d_k + e_k``: ``d_k`` the true
    local departure, of variance ``tau**2`` over the tile, and ``e_k`` the noise of ``n_k``
    stars, of variance ``star_var / n_k`` (``star_var``: the robust (MAD) star-to-star variance
    of all the tile's selected stars, which also holds ``tau**2`` and so errs toward less
    shrinkage). The best estimate of
    ``tile_zp + d_k`` is ``tile_zp + w_k (m_k - tile_zp)`` with ``w_k = tau**2 / (tau**2 +
    star_var / n_k)``. A bin of 1-3 stars whose spread is all noise thus takes the tile's
    value rather than one star's colour term, blend or XP error, while a map with real
    structure and enough stars per bin (DR1's full-size co-adds) keeps its medians.
    """
    full = pstar > 0
    offset = zp[full] - tile_zp
    noise_var = star_var / pstar[full]
    tau2, consistent = _between_bin_variance(offset, noise_var)
    zp[full] = tile_zp + np.where(consistent, tau2 / (tau2 + noise_var), 0.0) * offset
    return math.sqrt(tau2)


#: Confidence at which Cochran's Q test must find the bins differing beyond their noise before
#: a spatial variance is estimated (1% of flat tiles then get a spurious one).
HETEROGENEITY_LEVEL = 0.99


def _between_bin_variance(offset: np.ndarray, noise_var: np.ndarray,
                          z_max: float = 3.0) -> tuple[float, np.ndarray]:
    """Variance of the true bin offsets beyond their noise, by moments (DerSimonian-Laird).

    With weights ``1 / noise_var``, ``Q = sum(w offset**2)`` has expectation ``(k - 1) +
    tau**2 sum(w)`` for ``k`` bins about the tile's own median, so ``tau**2 = max(0, (Q - k +
    1) / sum(w))``, but only when ``Q`` exceeds the :data:`HETEROGENEITY_LEVEL` quantile of
    chi-square with ``k - 1`` degrees of freedom (Cochran's test), 0 otherwise. Without the
    test a flat tile gets a positive ``tau**2`` from its noise alone half the time, and with
    the demo's 4-10 stars per tile and band that estimate is large (0.01-0.04 mag for B) and
    keeps the single stars' errors in the map: on the demo release the B maps went from
    0.007-0.013 to 0.005 mag RMS about the injected residual (itself 0.005) with the test; a
    tile of DR1's size, with hundreds of bins, finds real structure significant. Bins more
    than ``z_max`` standard deviations (``sqrt(tau**2 + noise_var)``) from the tile are left
    out of the estimate, iterated until the set is stable from ``tau**2 = 0``: one blended
    star must not pass for structure (starting from all bins would let it inflate ``tau``
    enough to keep itself). Returns ``tau**2`` and which bins
    were consistent with it (the others are outliers of the model, e.g. a bin whose one star
    is blended, and :func:`_shrink_towards_tile` gives them the tile's value).
    """
    use = np.abs(offset) <= z_max * np.sqrt(noise_var)
    tau2 = 0.0
    for _ in range(offset.size + 1):
        if use.sum() < 2:
            return 0.0, use
        weight = 1.0 / noise_var[use]
        q = float(np.sum(weight * offset[use] ** 2))
        dof = int(use.sum()) - 1
        heterogeneous = q > chi2.ppf(HETEROGENEITY_LEVEL, dof)
        tau2 = max(0.0, (q - dof) / float(weight.sum())) if heterogeneous else 0.0
        keep = np.abs(offset) <= z_max * np.sqrt(tau2 + noise_var)
        if np.array_equal(keep, use):
            break
        use = keep
    return tau2, use


def align_maps(table: Table, gaia: Table, *, band: str, bin_px: int, shape: tuple[int, int],
               settings: MapSettings) -> AlignMap:
    """Alignment map: median separation of clean stars from Gaia DR3, arcsec, per bin.

    Parameters
    ----------
    table : Table
        The measurement table (``x_image``, ``y_image``, ``ra``, ``dec`` and the band's
        ``flux_auto``, ``fluxerr_auto``, ``class_star``, ``flags``, ``imaflags_iso``).
    gaia : Table
        Gaia DR3: ``ra``, ``dec``, ``phot_g_mean_mag`` (positions as given: DR1 compares with
        Gaia at epoch 2016.0 without proper motions).
    band : str
        Band whose star cuts select the stars (keyword added to the agreed signature: a dual
        table carries every band's columns).
    bin_px, shape, settings
        As :func:`zp_maps` (:data:`FULL_ALIGN_BIN_PX` for ``bin_px``).
    """
    b = _check_band(band)
    g = _column(gaia, "phot_g_mean_mag", "the Gaia DR3 table")
    usable = (g > settings.align_gaia_g_min) & (g < settings.align_gaia_g_max)
    i_det, _, sep = _match(_column(table, "ra", "the measurement table"),
                           _column(table, "dec", "the measurement table"),
                           np.where(usable, _column(gaia, "ra", "the Gaia DR3 table"), np.nan),
                           _column(gaia, "dec", "the Gaia DR3 table"),
                           settings.align_match_radius_arcsec)
    flux = _column(table, f"flux_auto_{b}", "the measurement table")[i_det]
    fluxerr = _column(table, f"fluxerr_auto_{b}", "the measurement table")[i_det]
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fluxerr > 0, flux / fluxerr, np.nan)
    x = _column(table, "x_image", "the measurement table")[i_det]
    y = _column(table, "y_image", "the measurement table")[i_det]
    keep = (_clean_stars(table, b, settings)[i_det]
            & (snr >= settings.align_snr_min) & np.isfinite(x) & np.isfinite(y))
    x, y, sep = x[keep], y[keep], sep[keep]
    n_x, n_y = _n_bins(shape, bin_px)
    align, alerr, astar = np.zeros((n_x, n_y)), np.zeros((n_x, n_y)), np.zeros((n_x, n_y))
    for ix, iy, members in _binned(x, y, shape, bin_px, settings.align_window_bins):
        align[ix, iy] = np.median(sep[members])
        alerr[ix, iy] = np.std(sep[members])
        astar[ix, iy] = members.size
    return AlignMap(align, alerr, astar, bin_px)


def apply_zp_maps(table: Table, maps: Mapping[str, ZpMap], band: str) -> Table:
    """A copy of ``table`` with calibrated magnitudes from the ZP maps of one band.

    For each aperture of ``maps`` (``AUTO`` -> ``mag_auto_{b}``, ``APER5`` -> ``mag_aper5_{b}``
    ...): ``mag = -2.5 log10(flux) + zp`` and ``magerr = sqrt((1.0857 fluxerr / flux)**2 +
    zperr**2)``. ``zp``/``zperr`` are the values of the bin holding the source's (``x_image``,
    ``y_image``) (:func:`lookup`) when that bin holds stars (``pstar > 0``; ``zperr`` only from two
    stars on), and the aperture's tile-wide ``tile_zp``/``tile_zperr`` otherwise (see the module
    docstring: an empty bin's 30 is no aperture's zero point). When the tile has no usable star at
    all (``tile_nstar == 0``) sources take 30 and 0, and a warning naming the tile (the table's
    ``tile`` column or ``meta["tile"]``), band and apertures is logged. Where the maps hold for a
    reference PSF (``reference_fwhm_arcsec``, see :func:`zp_maps`), each source's aperture magnitude
    is brightened by its PSF's aperture loss against it (:func:`aperture_loss_mag` of
    ``psf_fwhm_{b}``). Both columns are masked (null) where the flux is <= 0 or not finite, and
    ``magerr`` also where ``fluxerr`` is not finite.
    """
    b = _check_band(band)
    out = table.copy(copy_data=True)
    x = _column(table, "x_image", "the measurement table")
    y = _column(table, "y_image", "the measurement table")
    unknown = [a for a in maps if a not in APERTURES]
    if unknown:
        raise ValueError(f"unknown apertures {unknown}; expected some of {APERTURES}")
    starless = [a for a, zp_map in maps.items() if zp_map.tile_nstar == 0]
    if starless and len(table):
        logger.warning("tile %s band %s: no Gaia XP star calibrates %s; their magnitudes use the "
                       "nominal zero point %g with error 0", _tile_name(table), band,
                       ", ".join(starless), _EMPTY_ZP)
    for aperture, zp_map in maps.items():
        name = aperture.lower()
        flux = _column(table, _flux_column(aperture, b), "the measurement table")
        fluxerr = _column(table, f"fluxerr_{name}_{b}", "the measurement table")
        zp, zperr = _source_zero_points(zp_map, x, y)
        good = np.isfinite(flux) & (flux > 0)
        safe = np.where(good, flux, 1.0)
        mag = -2.5 * np.log10(safe) + zp
        if math.isfinite(zp_map.reference_fwhm_arcsec):
            mag -= aperture_loss_mag(_column(table, f"psf_fwhm_{b}", "the measurement table"),
                                     zp_map.reference_fwhm_arcsec, zp_map.psf_beta,
                                     APERTURE_DIAMETER_ARCSEC[aperture])
        magerr = np.hypot(_MAG_PER_REL_FLUX * fluxerr / safe, zperr)
        out[f"mag_{name}_{b}"] = MaskedColumn(
            mag, mask=~good, unit=u.mag,
            description=f"MAG_{aperture} calibrated by the ZP map (the tile-wide zero point where "
                        f"the bin has no star), AB")
        out[f"magerr_{name}_{b}"] = MaskedColumn(
            magerr, mask=~(good & np.isfinite(fluxerr)), unit=u.mag,
            description=f"Error of mag_{name}_{b}, ZP error included")
    return out


#: Fewest stars whose standard deviation gives a source its bin's zperr; a one-star bin's is 0
#: by construction, and its sources take the tile's spread of single stars instead.
_MIN_ZPERR_STARS = 2


def _source_zero_points(zp_map: ZpMap, x: np.ndarray,
                        y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero point and error at 1-based positions: the bin's where it has stars, else the tile's
    (the error: the bin's where it has at least :data:`_MIN_ZPERR_STARS` stars)."""
    pstar = lookup(zp_map.pstar, x, y, zp_map.bin_px)
    in_bin = pstar > 0
    if zp_map.tile_nstar > 0:
        tile_zp, tile_zperr = zp_map.tile_zp, zp_map.tile_zperr
    else:
        tile_zp, tile_zperr = _EMPTY_ZP, 0.0
    zp = np.where(in_bin, lookup(zp_map.zp, x, y, zp_map.bin_px), tile_zp)
    zperr = np.where(pstar >= _MIN_ZPERR_STARS, lookup(zp_map.zperr, x, y, zp_map.bin_px),
                     tile_zperr)
    return zp, zperr


def _tile_name(table: Table) -> str:
    """The tile of a measurement table, for messages: its ``tile`` column or ``meta["tile"]``."""
    if "tile" in table.colnames and len(table):
        return ", ".join(sorted({str(t) for t in table["tile"]}))
    return str(table.meta.get("tile", "(tile unknown)"))


# --- files -------------------------------------------------------------------------------------


def maps_dir(release_dir: Path, tile: str) -> Path:
    """``<release>/maps/<tile>/``: the ZP and alignment maps of one tile."""
    path = Path(release_dir) / "maps" / tile
    ensure_inside(path, release_dir, what=f"maps folder of tile {tile!r}")
    return path


def _map_name(kind: str, tile: str, band: str, mode: str, aperture: str | None) -> str:
    """The toolkit's file name of one map."""
    stem = f"{kind}_map_{tile}_{band}_{mode}"
    return f"{stem}_{aperture}.npy" if aperture else f"{stem}.npy"


def _check_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def zp_tile_path(release_dir: Path, tile: str, band: str, mode: str) -> Path:
    """``<release>/maps/<tile>/zp_tile_{tile}_{BAND}_{mode}.json``: the tile-wide zero points."""
    _check_band(band)
    _check_mode(mode)
    return maps_dir(release_dir, tile) / f"zp_tile_{tile}_{band}_{mode}.json"


def map_paths(release_dir: Path, tile: str, band: str, mode: str) -> list[Path]:
    """Every map file of one tile, band and mode.

    3 per aperture (``zp``, ``zperr``, ``pstar``), then the 3 alignment maps, then the
    tile-wide zero points (:func:`zp_tile_path`).
    """
    _check_band(band)
    _check_mode(mode)
    folder = maps_dir(release_dir, tile)
    names = [_map_name(kind, tile, band, mode, aperture)
             for aperture in APERTURES for kind in ("zp", "zperr", "pstar")]
    names += [_map_name(kind, tile, band, mode, None) for kind in ("align", "alerr", "astar")]
    return [folder / name for name in names] + [zp_tile_path(release_dir, tile, band, mode)]


#: Optional per-aperture values of the sidecar JSON (null when not known), as ZpMap fields.
_OPTIONAL_TILE_VALUES = ("spatial_rms", "reference_fwhm_arcsec", "psf_beta")

#: How the tile-wide zero points of the sidecar JSON are made and used (written into it).
_TILE_ZP_RULE = (
    "Tile-wide zero point of each aperture, AB mag: the zp_map rule (median of m_ref - m_inst "
    "after iterated sigma clipping) applied to all the stars of the tile that the ZP maps "
    "select at once; zperr is the standard deviation of the kept values, nstar their number. "
    "Calibrate a source with zp_map and zperr_map where its bin has pstar_map > 0 and with this "
    "zp and zperr elsewhere (empty bins hold 30 and 0, the co-adds' nominal zero point, which "
    "is not an aperture's zero point). nstar = 0: the tile has no usable star and zp = 30, "
    "zperr = 0. spatial_rms: the RMS of the true bin-to-bin variation of the zero point that "
    "the ZP-map bins show beyond their stars' noise (0 when Cochran's Q test finds none at "
    f"{HETEROGENEITY_LEVEL:.0%}; null: not estimated); each zp_map bin is "
    "the tile's zp plus its median's departure times spatial_rms**2 / (spatial_rms**2 + "
    "noise**2). reference_fwhm_arcsec and psf_beta (APER apertures; null: not done): the "
    "zero points hold for a point source under a Moffat PSF of that FWHM and index; a source "
    "under a PSF of FWHM f (the catalog stage's psf_fwhm) is calibrated with zp + 2.5 "
    "log10(EE(f) / EE(reference_fwhm)), EE(f) = 1 - (1 + (D/2)**2 / alpha(f)**2)**(1 - "
    "psf_beta) for the aperture's diameter D, alpha(f) = f / (2 sqrt(2**(1/psf_beta) - 1)). "
    "site_colour_correction.applied true: the zero points hold for fluxes with each site's "
    "colour term taken out (flux * 10**(-0.4 * delta), delta = 2.5 log10 of the mean over the "
    "exposures covering the source of 10**(0.4 colour_terms[exposure] ((V-I)_AB - pivot)); "
    "ks4release reduction/site_colour.py), and a source must be corrected so before it is "
    "calibrated.")


def write_maps(release_dir: Path, tile: str, band: str, mode: str,
               zp: Mapping[str, ZpMap], align: AlignMap,
               colour_correction: Mapping | None = None) -> list[Path]:
    """Write the maps of one tile, band and mode, each file atomically.

    The arrays with ``np.save`` in DR1's format, the tile-wide zero points as JSON
    (:func:`zp_tile_path`: ``{"tile", "band", "mode", "description", "apertures": {aperture:
    {"zp", "zperr", "nstar"}}, "site_colour_correction"}``), the last being what
    :mod:`.site_colour` did to the fluxes the maps were measured on (``{"applied": false}``
    when ``colour_correction`` is None). ``zp`` must hold every aperture of :data:`APERTURES`.
    Returns the written paths (the order of :func:`map_paths`).
    """
    missing = [a for a in APERTURES if a not in zp]
    if missing:
        raise ValueError(f"zp maps of apertures {missing} are missing")
    arrays = [getattr(zp[a], kind) for a in APERTURES for kind in ("zp", "zperr", "pstar")]
    arrays += [align.align, align.alerr, align.astar]
    paths = map_paths(release_dir, tile, band, mode)
    for path, array in zip(paths[:-1], arrays, strict=True):
        with atomic_path(path) as tmp:
            np.save(tmp, np.asarray(array, dtype=np.float64), allow_pickle=False)
    payload = {"tile": tile, "band": band, "mode": mode, "description": _TILE_ZP_RULE,
               "apertures": {a: {"zp": float(zp[a].tile_zp), "zperr": float(zp[a].tile_zperr),
                                 "nstar": int(zp[a].tile_nstar),
                                 **{key: (float(getattr(zp[a], key))
                                          if math.isfinite(getattr(zp[a], key)) else None)
                                    for key in _OPTIONAL_TILE_VALUES}}
                             for a in APERTURES},
               "site_colour_correction": dict(colour_correction or {"applied": False})}
    atomic_write_text(paths[-1], json.dumps(payload, indent=1, allow_nan=False) + "\n")
    return paths


def read_maps(release_dir: Path, tile: str, band: str, mode: str, *,
              shape: tuple[int, int]) -> tuple[dict[str, ZpMap], AlignMap]:
    """Read the maps of one tile, band and mode written by :func:`write_maps`.

    ``shape`` is the co-add's numpy shape ``(ny, nx)``; the bin sides follow from it
    (:func:`map_bin_px`), and every array must have the matching number of bins.

    Raises
    ------
    InputError
        Naming the file, when one is missing, unreadable, of the wrong shape, or (the JSON)
        without a finite ``zp``, ``zperr`` >= 0 and integer ``nstar`` >= 0 for every aperture
        or for another tile, band or mode.
    """
    ny, nx = shape
    zp_bin = map_bin_px(max(nx, ny), FULL_ZP_BIN_PX)
    align_bin = map_bin_px(max(nx, ny), FULL_ALIGN_BIN_PX)
    paths = map_paths(release_dir, tile, band, mode)
    n_zp = 3 * len(APERTURES)
    arrays = [_load(p, _n_bins(shape, zp_bin)) for p in paths[:n_zp]]
    arrays += [_load(p, _n_bins(shape, align_bin)) for p in paths[n_zp:-1]]
    tile_zp = _load_tile_zp(paths[-1], {"tile": tile, "band": band, "mode": mode})
    zp = {a: ZpMap(zp=arrays[3 * k], zperr=arrays[3 * k + 1], pstar=arrays[3 * k + 2],
                   bin_px=zp_bin, **tile_zp[a])
          for k, a in enumerate(APERTURES)}
    return zp, AlignMap(*arrays[n_zp:], align_bin)


def _load_tile_zp(path: Path, expected: dict[str, str]) -> dict[str, dict[str, float | int]]:
    """The tile-wide values per aperture from :func:`write_maps`, as :class:`ZpMap` keywords
    (``tile_zp``, ``tile_zperr``, ``tile_nstar`` and the :data:`_OPTIONAL_TILE_VALUES`, NaN
    when the file has none: a null, or a file from before they were written)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the tile-wide zero points ({exc})") from exc
    if not isinstance(payload, dict):
        raise InputError(path, "expected a JSON object with 'apertures'")
    for key, value in expected.items():
        if payload.get(key) != value:
            raise InputError(path, f"{key} is {payload.get(key)!r}, expected {value!r}", key=key)
    apertures = payload.get("apertures")
    result = {}
    for aperture in APERTURES:
        entry = apertures.get(aperture) if isinstance(apertures, dict) else None
        values = entry if isinstance(entry, dict) else {}
        zp, zperr, nstar = values.get("zp"), values.get("zperr"), values.get("nstar")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in (zp, zperr))
        if not (numbers and math.isfinite(zp) and math.isfinite(zperr) and zperr >= 0
                and isinstance(nstar, int) and not isinstance(nstar, bool) and nstar >= 0):
            raise InputError(path, f"apertures.{aperture} must hold a finite zp, a zperr >= 0 "
                                   f"and an integer nstar >= 0, got {entry!r}", key=aperture)
        result[aperture] = {"tile_zp": float(zp), "tile_zperr": float(zperr), "tile_nstar": nstar}
        for key in _OPTIONAL_TILE_VALUES:
            value = values.get(key)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool)
                                          and math.isfinite(value) and value >= 0):
                raise InputError(path, f"apertures.{aperture}.{key} must be null or a number "
                                       f">= 0, got {value!r}", key=aperture)
            result[aperture][key] = math.nan if value is None else float(value)
        result[aperture]["colour_corrected"] = _colour_corrected(path, payload)
    return result


def _colour_corrected(path: Path, payload: dict) -> bool:
    """Whether the sidecar says the maps were measured on colour-corrected fluxes (a file from
    before the correction existed has no ``site_colour_correction``: not corrected)."""
    record = payload.get("site_colour_correction", {"applied": False})
    applied = record.get("applied") if isinstance(record, dict) else None
    if not isinstance(applied, bool):
        raise InputError(path, f"site_colour_correction must be an object with a boolean "
                               f"'applied', got {record!r}", key="site_colour_correction")
    return applied


def _load(path: Path, expected: tuple[int, int]) -> np.ndarray:
    """One ``.npy`` map, checked to be a float array of ``expected`` shape."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the map ({exc})") from exc
    if array.shape != expected or array.dtype.kind != "f":
        raise InputError(path, f"map is {array.dtype} of shape {array.shape}; expected floats "
                               f"of shape {expected} (x bins, y bins)")
    return array


# --- task --------------------------------------------------------------------------------------


def run_maps(*, release_dir: Path, tile: str, band: str, mode: str, measured_path: Path,
             settings: MapSettings, dual_path: Path | None = None) -> None:
    """Measure and write the ZP and alignment maps of one tile, band and mode.

    Reads the measurement table ``measured_path`` (Parquet), the co-add header
    (``coadd_path(release, tile, band, "coadd")``, for its size and WCS) and the tile's
    ``gaia_xp`` and ``gaia_dr3`` reference catalogs (``tile_refcat_path``); with
    ``settings.site_colour_correction`` also the co-add's exposures JSON and the tile's
    dual-mode measurement table ``dual_path`` (None: the tile has none, no correction), see
    :mod:`.site_colour`. Writes the 16 files of :func:`map_paths` atomically (15 ``.npy`` maps
    and the tile-wide zero points' JSON).
    """
    _check_mode(mode)
    _check_band(band)
    coadd = coadd_path(release_dir, tile, band, "coadd")
    try:
        header = fits.getheader(coadd)
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    except (OSError, KeyError) as exc:
        raise InputError(coadd, f"cannot read the co-add size (NAXIS1, NAXIS2): {exc}") from exc
    table = read_measured(measured_path)
    xp = read_refcat(tile_refcat_path(release_dir, tile, "gaia_xp"), "gaia_xp")
    gaia = read_refcat(tile_refcat_path(release_dir, tile, "gaia_dr3"), "gaia_dr3")
    size = max(shape)
    colour = None
    if settings.site_colour_correction:
        dual = None if dual_path is None else (
            table if Path(dual_path) == Path(measured_path) else read_measured(dual_path))
        table, done = site_colour_correction(
            table, band, dual=dual, wcs=coadd_wcs(header), settings=settings,
            exposures_path=coadd_exposures_path(release_dir, tile, band))
        colour = done.as_dict()
    try:
        zp = zp_maps(table, xp, band, bin_px=map_bin_px(size, FULL_ZP_BIN_PX), shape=shape,
                     settings=settings)
        align = align_maps(table, gaia, band=band, bin_px=map_bin_px(size, FULL_ALIGN_BIN_PX),
                           shape=shape, settings=settings)
    except ValueError as exc:
        raise StageError(str(exc), stage="maps", tile=tile, band=band,
                         path=os.fspath(measured_path)) from exc
    write_maps(release_dir, tile, band, mode, zp, align, colour)
