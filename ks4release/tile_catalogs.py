"""The per-tile catalogs: what the reduction writes and the release catalogs are built from.

Dual mode (I-band detection, forced photometry in every band), one file per tile::

    <release>/catalogs/tiles/<tile>_dual.parquet

Single mode (independent detection in each band), one file per tile and observed band::

    <release>/catalogs/tiles/<tile>_single_<band>.parquet      band in b, v, r, i

Columns (lower case; ``{b}`` is the band letter b, v, r or i; null = missing value):

=====================================  ========  ==========================================
column                                 type      meaning
=====================================  ========  ==========================================
ra, dec                                float64   ICRS position, deg
raerr, decerr                          float32   position errors, arcsec (single mode; ra
                                                 error times cos dec)
x_image, y_image                       float32   position on the tile co-add, pixels
tile                                   string    tile name
snr_{b}                                float32   S/N of the detection (dual mode: every band's
                                                 forced S/N; single: that band's)
Table 3 per-band columns, e.g.         as in     DR1 Table 3: mag_auto_{b}, magerr_auto_{b},
mag_auto_{b}, flags_{b}, edge_{b}      the       mag_aper{3,5,10}_{b}, magerr_aper..., min/max/
                                       schemas   mean_mjd_{b}, fwhm_image_{b}, class_star_{b},
                                                 flux_radius_{b}, kron_radius_{b},
                                                 flux_max_{b}, theta_image_{b},
                                                 ellipticity_{b}, a_image_{b}, b_image_{b},
                                                 flags_{b}, imaflags_iso_{b}, ssflag_{b},
                                                 sscount_30_{b}, ndith_{b}, edge_{b}
=====================================  ========  ==========================================

A dual file has the per-band columns of all four bands (a band the tile was not observed in has
``ndith_{b} = 0`` and null measurements); a single file has those of its one band. Types, units
and descriptions of the per-band columns are those of ``ks4release/schemas/idual_master.yaml``;
the writer puts units and descriptions in the Parquet schema metadata (an astropy ``Table``
with units written by ``Table.write(..., format="parquet")`` does). Magnitudes of a forced
measurement without flux are null (not 99).
"""

from __future__ import annotations

import re
from pathlib import Path

from ks4release.schemas import catalog_schema

__all__ = [
    "BANDS",
    "POSITION_COLUMNS",
    "band_columns",
    "dual_catalog_path",
    "parse_tile_catalog_name",
    "single_catalog_path",
    "tile_catalogs_dir",
]

#: Band letters in catalog column names, in wavelength order.
BANDS = ("b", "v", "r", "i")

#: Columns of every tile catalog besides the per-band ones.
POSITION_COLUMNS = ("ra", "dec", "x_image", "y_image", "tile")

_NAME_RE = re.compile(r"^(?P<tile>.+?)_(?:(?P<dual>dual)|single_(?P<band>[bvri]))\.parquet$")


def band_columns(band: str) -> tuple[str, ...]:
    """The Table 3 per-band columns of ``band`` (schema order), without ``snr_{band}``."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; expected one of {', '.join(BANDS)}")
    suffix = f"_{band}"
    return tuple(n for n in catalog_schema("idual_master").names if n.endswith(suffix)
                 and n not in ("ra", "dec"))


def tile_catalogs_dir(release_dir: Path) -> Path:
    """Folder of the per-tile catalogs."""
    return Path(release_dir) / "catalogs" / "tiles"


def dual_catalog_path(release_dir: Path, tile: str) -> Path:
    """Dual-mode catalog of one tile."""
    return tile_catalogs_dir(release_dir) / f"{tile}_dual.parquet"


def single_catalog_path(release_dir: Path, tile: str, band: str) -> Path:
    """Single-mode catalog of one tile and band (band letter b, v, r or i)."""
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; expected one of {', '.join(BANDS)}")
    return tile_catalogs_dir(release_dir) / f"{tile}_single_{band}.parquet"


def parse_tile_catalog_name(path: Path) -> tuple[str, str | None]:
    """``(tile, band)`` of a tile catalog file name; band is None for a dual-mode file.

    Raises
    ------
    ValueError
        When the name is neither ``<tile>_dual.parquet`` nor ``<tile>_single_<band>.parquet``.
    """
    match = _NAME_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a tile catalog name (expected <tile>_dual.parquet or "
                         "<tile>_single_<band>.parquet)")
    return match["tile"], match["band"]
