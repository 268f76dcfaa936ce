"""Co-adds per tile and band: SWarp (LANCZOS3, median) on one grid per tile, mask, NDITH, headers.

DR1 co-added the exposures of a tile and band with SWarp on a grid shared by all bands of the
tile (fixed centre, TAN, 0.4 arcsec/px), LANCZOS3 resampling and median combination. So do we:
:func:`run_coadd` writes SWarp inputs (TPV headers, short masked runs filled, the other masked
pixels at weight 0), has SWarp resample them with FSCALASTRO_TYPE VARIABLE (flux kept through
the 0.395 -> 0.4 arcsec/px change and the field distortion: FIXED loses 0.02 mag, NONE 0.07 mag
on the demo), zeroes the resampled weight wherever an exposure's own pixel was masked (filled
runs only keep LANCZOS3 from spreading the hole; they never enter the median,
:func:`_exclude_masked_pixels`; crosstalk ghosts that the scale stage subtracted are not masked
here, :func:`.masks.unusable_pixels`), optionally matches the backgrounds of the resampled exposures
(:func:`background_offsets`, ``CoaddSettings.background_match``), has SWarp take the masked
median and adds what SWarp does not give:

* ``<tile>_<band>_mask.fits``: bitwise OR of the DR1 bits of the contributing pixels (nearest
  input pixel), see :mod:`ks4release.reduction.coadd_maps`;
* ``<tile>_<band>_ndith.fits``: number of exposures that entered the median at each pixel
  (masked pixels of an exposure do not), read from the resampled weight frames;
* ``work/coadd/<tile>_<band>_excluded.npz`` (``layout.coadd_excluded_path``): per exposure, the
  grid pixels where its masked data stayed out of the median (:func:`_exclude_masked_pixels`),
  so that the photometry knows which exposures made each object's PSF;
* ``<tile>_<band>_exposures.json``: stem, MJD, site, CCD footprints (sky outlines,
  ``coadd_maps.FOOTPRINT_VERTICES_PER_SIDE`` vertices per side, so that they follow the
  distortion's bow of the CCD edges) and ok flag of every exposure (for the catalog's NDITH,
  EDGE and MJD columns), its PSF half-light radius (``psf_r50_arcsec``, for CLASS_STAR's
  seeing map) and sky noise (``sky_sigma``, scaled counts per pixel; both for the photometry's
  median-stack flux factors, :mod:`~ks4release.reduction.median_stack`);
* co-add header: ``SEEING`` (median FWHM of stars on the co-add, arcsec) and ``PSFBETA``
  (their median Moffat index, for the catalog's Kron loss correction), ``MAGLIM`` (5-sigma
  limiting AB magnitude in an aperture of ``DEPTHAPD`` arcsec diameter = 2 x SEEING by default,
  from random empty apertures, so the noise correlation of the resampling is included; the
  median of the local values in 4 x 4 cells where NDITH has its most common value),
  ``NCOMBINE``, ``MJD-OBS``/``MJD-END``/``MJD-MEAN``, ``MAGZERO`` = 30, provenance.

Background matching (Montage-style, for scattered light and ghosts that differ between
exposures, such as the simulator's stray-light rings, which no DR1 mask bit flags): on the
resampled frames (``-COMBINE N``: one frame per CCD on the tile grid, with its weight), each
exposure's smooth offset from the others is the least-squares solution of the background maps of
all pairwise difference images (sources masked), the majority level taken as zero, computed in
blocks of grid rows with overlapping margins (memory ~20 bytes per exposure and pixel of a block,
``CoaddSettings.background_match_block_rows``); the offset is subtracted from copies of the
frames and SWarp median-combines the matched copies (``-RESAMPLE N``, as every co-add does:
as fast as a numpy masked median of the same frames, 0.7 s on a demo tile, which would also
need every frame in memory).
A ring in one exposure of four otherwise lifts the median by a fraction of the ring over its
~90 px wide band: 0.04-0.09 mag on the stars under an 8-sigma ring of the test survey.

The grid (:func:`tile_grid`) is a pure function of the tile centre and the camera, so the HiPS
and catalog stages rebuild it without reading a co-add.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.ndimage import binary_dilation, maximum_filter
from scipy.optimize import least_squares

from ks4release import __version__
from ks4release.atomic import atomic_path, atomic_write_text
from ks4release.camera import CCD_NAMES, COADD_PIXEL_SCALE_ARCSEC, Camera
from ks4release.errors import InputError, StageError
from ks4release.layout import coadd_excluded_path, coadd_exposures_path, coadd_path
from ks4release.projection import tan_wcs_header
from ks4release.reduction.coadd_maps import (
    CcdProjection,
    accumulate_mask,
    ccd_footprint_deg,
    exposure_coverage,
    frame_box,
    grid_slices,
    ndith_from_weights,
    project_ccd,
)
from ks4release.reduction.coadd_swarp import (
    SwarpCcd,
    run_swarp,
    swarp_command,
    swarp_header,
    swarp_version,
    write_swarp_exposure,
)
from ks4release.reduction.masks import unusable_pixels
from ks4release.reduction.moffat import moffat_fwhm
from ks4release.reduction.sep_objects import set_extraction_limits
from ks4release.settings import CoaddSettings
from ks4release.survey import DITHER_OFFSETS_ARCMIN, REFERENCE_ZEROPOINT

__all__ = [
    "CoaddSettings",
    "background_offset_blocks",
    "background_offsets",
    "coadd_work_dir",
    "fill_masked_pixels",
    "limiting_magnitude",
    "measure_seeing",
    "modal_coverage",
    "run_coadd",
    "tile_grid",
]

logger = logging.getLogger(__name__)

_DR1_BITS = 15
# Source mask of the empty apertures: detection threshold (sigma) and growth (px).
_EMPTY_THRESH = 1.0
_EMPTY_GROW_PX = 3
# Margin of a background-match block beyond the reach of sep's median filter, meshes. On
# synthetic stacks of unit noise (filter 3, mesh 16, blocks of 32-64 rows) block-wise offsets
# differ from the whole grid's by up to 0.2-0.35 / 0.005 / 1e-3 / 4e-5 of a pixel's sigma at
# 0 / 3 / 5 / 9 meshes beyond it (sep's natural bicubic spline: ~4x less pull per mesh); at 5,
# 12 of 16 stacks also had a source pixel or a map at the min_sigma cut flipped, moving a
# mesh-sized patch by up to 0.13; at 9 none had.
_MATCH_MARGIN_MESHES = 9



def tile_grid(ra_deg: float, dec_deg: float, camera: Camera, *,
              pixel_scale_arcsec: float = COADD_PIXEL_SCALE_ARCSEC,
              margin_arcsec: float = 120.0, square: bool = True) -> tuple[WCS, tuple[int, int]]:
    """The co-add grid of a tile: TAN at the tile centre, north up, east left.

    Size = the camera's field (CCDs and gaps) plus the full dither extent (DR1: +-4' in RA,
    +-7' in Dec, shrunk with the camera like the demo survey's dithers) plus ``margin_arcsec``
    (scaled with the camera) on every side, rounded up to an even number of pixels; square by
    default. Full size: 21886 x 21886 px (DR1: ~22000). CRPIX is the grid centre, as SWarp puts
    it with CENTER_TYPE MANUAL: ``(n + 1) / 2``.

    Returns
    -------
    wcs : WCS
        Celestial TAN WCS with a CD matrix (no PC: Hipsgen ignores PC).
    shape : (ny, nx)
    """
    if not pixel_scale_arcsec > 0:
        raise ValueError(f"pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec}")
    width_px, height_px = camera.field_size_px
    dither_ra = max(abs(d[0]) for d in DITHER_OFFSETS_ARCMIN) * 60.0 * camera.scale
    dither_dec = max(abs(d[1]) for d in DITHER_OFFSETS_ARCMIN) * 60.0 * camera.scale
    margin = margin_arcsec * camera.scale
    width = width_px * camera.pixel_scale_arcsec + 2 * (dither_ra + margin)
    height = height_px * camera.pixel_scale_arcsec + 2 * (dither_dec + margin)
    nx = 2 * math.ceil(width / pixel_scale_arcsec / 2)
    ny = 2 * math.ceil(height / pixel_scale_arcsec / 2)
    if square:
        nx = ny = max(nx, ny)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg % 360.0, dec_deg]
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    scale_deg = pixel_scale_arcsec / 3600.0
    wcs.wcs.cd = np.array([[-scale_deg, 0.0], [0.0, scale_deg]])
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    return wcs, (ny, nx)


# --------------------------------------------------------------------------------------------
# Image quality


def _moffat(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    amp, x0, y0, alpha, beta, bg = params
    return amp * (1.0 + ((x - x0) ** 2 + (y - y0) ** 2) / alpha**2) ** (-beta) + bg


def _fit_moffat(image: np.ndarray, x: float, y: float, half: int) -> tuple[float, float]:
    """FWHM (px) and beta of a circular Moffat with free beta fitted to the stamp around
    (x, y); NaN, NaN if the fit fails or leaves the plausible range."""
    ix, iy = round(float(x)), round(float(y))
    stamp = image[iy - half:iy + half + 1, ix - half:ix + half + 1].astype(float)
    if stamp.shape != (2 * half + 1, 2 * half + 1) or not np.all(np.isfinite(stamp)):
        return math.nan, math.nan
    gy, gx = np.mgrid[iy - half:iy + half + 1, ix - half:ix + half + 1]
    start = np.array([stamp.max(), x, y, 3.0, 3.0, 0.0])
    lower = [0.0, x - 2, y - 2, 0.3, 1.05, -np.inf]
    upper = [np.inf, x + 2, y + 2, 3.0 * half, 20.0, np.inf]
    fit = least_squares(lambda p: (_moffat(p, gx, gy) - stamp).ravel(), start,
                        bounds=(lower, upper), x_scale="jac")
    alpha, beta = fit.x[3], fit.x[4]
    at_bound = np.isclose([alpha, alpha, beta, beta], [lower[3], upper[3], lower[4], upper[4]],
                          rtol=1e-3)
    if not fit.success or at_bound.any():
        return math.nan, math.nan
    return float(moffat_fwhm(alpha, beta)), float(beta)


def _detect(image: np.ndarray, bad: np.ndarray, thresh: float, minarea: int = 9
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """sep objects, segmentation map, background-subtracted image and global pixel noise.

    The background mesh (64 px = 25.6 arcsec) removes what the catalog stage's background
    removes too: low-level structure such as a stray-light ring that one exposure of four
    lifts through the median.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    background = sep.Background(data, mask=bad, bw=64, bh=64)
    noise = float(background.globalrms)
    subtracted = data - background.back()
    set_extraction_limits(data.size)
    objects, segmap = sep.extract(subtracted, thresh, err=noise, mask=bad, minarea=minarea,
                                  segmentation_map=True)
    return objects, segmap, subtracted, noise


