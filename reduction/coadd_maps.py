"""Mask, NDITH and footprints of a co-add on the tile grid.

Mask: every output pixel centre is mapped to the nearest input pixel of each contributing CCD
through the CCD's full WCS (TAN-SIP as fitted) and the DR1 bits found there are OR'd. Doing that
exactly for every pixel of a full-size co-add would mean ~85 million iterative SIP inversions per
CCD, so the mapping is computed exactly on a coarse grid of output pixels (every ``step`` pixels)
and interpolated by a bicubic spline: the distortion is a smooth low-order polynomial, so the
error is far below a pixel.

NDITH: the number of exposures with a usable (weight > 0) resampled pixel at the output pixel,
read from SWarp's own resampled weight frames, so it is exactly what entered the median: it
drops where SWarp's kernel touched a zero-weight input pixel (within ~3 px of a dead amplifier,
a CCD edge or a large masked region), which a footprint projection would miss.

Footprints: the sky outline of every CCD, ``FOOTPRINT_VERTICES_PER_SIDE`` vertices per side, for
the catalog's NDITH, EDGE and MJD columns (the exposures JSON of the co-add).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from matplotlib.path import Path as PolygonPath
from scipy.interpolate import RectBivariateSpline

from ks4release.errors import InputError

__all__ = [
    "FOOTPRINT_VERTICES_PER_SIDE",
    "CcdProjection",
    "accumulate_mask",
    "ccd_bbox",
    "ccd_footprint_deg",
    "coadd_wcs",
    "exposure_coverage",
    "exposure_footprints",
    "frame_box",
    "grid_slices",
    "ndith_from_weights",
    "project_ccd",
    "read_exposures_json",
]

# Output rows handled at once when interpolating the pixel mapping (bounds memory).
_ROW_BLOCK = 1024

#: Vertices per CCD side of a footprint. Readers join them by straight lines on the TAN co-add
#: grid (great circles), so a side bowed by the field distortion is followed to within the
#: sagitta of one segment: measured with the simulator's cubic ``.ahead`` distortion
#: (:mod:`ks4release.simulate.astrometry`), 0.006 co-add px on the 1/16-scale demo and 0.10 px
#: on the full-size camera, where the four corners alone miss the bow by 1.6 and 25 px.
FOOTPRINT_VERTICES_PER_SIDE = 16

# Vertices per side of the outline that bounds a CCD on the output grid (ccd_bbox).
_BBOX_VERTICES_PER_SIDE = 32


@dataclass(frozen=True, kw_only=True)
class CcdProjection:
    """One CCD's mask on the output grid: rows ``y0:y1``, columns ``x0:x1``.

    ``bits`` is the mask of the nearest input pixel (0 outside the CCD).
    """

    y0: int
    y1: int
    x0: int
    x1: int
    bits: np.ndarray


def _outline_px(shape: tuple[int, int], per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel coordinates ``(x, y)`` of ``per_side`` points per side along a CCD's outer
    pixel edges, from pixel corner (-0.5, -0.5) through (nx - 0.5, -0.5), (nx - 0.5, ny - 0.5)
    and (-0.5, ny - 0.5): counter-clockwise in pixel coordinates, each corner once."""
    ny, nx = shape
    t = np.arange(per_side) / per_side
    xs = np.concatenate([t * nx, np.full(per_side, nx), (1 - t) * nx, np.zeros(per_side)]) - 0.5
    ys = np.concatenate([np.zeros(per_side), t * ny, np.full(per_side, ny), (1 - t) * ny]) - 0.5
    return xs, ys


def ccd_footprint_deg(ccd_wcs: WCS, shape: tuple[int, int], *,
                      vertices_per_side: int = FOOTPRINT_VERTICES_PER_SIDE) -> list[list[float]]:
    """Sky outline ``[[ra, dec], ...]`` of a CCD's outer pixel edges through its full WCS.

    ``4 * vertices_per_side`` vertices in the order of :func:`_outline_px` (the first is pixel
    corner (-0.5, -0.5)); enough of them that straight segments follow the edges bowed by the
    field distortion (see ``FOOTPRINT_VERTICES_PER_SIDE``). RA in [0, 360).
    """
    if vertices_per_side < 1:
        raise ValueError(f"vertices_per_side must be >= 1, got {vertices_per_side}")
    ra, dec = ccd_wcs.all_pix2world(*_outline_px(shape, vertices_per_side), 0)
    return [[float(r % 360.0), float(d)] for r, d in zip(ra, dec)]


