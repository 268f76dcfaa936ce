"""Per-tile band merge of single-mode source lists (DR1 section 4.2.2).

The single-band lists of one tile are merged hierarchically: the first band of ``order`` starts
the list of entries; each further band is matched one-to-one (nearest neighbour, DR1's
0.8 arcsec) to the running mean positions of the entries, and its unmatched sources become new
entries. An entry's position is the unweighted mean of its band positions and its errors are the
band errors combined in quadrature for that mean (``sqrt(sum(err**2)) / n``).

Per-band columns of a band in which an entry has no detection are NaN (null), except
``ndith_{b}``: 0 when the tile was not observed in that band (a non-observation), and for a
non-detection in an observed band the number of exposures at the entry's position, read from the
tile's NDITH map when one is given (NaN otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ks4release.publish.link import match_nearest, mean_positions, merge_disjoint_groups
from ks4release.tile_catalogs import BANDS, band_columns

__all__ = ["NdithLookup", "merge_bands"]

#: Number of exposures at positions (ra, dec in deg) of one tile and band.
NdithLookup = Callable[[np.ndarray, np.ndarray], np.ndarray]


def merge_bands(band_tables: Mapping[str, Mapping[str, np.ndarray]], *, order: tuple[str, ...],
                radius_arcsec: float, merge_radius_arcsec: float = 0.0,
                ndith_lookup: Mapping[str, NdithLookup] | None = None) -> dict[str, np.ndarray]:
    """Merge one tile's single-band lists into entries with the columns of every band.

    Parameters
    ----------
    band_tables : mapping of band letter to columns
        The observed bands' detections: ``ra``, ``dec``, ``raerr``, ``decerr`` and the band's
        Table 3 columns (float64, NaN for null). A band absent from the mapping was not observed.
    order : tuple of str
        Merge order of the bands (all four letters).
    radius_arcsec : float
        Matching radius (DR1: 0.8 arcsec).
    merge_radius_arcsec : float
        Second pass (0 = none): entries that are mutual nearest neighbours within this radius
        and have no band in common are joined (:func:`.link.merge_disjoint_groups`).
    ndith_lookup : mapping of band letter to callable, optional
        NDITH maps of observed bands, for entries not detected in that band.

    Returns
    -------
    dict of str to ndarray
        float64 columns ``ra``, ``dec``, ``raerr``, ``decerr`` and the per-band columns of all
        four bands.
    """
    unknown = set(band_tables) - set(BANDS)
    if unknown or sorted(order) != sorted(BANDS):
        raise ValueError(f"bands must be among {BANDS} and order a permutation of them")
    rows: dict[str, np.ndarray] = {}
    ref_ra = np.zeros(0)
    sum_dra = np.zeros(0)
    sum_dec = np.zeros(0)
    count = np.zeros(0)
    for band in order:
        if band not in band_tables:
            continue
        table = band_tables[band]
        ra = np.asarray(table["ra"], dtype=np.float64)
        dec = np.asarray(table["dec"], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_ra = (ref_ra + sum_dra / count) % 360.0
            mean_dec = sum_dec / count
        left, right = match_nearest(mean_ra, mean_dec, ra, dec, radius_arcsec)
        new = np.setdiff1d(np.arange(len(ra)), right)
        n_old = len(count)
        for other in rows:
            rows[other] = np.concatenate([rows[other], np.full(len(new), -1)])
        rows[band] = np.full(n_old + len(new), -1, dtype=np.int64)
        rows[band][left] = right
        rows[band][n_old:] = new
        ref_ra = np.concatenate([ref_ra, ra[new]])
        sum_dra = np.concatenate([sum_dra, np.zeros(len(new))])
        sum_dec = np.concatenate([sum_dec, np.zeros(len(new))])
        count = np.concatenate([count, np.zeros(len(new))])
        hit = rows[band] >= 0
        src = rows[band][hit]
        sum_dra[hit] += (ra[src] - ref_ra[hit] + 180.0) % 360.0 - 180.0
        sum_dec[hit] += dec[src]
        count[hit] += 1
    if merge_radius_arcsec > 0:
        rows = _join_entries(rows, band_tables, merge_radius_arcsec)
    out = _entry_positions(rows, band_tables)
    n = len(out["ra"])
    for band in BANDS:
        out.update(_band_values(band_tables.get(band), rows.get(band), n, band))
        if band in band_tables:
            missing = rows[band] < 0
            lookup = (ndith_lookup or {}).get(band)
            if lookup is not None and missing.any():
                out[f"ndith_{band}"][missing] = lookup(out["ra"][missing], out["dec"][missing])
    return out


def _detections(rows: Mapping[str, np.ndarray], band_tables: Mapping[str, Mapping[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
    """Every band detection of the entries: entry, band code, row, position and errors."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("entry", "band", "row", "ra", "dec",
                                                          "raerr", "decerr")}
    for code, band in enumerate(BANDS):
        if band not in rows:
            continue
        entry = np.flatnonzero(rows[band] >= 0)
        row = rows[band][entry]
        table = band_tables[band]
        parts["entry"].append(entry)
        parts["band"].append(np.full(entry.size, code))
        parts["row"].append(row)
        for name in ("ra", "dec", "raerr", "decerr"):
            parts[name].append(np.asarray(table[name], dtype=np.float64)[row])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def _join_entries(rows: dict[str, np.ndarray],
                  band_tables: Mapping[str, Mapping[str, np.ndarray]],
                  merge_radius_arcsec: float) -> dict[str, np.ndarray]:
    """The second pass: entries joined by :func:`merge_disjoint_groups`, rows renumbered."""
    det = _detections(rows, band_tables)
    if det["entry"].size == 0:
        return rows
    labels = merge_disjoint_groups(det["ra"], det["dec"], det["entry"].astype(np.int64),
                                   det["band"].astype(np.int64), merge_radius_arcsec)
    n = int(labels.max()) + 1
    joined = {band: np.full(n, -1, dtype=np.int64) for band in rows}
    for code, band in enumerate(BANDS):
        if band in rows:
            mine = det["band"] == code
            joined[band][labels[mine]] = det["row"][mine].astype(np.int64)
    return joined


def _entry_positions(rows: Mapping[str, np.ndarray],
                     band_tables: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Unweighted mean position of each entry's band detections, errors in quadrature / n."""
    n = len(next(iter(rows.values()))) if rows else 0
    det = _detections(rows, band_tables)
    entry = det["entry"].astype(np.int64)
    ra, dec = mean_positions(det["ra"], det["dec"], entry, n)
    count = np.maximum(np.bincount(entry, minlength=n), 1)
    return {"ra": ra, "dec": dec,
            "raerr": np.sqrt(np.bincount(entry, det["raerr"] ** 2, minlength=n)) / count,
            "decerr": np.sqrt(np.bincount(entry, det["decerr"] ** 2, minlength=n)) / count}


def _band_values(table: Mapping[str, np.ndarray] | None, rows: np.ndarray | None, n: int,
                 band: str) -> dict[str, np.ndarray]:
    out = {}
    for name in band_columns(band):
        values = np.full(n, np.nan)
        if table is not None and rows is not None:
            hit = rows >= 0
            values[hit] = np.asarray(table[name], dtype=np.float64)[rows[hit]]
        elif name == f"ndith_{band}":
            values[:] = 0.0
        out[name] = values
    return out
