"""Pure geometry of the astrometry stage: gnomonic projection, offset search, matching, and the
8 x 8 sub-section grid of DR1's quality check.

All functions work on plain arrays (pixels or degrees) and have no I/O, so the tests exercise
them directly (hypothesis properties in ``tests/test_astrometry.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "OffsetResult",
    "offset_search",
    "match_nearest",
    "subsection_index",
]


@dataclass(frozen=True)
class OffsetResult:
    """The shift ``(dx, dy)`` that carries reference positions onto detections, and how many
    reference-detection pairs agree with it (``votes``)."""

    dx: float
    dy: float
    votes: int


def offset_search(x_det: np.ndarray, y_det: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray,
                  *, max_offset: float, bin_size: float) -> OffsetResult:
    """Find the common shift between two point sets by voting of pair offsets.

    Every (detection, reference) pair closer than ``max_offset`` in both axes votes for its
    offset ``det - ref`` in a 2-D histogram of ``bin_size`` bins; the histogram is summed over
    3 x 3 bins (so a peak split between bins is not lost), and the offset is refined as the
    median of the votes within ``1.5 bin_size`` of the best bin. The true shift collects one
    vote per reference star seen as a detection; unrelated pairs spread over the histogram.
    Needs no triangles and no brightness ordering, so it survives crowding and missing stars.

    Returns ``OffsetResult(0, 0, 0)`` when no pair lies within ``max_offset``.
    """
    if max_offset <= 0 or bin_size <= 0:
        raise ValueError(f"max_offset and bin_size must be > 0, got {max_offset}, {bin_size}")
    det = np.column_stack([np.asarray(x_det, float), np.asarray(y_det, float)])
    ref = np.column_stack([np.asarray(x_ref, float), np.asarray(y_ref, float)])
    if det.size == 0 or ref.size == 0:
        return OffsetResult(0.0, 0.0, 0)
    pairs = cKDTree(ref).query_ball_point(det, r=max_offset * math.sqrt(2.0), p=2.0)
    i_det = np.repeat(np.arange(len(det)), [len(p) for p in pairs])
    i_ref = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=i_det.size)
    d = det[i_det] - ref[i_ref]
    d = d[(np.abs(d[:, 0]) <= max_offset) & (np.abs(d[:, 1]) <= max_offset)]
    if d.size == 0:
        return OffsetResult(0.0, 0.0, 0)
    n_bins = max(1, int(math.ceil(2.0 * max_offset / bin_size)))
    edges = np.linspace(-max_offset, max_offset, n_bins + 1)
    hist, _, _ = np.histogram2d(d[:, 0], d[:, 1], bins=(edges, edges))
    padded = np.pad(hist, 1)
    smooth = sum(padded[1 + i:1 + i + n_bins, 1 + j:1 + j + n_bins]
                 for i in (-1, 0, 1) for j in (-1, 0, 1))
    ix, iy = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    centre = np.array([0.5 * (edges[ix] + edges[ix + 1]), 0.5 * (edges[iy] + edges[iy + 1])])
    near = np.all(np.abs(d - centre) <= 1.5 * bin_size, axis=1)
    dx, dy = np.median(d[near], axis=0)
    near = np.all(np.abs(d - (dx, dy)) <= bin_size, axis=1)
    if near.any():
        dx, dy = np.median(d[near], axis=0)
    return OffsetResult(float(dx), float(dy), int(near.sum()))


def match_nearest(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                  radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour matches closer than ``radius``.

    Each point of set 1 takes its nearest neighbour in set 2; when several take the same point
    of set 2, only the closest pair is kept. Returns ``(i1, i2, distance)`` sorted by ``i1``.
    """
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if len(x1) == 0 or len(x2) == 0:
        return empty
    tree = cKDTree(np.column_stack([x2, y2]))
    dist, i2 = tree.query(np.column_stack([x1, y1]), distance_upper_bound=radius)
    i1 = np.flatnonzero(np.isfinite(dist))
    if i1.size == 0:
        return empty
    i2, dist = i2[i1], dist[i1]
    order = np.lexsort((dist, i2))
    first = np.ones(order.size, bool)
    first[1:] = i2[order][1:] != i2[order][:-1]
    keep = np.sort(order[first])
    return i1[keep], i2[keep], dist[keep]


def subsection_index(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], n_side: int = 8
                     ) -> np.ndarray:
    """Sub-section number ``iy * n_side + ix`` of 0-based pixel positions (x, y) on a chip.

    The chip of ``shape = (ny, nx)`` pixels is cut into ``n_side x n_side`` sub-sections along
    pixel boundaries: pixel column ``i`` belongs to ``ix = floor(i * n_side / nx)``, so every
    pixel belongs to exactly one sub-section and their sizes differ by at most one pixel.
    Positions are rounded to their pixel; positions off the chip are clipped to the edge.
    """
    ny, nx = shape
    col = np.clip(np.floor(np.asarray(x, float) + 0.5), 0, nx - 1).astype(np.int64)
    row = np.clip(np.floor(np.asarray(y, float) + 0.5), 0, ny - 1).astype(np.int64)
    return (row * n_side // ny) * n_side + col * n_side // nx
