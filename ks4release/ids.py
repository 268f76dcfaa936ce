"""The ``coadd_object_id`` of the release catalogs: Gaia's ``source_id`` scheme.

DR1 (section 4.2.1) gives every unique source a 64-bit identifier that, like Gaia's
``source_id``, carries the level-12 nested HEALPix index of the source in its most significant
bits::

    coadd_object_id = healpix_index * 2**35 + running_number

so that ``coadd_object_id >> 35`` is the HEALPix cell (``healpix_index``), identifiers sort by
cell, and a spatial query on a cell range is a range query on the identifier. The running number
(``0 <= running_number < 2**35``) numbers the sources of one cell; the release numbers them in a
canonical order of their positions so that a rerun on the same inputs gives the same identifiers.
Order-12 cells are about 0.73 arcmin2, far fewer than 2**35 sources fit in one.
"""

from __future__ import annotations

import healpy as hp
import numpy as np

__all__ = [
    "HEALPIX_ORDER",
    "ID_SHIFT",
    "MAX_RUNNING_NUMBER",
    "N_CELLS",
    "decode_ids",
    "encode_ids",
    "healpix_index",
    "running_numbers",
]

#: HEALPix order of the cell embedded in the identifier (Gaia's choice, DR1's too).
HEALPIX_ORDER = 12
#: Bits below the HEALPix index.
ID_SHIFT = 35
#: Largest running number that fits below the HEALPix index.
MAX_RUNNING_NUMBER = 2**ID_SHIFT - 1
#: Number of order-12 cells on the sphere.
N_CELLS = 12 * 4**HEALPIX_ORDER

def healpix_index(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Level-12 nested HEALPix index (int64) of ICRS positions in degrees."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    if ra.size and (not np.all(np.isfinite(ra)) or not np.all(np.isfinite(dec))):
        raise ValueError("ra and dec must be finite to compute a HEALPix index")
    if dec.size and (np.any(dec < -90.0) or np.any(dec > 90.0)):
        raise ValueError("dec must lie in [-90, 90] deg")
    cells = hp.ang2pix(2**HEALPIX_ORDER, np.mod(ra, 360.0), dec, nest=True, lonlat=True)
    return np.asarray(cells, dtype=np.int64)


def encode_ids(cells: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Identifiers from HEALPix cells and per-cell running numbers.

    Raises
    ------
    ValueError
        When a cell is outside ``[0, N_CELLS)`` or a number outside ``[0, 2**35)``.
    """
    cells = np.asarray(cells, dtype=np.int64)
    numbers = np.asarray(numbers, dtype=np.int64)
    if cells.size and (cells.min() < 0 or cells.max() >= N_CELLS):
        raise ValueError(f"HEALPix index outside [0, {N_CELLS}) for order {HEALPIX_ORDER}")
    if numbers.size and (numbers.min() < 0 or numbers.max() > MAX_RUNNING_NUMBER):
        raise ValueError(f"running number outside [0, 2**{ID_SHIFT})")
    return (cells << ID_SHIFT) | numbers


def decode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The HEALPix cells and running numbers of identifiers (inverse of :func:`encode_ids`)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> ID_SHIFT, ids & MAX_RUNNING_NUMBER


def running_numbers(cells: np.ndarray) -> np.ndarray:
    """Per-cell running numbers 0, 1, 2, ... for rows already sorted by cell.

    The rows of one cell must be contiguous (the caller sorts them by cell and then by a
    canonical key); the n-th row of a cell gets number n.
    """
    cells = np.asarray(cells, dtype=np.int64)
    if cells.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any(np.diff(cells) < 0):
        raise ValueError("rows must be sorted by HEALPix cell")
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    lengths = np.diff(np.r_[starts, cells.size])
    return np.arange(cells.size, dtype=np.int64) - np.repeat(starts, lengths)
