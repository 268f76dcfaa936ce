"""Cross-tile linking of detections and the per-tile band merge of single-mode catalogs.

* :func:`link_detections` groups detections of one source seen on several overlapping tiles:
  friends-of-friends within DR1's 0.5 arcsec, where only detections from *different* tiles are
  friends (two detections on the same tile are two sources that the extraction separated).
* :func:`merge_disjoint_groups` is the optional second pass: groups that are mutual nearest
  neighbours within a larger radius and share no tile (or band) are joined, round after round
  until nothing is left to join.
* :func:`merge_bands` merges one tile's single-band source lists hierarchically (DR1 4.2.2):
  the first band's list, then each further band matched one-to-one within 0.8 arcsec to the
  running mean positions of what has been merged so far; unmatched sources start new entries.

Both work on plain arrays in degrees. Group labels depend on row order only through their
numbering: the partition into groups does not change when the input rows are permuted.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ks4release.projection import chord, unit_vectors

__all__ = [
    "link_detections",
    "mean_positions",
    "match_nearest",
    "merge_disjoint_groups",
]


def link_detections(ra_deg: np.ndarray, dec_deg: np.ndarray, tile_codes: np.ndarray,
                    radius_arcsec: float) -> np.ndarray:
    """Group labels (int64, 0..n_groups-1) of detections linked across tiles.

    Parameters
    ----------
    ra_deg, dec_deg : ndarray
        Detection positions, deg.
    tile_codes : ndarray of int
        Tile of each detection; detections of the same tile are never linked directly.
    radius_arcsec : float
        Linking length (DR1: 0.5 arcsec).
    """
    n = len(ra_deg)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    tree = cKDTree(unit_vectors(ra_deg, dec_deg))
    pairs = tree.query_pairs(chord(radius_arcsec), output_type="ndarray")
    tile_codes = np.asarray(tile_codes)
    pairs = pairs[tile_codes[pairs[:, 0]] != tile_codes[pairs[:, 1]]]
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def merge_disjoint_groups(ra_deg: np.ndarray, dec_deg: np.ndarray, labels: np.ndarray,
                          keys: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Join groups that are mutual nearest neighbours within ``radius_arcsec`` and share no key.

    The second pass after a fixed-radius linking: faint sources seen on two tiles (or in two
    bands) often land a little beyond DR1's radius because their centroids are noisy. Two
    groups are joined when their mean positions are within ``radius_arcsec``, each is the
    other's nearest such group, and no key (tile, or band) occurs in both, so that two
    sources one image resolved are never joined. The joining is repeated until nothing is
    left to join: a join moves the group's mean, which can make it the mutual nearest
    neighbour of a third group (a faint galaxy whose I and R centroids are 1.1" apart and whose
    V centroid is 1.4" from their mean was left as two sources by a single round). A group
    holds each key at most as often as the first pass's groups it joined did, so the rounds
    end. Labels are renumbered 0..n_groups-1 in order of first appearance; the partition does
    not depend on the row order.

    Parameters
    ----------
    ra_deg, dec_deg : ndarray
        Positions of the rows, deg.
    labels : ndarray of int
        Group of every row (0..n_groups-1), e.g. from :func:`link_detections`.
    keys : ndarray of int
        What may occur only once in a group: the tile (cross-tile linking) or the band.
    radius_arcsec : float
        Largest separation of the mean positions of two joined groups.
    """
    labels = np.asarray(labels, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    while True:
        joined = _join_mutual_nearest(ra_deg, dec_deg, labels, keys, radius_arcsec)
        if joined is None:
            return labels
        labels = joined


def _join_mutual_nearest(ra_deg: np.ndarray, dec_deg: np.ndarray, labels: np.ndarray,
                         keys: np.ndarray, radius_arcsec: float) -> np.ndarray | None:
    """One round of :func:`merge_disjoint_groups`: the renumbered labels, or None when no two
    groups are joined."""
    n_groups = int(labels.max()) + 1 if labels.size else 0
    if n_groups < 2:
        return None
    gra, gdec = mean_positions(ra_deg, dec_deg, labels, n_groups)
    vectors = unit_vectors(gra, gdec)
    pairs = cKDTree(vectors).query_pairs(chord(radius_arcsec), output_type="ndarray")
    if len(pairs) == 0:
        return None
    pairs = pairs[_disjoint(pairs, labels, keys)]
    if len(pairs) == 0:
        return None
    distance = np.linalg.norm(vectors[pairs[:, 0]] - vectors[pairs[:, 1]], axis=1)
    nearest = np.full(n_groups, np.inf)
    np.minimum.at(nearest, pairs[:, 0], distance)
    np.minimum.at(nearest, pairs[:, 1], distance)
    mutual = (distance == nearest[pairs[:, 0]]) & (distance == nearest[pairs[:, 1]])
    pairs = pairs[mutual]
    if len(pairs) == 0:
        return None
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n_groups, n_groups)).tocsr()
    _, joined = connected_components(graph, directed=False)
    merged = joined[labels]
    _, first = np.unique(merged, return_index=True)
    renumber = np.empty(merged.max() + 1, dtype=np.int64)
    renumber[merged[np.sort(first)]] = np.arange(first.size)
    return renumber[merged]


