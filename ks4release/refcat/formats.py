"""Reference-catalog formats: Gaia DR3, Gaia XP synthetic photometry and DELVE DR2.

Local reference files are Parquet or FITS tables that use the archives' own column names, so a
file saved from a TAP query and a file prepared by hand are interchangeable. Each catalog is
described here as data (:class:`RefcatFormat`: name, archive table, and one :class:`RefColumn`
per column with unit, dtype kind, required flag and description), and :func:`read_refcat` reads
a local file into an astropy Table with canonical lower-case names and units, after checking it:

* every required column is present (names match case-insensitively);
* every column has the expected kind (float columns accept integers, integer columns do not
  accept floats);
* ``ra``/``dec``, where present, are finite, with 0 <= ra < 360 and -90 <= dec <= 90 deg.

Violations raise :class:`ks4release.errors.InputError` naming the file and the column.
:func:`conform_table` applies the same checks to a table already in memory (a TAP or VizieR
result, a cache file).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import MaskedColumn, Table

from ks4release.errors import InputError

__all__ = [
    "RefColumn",
    "RefcatFormat",
    "GAIA_DR3",
    "GAIA_XP",
    "DELVE_DR2",
    "REFCAT_FORMATS",
    "refcat_format",
    "read_refcat",
    "conform_table",
]

_KIND_NAMES = {"f": "float", "i": "integer", "U": "string"}


@dataclass(frozen=True, kw_only=True)
class RefColumn:
    """One column of a reference catalog.

    ``kind`` is the NumPy dtype kind expected: ``"f"`` (float; integers are accepted and
    converted to float64), ``"i"`` (signed or unsigned integer) or ``"U"`` (string).
    ``unit`` is a string astropy understands, or ``None`` for dimensionless columns.
    """

    name: str
    unit: str | None
    kind: str
    required: bool
    description: str

    def __post_init__(self) -> None:
        if self.kind not in _KIND_NAMES:
            raise ValueError(f"kind must be one of {', '.join(_KIND_NAMES)}, got {self.kind!r}")
        if self.name != self.name.lower():
            raise ValueError(f"column names are lower case, got {self.name!r}")


@dataclass(frozen=True, kw_only=True)
class RefcatFormat:
    """A reference catalog: short name, the archive table it comes from, and its columns."""

    name: str
    archive_table: str
    description: str
    columns: tuple[RefColumn, ...]

    @property
    def required(self) -> tuple[str, ...]:
        """Names of the required columns."""
        return tuple(c.name for c in self.columns if c.required)

    def column(self, name: str) -> RefColumn:
        """The column called ``name`` (case-insensitive)."""
        for col in self.columns:
            if col.name == name.lower():
                return col
        raise KeyError(f"{self.name} has no column {name!r}")


def _col(name, unit, kind, required, description) -> RefColumn:
    return RefColumn(name=name, unit=unit, kind=kind, required=required, description=description)


_RA = "Right ascension (ICRS)"
_DEC = "Declination (ICRS)"

GAIA_DR3 = RefcatFormat(
    name="gaia_dr3",
    archive_table="gaiadr3.gaia_source",
    description="Gaia DR3 astrometry and G/BP/RP photometry",
    columns=(
        _col("source_id", None, "i", True, "Gaia DR3 unique source identifier"),
        _col("ra", "deg", "f", True, f"{_RA} at ref_epoch"),
        _col("dec", "deg", "f", True, f"{_DEC} at ref_epoch"),
        _col("phot_g_mean_mag", "mag", "f", True, "G-band mean magnitude (Vega)"),
        _col("ra_error", "mas", "f", False, "Standard error of ra (times cos dec)"),
        _col("dec_error", "mas", "f", False, "Standard error of dec"),
        _col("pmra", "mas / yr", "f", False, "Proper motion in RA (times cos dec)"),
        _col("pmdec", "mas / yr", "f", False, "Proper motion in Dec"),
        _col("parallax", "mas", "f", False, "Parallax"),
        _col("phot_bp_mean_mag", "mag", "f", False, "BP mean magnitude (Vega)"),
        _col("phot_rp_mean_mag", "mag", "f", False, "RP mean magnitude (Vega)"),
        _col("ref_epoch", "yr", "f", False, "Reference epoch (Julian year, 2016.0 in DR3)"),
    ),
)

_XP_FLUX_UNIT = "W / (m2 nm)"
GAIA_XP = RefcatFormat(
    name="gaia_xp",
    archive_table="gaiadr3.synthetic_photometry_gspc",
    description="Gaia DR3 XP synthetic photometry, Johnson-Kron-Cousins B, V, R, I",
    columns=(
        _col("source_id", None, "i", True, "Gaia DR3 unique source identifier"),
        *(_col(f"{b}_jkc_mag", "mag", "f", True, f"Synthetic Johnson-Kron-Cousins {b.upper()} "
               "magnitude (Vega)") for b in "bvri"),
        _col("ra", "deg", "f", False, f"{_RA} (joined from gaia_source)"),
        _col("dec", "deg", "f", False, f"{_DEC} (joined from gaia_source)"),
        *(_col(f"{b}_jkc_flux_error", _XP_FLUX_UNIT, "f", False,
               f"Error on the synthetic {b.upper()} flux") for b in "bvri"),
        *(_col(f"{b}_jkc_flag", None, "i", False,
               f"Quality flag of the synthetic {b.upper()} photometry (1 = reliable)")
          for b in "bvri"),
    ),
)

DELVE_DR2 = RefcatFormat(
    name="delve_dr2",
    archive_table="delve_dr2.objects",
    description="DELVE DR2 unique objects, g r i z MAG_AUTO photometry (AB)",
    columns=(
        _col("ra", "deg", "f", True, _RA),
        _col("dec", "deg", "f", True, _DEC),
        *(_col(f"mag_auto_{b}", "mag", "f", True, f"Weighted-average {b} MAG_AUTO (AB)")
          for b in "griz"),
        _col("quick_object_id", None, "i", False, "DELVE object identifier"),
        *(_col(f"magerr_auto_{b}", "mag", "f", False, f"Uncertainty of mag_auto_{b}")
          for b in "griz"),
        *(_col(f"extended_class_{b}", None, "i", False,
               f"Morphological class in {b} (0 = star .. 3 = galaxy)") for b in "griz"),
        *(_col(f"nepochs_{b}", None, "i", False, f"Number of epochs detected in {b}")
          for b in "griz"),
    ),
)

#: Every known reference catalog format by short name.
REFCAT_FORMATS: dict[str, RefcatFormat] = {f.name: f for f in (GAIA_DR3, GAIA_XP, DELVE_DR2)}


def refcat_format(name: str) -> RefcatFormat:
    """The reference-catalog format called ``name`` (gaia_dr3, gaia_xp, delve_dr2)."""
    try:
        return REFCAT_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown reference catalog {name!r}; known: {', '.join(REFCAT_FORMATS)}"
        ) from None


def _table_format(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() in (".fits", ".fit", ".fts") or suffixes in (".fits.gz", ".fit.gz"):
        return "fits"
    raise InputError(path, "unknown table file type (expected .parquet or .fits)")


def _read_table(path: Path) -> Table:
    fmt = _table_format(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    try:
        with warnings.catch_warnings():
            # Unit strings we cannot parse are replaced by the canonical units below.
            warnings.simplefilter("ignore", u.UnitsWarning)
            return Table.read(path, format=fmt)
    except Exception as exc:  # pyarrow and astropy.io.fits raise many types for corrupt files
        text = " ".join(str(exc).split())
        raise InputError(path, f"not a readable {fmt} table ({text})") from None


def _kind_ok(expected: str, actual: str) -> bool:
    if expected == "f":
        return actual in "fiu"
    if expected == "i":
        return actual in "iu"
    return actual in "US"


def _convert(path: str | os.PathLike[str], spec: RefColumn, column) -> MaskedColumn | np.ndarray:
    """Check the kind of ``column`` and return it with the canonical dtype and unit."""
    kind = column.dtype.kind
    if not _kind_ok(spec.kind, kind):
        raise InputError(
            path,
            f"column {spec.name!r} has dtype {column.dtype} (expected {_KIND_NAMES[spec.kind]})",
            column=spec.name,
        )
    values = column
    factor = 1.0
    file_unit = getattr(column, "unit", None)
    if spec.unit and file_unit is not None and not isinstance(file_unit, u.UnrecognizedUnit):
        try:
            factor = file_unit.to(u.Unit(spec.unit))
        except u.UnitConversionError:
            raise InputError(
                path, f"column {spec.name!r} has unit {file_unit} (expected {spec.unit})",
                column=spec.name,
            ) from None
    if spec.kind == "f":
        data = np.asarray(values, dtype=np.float64) * factor
    elif spec.kind == "i":
        data = np.asarray(values, dtype=np.int64)
    else:
        data = np.asarray(values, dtype=str)
    mask = getattr(column, "mask", None)
    if mask is not None and np.any(mask):
        return MaskedColumn(data, mask=np.array(mask, dtype=bool), name=spec.name)
    return data


def _check_coordinates(path: str | os.PathLike[str], table: Table) -> None:
    for name, low, high, high_text in (("ra", 0.0, 360.0, "< 360"), ("dec", -90.0, 90.0, "<= 90")):
        if name not in table.colnames:
            continue
        col = table[name]
        values = np.asarray(col.filled(np.nan) if isinstance(col, MaskedColumn) else col,
                            dtype=np.float64)
        bad_finite = ~np.isfinite(values)
        if bad_finite.any():
            raise InputError(
                path, f"column {name!r} has {int(bad_finite.sum())} null or non-finite value(s) "
                f"(first at row {int(np.flatnonzero(bad_finite)[0])}; expected finite degrees)",
                column=name,
            )
        out = (values < low) | (values >= high if name == "ra" else values > high)
        if out.any():
            row = int(np.flatnonzero(out)[0])
            raise InputError(
                path, f"column {name!r} has {int(out.sum())} value(s) out of range (first: "
                f"{float(values[row])!r} at row {row}; expected {low:g} <= {name} {high_text} deg)",
                column=name,
            )


def read_refcat(path: str | os.PathLike[str], catalog: RefcatFormat | str) -> Table:
    """Read and check a local reference catalog (Parquet or FITS) of format ``catalog``.

    Returns a Table with the format's columns that the file holds, in the format's order, under
    their canonical lower-case names, with units and descriptions; other columns are dropped.
    ``meta`` records the catalog name, archive table and source file.
    """
    path = Path(path)
    return conform_table(_read_table(path), catalog, origin=path)


def conform_table(raw: Table, catalog: RefcatFormat | str,
                  origin: str | os.PathLike[str]) -> Table:
    """Check ``raw`` against format ``catalog`` and return it in canonical form.

    The same checks and conversions as :func:`read_refcat`, for a table that is already in
    memory (a TAP or VizieR result, a cache file). ``origin`` names where the table came from
    in error messages (a file, or a service URL) and is recorded as ``meta["source"]``.
    """
    fmt = refcat_format(catalog) if isinstance(catalog, str) else catalog
    path = origin
    by_lower: dict[str, str] = {}
    for name in raw.colnames:
        key = name.lower()
        if key in by_lower:
            raise InputError(
                path, f"columns {by_lower[key]!r} and {name!r} differ only in case", column=key
            )
        by_lower[key] = name
    missing = [c for c in fmt.required if c not in by_lower]
    if missing:
        raise InputError(
            path, f"required column {missing[0]!r} of {fmt.archive_table} is missing "
            f"(required: {', '.join(fmt.required)})", column=missing[0],
        )
    out = Table(meta={"refcat": fmt.name, "archive_table": fmt.archive_table,
                      "source": os.fspath(path)})
    for spec in fmt.columns:
        if spec.name not in by_lower:
            continue
        out[spec.name] = _convert(path, spec, raw[by_lower[spec.name]])
        out[spec.name].unit = spec.unit
        out[spec.name].description = spec.description
    _check_coordinates(path, out)
    return out
