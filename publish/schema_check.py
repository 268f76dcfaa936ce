"""The schema checker: a release catalog file against its felis schema, streamed.

:func:`check_catalog` reads a catalog in any export format (Parquet, FITS, VOTable, Data Lab CSV
with its TAP_SCHEMA SQL beside it, VizieR data file with its ReadMe) chunk by chunk and checks:

* columns: every schema column present, no other column; datatype, unit and UCD as in the schema
  (where the format carries them: CSV takes types, units and UCDs from the TAP_SCHEMA SQL, a
  VizieR ReadMe has units but no UCDs and only integer/real kinds);
* values: nulls only in nullable columns; every value within the schema's range (NaN and
  infinities are outside every range; in FITS, VOTable and the text formats NaN is their
  null); ``coadd_object_id`` unique; ``coadd_object_id >> 35 == healpix_index ==
  HEALPix(ra, dec, order 12, nested)``;
* the row count against the export manifest, when given.

Memory holds one chunk plus the identifiers (8 bytes a row) for the uniqueness test, so files
larger than memory are checked. Results are data (:class:`CheckResult`); the report renders a
human summary and JSON, and ``ok`` gives the exit status of ``ks4release schema check``.
Every failed check names its column.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from astropy import units as u
from astropy.io import fits
from astropy.io.votable import parse as parse_votable
from astropy.table import Table

from ks4release.ids import ID_SHIFT, healpix_index
from ks4release.publish.export_fits import FITS_FORMATS
from ks4release.schemas import CATALOGS, CatalogSchema, ColumnSpec, catalog_schema

__all__ = ["CheckReport", "CheckResult", "check_catalog", "detect_format"]

#: Values of one chunk: column name -> (values, null mask).
Chunk = dict[str, tuple[np.ndarray, np.ndarray]]

_ARROW_TYPES = {pa.bool_(): "boolean", pa.int16(): "short", pa.int32(): "int",
                pa.int64(): "long", pa.float32(): "float", pa.float64(): "double"}
_FITS_TYPES = {tform: name for name, (tform, _) in FITS_FORMATS.items()}
_VOTABLE_TYPES = {"boolean": "boolean", "bit": "boolean", "short": "short", "int": "int",
                  "long": "long", "float": "float", "double": "double"}
_KIND = {"boolean": "integer", "short": "integer", "int": "integer", "long": "integer",
         "float": "real", "double": "real"}


@dataclass(frozen=True)
class CheckResult:
    """One check of one column (or of the file when ``column`` is empty)."""

    check: str
    column: str
    passed: bool
    message: str


@dataclass
class CheckReport:
    """All checks of one file."""

    path: str
    catalog: str
    format: str
    rows: int = 0
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [r for r in self.results if not r.passed]

    def add(self, check: str, column: str, passed: bool, message: str) -> None:
        """Record one check."""
        self.results.append(CheckResult(check, column, passed, message))

    def summary(self) -> str:
        """Human summary: one line per failure, then the verdict."""
        lines = [f"FAIL {r.check:<11} {r.message}" for r in self.failures]
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} problem(s))"
        lines.append(f"{self.path}: {self.catalog} ({self.format}), {self.rows} rows, "
                     f"{len(self.results)} checks: {verdict}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON (every check, passed or not)."""
        return json.dumps({"path": self.path, "catalog": self.catalog, "format": self.format,
                           "rows": self.rows, "ok": self.ok,
                           "results": [asdict(r) for r in self.results]}, indent=2)


# --- readers: columns (name, datatype, unit, ucd) and chunks of values ------------------------


@dataclass(frozen=True)
class _FileColumn:
    name: str
    datatype: str | None  # felis datatype, "integer"/"real" kind, or None when not carried
    unit: str | None  # None = the format does not carry units
    ucd: str | None  # None = the format does not carry UCDs