def _disjoint(pairs: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which pairs of groups have no key in common.

    Vectorised: every (group, key) occurring is one sorted code ``group * n_keys + key``; each
    key of a pair's first group is looked up under the second group.
    """
    n_keys = int(keys.max()) + 1
    codes = np.sort(labels * n_keys + keys)
    codes = codes[np.r_[True, codes[1:] != codes[:-1]]]
    first_keys_from = np.searchsorted(codes, pairs[:, 0] * n_keys)
    counts = np.searchsorted(codes, (pairs[:, 0] + 1) * n_keys) - first_keys_from
    pair = np.repeat(np.arange(len(pairs)), counts)
    within = np.arange(pair.size) - np.repeat(np.cumsum(counts) - counts, counts)
    probe = pairs[pair, 1] * n_keys + codes[np.repeat(first_keys_from, counts) + within] % n_keys
    found = np.searchsorted(codes, probe)
    shared = codes[np.minimum(found, codes.size - 1)] == probe
    disjoint = np.ones(len(pairs), dtype=bool)
    disjoint[pair[shared]] = False
    return disjoint


def mean_positions(ra_deg: np.ndarray, dec_deg: np.ndarray, labels: np.ndarray,
                   n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Unweighted mean position of each group, with right ascension taken across 0/360."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    first = np.full(n_groups, np.nan)
    first[labels[::-1]] = ra[::-1]  # the first member of each group is the reference
    offset = (ra - first[labels] + 180.0) % 360.0 - 180.0
    counts = np.bincount(labels, minlength=n_groups)
    mean_ra = (first + np.bincount(labels, offset, minlength=n_groups) / counts) % 360.0
    mean_dec = np.bincount(labels, np.asarray(dec_deg, dtype=np.float64),
                           minlength=n_groups) / counts
    return mean_ra, mean_dec


def match_nearest(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray,
                  radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour match of list 2 onto list 1 within ``radius_arcsec``.

    Returns the matched row indices ``(rows1, rows2)``, sorted by ``rows1``.

    Each row of list 1 takes its nearest row of list 2; when several rows of list 1 want the
    same row of list 2, the closest wins (ties: the lower row of list 1) and the others stay
    unmatched.
    """
    if len(ra1) == 0 or len(ra2) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    tree = cKDTree(unit_vectors(ra2, dec2))
    dist, idx = tree.query(unit_vectors(ra1, dec1), k=1,
                           distance_upper_bound=chord(radius_arcsec))
    left = np.flatnonzero(np.isfinite(dist))
    right = idx[left]
    order = np.lexsort((left, dist[left]))
    left, right = left[order], right[order]
    _, first = np.unique(right, return_index=True)
    keep = first[np.argsort(left[first], kind="stable")]
    return left[keep].astype(np.int64), right[keep].astype(np.int64)