def ccd_bbox(ccd_wcs: WCS, shape: tuple[int, int], grid_wcs: WCS, grid_shape: tuple[int, int],
             pad: int = 2) -> tuple[int, int, int, int] | None:
    """Output rows/columns ``(y0, y1, x0, x1)`` holding the CCD, or None when it misses the grid.

    The CCD outline is sampled every 1/32 of a side, so that distortion bowing the edges is
    followed; ``pad`` output pixels are added on every side.
    """
    ra, dec = ccd_wcs.all_pix2world(*_outline_px(shape, _BBOX_VERTICES_PER_SIDE), 0)
    gx, gy = grid_wcs.wcs_world2pix(ra, dec, 0)
    gny, gnx = grid_shape
    x0 = max(0, int(np.floor(gx.min())) - pad)
    x1 = min(gnx, int(np.ceil(gx.max())) + pad + 1)
    y0 = max(0, int(np.floor(gy.min())) - pad)
    y1 = min(gny, int(np.ceil(gy.max())) + pad + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def _coarse_axis(start: int, stop: int, step: int) -> np.ndarray:
    """Coarse sample positions covering ``start .. stop - 1`` (both ends included)."""
    axis = np.arange(start, stop, step, dtype=float)
    if axis[-1] != stop - 1:
        axis = np.append(axis, stop - 1)
    if axis.size < 4:  # a cubic spline needs four knots per axis
        axis = np.linspace(start, stop - 1, 4) if stop - start >= 4 else axis
    return axis


def _input_coordinates(ccd_wcs: WCS, grid_wcs: WCS, box: tuple[int, int, int, int], step: int
                       ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(row0, row1, x_in, y_in)``: input pixel coordinates of output rows, by blocks."""
    y0, y1, x0, x1 = box
    cy, cx = _coarse_axis(y0, y1, step), _coarse_axis(x0, x1, step)
    gx, gy = np.meshgrid(cx, cy)
    ra, dec = grid_wcs.wcs_pix2world(gx.ravel(), gy.ravel(), 0)
    ix, iy = ccd_wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50)
    ix, iy = ix.reshape(gx.shape), iy.reshape(gx.shape)
    degree = 3 if min(cy.size, cx.size) >= 4 else 1
    spline_x = RectBivariateSpline(cy, cx, ix, kx=degree, ky=degree)
    spline_y = RectBivariateSpline(cy, cx, iy, kx=degree, ky=degree)
    cols = np.arange(x0, x1, dtype=float)
    for r0 in range(y0, y1, _ROW_BLOCK):
        r1 = min(y1, r0 + _ROW_BLOCK)
        rows = np.arange(r0, r1, dtype=float)
        yield r0, r1, spline_x(rows, cols), spline_y(rows, cols)


def project_ccd(mask: np.ndarray, ccd_wcs: WCS, grid_wcs: WCS, grid_shape: tuple[int, int], *,
                step: int = 16) -> CcdProjection | None:
    """Nearest-neighbour projection of one CCD's mask onto the output grid (see module doc).

    Parameters
    ----------
    mask : ndarray of uint8
        DR1 bits of the CCD (its shape is the CCD's).
    ccd_wcs, grid_wcs : WCS
        The CCD's full WCS (SIP allowed) and the tile grid's.
    grid_shape : (ny, nx)
        Output grid shape.
    step : int
        Output pixels between exact WCS evaluations of the mapping.

    Returns
    -------
    CcdProjection or None
        None when the CCD does not reach the grid.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    box = ccd_bbox(ccd_wcs, mask.shape, grid_wcs, grid_shape)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    bits = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    ny, nx = mask.shape
    for r0, r1, xin, yin in _input_coordinates(ccd_wcs, grid_wcs, box, step):
        ix, iy = np.rint(xin).astype(np.int64), np.rint(yin).astype(np.int64)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        values = np.zeros(ix.shape, dtype=np.uint8)
        values[inside] = mask[iy[inside], ix[inside]]
        bits[r0 - y0:r1 - y0] = values
    return CcdProjection(y0=y0, y1=y1, x0=x0, x1=x1, bits=bits)


def frame_box(header: fits.Header, grid_wcs: WCS, path: Path) -> tuple[int, int]:
    """(y0, x0) of a SWarp resampled frame on the tile grid: the same CRVAL and CD, CRPIX
    shifted by whole pixels.

    Raises
    ------
    ValueError
        Naming ``path`` when the frame is not on the grid (CRVAL or a fractional shift differ).
    """
    dx = grid_wcs.wcs.crpix[0] - header["CRPIX1"]
    dy = grid_wcs.wcs.crpix[1] - header["CRPIX2"]
    same = np.allclose([header["CRVAL1"], header["CRVAL2"]], grid_wcs.wcs.crval, rtol=0,
                       atol=1e-9)
    if not same or abs(dx - round(dx)) > 1e-6 or abs(dy - round(dy)) > 1e-6:
        raise ValueError(f"{path}: resampled frame is not on the tile grid")
    return round(float(dy)), round(float(dx))


def grid_slices(y0: int, x0: int, frame_shape: tuple[int, int], shape: tuple[int, int]
                ) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """(grid, frame) slices of the part of a frame at (y0, x0) inside the grid, or None."""
    ny, nx = frame_shape
    gy0, gx0 = max(0, y0), max(0, x0)
    gy1, gx1 = min(shape[0], y0 + ny), min(shape[1], x0 + nx)
    if gy0 >= gy1 or gx0 >= gx1:
        return None
    return ((slice(gy0, gy1), slice(gx0, gx1)),
            (slice(gy0 - y0, gy1 - y0), slice(gx0 - x0, gx1 - x0)))


def exposure_coverage(weight_frames: list[Path], grid_wcs: WCS, out: np.ndarray) -> np.ndarray:
    """``out`` (a grid-sized bool map, overwritten) set where any of one exposure's resampled
    weight frames (``*.resamp.weight.fits``) has weight > 0."""
    out[:] = False
    for path in weight_frames:
        with fits.open(path) as hdul:
            header, weight = hdul[0].header, hdul[0].data
            slices = grid_slices(*frame_box(header, grid_wcs, path), weight.shape, out.shape)
            if slices is not None:
                out[slices[0]] |= weight[slices[1]] > 0
    return out


def ndith_from_weights(frames_by_exposure: dict[str, list[Path]], grid_wcs: WCS,
                       grid_shape: tuple[int, int]) -> np.ndarray:
    """NDITH map from SWarp's resampled weight frames (``*.resamp.weight.fits``): an exposure
    counts once where any of its frames has weight > 0 (:func:`exposure_coverage`).

    Raises
    ------
    ValueError
        When a frame is not on the grid (:func:`frame_box`).
    """
    ndith = np.zeros(grid_shape, dtype=np.int16)
    covered = np.zeros(grid_shape, dtype=bool)
    for frames in frames_by_exposure.values():
        ndith += exposure_coverage(frames, grid_wcs, covered)
    return ndith


def accumulate_mask(projections: list[CcdProjection], mask_map: np.ndarray) -> None:
    """OR the bits of projected CCDs into the co-add mask in place (they say what happened to
    the data at each output pixel, whether or not it entered the median)."""
    for p in projections:
        mask_map[p.y0:p.y1, p.x0:p.x1] |= p.bits


def coadd_wcs(header: fits.Header) -> WCS:
    """The celestial WCS of a co-add header, without astropy's notes on the cards it fixes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header).celestial


def read_exposures_json(path: Path) -> dict:
    """A co-add's exposures JSON, with an InputError naming the file when unreadable."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the co-add's exposures ({exc})") from exc
    if not isinstance(payload, dict):
        raise InputError(path, "expected a JSON object with 'exposures'")
    return payload


def exposure_footprints(exposures_json: dict, wcs: WCS, origin: int
                        ) -> list[tuple[dict, list[PolygonPath]]]:
    """Every usable exposure of a co-add with its kept CCDs' polygons in co-add pixels.

    ``exposures_json`` is the co-add's exposure list (``coadd_exposures_path``, as
    :func:`ccd_footprint_deg` writes the vertices); exposures with ``ok`` false are left out,
    excluded CCDs are not listed. The [ra, dec] vertices are projected with the co-add ``wcs``
    to pixels of the given ``origin`` (0 or 1) and joined by straight lines.

    Raises
    ------
    ValueError
        Naming the exposure and CCD when a footprint is not a list of >= 3 [ra, dec] pairs.
    """
    out = []
    for exposure in exposures_json.get("exposures", []):
        if not exposure.get("ok", False):
            continue
        paths = []
        for name, vertices in exposure.get("ccds", {}).items():
            vertices = np.asarray(vertices, dtype=float)
            if vertices.ndim != 2 or vertices.shape[0] < 3 or vertices.shape[1] != 2:
                raise ValueError(f"exposure {exposure.get('stem')!r} CCD {name}: expected at "
                                 f"least 3 [ra, dec] vertices, got shape {vertices.shape}")
            x, y = wcs.all_world2pix(vertices[:, 0], vertices[:, 1], origin)
            paths.append(PolygonPath(np.column_stack([x, y])))
        out.append((exposure, paths))
    return out
