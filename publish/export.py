"""Exports of a release catalog for the archives: Parquet, FITS, VOTable, CSV + TAP_SCHEMA, VizieR.

:func:`export_catalog` reads a master catalog (the Parquet file of :mod:`publish.master`) in
chunks of ``chunk_rows`` rows and writes, into ``out_dir``:

==========  ===============================================  ================================
format      files                                            metadata
==========  ===============================================  ================================
parquet     ``<catalog>.parquet``                            units, UCDs, descriptions in the
                                                             Arrow field metadata
fits        ``<catalog>.fits``                               ``TUNITn``, ``TUCDn``,
                                                             ``TCOMMn``, ``TNULLn``
votable     ``votable/<catalog>_NNNN.vot``                   unit, ucd, DESCRIPTION per FIELD
            (BINARY2, ``part_rows`` rows per file)
csv         ``datalab/<catalog>.csv`` and                    units etc. in the TAP_SCHEMA SQL
            ``datalab/<catalog>_tap_schema.sql``              (felis load-tap-schema --dry-run)
vizier      ``vizier/<catalog>_NNNN/ReadMe`` and             CDS ReadMe with the byte-by-byte
            ``vizier/<catalog>_NNNN/<catalog>.dat``          description, made by cdspyreadme
            (none for an empty catalog)
==========  ===============================================  ================================

and ``manifest.json``: the catalog, its total row count and every file written with its format,
kind (data or metadata) and row count. The schema checker then runs on every data file against
the manifest (:func:`check_exports`); only when all pass is ``READY`` written, the marker that
the export may be uploaded. Formats that cannot stream one file
(VOTable through astropy, the CDS ReadMe through cdspyreadme, which sizes each column from the
data) are split into parts of at most ``part_rows`` rows, each a complete file; every file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from astropy.io.votable import from_table
from astropy.table import Column, MaskedColumn, Table

from ks4release.atomic import atomic_path, atomic_write_text
from ks4release.errors import InputError, StageError
from ks4release.publish.export_fits import write_fits
from ks4release.publish.schema_check import check_catalog
from ks4release.schemas import CATALOGS, CatalogSchema, catalog_schema, tap_schema_sql
from ks4release.settings import EXPORT_FORMATS, ExportSettings

__all__ = [
    "EXPORT_FORMATS",
    "ExportSettings",
    "batch_to_table",
    "check_exports",
    "export_catalog",
    "master_catalog_name",
]


def master_catalog_name(master: Path) -> str:
    """The catalog a master Parquet file holds (from its schema metadata)."""
    metadata = pq.read_schema(master).metadata or {}
    name = metadata.get(b"catalog", b"").decode()
    if name not in CATALOGS:
        raise InputError(master, f"schema metadata 'catalog' is {name!r}; expected one of "
                         f"{', '.join(CATALOGS)}")
    return name


def batch_to_table(batch: pa.RecordBatch, schema: CatalogSchema) -> Table:
    """An astropy table with units and descriptions; nullable columns are masked."""
    table = Table()
    for spec in schema.columns:
        column = batch.column(spec.name)
        mask = column.is_null().to_numpy(zero_copy_only=False)
        fill = False if spec.datatype == "boolean" else 0
        values = column.fill_null(fill).to_numpy(zero_copy_only=False).astype(spec.dtype)
        if spec.datatype in ("float", "double"):
            mask = mask | np.isnan(values)
        kwargs = {"name": spec.name, "unit": spec.unit or None, "description": spec.description}
        if spec.nullable:
            table.add_column(MaskedColumn(values, mask=mask, **kwargs))
        else:
            table.add_column(Column(values, **kwargs))
        table[spec.name].meta["ucd"] = spec.ucd
    return table


def _batches(master: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    # pre_buffer=False: the default reads ahead the whole file into memory.
    yield from pq.ParquetFile(master, pre_buffer=False).iter_batches(batch_size=chunk_rows)


def _parts(master: Path, settings: ExportSettings) -> Iterator[list[pa.RecordBatch]]:
    """Lists of batches of at most ``part_rows`` rows in all."""
    part: list[pa.RecordBatch] = []
    rows = 0
    yielded = False
    for batch in _batches(master, settings.chunk_rows):
        while batch.num_rows:
            take = min(batch.num_rows, settings.part_rows - rows)
            part.append(batch.slice(0, take))
            rows += take
            batch = batch.slice(take)
            if rows == settings.part_rows:
                yield part
                part, rows, yielded = [], 0, True
    if part or not yielded:  # an empty catalog still gets one (empty) part
        yield part


def _file_metadata(settings: ExportSettings, schema: CatalogSchema) -> dict[str, str]:
    return {"RELEASE": settings.release_name, "CATALOG": schema.catalog}


def _export_parquet(master: Path, out: Path, schema: CatalogSchema,
                    settings: ExportSettings) -> list[tuple[Path, int]]:
    arrow_schema = pq.read_schema(master)
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, arrow_schema) as writer:
        for batch in _batches(master, settings.chunk_rows):
            writer.write_batch(batch)
            rows += batch.num_rows
    return [(out, rows)]


def _export_fits(master: Path, out: Path, schema: CatalogSchema,
                 settings: ExportSettings) -> list[tuple[Path, int]]:
    n_rows = pq.ParquetFile(master).metadata.num_rows
    with atomic_path(out) as tmp:
        write_fits(tmp, schema, n_rows, _batches(master, settings.chunk_rows),
                   _file_metadata(settings, schema))
    return [(out, n_rows)]


def _export_votable(master: Path, out_dir: Path, schema: CatalogSchema,
                    settings: ExportSettings) -> list[tuple[Path, int]]:
    written = []
    for number, part in enumerate(_parts(master, settings), start=1):
        table = batch_to_table(pa.Table.from_batches(part, schema=pq.read_schema(master)
                                                     ).combine_chunks().to_batches()[0]
                               if part else _empty_batch(schema), schema)
        votable = from_table(table)
        resource_table = votable.get_first_table()
        resource_table.name = schema.catalog
        resource_table.description = schema.description
        for field, spec in zip(resource_table.fields, schema.columns, strict=True):
            field.ucd = spec.ucd
        path = out_dir / f"{schema.catalog}_{number:04d}.vot"
        with atomic_path(path) as tmp:
            votable.to_xml(str(tmp), tabledata_format="binary2")
        written.append((path, len(table)))
    return written


def _empty_batch(schema: CatalogSchema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema.arrow_schema())


def _export_csv(master: Path, out_dir: Path, schema: CatalogSchema,
                settings: ExportSettings) -> list[tuple[Path, int]]:
    csv_path = out_dir / f"{schema.catalog}.csv"
    rows = 0
    with atomic_path(csv_path) as tmp:
        with pacsv.CSVWriter(str(tmp), schema.arrow_schema()) as writer:
            for batch in _batches(master, settings.chunk_rows):
                writer.write_batch(batch)
                rows += batch.num_rows
    sql_path = atomic_write_text(out_dir / f"{schema.catalog}_tap_schema.sql",
                                 tap_schema_sql(schema.catalog))
    return [(csv_path, rows), (sql_path, 0)]


def _export_vizier(master: Path, out_dir: Path, schema: CatalogSchema,
                   settings: ExportSettings) -> list[tuple[Path, int]]:
    from ks4release.publish.export_vizier import write_vizier_bundle

    written = []
    arrow_schema = pq.read_schema(master)
    for number, part in enumerate(_parts(master, settings), start=1):
        if not part:  # cdspyreadme cannot describe an empty table: no bundle for no rows
            break
        batch = pa.Table.from_batches(part, schema=arrow_schema).combine_chunks().to_batches()[0]
        folder = out_dir / f"{schema.catalog}_{number:04d}"
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            write_vizier_bundle(tmp, batch_to_table(batch, schema), schema, settings.title,
                                settings.author)
        written.append((folder / f"{schema.catalog}.dat", batch.num_rows))
        written.append((folder / "ReadMe", 0))
    return written


def export_catalog(master: Path, out_dir: Path, formats: tuple[str, ...],
                   settings: ExportSettings) -> None:
    """Export a master catalog in ``formats`` into ``out_dir`` (task function).

    Reads ``master`` (Parquet); writes the files of the module docstring table and
    ``out_dir/manifest.json`` (each file atomically).

    Raises
    ------
    ValueError
        On an unknown format.
    InputError
        When ``master`` is not a release catalog.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be among {', '.join(EXPORT_FORMATS)}, got {formats}")
    master, out_dir = Path(master), Path(out_dir)
    schema = catalog_schema(master_catalog_name(master))
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, object]] = []
    writers = {
        "parquet": lambda: _export_parquet(master, out_dir / f"{schema.catalog}.parquet",
                                           schema, settings),
        "fits": lambda: _export_fits(master, out_dir / f"{schema.catalog}.fits", schema,
                                     settings),
        "votable": lambda: _export_votable(master, out_dir / "votable", schema, settings),
        "csv": lambda: _export_csv(master, out_dir / "datalab", schema, settings),
        "vizier": lambda: _export_vizier(master, out_dir / "vizier", schema, settings),
    }
    for fmt in EXPORT_FORMATS:
        if fmt in formats:
            (out_dir / {"votable": "votable", "csv": "datalab", "vizier": "vizier"}.get(
                fmt, ".")).mkdir(parents=True, exist_ok=True)
            for path, rows in writers[fmt]():
                kind = "metadata" if path.suffix == ".sql" or path.name == "ReadMe" else "data"
                files.append({"path": path.relative_to(out_dir).as_posix(), "format": fmt,
                              "kind": kind, "rows": rows})
    manifest = {"catalog": schema.catalog,
                "rows": pq.ParquetFile(master).metadata.num_rows,
                "release": settings.release_name, "files": files}
    manifest_path = atomic_write_text(out_dir / "manifest.json",
                                      json.dumps(manifest, indent=2) + "\n")
    if settings.check:
        check_exports(out_dir, manifest_path, schema.catalog, settings.chunk_rows)


