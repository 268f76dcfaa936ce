"""Photometry of a large co-add in overlapping blocks, so that memory follows the block size.

The measurement of :mod:`ks4release.reduction.photometry` holds a whole co-add and about ten
per-pixel work maps at once, about 41 bytes a pixel for one band: 0.9 GB on a 4096 x 4096
co-add, ~20 GB on a full-size 22000 x 22000 DR1 co-add. SExtractor streams the image by
scanlines; here a co-add larger than ``block_size_px`` on a side is cut into blocks instead, as
survey pipelines cut a sky tessellation into patches:

* **Cores** tile the co-add without overlap, all of one size (the co-add split into the fewest
  equal parts per axis no larger than ``block_size_px``, rounded up to whole background
  meshes), so no block is a thin sliver.
* **Blocks** are the cores grown by ``block_margin_px`` (rounded up to whole meshes, clipped at
  the co-add's border). Each block is measured on its own, exactly as a whole co-add
  (``measure_single`` / ``measure_dual`` on the cropped image, mask, NDITH, excluded pixels and
  a header whose CRPIX is shifted); the block's origin is a multiple of the background mesh, so
  its mesh cells are the co-add's.
* **Every detection belongs to the block whose core holds its centroid**, and only that
  block's measurement of it is kept: an object whose footprint fits in the margin is measured
  from all its pixels, with the neighbours it has on the whole co-add.

The RMS map's factors per NDITH are the whole co-add's, from a first pass over the blocks'
cores (:func:`~ks4release.reduction.photometry.blockwise_noise_factors`): measured per block
they came out 2-3% off. So is the PSF's half-light radius that caps the windowed centroids'
windows, measured once on the co-add's central block (:func:`central_block`): each block's own
median came out up to 4.6% off, which moved a large galaxy's centroid by 0.065 px. What each
block estimates on its own pixels: the typical PSF that normalises the seeing map
(:func:`~ks4release.reduction.photometry.local_seeing`) and the background level that SATURATE
is taken above; with the default cores of 4096 pixels these rest on thousands of detections
and millions of pixels. An object whose footprint reaches an inner block edge (larger than the
margin) is truncated like one at the co-add's border and carries FLAGS bit 8.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

__all__ = ["Block", "central_block", "crop_excluded", "crop_header", "measure_in_blocks",
           "plan_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """One block of a co-add: the core it answers for and the pixels it measures (0-based,
    end-exclusive rows ``y0:y1`` and columns ``x0:x1``)."""

    core: tuple[int, int, int, int]   # (y0, y1, x0, x1)
    outer: tuple[int, int, int, int]  # (y0, y1, x0, x1)

    @property
    def slices(self) -> tuple[slice, slice]:
        """Row and column slices of the outer block in the co-add."""
        y0, y1, x0, x1 = self.outer
        return slice(y0, y1), slice(x0, x1)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Row and column slices of the core within the outer block."""
        y0, y1, x0, x1 = self.core
        oy, _, ox, _ = self.outer
        return slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the outer block."""
        y0, y1, x0, x1 = self.outer
        return y1 - y0, x1 - x0


def _round_up(value: int, step: int) -> int:
    """``value`` rounded up to a multiple of ``step``."""
    return -(-value // step) * step


def _cores(n: int, size: int, mesh: int) -> list[tuple[int, int]]:
    """(start, stop) of the cores along one axis of ``n`` pixels: the fewest equal parts no
    larger than ``size``, each rounded up to whole meshes (the last one ends at ``n``)."""
    parts = max(1, math.ceil(n / size))
    step = _round_up(math.ceil(n / parts), mesh)
    starts = list(range(0, n, step))
    return [(s, min(s + step, n)) for s in starts]


def plan_blocks(shape: tuple[int, int], size: int, margin: int, mesh: int) -> list[Block]:
    """The blocks of a co-add of numpy ``shape``: one block when both sides are at most
    ``size``; else cores of at most ``size`` (rounded up to whole ``mesh`` cells) grown by
    ``margin`` (rounded up likewise), row by row.

    Raises
    ------
    ValueError
        ``size`` or ``mesh`` below 1 or ``margin`` negative.
    """
    if size < 1 or mesh < 1 or margin < 0:
        raise ValueError(f"block size {size} and mesh {mesh} must be >= 1 and the margin "
                         f"{margin} >= 0")
    ny, nx = shape
    if ny <= size and nx <= size:
        return [Block((0, ny, 0, nx), (0, ny, 0, nx))]
    pad = _round_up(margin, mesh)
    blocks = []
    for y0, y1 in _cores(ny, size, mesh):
        for x0, x1 in _cores(nx, size, mesh):
            blocks.append(Block((y0, y1, x0, x1), (max(y0 - pad, 0), min(y1 + pad, ny),
                                                   max(x0 - pad, 0), min(x1 + pad, nx))))
    return blocks


def central_block(shape: tuple[int, int], size: int, margin: int, mesh: int) -> Block:
    """The co-add's central square of one block's outer side (``size`` and ``margin`` rounded
    up to whole ``mesh`` cells as in :func:`plan_blocks`; the whole co-add along an axis not
    longer than that), starting at a multiple of ``mesh``: where the properties of the whole
    co-add that need a detection are measured, with one block's memory."""
    side = _round_up(size, mesh) + 2 * _round_up(margin, mesh)
    bounds = []
    for n in shape:
        start = 0 if n <= side else (n - side) // 2 // mesh * mesh
        bounds += [start, min(start + side, n)]
    y0, y1, x0, x1 = bounds
    return Block((y0, y1, x0, x1), (y0, y1, x0, x1))