def detect_format(path: Path) -> str:
    """The export format of ``path`` from its name."""
    name = Path(path).name.lower()
    if Path(path).is_dir() or name == "readme" or name.endswith(".dat"):
        return "vizier"
    for suffixes, fmt in (((".parquet", ".pq"), "parquet"), ((".fits", ".fit", ".fits.gz"), "fits"),
                          ((".vot", ".xml", ".votable"), "votable"), ((".csv",), "csv")):
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"{path}: cannot tell the format from the name (expected .parquet, .fits, "
                     ".vot, .csv, a VizieR .dat file, ReadMe or bundle folder)")


def _arrow_chunk(batch: pa.RecordBatch | pa.Table, nan_is_null: bool) -> Chunk:
    out: Chunk = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        null = column.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_boolean(column.type):
            values = column.fill_null(False).to_numpy(zero_copy_only=False)
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values = column.fill_null(0).to_numpy(zero_copy_only=False)
            if nan_is_null and values.dtype.kind == "f":
                null = null | np.isnan(values)
        else:
            values = column.to_numpy(zero_copy_only=False)
        out[name] = (values, np.asarray(null, dtype=bool))
    return out


class _ParquetReader:
    format = "parquet"

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self._file = pq.ParquetFile(path, pre_buffer=False)  # else it reads the whole file
        self._chunk_rows = chunk_rows
        self.meta_catalog = (self._file.schema_arrow.metadata or {}).get(b"catalog", b"").decode()

    def columns(self) -> list[_FileColumn]:
        out = []
        for f in self._file.schema_arrow:
            meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
            out.append(_FileColumn(f.name, _ARROW_TYPES.get(f.type, str(f.type)),
                                   meta.get("unit", ""), meta.get("ucd", "")))
        return out

    def chunks(self) -> Iterator[Chunk]:
        for batch in self._file.iter_batches(batch_size=self._chunk_rows):
            yield _arrow_chunk(batch, nan_is_null=False)


class _FitsReader:
    format = "fits"

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self._path = path
        self._chunk_rows = chunk_rows
        with fits.open(path) as hdul:
            self._header = hdul[1].header.copy()
        self.meta_catalog = str(self._header.get("EXTNAME", "")).lower()

    def columns(self) -> list[_FileColumn]:
        h = self._header
        out = []
        for i in range(1, h["TFIELDS"] + 1):
            tform = re.sub(r"^1", "", str(h[f"TFORM{i}"]).strip())
            out.append(_FileColumn(h[f"TTYPE{i}"], _FITS_TYPES.get(tform, tform),
                                   h.get(f"TUNIT{i}", ""), h.get(f"TUCD{i}", "")))
        return out

    def chunks(self) -> Iterator[Chunk]:
        with fits.open(self._path, memmap=True) as hdul:
            data = hdul[1].data
            names = data.columns.names
            nulls = {c.name: c.null for c in data.columns}
            n = len(data)
            for a in range(0, n, self._chunk_rows):
                rows = data[a:a + self._chunk_rows]
                chunk: Chunk = {}
                for name in names:
                    values = np.asarray(rows.field(name))
                    values = values.astype(values.dtype.newbyteorder("="))
                    if values.dtype.kind == "f":
                        null = np.isnan(values)
                    elif nulls[name] is not None and values.dtype.kind in "iu":
                        null = values == nulls[name]
                    else:
                        null = np.zeros(len(values), dtype=bool)
                    chunk[name] = (values, null)
                yield chunk


def _masked_chunk(table: Table) -> Chunk:
    chunk: Chunk = {}
    for name in table.colnames:
        column = table[name]
        mask = np.asarray(np.ma.getmaskarray(column), dtype=bool)
        values = np.asarray(np.ma.getdata(column))
        if values.dtype.kind == "f":
            mask = mask | np.isnan(values)
        chunk[name] = (values, mask)
    return chunk


class _VOTableReader:
    format = "votable"

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self._table = parse_votable(str(path)).get_first_table()
        self.meta_catalog = str(self._table.name or "")

    def columns(self) -> list[_FileColumn]:
        return [_FileColumn(f.name, _VOTABLE_TYPES.get(f.datatype, f.datatype),
                            str(f.unit) if f.unit is not None else "", f.ucd or "")
                for f in self._table.fields]

    def chunks(self) -> Iterator[Chunk]:
        # A VOTable part is read whole: the exporter bounds a part to part_rows rows.
        yield _masked_chunk(self._table.to_table())