def check_exports(out_dir: Path, manifest_path: Path, catalog: str, chunk_rows: int) -> None:
    """Run the schema checker on every exported data file; mark the export ready only if all pass.

    Writes ``check_report.json`` (every report) and, when every file passes, ``READY`` (the
    marker that the upload step waits for); otherwise removes a stale ``READY`` and raises.

    Raises
    ------
    StageError
        Naming each failing file and its first problems.
    """
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    # Each report names its file as the manifest does, relative to the export folder: the
    # folder is what an archive receives, and the build machine's paths mean nothing there.
    reports = [dataclasses.replace(check_catalog(out_dir / entry["path"], catalog,
                                                 manifest_path, chunk_rows=chunk_rows),
                                   path=entry["path"])
               for entry in manifest["files"] if entry["kind"] == "data"]
    atomic_write_text(out_dir / "check_report.json",
                      "[\n" + ",\n".join(r.to_json() for r in reports) + "\n]\n")
    failed = [r for r in reports if not r.ok]
    ready = out_dir / "READY"
    if failed:
        ready.unlink(missing_ok=True)
        details = "; ".join(f"{r.path}: " + ", ".join(f.message for f in r.failures[:3])
                            for r in failed)
        raise StageError(f"schema check failed, export not ready for upload: {details}",
                         stage="export", path=out_dir)
    atomic_write_text(ready, f"{catalog}: {len(reports)} file(s) passed the schema check\n")