def measure_seeing(image: np.ndarray, bad: np.ndarray, pixel_scale_arcsec: float, *,
                   snr_min: float = 50.0, max_stars: int = 300) -> tuple[float, float, int]:
    """Median FWHM (arcsec) and Moffat beta of the stars on an image, and how many stars they
    rest on.

    Stars: sep detections with S/N >= ``snr_min``, no sep flag, no bad pixel near them, round
    (b/a > 0.8), not among the brightest 2% (saturation), whose half-light radius lies within
    15% of the stellar locus (the 20th percentile of the candidates' radii: galaxies are
    larger). Each is fitted with a circular Moffat of free beta, so the FWHM does not assume the
    PSF profile (its median beta describes the co-add PSF's wings, which a median of exposures
    of different seeing shapes). NaN, NaN and the number of good fits when fewer than 5 stars
qualify or fit.
    """
    objects, _, _, noise = _detect(image, bad, 5.0)
    if objects.size == 0:
        return math.nan, math.nan, 0
    snr = objects["flux"] / (noise * np.sqrt(np.maximum(objects["npix"], 1)))
    keep = (snr >= snr_min) & (objects["flag"] == 0) & (objects["b"] > 0.8 * objects["a"])
    keep &= objects["peak"] < np.percentile(objects["peak"], 98)
    obj = objects[keep]
    if obj.size < 5:
        return math.nan, math.nan, 0
    data = np.ascontiguousarray(image, dtype=np.float32)
    radius, _ = sep.flux_radius(data, obj["x"], obj["y"], 6.0 * obj["a"], 0.5, subpix=5)
    locus = np.percentile(radius, 20)
    obj = obj[np.abs(radius / locus - 1.0) < 0.15]
    obj = obj[np.argsort(-obj["flux"])][:max_stars]
    half = int(max(6, math.ceil(3.0 * locus)))
    dilated = _dilate(bad, half)
    fits_ = np.array([_fit_moffat(image, o["x"], o["y"], half) for o in obj
                      if not dilated[round(float(o["y"])), round(float(o["x"]))]]).reshape(-1, 2)
    fits_ = fits_[np.all(np.isfinite(fits_), axis=1)]
    if len(fits_) < 5:
        return math.nan, math.nan, len(fits_)
    return (float(np.median(fits_[:, 0]) * pixel_scale_arcsec), float(np.median(fits_[:, 1])),
            len(fits_))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square of half-size ``radius``."""
    return maximum_filter(mask.astype(np.uint8), size=2 * radius + 1) > 0


def modal_coverage(ndith: np.ndarray) -> int:
    """The most common non-zero NDITH value: the coverage of the main part of the tile."""
    counts = np.bincount(ndith.ravel().astype(np.int64))
    if counts.size <= 1:
        return 0
    return int(np.argmax(counts[1:]) + 1)


def limiting_magnitude(image: np.ndarray, usable: np.ndarray, diameter_px: float, *,
                       n_apertures: int = 400, nsigma: float = 5.0, seed: int = 1,
                       grid: int = 1, zeropoint: float = REFERENCE_ZEROPOINT
                       ) -> tuple[float, float, int, int]:
    """``nsigma`` limiting AB magnitude from random empty apertures, median over cells.

    The image is cut into ``grid`` x ``grid`` cells. In each, ``n_apertures`` apertures of
    ``diameter_px`` are dropped at random on ``usable`` pixels away from every source (the sep
    segmentation map at 1 sigma, 5 px, dilated by the aperture radius + 3 px: the faint
    galaxies of the demo survey otherwise add 15% to the noise), on the image minus its sep
    background map (as the catalog measures it); the scatter of their sums (1.4826 x MAD) is the
    noise of a faint point source in that aperture, correlated pixel noise included. Cells with
    fewer than 50 apertures are skipped. Returns (median magnitude, median aperture noise,
    apertures used, cells used); NaN and zeros when no cell qualifies.
    """
    if diameter_px <= 0 or not math.isfinite(diameter_px):
        raise ValueError(f"diameter_px must be finite and > 0, got {diameter_px}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    radius = diameter_px / 2.0
    _, segmap, data, _ = _detect(image, ~usable, _EMPTY_THRESH, minarea=5)
    allowed = ~_dilate((segmap > 0) | ~usable, math.ceil(radius) + _EMPTY_GROW_PX)
    rng = np.random.default_rng(seed)
    ny, nx = data.shape
    edges_y = np.linspace(0, ny, grid + 1).astype(int)
    edges_x = np.linspace(0, nx, grid + 1).astype(int)
    sigmas, n_used = [], 0
    for i in range(grid):
        for j in range(grid):
            ys, xs = np.nonzero(allowed[edges_y[i]:edges_y[i + 1], edges_x[j]:edges_x[j + 1]])
            if ys.size == 0:
                continue
            pick = rng.choice(ys.size, size=min(n_apertures, ys.size), replace=False)
            x = xs[pick] + edges_x[j] + rng.uniform(-0.5, 0.5, pick.size)
            y = ys[pick] + edges_y[i] + rng.uniform(-0.5, 0.5, pick.size)
            sums, _, flags = sep.sum_circle(data, x, y, radius, subpix=5)
            sums = sums[flags == 0]
            if sums.size < 50:
                continue
            n_used += int(sums.size)
            sigmas.append(1.4826 * float(np.median(np.abs(sums - np.median(sums)))))
    if not sigmas:
        return math.nan, math.nan, 0, 0
    sigma = float(np.median(sigmas))
    return zeropoint - 2.5 * math.log10(nsigma * sigma), sigma, n_used, len(sigmas)


def fill_masked_pixels(data: np.ndarray, bad: np.ndarray, max_gap: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fill short runs of bad pixels along each row by linear interpolation.

    Returns ``(filled, still_bad)``: a copy of ``data`` in which every run of at most
    ``max_gap`` bad pixels with good pixels on both sides holds the straight line between them,
    and the bad pixels left (longer runs, runs touching the row ends), which are set to 0.
    Rows run along X, across the vertical bleed trails and bad columns of the KMTNet CCDs.
    """
    if data.shape != bad.shape:
        raise ValueError(f"data {data.shape} and bad {bad.shape} differ in shape")
    filled = np.array(data, dtype=np.float32)
    still_bad = np.array(bad, dtype=bool)
    nx = data.shape[1]
    for row in np.flatnonzero(still_bad.any(axis=1)):
        line = still_bad[row]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start > max_gap or start == 0 or stop == nx:
                continue
            left, right = filled[row, start - 1], filled[row, stop]
            t = np.arange(1, stop - start + 1) / (stop - start + 1)
            filled[row, start:stop] = left + (right - left) * t
            line[start:stop] = False
    filled[still_bad] = 0.0
    return filled, still_bad