class _CsvReader:
    """Data Lab CSV; datatypes, units and UCDs from ``<catalog>_tap_schema.sql`` beside it."""

    format = "csv"

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self._path = path
        self._chunk_rows = chunk_rows
        self.meta_catalog = path.stem
        self._tap = _tap_columns(path.with_name(f"{path.stem}_tap_schema.sql"))
        self.type_errors: dict[str, str] = {}  # columns whose values do not parse as their type

    def columns(self) -> list[_FileColumn]:
        header = pacsv.open_csv(self._path, read_options=pacsv.ReadOptions(block_size=1 << 16))
        out = []
        for name in header.schema.names:
            tap = self._tap.get(name)
            out.append(_FileColumn(name, tap[0] if tap else None, tap[1] if tap else None,
                                   tap[2] if tap else None))
        return out

    def chunks(self) -> Iterator[Chunk]:
        names = pacsv.open_csv(self._path).schema.names
        reader = pacsv.open_csv(
            self._path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=True))
        for batch in reader:
            chunk: Chunk = {}
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                if name in self.type_errors:
                    continue
                target = self._tap.get(name, ("double",))[0]
                try:
                    chunk[name] = _parse_text_column(name, column, target)
                except TextTypeError as exc:
                    self.type_errors[name] = str(exc)
            yield chunk


class TextTypeError(ValueError):
    """A text column whose values do not parse as its declared type."""

    def __init__(self, column: str, message: str) -> None:
        self.column = column
        super().__init__(f"{column}: {message}")


