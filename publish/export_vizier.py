"""The VizieR bundle of a catalog part: CDS ReadMe and fixed-width data file, by cdspyreadme.

CDS's own ``cdspyreadme`` sizes every column from the data, writes the aligned ASCII data file
and the ReadMe with its byte-by-byte description (formats, units, labels, explanations); nulls
are blank fields. Nothing of the ReadMe is written by hand here: the schema supplies the column
descriptions and units, the settings the title and author.

Two choices are made through cdspyreadme's own API: floating-point columns get an explicit
exponential format with enough digits to give back the stored value exactly (``E16.9`` for
32-bit, ``E24.17`` for 64-bit floats; cdspyreadme's automatic widths break on columns mixing
fixed and exponential notation), and booleans are written as the integers 0 and 1 (integers
go to cdspyreadme as 64-bit, as it marks nulls with +-999999 while sizing columns).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
from astropy.table import Table
from cdspyreadme import CDSTablesMaker

from ks4release.schemas import CatalogSchema

__all__ = ["write_vizier_bundle"]

#: Fortran formats that keep every digit of 32- and 64-bit floats.
_FLOAT_FORMATS = {"float": "E16.9", "double": "E24.17"}


def write_vizier_bundle(folder: Path, table: Table, schema: CatalogSchema, title: str,
                        author: str) -> None:
    """Write ``<catalog>.dat`` and ``ReadMe`` into ``folder`` (which must exist)."""
    maker = CDSTablesMaker(outfolder=str(folder))
    maker.title = title
    maker.author = author
    maker.authors = author
    maker.abstract = schema.description
    maker.more_description = (f"The {schema.catalog} catalog of the release; columns as in "
                              "appendix A (Table 3) of the KS4 DR1 paper.")
    table = table.copy(copy_data=False)
    for spec in schema.columns:
        if spec.datatype in ("boolean", "short", "int"):  # cdspyreadme fills nulls with 999999
            table[spec.name] = table[spec.name].astype(np.int64)
    cds_table = maker.addTable(table, name=f"{schema.catalog}.dat",
                               description=schema.description)
    for spec in schema.columns:
        if spec.datatype in _FLOAT_FORMATS:
            cds_table.get_column(spec.name).set_format(_FLOAT_FORMATS[spec.datatype])
    cdspyreadme_logger = logging.getLogger("CDSTablesMaker")
    previous = cdspyreadme_logger.level
    cdspyreadme_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            maker.writeCDSTables()
            maker.makeReadMe()
    finally:
        cdspyreadme_logger.setLevel(previous)
