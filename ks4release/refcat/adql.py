"""ADQL for the reference catalogs, built from numbers only.

A query is assembled from fixed parts (table and column names taken from the catalog formats of
:mod:`ks4release.refcat.formats`, checked against ``[a-z_][a-z0-9_.]*``) and finite floats
formatted in fixed-point notation. No text from users or configuration files ever enters a query,
so there is nothing to quote or escape: the queries contain no string literals at all.

The spatial constraint is a declination range and one or two right-ascension ranges
(``BETWEEN``) that hold one HEALPix cell (:func:`~ks4release.refcat.region.cell_bounds`). Plain
comparisons on ``ra``/``dec`` run on every TAP service; rows that fall in the box but outside the
cell are dropped by the caller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ks4release.refcat.formats import REFCAT_FORMATS
from ks4release.refcat.region import CellBounds

__all__ = ["TapTable", "TAP_TABLES", "build_cell_query", "format_number"]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


@dataclass(frozen=True, kw_only=True)
class TapTable:
    """How one catalog is read from its archive's TAP service.

    ``from_clause`` names the table(s) with aliases; ``select`` maps each canonical column of
    the format to the qualified archive column; ``ra``/``dec`` are the qualified position
    columns used in the spatial constraint.
    """

    catalog: str
    from_clause: tuple[str, ...]
    select: tuple[tuple[str, str], ...]
    ra: str
    dec: str

    def __post_init__(self) -> None:
        names = [*(q for _, q in self.select), self.ra, self.dec]
        for name in names:
            if not _IDENTIFIER.match(name):
                raise ValueError(f"not a plain column name: {name!r}")


def _simple(catalog: str, alias: str) -> TapTable:
    fmt = REFCAT_FORMATS[catalog]
    table = fmt.archive_table
    return TapTable(
        catalog=catalog,
        from_clause=(table, "AS", alias),
        select=tuple((c.name, f"{alias}.{c.name}") for c in fmt.columns),
        ra=f"{alias}.ra",
        dec=f"{alias}.dec",
    )


def _gaia_xp() -> TapTable:
    # synthetic_photometry_gspc has no positions: join gaia_source on source_id.
    fmt = REFCAT_FORMATS["gaia_xp"]
    select = tuple(
        (c.name, f"g.{c.name}" if c.name in ("ra", "dec") else f"xp.{c.name}")
        for c in fmt.columns
    )
    return TapTable(
        catalog="gaia_xp",
        from_clause=(fmt.archive_table, "AS", "xp", "JOIN", "gaiadr3.gaia_source", "AS", "g",
                     "ON", "g.source_id", "=", "xp.source_id"),
        select=select,
        ra="g.ra",
        dec="g.dec",
    )


#: How each catalog is queried over TAP.
TAP_TABLES: dict[str, TapTable] = {
    "gaia_dr3": _simple("gaia_dr3", "g"),
    "gaia_xp": _gaia_xp(),
    "delve_dr2": _simple("delve_dr2", "o"),
}


def format_number(value: float) -> str:
    """A finite float as an ADQL fixed-point literal (``-61.219637840``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"ADQL numbers must be finite, got {value}")
    text = f"{value:.9f}"
    return "0.000000000" if text == "-0.000000000" else text


def build_cell_query(catalog: str, bounds: CellBounds) -> str:
    """The ADQL that selects ``catalog``'s rows inside ``bounds`` (a cell's RA/Dec box)."""
    try:
        table = TAP_TABLES[catalog]
    except KeyError:
        raise ValueError(
            f"no TAP table for catalog {catalog!r}; known: {', '.join(TAP_TABLES)}"
        ) from None
    if not isinstance(bounds, CellBounds):
        raise TypeError(f"bounds must be a CellBounds, got {type(bounds).__name__}")
    columns = ", ".join(f"{qualified} AS {name}" if qualified.split(".")[-1] != name
                        else qualified for name, qualified in table.select)
    dec = (f"{table.dec} BETWEEN {format_number(bounds.dec_min)} "
           f"AND {format_number(bounds.dec_max)}")
    ra_parts = [f"{table.ra} BETWEEN {format_number(lo)} AND {format_number(hi)}"
                for lo, hi in bounds.ra_ranges]
    where = dec
    if not (len(bounds.ra_ranges) == 1 and bounds.ra_ranges[0] == (0.0, 360.0)):
        where = f"{dec} AND ({' OR '.join(ra_parts)})"
    return f"SELECT {columns} FROM {' '.join(table.from_clause)} WHERE {where}"