def _parse_text_column(name: str, column: pa.Array, datatype: str) -> tuple[np.ndarray, np.ndarray]:
    arrow_type = {"boolean": pa.bool_(), "short": pa.int16(), "int": pa.int32(),
                  "long": pa.int64(), "float": pa.float32()}.get(datatype, pa.float64())
    try:
        typed = pc.cast(column, arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TextTypeError(name, f"values do not parse as {datatype} ({exc})") from exc
    values, null = _arrow_chunk(pa.table({name: typed}), nan_is_null=True)[name]
    return values, null


def _tap_columns(sql_path: Path) -> dict[str, tuple[str, str, str]]:
    """(datatype, unit, ucd) per column from the TAP_SCHEMA INSERTs felis wrote."""
    if not sql_path.exists():
        return {}
    inserts = [s for s in sql_path.read_text(encoding="utf-8").split(";\n")
               if s.strip().startswith("INSERT INTO columns")]
    if not inserts:
        return {}
    fields = re.match(r"INSERT INTO columns \(([^)]*)\)", inserts[0].strip())[1]
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE TABLE columns ({fields})")
    for statement in inserts:
        db.execute(statement)
    rows = db.execute("SELECT column_name, datatype, unit, ucd FROM columns").fetchall()
    db.close()
    return {name: (datatype, unit or "", ucd or "") for name, datatype, unit, ucd in rows}


class _VizierReader:
    """A VizieR part: ``<catalog>.dat`` and ``ReadMe`` in one folder."""

    format = "vizier"

    def __init__(self, path: Path, chunk_rows: int) -> None:
        folder = path if path.is_dir() else path.parent
        readme = folder / "ReadMe"
        data = sorted(folder.glob("*.dat")) if path.is_dir() or path.name == "ReadMe" else [path]
        if not readme.exists() or len(data) != 1:
            raise ValueError(f"{path}: a VizieR bundle needs a ReadMe and one .dat file")
        self.data_path = data[0]
        self.meta_catalog = data[0].stem
        # A part is read whole: the exporter bounds a part to part_rows rows.
        self._table = Table.read(data[0], format="ascii.cds", readme=str(readme))

    def columns(self) -> list[_FileColumn]:
        out = []
        for name in self._table.colnames:
            column = self._table[name]
            kind = "real" if column.dtype.kind == "f" else "integer" if column.dtype.kind in "iub" \
                else column.dtype.kind
            out.append(_FileColumn(name, kind, str(column.unit) if column.unit else "", None))
        return out

    def chunks(self) -> Iterator[Chunk]:
        yield _masked_chunk(self._table)


_READERS = {"parquet": _ParquetReader, "fits": _FitsReader, "votable": _VOTableReader,
            "csv": _CsvReader, "vizier": _VizierReader}


# --- the checks -------------------------------------------------------------------------------


def _same_unit(found: str, expected: str) -> bool:
    if (found or "") == (expected or ""):
        return True
    try:
        return u.Unit(found or "") == u.Unit(expected or "")
    except ValueError:
        return False


def _check_columns(report: CheckReport, found: list[_FileColumn],
                   schema: CatalogSchema) -> set[str]:
    """Names, datatypes, units and UCDs; returns the schema columns present."""
    by_name = {c.name: c for c in found}
    expected = set(schema.names)
    for name in [c.name for c in found if c.name not in expected]:
        report.add("columns", name, False, f"{name}: column not in the {schema.catalog} schema")
    present = set()
    for spec in schema.columns:
        col = by_name.get(spec.name)
        if col is None:
            report.add("columns", spec.name, False, f"{spec.name}: column missing")
            continue
        present.add(spec.name)
        _check_type(report, col, spec)
        if col.unit is not None:
            ok = _same_unit(col.unit, spec.unit)
            report.add("unit", spec.name, ok,
                       f"{spec.name}: unit {col.unit or 'none'!r}, "
                       f"expected {spec.unit or 'none'!r}")
        if col.ucd is not None:
            ok = col.ucd == spec.ucd
            report.add("ucd", spec.name, ok, f"{spec.name}: UCD {col.ucd!r}, expected {spec.ucd!r}")
    return present


def _check_type(report: CheckReport, col: _FileColumn, spec: ColumnSpec) -> None:
    if col.datatype is None:
        return
    expected = _KIND[spec.datatype] if col.datatype in ("integer", "real") else spec.datatype
    report.add("datatype", spec.name, col.datatype == expected,
               f"{spec.name}: datatype {col.datatype}, expected {expected}")


@dataclass
class _ValueTally:
    """Running counts of one column's value problems."""

    nulls: int = 0
    out_of_range: int = 0
    example: str = ""


def _check_chunk(chunk: Chunk, schema: CatalogSchema, present: set[str], offset: int,
                 tallies: dict[str, _ValueTally], consistency: dict[str, int],
                 ids: list[np.ndarray]) -> None:
    for spec in schema.columns:
        if spec.name not in present:
            continue
        values, null = chunk[spec.name]
        tally = tallies[spec.name]
        if not spec.nullable and null.any():
            tally.nulls += int(null.sum())
        if spec.has_range and values.dtype.kind in "iufb":
            bad = ~null & ~spec.in_range(values.astype(np.float64))
            if bad.any():
                tally.out_of_range += int(bad.sum())
                if not tally.example:
                    i = int(np.flatnonzero(bad)[0])
                    value = values[i].item() if hasattr(values[i], "item") else values[i]
                    tally.example = f"row {offset + i}: {value!r}"
    needed = {"coadd_object_id", "healpix_index", "ra", "dec"}
    if not needed <= present:
        return
    oid, oid_null = chunk["coadd_object_id"]
    cell, cell_null = chunk["healpix_index"]
    ra, ra_null = chunk["ra"]
    dec, dec_null = chunk["dec"]
    good = ~(oid_null | cell_null | ra_null | dec_null)
    good &= np.isfinite(ra.astype(float)) & np.isfinite(dec.astype(float))
    good &= (dec.astype(float) >= -90) & (dec.astype(float) <= 90)
    oid64 = oid.astype(np.int64)
    ids.append(oid64[~oid_null])
    consistency["id_cell"] += int(np.sum(good & ((oid64 >> ID_SHIFT) != cell.astype(np.int64))))
    computed = healpix_index(ra[good].astype(float), dec[good].astype(float))
    consistency["cell_position"] += int(np.sum(computed != cell[good].astype(np.int64)))


def _finish_values(report: CheckReport, schema: CatalogSchema, present: set[str],
                   tallies: dict[str, _ValueTally], consistency: dict[str, int],
                   ids: list[np.ndarray]) -> None:
    for spec in schema.columns:
        if spec.name not in present:
            continue
        tally = tallies[spec.name]
        if not spec.nullable:
            report.add("nulls", spec.name, tally.nulls == 0,
                       f"{spec.name}: {tally.nulls} null(s) in a column that allows none")
        if spec.has_range:
            report.add("range", spec.name, tally.out_of_range == 0,
                       f"{spec.name}: {tally.out_of_range} value(s) outside "
                       f"{spec.range_text()} (first at {tally.example or '-'})")
    if "coadd_object_id" in present:
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        all_ids.sort()
        duplicates = int(np.sum(all_ids[1:] == all_ids[:-1]))
        report.add("unique", "coadd_object_id", duplicates == 0,
                   f"coadd_object_id: {duplicates} duplicated identifier(s)")
    if {"coadd_object_id", "healpix_index", "ra", "dec"} <= present:
        report.add("consistency", "coadd_object_id", consistency["id_cell"] == 0,
                   f"coadd_object_id: {consistency['id_cell']} row(s) with coadd_object_id >> "
                   f"{ID_SHIFT} != healpix_index")
        report.add("consistency", "healpix_index", consistency["cell_position"] == 0,
                   f"healpix_index: {consistency['cell_position']} row(s) where it is not the "
                   "order-12 nested HEALPix cell of (ra, dec)")


def _check_manifest(report: CheckReport, path: Path, manifest: Path) -> None:
    try:
        data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        report.add("manifest", "", False, f"manifest {manifest}: unreadable ({exc})")
        return
    target = path.resolve()
    for entry in data.get("files", []):
        if (Path(manifest).parent / entry["path"]).resolve() == target:
            expected = int(entry["rows"])
            report.add("manifest", "", expected == report.rows,
                       f"row count {report.rows}, manifest says {expected}")
            return
    report.add("manifest", "", False, f"{path.name} is not listed in manifest {manifest}")


def check_catalog(path: Path, catalog: str | None = None, manifest: Path | None = None, *,
                  chunk_rows: int = 200_000) -> CheckReport:
    """Check one catalog file (any export format) against its schema; see the module docstring.

    Parameters
    ----------
    path : Path
        The file (for VizieR: the ``.dat`` file, the ReadMe or their folder).
    catalog : str, optional
        ``idual_master`` or ``single_master``; by default read from the file's metadata or name.
    manifest : Path, optional
        ``manifest.json`` of the export, for the row count.
    chunk_rows : int
        Rows read at a time.
    """
    path = Path(path)
    fmt = detect_format(path)
    reader = _READERS[fmt](path, chunk_rows)
    if fmt == "vizier":
        path = reader.data_path
    catalog = catalog or next((c for c in CATALOGS if reader.meta_catalog.startswith(c)), "")
    if catalog not in CATALOGS:
        raise ValueError(f"{path}: cannot tell the catalog; pass one of {', '.join(CATALOGS)}")
    schema = catalog_schema(catalog)
    report = CheckReport(path=str(path), catalog=catalog, format=fmt)
    present = _check_columns(report, reader.columns(), schema)
    tallies = {name: _ValueTally() for name in schema.names}
    consistency = {"id_cell": 0, "cell_position": 0}
    ids: list[np.ndarray] = []
    type_errors: dict[str, str] = getattr(reader, "type_errors", {})
    for chunk in reader.chunks():
        for name, message in type_errors.items():
            if name in present:
                report.add("datatype", name, False, message)
                present.discard(name)
        n = len(next(iter(chunk.values()))[0]) if chunk else 0
        _check_chunk(chunk, schema, present, report.rows, tallies, consistency, ids)
        report.rows += n
    _finish_values(report, schema, present, tallies, consistency, ids)
    if manifest is not None:
        _check_manifest(report, path, manifest)
    return report
