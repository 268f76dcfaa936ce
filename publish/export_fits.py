"""Streaming FITS binary-table writer for the release catalogs.

The header is made by astropy from the schema (a zero-row ``BinTableHDU`` with ``TUNITn`` and
``TNULLn``, to which ``TUCDn`` and ``TCOMMn`` cards are added), ``NAXIS2`` is set to the total
number of rows, and the rows are appended chunk by chunk as big-endian records, so a catalog of
any size is written with one chunk in memory. Nulls: NaN for floats, ``TNULLn`` (the most
negative value of the type) for nullable integers; booleans are not nullable in the schemas.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
from astropy.io import fits

from ks4release.schemas import CatalogSchema, ColumnSpec

__all__ = ["FITS_FORMATS", "fits_header", "write_fits"]

#: FITS TFORM and big-endian record dtype of each felis datatype.
FITS_FORMATS = {
    "boolean": ("L", "S1"),
    "short": ("I", ">i2"),
    "int": ("J", ">i4"),
    "long": ("K", ">i8"),
    "float": ("E", ">f4"),
    "double": ("D", ">f8"),
}


def _tnull(spec: ColumnSpec) -> int | None:
    if spec.nullable and spec.datatype in ("short", "int", "long"):
        return int(np.iinfo(spec.dtype).min)
    return None


def fits_header(schema: CatalogSchema, n_rows: int, metadata: dict[str, str]) -> fits.Header:
    """The binary-table header of ``n_rows`` rows, with units, UCDs and descriptions."""
    columns = []
    for spec in schema.columns:
        tform, _ = FITS_FORMATS[spec.datatype]
        columns.append(fits.Column(name=spec.name, format=tform, unit=spec.unit or None,
                                   null=_tnull(spec)))
    hdu = fits.BinTableHDU.from_columns(columns, nrows=0, name=schema.catalog.upper())
    header = hdu.header
    header["NAXIS2"] = n_rows
    for i, spec in enumerate(schema.columns, start=1):
        header.set(f"TUCD{i}", spec.ucd, "IVOA UCD", after=f"TFORM{i}")
        header.set(f"TCOMM{i}", spec.description, after=f"TUCD{i}")
    for key, value in metadata.items():
        header[key] = value
    return header


def _records(batch: pa.RecordBatch, schema: CatalogSchema) -> np.ndarray:
    dtype = np.dtype([(s.name, FITS_FORMATS[s.datatype][1]) for s in schema.columns])
    records = np.zeros(batch.num_rows, dtype=dtype)
    for spec in schema.columns:
        column = batch.column(spec.name)
        if spec.datatype == "boolean":
            values = column.fill_null(False).to_numpy(zero_copy_only=False)
            records[spec.name] = np.where(values, b"T", b"F")
        elif spec.datatype in ("float", "double"):
            records[spec.name] = column.to_numpy(zero_copy_only=False)
        else:
            tnull = _tnull(spec)
            records[spec.name] = column.fill_null(tnull if tnull is not None else 0).to_numpy()
    return records


def write_fits(path: Path, schema: CatalogSchema, n_rows: int,
               batches: Iterable[pa.RecordBatch], metadata: dict[str, str]) -> None:
    """Write a primary HDU and the catalog's binary table to ``path``, one batch at a time.

    Raises
    ------
    ValueError
        When the batches do not hold exactly ``n_rows`` rows.
    """
    primary = fits.PrimaryHDU()
    for key, value in metadata.items():
        primary.header[key] = value
    header = fits_header(schema, n_rows, metadata)
    written = 0
    with open(path, "wb") as handle:
        handle.write(primary.header.tostring().encode("ascii"))
        handle.write(header.tostring().encode("ascii"))
        for batch in batches:
            handle.write(_records(batch, schema).tobytes())
            written += batch.num_rows
        if written != n_rows:
            raise ValueError(f"{path}: wrote {written} rows, header says {n_rows}")
        size = written * header["NAXIS1"]
        handle.write(b"\0" * (-size % 2880))
