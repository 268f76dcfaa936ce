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
blend_aper5_{b}                        float32   share of the 5" aperture flux predicted to
                                                 come from the other detections (ours)
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ks4release.atomic import atomic_path
from ks4release.schemas import CatalogSchema, ColumnSpec, catalog_schema, columns_to_batch

__all__ = [
    "BANDS",
    "POSITION_COLUMNS",
    "band_columns",
    "dual_catalog_path",
    "parse_tile_catalog_name",
    "single_catalog_path",
    "tile_catalog_schema",
    "tile_catalogs_dir",
    "write_tile_catalog",
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


def _extra(name: str, datatype: str, unit: str, ucd: str, description: str) -> ColumnSpec:
    return ColumnSpec(name=name, datatype=datatype, unit=unit, ucd=ucd, nullable=True,
                      description=description)


def tile_catalog_schema(mode: str, band: str | None = None) -> CatalogSchema:
    """The columns of a dual-mode tile catalog, or of a single-mode one of ``band``.

    Position and per-band columns are those of ``idual_master``; ``x_image``/``y_image``,
    ``raerr``/``decerr`` (single mode), ``snr_{b}`` and ``blend_aper5_{b}`` are the tile
    catalogs' own. The ``tile``
    string column is added by :func:`write_tile_catalog`.
    """
    if mode not in ("dual", "single") or (mode == "single") != (band is not None):
        raise ValueError(f"mode {mode!r} with band {band!r}: expected 'dual' without a band "
                         "or 'single' with one")
    master = catalog_schema("idual_master")
    columns = [master.column("ra"), master.column("dec"),
               _extra("x_image", "float", "pix", "pos.cartesian.x;instr.det",
                      "X position on the tile co-add (1-based)"),
               _extra("y_image", "float", "pix", "pos.cartesian.y;instr.det",
                      "Y position on the tile co-add (1-based)")]
    if mode == "single":
        columns += [_extra("raerr", "float", "arcsec", "stat.error;pos.eq.ra",
                           "Error of ra times cos(dec)"),
                    _extra("decerr", "float", "arcsec", "stat.error;pos.eq.dec",
                           "Error of dec")]
    for b in BANDS if band is None else (band,):
        columns.append(_extra(f"snr_{b}", "float", "", "stat.snr",
                              f"Signal-to-noise ratio of the {b.upper()}-band MAG_AUTO flux"))
        columns += [master.column(n) for n in band_columns(b)]
        columns.append(_extra(f"blend_aper5_{b}", "float", "", "arith.ratio;phot.flux",
                              f"Share of the {b.upper()}-band 5-arcsec aperture flux predicted "
                              "to come from the other detections (reduction.blending)"))
    name = "tile_dual" if band is None else f"tile_single_{band}"
    return CatalogSchema(catalog=name, description=f"KS4 {mode}-mode tile catalog",
                         columns=tuple(columns))


def write_tile_catalog(path: Path, cols: dict[str, np.ndarray], *, tile: str,
                       schema: CatalogSchema) -> None:
    """Write a tile catalog atomically as Parquet, units and descriptions in the field metadata.

    ``cols`` holds every column of ``schema`` as arrays with NaN for null (integers and
    booleans as floats are cast to the schema's types).
    """
    batch = columns_to_batch(cols, schema)
    n = batch.num_rows
    table = pa.Table.from_batches([batch]).append_column(
        pa.field("tile", pa.string(), nullable=False,
                 metadata={"description": "KS4 tile name", "ucd": "meta.id;obs.field"}),
        pa.array([tile] * n, type=pa.string()))
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)