def crop_header(header: fits.Header, block: Block) -> fits.Header:
    """A copy of a co-add header for the block: the reference pixel moved to the block's
    origin (the celestial WCS, TAN or TAN-SIP, is otherwise the co-add's)."""
    out = header.copy()
    y0, _, x0, _ = block.outer
    for axis, offset in ((1, x0), (2, y0)):
        if f"CRPIX{axis}" in out:
            out[f"CRPIX{axis}"] = float(out[f"CRPIX{axis}"]) - offset
    y_len, x_len = block.shape
    if "NAXIS1" in out:
        out["NAXIS1"], out["NAXIS2"] = x_len, y_len
    return out


def crop_excluded(excluded: dict[str, np.ndarray], shape: tuple[int, int], block: Block
                  ) -> dict[str, np.ndarray]:
    """The excluded pixels per exposure (sorted flat indices of the co-add of numpy ``shape``,
    ``coadd.read_excluded``) that fall in the block, as sorted flat indices of the block."""
    y0, y1, x0, x1 = block.outer
    out = {}
    for stem, flat in excluded.items():
        row, col = np.divmod(np.asarray(flat, dtype=np.int64), shape[1])
        inside = (row >= y0) & (row < y1) & (col >= x0) & (col < x1)
        out[stem] = (row[inside] - y0) * (x1 - x0) + (col[inside] - x0)
    return out


def _in_core(table: Table, block: Block) -> np.ndarray:
    """Rows whose centroid (1-based ``x_image``/``y_image`` of the block) lies in its core."""
    y0, y1, x0, x1 = block.core
    x = np.asarray(table["x_image"]) - 1.0 + block.outer[2]
    y = np.asarray(table["y_image"]) - 1.0 + block.outer[0]
    col, row = np.floor(x + 0.5), np.floor(y + 0.5)  # the pixel holding the centroid
    return (row >= y0) & (row < y1) & (col >= x0) & (col < x1)


def measure_in_blocks(measure: Callable[[Block], Table], blocks: list[Block], *,
                      label: str = "") -> Table:
    """Measure a co-add block by block (:func:`plan_blocks`) and join the blocks' catalogs.

    ``measure(block)`` returns the measurement table of one block (pixel columns relative to
    the block); each keeps the rows whose centroid its core holds, ``x_image``/``y_image``
    moved to the co-add, ``number`` running over the joined table. One block: its table
    unchanged. The metadata are the first block's, plus ``blocks`` (their count) and
    ``detect_background_rms_adu`` as the median over the blocks. ``label`` (tile and band)
    names the co-add in the log.
    """
    if len(blocks) == 1:
        return measure(blocks[0])
    parts, rms = [], []
    for block, table in zip(blocks, _tables(measure, blocks, label), strict=True):
        part = table[_in_core(table, block)]
        part["x_image"] += block.outer[2]
        part["y_image"] += block.outer[0]
        parts.append(part)
        rms.append(table.meta.get("detect_background_rms_adu", math.nan))
    joined = vstack(parts, join_type="exact", metadata_conflicts="silent")
    joined["number"] = np.arange(1, len(joined) + 1, dtype=joined["number"].dtype)
    joined.meta = dict(parts[0].meta)
    joined.meta["blocks"] = len(blocks)
    joined.meta["detect_background_rms_adu"] = float(np.nanmedian(rms))
    return joined


def _tables(measure: Callable[[Block], Table], blocks: list[Block], label: str
            ) -> Iterator[Table]:
    """Each block's table in turn, logged (one block's work arrays in memory at a time)."""
    for k, block in enumerate(blocks, 1):
        logger.info("%s: block %d/%d, rows %d-%d, columns %d-%d", label or "co-add", k,
                    len(blocks), *block.outer)
        yield measure(block)
