"""The KS4 tile grid, generated in code, and the tiles of a release.

The KMTNet field grid (``kmtnet_grid.fits``, 8,335 fields) is a set of declination bands with
evenly spaced right ascensions, RA = i * 360 / N starting at 0:

* the survey part (the first 2,749 fields, Dec -30 and south) has bands every 2 degrees with
  N = ceil(180 cos(|Dec| - 1 deg)), i.e. the 2-degree field width at the band's equatorward
  edge, and a single field at the pole. The bands are listed starting at Dec -62 towards the
  pole, then from Dec -30 to -60, and the RAs are computed in single precision
  (float32(i) * float32(360 / N)), all as in the original file;
* the northern extension (fields 2,749 and up, |Dec| <= 28.7) has bands every 90/47 degrees with
  N = ceil(360 cos(|Dec| - 45/47 deg) / 1.923 deg).

A field is named ``{RA:03d}{Dec:+03d}`` with Dec truncated and RA rounded half up in the survey
part, truncated in the northern extension (``004-62``, ``006-28``); a DR1 tile is
``{index:04d}.{name}`` (``0376.321-70``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

__all__ = [
    "N_SURVEY_FIELDS",
    "Tile",
    "grid_table",
    "survey_tiles",
    "tile_by_name",
    "neighbour_tiles",
]

#: Number of KS4 survey fields at the start of the grid (Dec <= -30).
N_SURVEY_FIELDS = 2749

_SOUTH_BAND_ORDER = list(range(-62, -91, -2)) + list(range(-30, -61, -2))
_NORTH_STEP_DEG = 90.0 / 47.0
_NORTH_RA_WIDTH_DEG = 1.923
_TILE_NAME = re.compile(r"^(\d{4})\.(\d{3})([+-]\d{2})$")


@dataclass(frozen=True, kw_only=True)
class Tile:
    """A survey tile: its grid index, DR1-style name and centre (ICRS degrees)."""

    index: int
    name: str
    ra_deg: float
    dec_deg: float

    @property
    def field_name(self) -> str:
        """The grid's short field name, e.g. ``004-62``."""
        return self.name.split(".", 1)[1]


def _south_band_count(dec_deg: float) -> int:
    """Number of fields in a southern 2-degree declination band."""
    if abs(dec_deg) >= 90.0:
        return 1
    return math.ceil(180.0 * math.cos(math.radians(abs(dec_deg) - 1.0)))


def _north_band_count(dec_deg: float) -> int:
    """Number of fields in a band of the northern extension."""
    edge = abs(dec_deg) - _NORTH_STEP_DEG / 2.0
    return math.ceil(360.0 * math.cos(math.radians(edge)) / _NORTH_RA_WIDTH_DEG)


def _field_name(ra_deg: float, dec_deg: float, *, round_ra: bool) -> str:
    """Short field name: ``004-62``, ``025-62`` (RA rounded half up), ``006-28`` (truncated)."""
    ra_int = math.floor(ra_deg + 0.5) if round_ra else math.floor(ra_deg)
    sign = "-" if dec_deg < 0 else "+"
    return f"{ra_int % 360:03d}{sign}{int(abs(dec_deg)):02d}"


def _field_names(ra: np.ndarray, dec: np.ndarray) -> list[str]:
    """Names of grid fields: the survey part rounds RA, the northern extension truncates it."""
    return [
        _field_name(float(r), float(d), round_ra=i < N_SURVEY_FIELDS)
        for i, (r, d) in enumerate(zip(ra, dec))
    ]


@lru_cache(maxsize=1)
def _grid_arrays() -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec of every grid field, in grid order (float64 degrees)."""
    ras: list[np.ndarray] = []
    decs: list[np.ndarray] = []
    for dec in _SOUTH_BAND_ORDER:
        n = _south_band_count(dec)
        # The survey part of the original grid was computed in single precision.
        step = np.float32(360.0 / n)
        ras.append((np.arange(n, dtype=np.float32) * step).astype(np.float64))
        decs.append(np.full(n, float(dec)))
    for k in range(-15, 16):
        dec = k * _NORTH_STEP_DEG
        n = _north_band_count(dec)
        ras.append(np.arange(n) * (360.0 / n))
        decs.append(np.full(n, dec))
    return np.concatenate(ras), np.concatenate(decs)


def grid_table() -> Table:
    """The whole KMTNet field grid as a Table (index, field name, centre, Galactic coordinates)."""
    ra, dec = _grid_arrays()
    coords = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs").galactic
    table = Table(
        {
            "index": np.arange(ra.size),
            "field_name": _field_names(ra, dec),
            "ra": ra * u.deg,
            "dec": dec * u.deg,
            "glon": coords.l.deg * u.deg,
            "glat": coords.b.deg * u.deg,
        }
    )
    table["index"].description = "Grid index (field_name1 of kmtnet_grid.fits)"
    table["field_name"].description = "Field name from truncated RA and Dec"
    table["ra"].description = "Tile centre right ascension (ICRS)"
    table["dec"].description = "Tile centre declination (ICRS)"
    return table


def _tile(index: int) -> Tile:
    ra, dec = _grid_arrays()
    r, d = float(ra[index]), float(dec[index])
    field = _field_name(r, d, round_ra=index < N_SURVEY_FIELDS)
    return Tile(index=index, name=f"{index:04d}.{field}", ra_deg=r, dec_deg=d)


def survey_tiles() -> list[Tile]:
    """The 2,749 KS4 survey tiles (Dec -30 and south)."""
    return [_tile(i) for i in range(N_SURVEY_FIELDS)]


def tile_by_name(name: str) -> Tile:
    """The grid tile called ``name`` (``0376.321-70``); a bare index (``0376``) also works."""
    ra, _ = _grid_arrays()
    text = name.strip()
    match = _TILE_NAME.match(text)
    index_text = match.group(1) if match else text
    if not index_text.isdigit() or not 0 <= int(index_text) < ra.size:
        raise ValueError(
            f"tile {name!r} is not a KS4 grid tile: expected a name like '0376.321-70' "
            f"with an index from 0000 to {ra.size - 1}"
        )
    tile = _tile(int(index_text))
    if match and tile.name != text:
        raise ValueError(f"tile {name!r} does not match the grid: index {index_text} is {tile.name}")
    return tile


def neighbour_tiles(anchor: Tile, n_ra: int, n_dec: int) -> list[Tile]:
    """An ``n_ra`` x ``n_dec`` block of adjacent grid tiles starting at ``anchor``.

    Columns step east in RA within the anchor's declination band; rows step one band towards
    the pole, taking in each band the tile nearest in RA to the anchor column.
    """
    ra, dec = _grid_arrays()
    tiles = []
    band_decs = _SOUTH_BAND_ORDER
    if anchor.dec_deg not in band_decs:
        raise ValueError(f"tile {anchor.name} is not in the southern survey bands")
    start = band_decs.index(int(anchor.dec_deg))
    for row in range(n_dec):
        d = float(band_decs[(start + row) % len(band_decs)])
        in_band = np.flatnonzero(dec == d)
        n = in_band.size
        first = int(np.argmin(np.abs(((ra[in_band] - anchor.ra_deg + 180.0) % 360.0) - 180.0)))
        for col in range(n_ra):
            tiles.append(_tile(int(in_band[(first + col) % n])))
    return tiles