def _masked_median(stack: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the ``valid`` values of ``stack`` (mean of the two middle ones for
    an even count, as SWarp's and numpy's), NaN where none is valid. Sorting the few exposures
    is 4x faster than ``np.nanmedian`` on them, which warns once per empty pixel."""
    data = np.where(valid, stack, np.float32(np.inf))
    data.sort(axis=0)
    count = valid.sum(axis=0)
    low = np.take_along_axis(data, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
    high = np.take_along_axis(data, np.maximum(count // 2, 0)[None], axis=0)[0]
    return np.where(count > 0, 0.5 * (low + high), np.float32(np.nan)).astype(np.float32)


def _source_pixels(stack: np.ndarray, valid: np.ndarray, mesh_px: int, nsigma: float
                   ) -> np.ndarray:
    """Pixels of sources: ``nsigma`` sep detections (minarea 5, against the local rms map) on the
    per-pixel median of the exposures minus its background map of ``mesh_px`` meshes. The median
    and the small mesh keep scattered light of one exposure out of the detections (a stray-light
    ring reaches 4 sigma in the mean of four demo exposures and would be masked as a source, its
    own matching then interpolated over)."""
    median = _masked_median(stack, valid)
    no_data = ~np.isfinite(median)
    median = np.ascontiguousarray(np.where(no_data, 0.0, median), dtype=np.float32)
    background = sep.Background(median, mask=no_data, bw=mesh_px, bh=mesh_px)
    set_extraction_limits(median.size)
    _, segmap = sep.extract(median - background.back(), nsigma, err=background.rms(),
                            mask=no_data, minarea=5, segmentation_map=True)
    return segmap > 0


def background_offsets(stack: np.ndarray, valid: np.ndarray, *, mesh_px: int,
                       filter_size: int = 3, source_sigma: float = 5.0,
                       source_grow_px: int = 1, min_sigma: float = 3.0) -> np.ndarray:
    """Smooth background offset of every exposure from the others, on a common grid.

    ``stack`` (n, ny, nx) holds the n resampled exposures, ``valid`` (n, ny, nx) where each has
    data. For every pair of exposures the difference of their backgrounds is the sep background
    map (``mesh_px`` meshes, median filter of ``filter_size`` meshes, sigma-clipped per mesh) of
    their difference image where both have data, with the sources of the median image masked
    (:func:`_source_pixels`, grown by ``source_grow_px``): stars and galaxies cancel in a
    difference, so a small mesh follows scattered light without eating them, and a difference of
    two noisy images is symmetric, so no noise bias enters (a median of the others would be
    pulled towards an offset exposure). At each pixel the offsets of the exposures covering it
    are the least-squares solution of those pairwise differences (exposure i: the mean over
    covering j of D_ij, D_ii = 0), shifted so that their median is zero: the majority of
    exposures, those without scattered light, keep their level and one lifted exposure takes all
    of its own lift. Pairwise maps do not change where the set of covering exposures changes
    (chip gaps), so neither do the offsets. Where only two exposures overlap, a difference
    cannot tell which one is lifted: both move halfway, which leaves their median (= mean) as it
    was. Pairwise values below ``min_sigma`` times the noise of one mesh (1.2533 x the
    difference image's local rms / ``mesh_px``, sep's rms map) are set to 0 (``min_sigma`` 0:
    none): where nothing is found nothing is subtracted, so the maps' own noise (~0.1 sigma of a
    pixel at a 16 px mesh, coherent over a mesh) does not cost depth (0.05 mag on the demo's V
    co-add otherwise). The cut acts on the pairs, not on each exposure's offsets, so that the
    two offsets of a pair always move together. Every noise figure is local (sep's rms maps, not
    its image-wide median of them), so that the offsets of a part of the grid depend on its
    surroundings only (:func:`background_offset_blocks`).

    Returns the offsets (n, ny, nx) float32, 0 where an exposure has no data.
    """
    if stack.ndim != 3 or stack.shape != valid.shape:
        raise ValueError(f"stack {stack.shape} and valid {valid.shape} must be equal (n, ny, nx)")
    if mesh_px < 2 or filter_size < 1:
        raise ValueError(f"mesh_px must be >= 2 and filter_size >= 1, got {mesh_px}, "
                         f"{filter_size}")
    count = valid.sum(axis=0)
    sources = _dilate(_source_pixels(stack, valid, mesh_px, source_sigma), source_grow_px)
    summed = np.zeros(stack.shape, dtype=np.float32)
    n = stack.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            both = valid[i] & valid[j]
            ignore = sources | ~both
            if ignore.all():
                continue
            diff = np.ascontiguousarray(np.where(both, stack[i] - stack[j], 0.0),
                                        dtype=np.float32)
            background = sep.Background(diff, mask=ignore, bw=mesh_px, bh=mesh_px,
                                        fw=filter_size, fh=filter_size)
            pair = background.back()
            # noise of one mesh's estimate (the median of mesh_px^2 pixels)
            pair[np.abs(pair) < min_sigma * 1.2533 / mesh_px * background.rms()] = 0.0
            summed[i][both] += pair[both]
            summed[j][both] -= pair[both]
    summed /= np.maximum(count, 1).astype(np.float32)
    majority = _masked_median(summed, valid)
    return np.where(valid, summed - majority, 0.0).astype(np.float32)


def background_offset_blocks(read_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
                             ny: int, *, block_rows: int, mesh_px: int,
                             filter_size: int = 3, source_sigma: float = 5.0,
                             source_grow_px: int = 1, min_sigma: float = 3.0
                             ) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`background_offsets` of a grid of ``ny`` rows, computed in blocks of rows.

    ``read_rows(r0, r1)`` returns the (stack, valid) rows r0:r1 of the grid (n, r1 - r0, nx).
    Each block of ``block_rows`` rows (a multiple of ``mesh_px``, so that sep's meshes fall
    where they fall on the whole grid) is computed from its rows extended by a margin of
    ``filter_size // 2 + 9`` meshes on each side (less at the grid's ends), of which only its
    own rows are kept. Beyond the reach of sep's median filter (``filter_size // 2`` meshes) the
    block's edge still pulls on sep's natural bicubic spline (~4x less per mesh) and on the
    detection of the sources it cuts: 9 meshes more leave the kept rows within ~4e-5 of a
    pixel's sigma of the whole grid's offsets, so close that a source pixel at sep's threshold
    or a pairwise map at the ``min_sigma`` cut seldom flips (which moves a mesh-sized patch by
    ~0.1 sigma). Yields (y0, y1, offsets of rows y0:y1),
    top to bottom; peak memory ~20 bytes per exposure and pixel of ``block_rows + 2 x margin``
    rows.
    """
    if block_rows < mesh_px or block_rows % mesh_px:
        raise ValueError(f"block_rows must be a positive multiple of mesh_px ({mesh_px}), got "
                         f"{block_rows}")
    margin = (filter_size // 2 + _MATCH_MARGIN_MESHES) * mesh_px
    for y0 in range(0, ny, block_rows):
        y1 = min(ny, y0 + block_rows)
        r0, r1 = max(0, y0 - margin), min(ny, y1 + margin)
        stack, valid = read_rows(r0, r1)
        offsets = background_offsets(stack, valid, mesh_px=mesh_px, filter_size=filter_size,
                                     source_sigma=source_sigma, source_grow_px=source_grow_px,
                                     min_sigma=min_sigma)
        del stack, valid
        yield y0, y1, offsets[:, y0 - r0:y1 - r0]
        del offsets  # before the next block is read (the caller drops its view too)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, kw_only=True)
class _Exposure:
    """One scaled exposure with its mask, as far as the co-add needs it."""

    stem: str
    path: Path
    mask_path: Path
    mjd: float
    site: str
    camera_scale: float
    ok_ccds: tuple[str, ...]
    excluded: dict[str, str]


def _read_exposure(path: Path, mask_path: Path, tile: str, band: str) -> _Exposure:
    """Primary-header facts and the CCDs the co-add may use (ASTOK = T)."""
    try:
        with fits.open(path, memmap=True) as hdul:
            primary = hdul[0].header
            for key, want in (("TILE", tile), ("FILTER", band)):
                if str(primary.get(key, "")).strip() != want:
                    raise InputError(path, f"{key} = {primary.get(key)!r} (expected {want!r})",
                                     key=key)
            ok, excluded = [], {}
            names = {str(h.header.get("EXTNAME", "")).strip(): h for h in hdul[1:]}
            for name in CCD_NAMES:
                if name not in names:
                    raise InputError(path, f"extension {name!r} is missing", hdu=name)
                astok = names[name].header.get("ASTOK")
                if astok is True:
                    ok.append(name)
                else:
                    excluded[name] = f"ASTOK = {astok!r}"
            mjd, site = primary.get("MJD-OBS"), str(primary.get("OBSERVAT", "")).strip()
            scale = float(primary.get("CAMSCALE", 1.0))
    except OSError as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from None
    if not isinstance(mjd, (int, float)):
        raise InputError(path, f"MJD-OBS = {mjd!r} is not a number", key="MJD-OBS")
    if not mask_path.is_file():
        raise InputError(mask_path, "mask file does not exist")
    return _Exposure(stem=path.name.removesuffix(".fits"), path=path, mask_path=mask_path,
                     mjd=float(mjd), site=site, camera_scale=scale, ok_ccds=tuple(ok),
                     excluded=excluded)


def _load_ccd(exposure: _Exposure, name: str, ignore_bits: int, max_gap: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header]:
    """Pixels (short bad runs filled, the other bad pixels 0), mask bits (DR1's and the
    internal :data:`.masks.XTALK_CORRECTED`), the map of pixels SWarp may use, and the
    header."""
    with fits.open(exposure.path, memmap=True) as hdul:
        data = np.array(hdul[name].data, dtype=np.float32)
        header = hdul[name].header.copy()
    try:
        with fits.open(exposure.mask_path, memmap=True) as hdul:
            mask = np.array(hdul[name].data, dtype=np.uint8)
    except (KeyError, OSError) as exc:
        raise InputError(exposure.mask_path, f"extension {name!r} cannot be read ({exc})",
                         hdu=name) from None
    if mask.shape != data.shape:
        raise InputError(exposure.mask_path, f"extension {name!r}: shape {mask.shape} differs "
                         f"from the image's {data.shape}", hdu=name)
    bad = unusable_pixels(mask, ignore_bits) | ~np.isfinite(data)
    data, still_bad = fill_masked_pixels(np.where(bad, 0.0, data), bad, max_gap)
    return data, mask, ~still_bad, header


def _ccd_wcs(header: fits.Header) -> WCS:
    """The CCD's WCS; astropy's notes about non-standard keywords are not errors here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


# --------------------------------------------------------------------------------------------
# The task


def coadd_work_dir(release_dir: Path) -> Path:
    """Folder of SWarp's temporary inputs and resampled frames (emptied after each co-add)."""
    return Path(release_dir) / "work" / "coadd"


def run_coadd(*, tile: str, band: str, ra: float, dec: float, scaled: list[Path],
              masks: list[Path], release_dir: Path, settings: CoaddSettings) -> dict:
    """Co-add one tile and band; write co-add, mask, NDITH and the exposures JSON.

    Parameters
    ----------
    tile, band : str
        What is co-added (checked against each exposure's TILE and FILTER).
    ra, dec : float
        Tile centre, deg (the grid centre).
    scaled, masks : list of Path
        Scaled exposures (``layout.scaled_path``) and their masks (``layout.mask_path``), in
        the same order.
    release_dir : Path
        Release directory; outputs go to ``layout.coadd_path`` / ``coadd_exposures_path``.
    settings : CoaddSettings

    Returns
    -------
    dict
        Seconds spent per step (inputs, swarp, exclude (masked pixels out of the median), match
        when ``settings.background_match``, maps, quality, write), the largest background
        offset subtracted (co-add units) and the header figures.

    Raises
    ------
    StageError
        No usable CCD, or SWarp failed.
    InputError
        An input is unreadable or belongs to another tile or band.
    """
    if len(scaled) != len(masks):
        raise ValueError(f"scaled ({len(scaled)}) and masks ({len(masks)}) differ in length")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    exposures = [_read_exposure(Path(s), Path(m), tile, band) for s, m in zip(scaled, masks)]
    for exp in exposures:
        for name, why in exp.excluded.items():
            logger.warning("coadd %s %s: %s CCD %s excluded (%s)", tile, band, exp.stem, name, why)
    used = [e for e in exposures if e.ok_ccds]
    if not used:
        raise StageError("no exposure has a CCD with ASTOK = T", stage="coadd", tile=tile,
                         band=band)
    scales = {e.camera_scale for e in used}
    if len(scales) != 1:
        raise StageError(f"exposures disagree on CAMSCALE: {sorted(scales)}", stage="coadd",
                         tile=tile, band=band)
    camera = Camera.kmtnet(scales.pop())
    grid_wcs, shape = tile_grid(ra, dec, camera, pixel_scale_arcsec=settings.pixel_scale_arcsec,
                                margin_arcsec=settings.grid_margin_arcsec,
                                square=settings.square_grid)
    work_root = coadd_work_dir(release_dir).resolve()  # SWarp runs in the temporary folder
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{tile}_{band}_", dir=work_root) as tmp_name:
        tmp = Path(tmp_name)
        images, weights, mask_map, masked, t_maps = _swarp_inputs_and_mask(
            used, tmp, grid_wcs, shape, settings)
        timings["inputs_s"] = time.perf_counter() - t0 - t_maps
        timings["maps_s"] = t_maps
        t1 = time.perf_counter()
        out_image = tmp / "coadd.fits"
        common = {"out_image": out_image, "out_weight": tmp / "coadd.weight.fits",
                  "center_deg": (float(grid_wcs.wcs.crval[0]), float(grid_wcs.wcs.crval[1])),
                  "shape": shape, "pixel_scale_arcsec": settings.pixel_scale_arcsec,
                  "resample_dir": tmp, "nthreads": settings.nthreads,
                  "combine_type": settings.combine_type,
                  "resampling_type": settings.resampling_type,
                  "projection_err_px": settings.projection_err_px,
                  "binary": settings.swarp_binary}
        swarp = {"timeout_s": settings.timeout_s, "tile": tile, "band": band, "cwd": tmp}
        largest_offset = 0.0
        run_swarp(swarp_command(images, weights, combine=False, **common), **swarp)
        frames = {e.stem: sorted(tmp.glob(f"{e.stem}.*.resamp.fits")) for e in used}
        timings["swarp_s"] = time.perf_counter() - t1
        try:
            t1 = time.perf_counter()
            excluded = _exclude_masked_pixels(frames, masked, grid_wcs, shape)
            timings["exclude_s"] = time.perf_counter() - t1
            if settings.background_match:
                t1 = time.perf_counter()
                largest_offset = _match_backgrounds(frames, grid_wcs, shape, settings)
                timings["match_s"] = time.perf_counter() - t1
        except ValueError as exc:
            raise StageError(str(exc), stage="coadd", tile=tile, band=band) from None
        t1 = time.perf_counter()
        resampled = [f for stem_frames in frames.values() for f in stem_frames]
        images = ([_matched_frame(f) for f in resampled] if settings.background_match
                  else resampled)
        run_swarp(swarp_command(images, [_weight_frame(f) for f in resampled],
                                resample=False, **common), **swarp)
        with fits.open(out_image) as hdul:
            coadd = np.array(hdul[0].data, dtype=np.float32)
            _check_swarp_grid(hdul[0].header, grid_wcs, shape, tile, band)
        timings["swarp_s"] = timings.get("swarp_s", 0.0) + time.perf_counter() - t1
        t1 = time.perf_counter()
        frames = {e.stem: sorted(tmp.glob(f"{e.stem}.*.resamp.weight.fits")) for e in used}
        try:
            ndith_map = ndith_from_weights(frames, grid_wcs, shape)
        except ValueError as exc:
            raise StageError(str(exc), stage="coadd", tile=tile, band=band) from None
        timings["maps_s"] += time.perf_counter() - t1
    coadd[ndith_map == 0] = 0.0
    t1 = time.perf_counter()
    quality = _quality(coadd, mask_map, ndith_map, settings)
    timings["quality_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    header = _coadd_header(tile, band, grid_wcs, used, quality, settings)
    _write_products(release_dir, tile, band, coadd, mask_map, ndith_map, header,
                    [_footprint(e) for e in exposures], grid_wcs)
    write_excluded(coadd_excluded_path(release_dir, tile, band), excluded, shape)
    timings["write_s"] = time.perf_counter() - t1
    return {"timings_s": timings, "background_offset_max": largest_offset, **quality}


def _swarp_inputs_and_mask(used: list[_Exposure], folder: Path, grid_wcs: WCS,
                           shape: tuple[int, int], settings: CoaddSettings
                           ) -> tuple[list[Path], list[Path], np.ndarray, dict[str, np.ndarray],
                                      float]:
    """Write every exposure's SWarp input and weight files into ``folder`` and OR its mask
    bits onto the grid; returns (images, weights, mask map, each exposure's masked grid pixels
    (:func:`_masked_on_grid`), seconds spent on the mask)."""
    mask_map = np.zeros(shape, dtype=np.uint8)
    masked = {}
    images, weights = [], []
    t_maps = 0.0
    for exp in used:
        ccds, projections = [], []
        for name in exp.ok_ccds:
            data, mask, good, header = _load_ccd(exp, name, settings.ignore_bits,
                                                settings.fill_max_gap_px)
            t1 = time.perf_counter()
            projection = project_ccd(mask, _ccd_wcs(header), grid_wcs, shape,
                                     step=settings.map_step_px)
            t_maps += time.perf_counter() - t1
            if projection is not None:
                projections.append(projection)
            ccds.append(SwarpCcd(name=name, data=data, weight=good.astype(np.float32),
                                 header=swarp_header(header, data.shape)))
        accumulate_mask(projections, mask_map)
        masked[exp.stem] = _masked_on_grid(projections, settings.ignore_bits, shape)
        image, weight = folder / f"{exp.stem}.fits", folder / f"{exp.stem}.weight.fits"
        write_swarp_exposure(ccds, image, weight)
        images.append(image)
        weights.append(weight)
    mask_map &= np.uint8(_DR1_BITS)
    return images, weights, mask_map, masked, t_maps


def _masked_on_grid(projections: list[CcdProjection], bits: int, shape: tuple[int, int]
                    ) -> np.ndarray:
    """Flat indices of the grid pixels whose nearest input pixel of one exposure is unusable
    under ``bits`` (:func:`.masks.unusable_pixels`; sorted, unique; int32 when the grid allows):
    a few percent of the grid, kept instead of a map per exposure (4 bytes per masked pixel
    against 1 per grid pixel)."""
    dtype = np.int32 if shape[0] * shape[1] < 2**31 else np.int64
    parts = [np.empty(0, dtype=dtype)]
    for p in projections:
        yy, xx = np.nonzero(unusable_pixels(p.bits, bits))
        parts.append(np.ravel_multi_index((yy + p.y0, xx + p.x0), shape).astype(dtype))
    return np.unique(np.concatenate(parts))


def _exclude_masked_pixels(frames: dict[str, list[Path]], masked: dict[str, np.ndarray],
                           grid_wcs: WCS, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Zero the resampled weight of every exposure where its own input pixels were masked,
    wherever another exposure has unmasked data; return, per exposure stem, the sorted flat
    grid indices so excluded (the photometry's seeing map needs which exposures entered the
    median at each object, not only how many).

    Short masked runs are filled before resampling, so that LANCZOS3 does not zero the weight
    of every output pixel it carries them into (~10% of an exposure, one cosmic ray at a time).
    The filled values must still stay out of the median: a 12 px crosstalk strip (masked only,
    ``[masks] crosstalk_correct = false``) filled across a star leaves a flat smear, which the
    median of two or three exposures turned into elongated stars (CLASS_STAR ~0.03). The masked
    grid pixels, grown by one pixel to cover the nearest-pixel projection, get weight 0 in that
    exposure's frames, so that the median is a masked median and NDITH counts the exposures
    that entered it. Where every covering exposure is masked (a saturated core; crosstalk
    strips that overlap when they are only masked) the filled values are kept rather than
    leaving a hole: on the demo, whose 1/16-scale CCDs put a full bleed trail and its crosstalk
    strips on every chip (10% of a chip), holes grew the area without data by 3% of a tile
    (crosstalk masked only). Four grid-sized byte maps at a time (~1.9 GB for a full-size tile).
    """
    good = np.zeros(shape, dtype=np.uint8)  # exposures with unmasked data (NCOMBINE < 256)
    covered, scratch, grown = (np.zeros(shape, dtype=bool) for _ in range(3))
    for stem, paths in frames.items():
        exposure_coverage([_weight_frame(p) for p in paths], grid_wcs, covered)
        covered &= ~_grow_into(masked[stem], scratch=scratch, out=grown)
        good += covered
    has_good = good > 0
    del good
    dtype = np.int32 if shape[0] * shape[1] < 2**31 else np.int64
    out = {}
    for stem, paths in frames.items():
        excluded = _grow_into(masked[stem], scratch=scratch, out=grown)
        excluded &= has_good
        out[stem] = np.flatnonzero(excluded).astype(dtype)
        for path in paths:
            header, weight, slices = _read_weight_frame(path, grid_wcs, shape)
            if slices is None or not excluded[slices[0]].any():
                continue
            on_grid, on_frame = slices
            weight[on_frame][excluded[on_grid]] = 0.0
            fits.PrimaryHDU(data=weight, header=header).writeto(_weight_frame(path),
                                                                overwrite=True)
    return out


def _grow_into(indices: np.ndarray, *, scratch: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` set to the grid map of the flat ``indices`` grown by one pixel (3 x 3); both
    grid-sized buffers are reused from exposure to exposure."""
    scratch[:] = False
    scratch.flat[indices] = True
    binary_dilation(scratch, np.ones((3, 3), dtype=bool), output=out)
    return out


def _read_weight_frame(frame: Path, grid_wcs: WCS, shape: tuple[int, int]
                       ) -> tuple[fits.Header, np.ndarray, tuple | None]:
    """Header, pixels and (grid, frame) slices (:func:`.coadd_maps.grid_slices`) of a
    resampled frame's weight."""
    path = _weight_frame(frame)
    with fits.open(path) as hdul:
        header, weight = hdul[0].header.copy(), np.array(hdul[0].data, dtype=np.float32)
    return header, weight, grid_slices(*frame_box(header, grid_wcs, path), weight.shape,
                                        shape)


def _weight_frame(frame: Path) -> Path:
    """SWarp's weight frame of a resampled frame (``x.resamp.fits`` -> ``x.resamp.weight.fits``)."""
    return frame.with_name(frame.name.removesuffix(".fits") + ".weight.fits")


def _match_backgrounds(frames: dict[str, list[Path]], grid_wcs: WCS, shape: tuple[int, int],
                       settings: CoaddSettings) -> float:
    """Write every resampled frame less its exposure's background offset
    (:func:`background_offsets`, where its weight is > 0) to :func:`_matched_frame`; returns the
    largest |offset|.

    The grid is matched in blocks of ``settings.background_match_block_rows`` rows
    (:func:`background_offset_blocks`, margins of ``filter // 2 + 9`` meshes), each read from
    the frames and their weights (row sections, no memory map, so that the resident memory is
    the block's) and written into copies of the frames, whose originals later blocks still read
    as their margin. Peak memory ~20 bytes per exposure and pixel of a block with its margins
    (20.3 measured): ~4.2 GB for a full-size tile (21886 px wide, 7 exposures, 1024 + 2 x 160
    rows) instead of ~70 GB for the whole grid (the demo's 1368^2 grid: two blocks at the
    default).
    """
    placed = [[_place_frame(path, grid_wcs, shape) for path in frames[stem]] for stem in frames]
    for stem_frames in frames.values():
        for path in stem_frames:
            shutil.copyfile(path, _matched_frame(path))
    largest = 0.0
    blocks = background_offset_blocks(
        lambda r0, r1: _read_stack(placed, r0, r1, shape[1]), shape[0],
        block_rows=settings.background_match_block_rows,
        mesh_px=settings.background_match_mesh_px, filter_size=settings.background_match_filter,
        source_sigma=settings.background_match_source_sigma,
        source_grow_px=settings.background_match_source_grow_px,
        min_sigma=settings.background_match_min_sigma)
    for y0, y1, offsets in blocks:
        for i, exposure_frames in enumerate(placed):
            for frame in exposure_frames:
                if frame is not None:
                    _write_matched_rows(frame, y0, y1, offsets[i])
        largest = max(largest, float(np.abs(offsets).max()))
        del offsets
    return largest


@dataclass(frozen=True, kw_only=True)
class _PlacedFrame:
    """A resampled frame, where it lies on the tile grid and where its pixels start in the
    file (SWarp writes BITPIX -32 unscaled)."""

    path: Path
    on_grid: tuple[slice, slice]
    on_frame: tuple[slice, slice]
    width: int
    data_offset: int


def _place_frame(path: Path, grid_wcs: WCS, shape: tuple[int, int]) -> _PlacedFrame | None:
    """Where ``path`` lies on the grid (None if outside), from its header alone."""
    with fits.open(path, memmap=False) as hdul:
        header, data_offset = hdul[0].header, hdul.fileinfo(0)["datLoc"]
        if header["BITPIX"] != -32 or header.get("BZERO", 0) != 0 or header.get("BSCALE", 1) != 1:
            raise ValueError(f"{path}: resampled frame is not unscaled float32 (BITPIX -32)")
        frame_shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        slices = grid_slices(*frame_box(header, grid_wcs, path), frame_shape, shape)
    if slices is None:
        return None
    return _PlacedFrame(path=path, on_grid=slices[0], on_frame=slices[1], width=frame_shape[1],
                        data_offset=data_offset)


def _frame_rows(frame: _PlacedFrame, r0: int, r1: int) -> tuple[slice, slice] | None:
    """(grid rows, frame rows) of the part of ``frame`` in grid rows r0:r1, or None."""
    g0, g1 = max(r0, frame.on_grid[0].start), min(r1, frame.on_grid[0].stop)
    if g0 >= g1:
        return None
    shift = frame.on_frame[0].start - frame.on_grid[0].start
    return slice(g0, g1), slice(g0 + shift, g1 + shift)


def _read_rows(path: Path, rows: slice) -> np.ndarray:
    """Whole rows of a FITS image, read from the file without mapping it (float32)."""
    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[0].section[rows, :], dtype=np.float32)


def _read_stack(placed: list[list[_PlacedFrame | None]], r0: int, r1: int, nx: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(stack, valid) of grid rows r0:r1 (n, r1 - r0, nx): every exposure's frames where their
    weight is > 0."""
    stack = np.zeros((len(placed), r1 - r0, nx), dtype=np.float32)
    valid = np.zeros(stack.shape, dtype=bool)
    for i, exposure_frames in enumerate(placed):
        for frame in exposure_frames:
            rows = None if frame is None else _frame_rows(frame, r0, r1)
            if rows is None:
                continue
            on_grid = (slice(rows[0].start - r0, rows[0].stop - r0), frame.on_grid[1])
            used = _read_rows(_weight_frame(frame.path), rows[1])[:, frame.on_frame[1]] > 0
            stack[i][on_grid][used] = _read_rows(frame.path, rows[1])[:, frame.on_frame[1]][used]
            valid[i][on_grid] |= used
    return stack, valid


def _write_matched_rows(frame: _PlacedFrame, y0: int, y1: int, offsets: np.ndarray) -> None:
    """Write the frame's rows in grid rows y0:y1, less ``offsets`` (the exposure's offsets of
    those rows) where their weight is > 0, into the frame's :func:`_matched_frame`."""
    rows = _frame_rows(frame, y0, y1)
    if rows is None:
        return
    data = _read_rows(frame.path, rows[1])
    used = _read_rows(_weight_frame(frame.path), rows[1]) > 0
    part, used_part = data[:, frame.on_frame[1]], used[:, frame.on_frame[1]]
    part[used_part] -= offsets[rows[0].start - y0:rows[0].stop - y0, frame.on_grid[1]][used_part]
    with open(_matched_frame(frame.path), "r+b") as out:
        out.seek(frame.data_offset + rows[1].start * frame.width * 4)
        out.write(data.astype(">f4").tobytes())


def _matched_frame(frame: Path) -> Path:
    """The background-matched copy of a resampled frame (``x.resamp.fits`` ->
    ``x.matched.fits``)."""
    return frame.with_name(frame.name.removesuffix(".resamp.fits") + ".matched.fits")


def _footprint(exp: _Exposure) -> dict:
    """The exposures-JSON entry of one exposure: the sky outline (``ccd_footprint_deg``, a list
    of [ra, dec] vertices) of every CCD used, through its fitted WCS, and ``psf_r50_arcsec``,
    the median over those CCDs of the stars' half-light radius (``PSFR50``, from the
    zero-point photometry) in arcsec, and ``sky_sigma``, the median over those CCDs of the
    per-pixel sky noise in scaled counts (:func:`_sky_sigma`); None when no CCD has it. Also
    ``colour_term`` (``ZPCOLT``, the site's colour term in (V-I)_AB that the scaling left in,
    median over the CCDs) and ``colour_pivot`` (``ZPCOLPIV``, the colour its zero points hold
    for), None when the scaled exposure has no such card: the maps and catalogs take the site
    colour terms out of each source with them (:mod:`.site_colour`)."""
    outlines, r50, sky, colour_terms = {}, [], [], []
    with fits.open(exp.path, memmap=True) as hdul:
        pivot = hdul[0].header.get("ZPCOLPIV")
        for name in exp.ok_ccds:
            header = hdul[name].header
            if isinstance(header.get("ZPCOLT"), (int, float)):
                colour_terms.append(float(header["ZPCOLT"]))
            shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
            wcs = _ccd_wcs(header)
            outlines[name] = ccd_footprint_deg(wcs, shape)
            if isinstance(header.get("PSFR50"), (int, float)):
                r50.append(float(header["PSFR50"])
                           * float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0)
            sky.append(_sky_sigma(header))
    sky = [value for value in sky if value is not None]
    return {"stem": exp.stem, "mjd": exp.mjd, "site": exp.site, "ok": bool(exp.ok_ccds),
            "ccds": outlines, "excluded_ccds": exp.excluded,
            "psf_r50_arcsec": float(np.median(r50)) if r50 else None,
            "sky_sigma": float(np.median(sky)) if sky else None,
            "colour_term": float(np.median(colour_terms)) if colour_terms else None,
            "colour_pivot": float(pivot) if isinstance(pivot, (int, float)) else None}


def _sky_sigma(header: fits.Header) -> float | None:
    """Per-pixel sky noise of a scaled CCD in its scaled counts, from the scale stage's cards:
    sqrt(SKYLEVEL * GAIN + RDNOISE^2) / GAIN (sky photons and read noise; GAIN is e- per scaled
    count). None when a card is missing or GAIN is not positive."""
    values = [header.get(key) for key in ("SKYLEVEL", "GAIN", "RDNOISE")]
    if not all(isinstance(v, (int, float)) for v in values) or not values[1] > 0:
        return None
    sky, gain, read_noise = (float(v) for v in values)
    return math.sqrt(max(sky, 0.0) * gain + read_noise**2) / gain


def _check_swarp_grid(header: fits.Header, grid_wcs: WCS, shape: tuple[int, int], tile: str,
                      band: str) -> None:
    """SWarp's output must sit exactly on the tile grid (later stages rebuild it)."""
    ny, nx = shape
    got = (header.get("NAXIS1"), header.get("NAXIS2"), header.get("CRPIX1"),
           header.get("CRPIX2"), header.get("CRVAL1"), header.get("CRVAL2"))
    want = (nx, ny, *grid_wcs.wcs.crpix, *grid_wcs.wcs.crval)
    if got[:2] != want[:2] or not np.allclose(got[2:], want[2:], rtol=0, atol=1e-7):
        raise StageError(f"SWarp's output grid {got} differs from the tile grid {want}",
                         stage="coadd", tile=tile, band=band)


def _quality(coadd: np.ndarray, mask_map: np.ndarray, ndith: np.ndarray,
             settings: CoaddSettings) -> dict:
    """Seeing and depth of a co-add, measured in its central window where the coverage is the
    tile's usual one."""
    modal = modal_coverage(ndith)
    ny, nx = coadd.shape
    half = settings.quality_window_px // 2
    window = (slice(max(0, ny // 2 - half), ny // 2 + half),
              slice(max(0, nx // 2 - half), nx // 2 + half))
    coadd, mask_map, ndith = coadd[window], mask_map[window], ndith[window]
    usable = (ndith == modal) & (mask_map == 0) & (modal > 0)
    seeing, beta, n_stars = measure_seeing(coadd, ndith == 0, settings.pixel_scale_arcsec,
                                           snr_min=settings.star_snr_min,
                                           max_stars=settings.star_count_max)
    result = {"seeing_arcsec": seeing, "psf_beta": beta, "seeing_stars": n_stars,
              "ndith_modal": modal,
              "depth_mag": math.nan, "depth_aperture_arcsec": math.nan,
              "depth_aperture_sigma": math.nan, "depth_apertures": 0, "depth_cells": 0}
    if math.isfinite(seeing):
        diameter = settings.depth_aperture_fwhm * seeing
        depth, sigma, n_ap, n_cells = limiting_magnitude(
            coadd, usable, diameter / settings.pixel_scale_arcsec,
            n_apertures=settings.depth_apertures, nsigma=settings.depth_sigma,
            seed=settings.seed, grid=settings.depth_grid)
        result.update(depth_mag=depth, depth_aperture_arcsec=diameter,
                      depth_aperture_sigma=sigma, depth_apertures=n_ap, depth_cells=n_cells)
    return result


def _coadd_header(tile: str, band: str, grid_wcs: WCS, used: list[_Exposure], quality: dict,
                  settings: CoaddSettings) -> fits.Header:
    """WCS, photometric scale, image quality and provenance of a co-add."""
    header = tan_wcs_header(grid_wcs)
    mjds = [e.mjd for e in used]

    def finite(value: float) -> float | None:
        return round(float(value), 4) if math.isfinite(value) else None

    cards = [
        ("TILE", tile, "KS4 tile"),
        ("FILTER", band, "band"),
        ("BUNIT", "adu", "flux scaled to MAGZERO (AB)"),
        ("MAGZERO", REFERENCE_ZEROPOINT, "AB zero point: m = MAGZERO - 2.5 log10(flux)"),
        ("NCOMBINE", len(used), "exposures combined"),
        ("MJD-OBS", min(mjds), "[d] start of the earliest exposure"),
        ("MJD-END", max(mjds), "[d] start of the latest exposure"),
        ("MJD-MEAN", float(np.mean(mjds)), "[d] mean MJD of the exposures"),
        ("SEEING", finite(quality["seeing_arcsec"]), "[arcsec] median FWHM of stars"),
        ("PSFBETA", finite(quality["psf_beta"]), "median Moffat beta of the same stars"),
        ("NSEEING", quality["seeing_stars"], "stars behind SEEING and PSFBETA"),
        ("MAGLIM", finite(quality["depth_mag"]),
         f"{settings.depth_sigma:g}-sigma AB limit in DEPTHAPD aperture"),
        ("DEPTHAPD", finite(quality["depth_aperture_arcsec"]),
         f"[arcsec] depth aperture diameter ({settings.depth_aperture_fwhm:g} x SEEING)"),
        ("NDITHMOD", quality["ndith_modal"], "NDITH where MAGLIM is measured"),
        ("NDEPTHC", quality["depth_cells"], "cells whose median depth is MAGLIM"),
        ("COMBINET", settings.combine_type, "SWarp COMBINE_TYPE"),
        ("RESAMPT", settings.resampling_type, "SWarp RESAMPLING_TYPE"),
        ("SWARPVER", swarp_version(settings.swarp_binary)[:68], "co-added by"),
        ("KS4RVER", __version__, "ks4release version"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    for exp in used:
        header.add_history(f"input {exp.stem} CCDs {','.join(exp.ok_ccds)}")
    return header


def write_excluded(path: Path, excluded: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
    """Write :func:`_exclude_masked_pixels`' flat indices per exposure stem atomically, as a
    compressed ``.npz`` without pickles (one int array per stem, plus the grid ``__shape__``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, __shape__=np.asarray(shape, dtype=np.int64), **excluded)


def read_excluded(path: Path, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The excluded grid pixels per exposure stem written by :func:`write_excluded`.

    Raises
    ------
    InputError
        Naming the file, when it is unreadable or was written for another grid shape.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"cannot read the excluded pixels ({exc})") from None
    written = tuple(int(v) for v in arrays.pop("__shape__", ()))
    if written != tuple(shape):
        raise InputError(path, f"written for a grid of shape {written}, the co-add is {shape}")
    return arrays


def _write_products(release_dir: Path, tile: str, band: str, coadd: np.ndarray,
                    mask_map: np.ndarray, ndith: np.ndarray, header: fits.Header,
                    footprints: list[dict], grid_wcs: WCS) -> None:
    """Write the three images and the exposures JSON, each atomically."""
    wcs_header = tan_wcs_header(grid_wcs)
    products = (
        ("coadd", coadd, header),
        ("mask", mask_map, wcs_header + fits.Header([
            ("MASKB0", 1, "cosmic ray or crosstalk (DR1 bit 1)"),
            ("MASKB1", 2, "bleed trail (DR1 bit 2)"),
            ("MASKB2", 4, "CCD defect (DR1 bit 4)"),
            ("MASKB3", 8, "amplifier defect (DR1 bit 8)")])),
        ("ndith", ndith.astype(np.uint8 if ndith.max() < 256 else np.int16),
         wcs_header + fits.Header([("COMMENT", "exposures contributing to each pixel")])),
    )
    for kind, data, hdr in products:
        with atomic_path(coadd_path(release_dir, tile, band, kind)) as tmp:
            fits.PrimaryHDU(data=data, header=hdr).writeto(tmp)
    payload = {"tile": tile, "band": band, "exposures": footprints}
    atomic_write_text(coadd_exposures_path(release_dir, tile, band),
                      json.dumps(payload, indent=1) + "\n")
