"""The release catalog schemas, kept as data: one felis YAML file per catalog.

``idual_master.yaml`` and ``single_master.yaml`` (Rubin's felis format, `lsst-felis` on PyPI)
list every column of DR1's Table 3 with its datatype, unit (``fits:tunit``), IVOA UCD,
nullability and description; the allowed value range of each column is a felis ``Check``
constraint of the form ``name >= low AND name < high``. Every writer, exporter and the schema
checker read these files through :func:`catalog_schema`, so that a column changes in one place.

The files validate with ``felis validate`` (felis checks the UCDs against the IVOA list and the
units against astropy), and :func:`tap_schema_sql` turns one into the ``TAP_SCHEMA`` inserts
that Astro Data Lab loads (``felis load-tap-schema --dry-run``).
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from felis.datamodel import CheckConstraint, Schema

__all__ = [
    "CATALOGS",
    "CatalogSchema",
    "ColumnSpec",
    "catalog_schema",
    "columns_to_batch",
    "schema_path",
    "tap_schema_sql",
]

#: The release catalogs that have a schema file.
CATALOGS = ("idual_master", "single_master")

#: felis datatype -> numpy dtype of the in-memory column.
_NUMPY = {
    "boolean": np.dtype(bool),
    "short": np.dtype(np.int16),
    "int": np.dtype(np.int32),
    "long": np.dtype(np.int64),
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
}

_RANGE_RE = re.compile(
    r"^(?P<name>\w+) (?P<lop>>=|>) (?P<low>\S+) AND (?P=name) (?P<hop><=|<) (?P<high>\S+)$"
)


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a release catalog, as its schema file describes it."""

    name: str
    datatype: str
    unit: str
    ucd: str
    nullable: bool
    description: str
    low: float = -math.inf
    low_inclusive: bool = True
    high: float = math.inf
    high_inclusive: bool = True

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the column."""
        return _NUMPY[self.datatype]

    @property
    def has_range(self) -> bool:
        """True when the schema limits the column's values."""
        return math.isfinite(self.low) or math.isfinite(self.high)

    def range_text(self) -> str:
        """The allowed range in interval notation, e.g. ``[0, 360)``."""
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def in_range(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask of ``values`` inside the allowed range (NaN and inf are outside)."""
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        ok &= values >= self.low if self.low_inclusive else values > self.low
        ok &= values <= self.high if self.high_inclusive else values < self.high
        return ok


@dataclass(frozen=True)
class CatalogSchema:
    """A release catalog's columns in order, with its name and description."""

    catalog: str
    description: str
    columns: tuple[ColumnSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Column names in order."""
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> ColumnSpec:
        """The column called ``name``; KeyError naming it and the catalog otherwise."""
        for spec in self.columns:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.catalog} has no column {name!r}")

    def arrow_schema(self) -> pa.Schema:
        """Arrow schema with each field's unit, UCD and description as field metadata."""
        fields = []
        for spec in self.columns:
            meta = {"description": spec.description, "ucd": spec.ucd}
            if spec.unit:
                meta["unit"] = spec.unit
            fields.append(pa.field(spec.name, pa.from_numpy_dtype(spec.dtype),
                                   nullable=spec.nullable, metadata=meta))
        return pa.schema(fields, metadata={"catalog": self.catalog,
                                           "description": self.description})


def schema_path(catalog: str) -> Path:
    """The felis YAML file of ``catalog``."""
    _check_catalog(catalog)
    return Path(str(resources.files(__name__).joinpath(f"{catalog}.yaml")))


def _check_catalog(catalog: str) -> None:
    if catalog not in CATALOGS:
        raise ValueError(f"unknown catalog {catalog!r}; expected one of {', '.join(CATALOGS)}")


@functools.cache
def catalog_schema(catalog: str) -> CatalogSchema:
    """Read and validate the felis schema of ``catalog`` (cached).

    Raises
    ------
    ValueError
        When the file is not a valid felis schema, has not exactly one table, or a Check
        constraint is not a range of the form ``name >= low AND name < high``.
    """
    path = schema_path(catalog)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    schema = Schema.model_validate(data)
    if len(schema.tables) != 1:
        raise ValueError(f"{path}: expected one table, found {len(schema.tables)}")
    table = schema.tables[0]
    ranges = {}
    for constraint in table.constraints:
        if isinstance(constraint, CheckConstraint):
            name, limits = _parse_range(constraint.expression, path)
            ranges[name] = limits
    columns = []
    for col in table.columns:
        if col.datatype.value not in _NUMPY:
            raise ValueError(f"{path}: column {col.name}: unsupported datatype "
                             f"{col.datatype.value}")
        columns.append(ColumnSpec(
            name=col.name, datatype=col.datatype.value, unit=col.fits_tunit or "",
            ucd=col.ivoa_ucd or "", nullable=col.nullable, description=col.description or "",
            **ranges.pop(col.name, {}),
        ))
    if ranges:
        raise ValueError(f"{path}: range constraints on unknown columns {sorted(ranges)}")
    return CatalogSchema(catalog=table.name, description=table.description or "",
                         columns=tuple(columns))


def _parse_range(expression: str, path: Path) -> tuple[str, dict[str, float | bool]]:
    match = _RANGE_RE.match(expression.strip())
    if match is None:
        raise ValueError(f"{path}: Check constraint {expression!r} is not "
                         "'name >= low AND name < high'")
    return match["name"], {
        "low": float(match["low"]), "low_inclusive": match["lop"] == ">=",
        "high": float(match["high"]), "high_inclusive": match["hop"] == "<=",
    }


def tap_schema_sql(catalog: str) -> str:
    """The ``TAP_SCHEMA`` INSERT statements for ``catalog`` (``felis load-tap-schema --dry-run``).

    Does what felis's command does, through its Python API (the command would add a logging
    handler to the process on every call): a dry run against an in-memory SQLite engine, which
    only picks the SQL dialect, writing the statements to a file; nothing is loaded anywhere.
    """
    from felis.db.database_context import create_database_context
    from felis.tap_schema import DataLoader, TableManager

    engine_url = "sqlite://"
    manager = TableManager(engine_url=engine_url, schema_name=None, table_name_postfix="")
    schema = Schema.from_uri(str(schema_path(catalog)), context={"id_generation": True})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{catalog}_tap_schema.sql"
        with open(out, "w", encoding="utf-8") as handle, create_database_context(
                engine_url, manager.metadata, echo=False, dry_run=True,
                output_file=handle) as db_context:
            DataLoader(schema, manager, db_context=db_context, tap_schema_index=None,
                       dry_run=True, output_file=handle).load()
        return out.read_text(encoding="utf-8")


def columns_to_batch(cols: dict[str, np.ndarray], schema: CatalogSchema) -> pa.RecordBatch:
    """A record batch in the catalog's schema from float64 columns with NaN for null.

    Raises
    ------
    ValueError
        When a column is missing or a non-nullable column has a null.
    """
    arrays = []
    for spec in schema.columns:
        if spec.name not in cols:
            raise ValueError(f"{schema.catalog}: column {spec.name} was not computed")
        values = np.asarray(cols[spec.name])
        null = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
        if null.any() and not spec.nullable:
            raise ValueError(f"{schema.catalog}: column {spec.name} has nulls but is not nullable")
        filled = np.where(null, 0, values)
        typed = filled != 0 if spec.datatype == "boolean" else filled.astype(spec.dtype)
        arrays.append(pa.array(typed, type=pa.from_numpy_dtype(spec.dtype),
                               mask=null if null.any() else None))
    return pa.record_batch(arrays, schema=schema.arrow_schema())
