"""The reference-catalog cache: one Parquet file per HEALPix cell, with a JSON sidecar.

Layout, under the cache folder (``[refcat] cache_dir``)::

    <catalog>/<source>/order<k>/<cell>.parquet   rows of the catalog inside the cell
    <catalog>/<source>/order<k>/<cell>.json      what made them: service URL, queries, UTC
                                                 date, row count, SHA-256 of the Parquet file

A cell is cached once its sidecar exists (the Parquet file is written first, both atomically),
so an interrupted fetch leaves no cell that looks complete. Reading a cell checks the SHA-256
and the row count; a cell that fails the check is reported as corrupt, and the fetch layer
fetches it again (or, offline, fails naming the file).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astropy.table import Table

from ks4release.atomic import atomic_path, atomic_write_text
from ks4release.errors import InputError
from ks4release.refcat.formats import conform_table
from ks4release.refcat.region import MAX_CELL_ORDER

__all__ = ["CACHE_FORMAT_VERSION", "CellEntry", "RefcatCache", "CacheLookup"]

#: Version of the cache layout, recorded in every sidecar.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CellEntry:
    """The sidecar of one cached cell."""

    catalog: str
    source: str
    order: int
    cell: int
    service: str
    queries: tuple[str, ...]
    fetched_utc: str
    rows: int
    sha256: str

    def to_json(self) -> str:
        data = {"format_version": CACHE_FORMAT_VERSION, **self.__dict__,
                "queries": list(self.queries)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CellEntry:
        data = json.loads(text)
        data.pop("format_version", None)
        data["queries"] = tuple(data["queries"])
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class CacheLookup:
    """Result of looking up a cell: ``status`` is ``"hit"``, ``"missing"`` or ``"corrupt"``."""

    status: str
    table: Table | None = None
    reason: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RefcatCache:
    """The cached cells of one catalog from one source at one HEALPix order."""

    def __init__(self, root: str | os.PathLike[str], catalog: str, source: str,
                 order: int) -> None:
        if not 0 <= order <= MAX_CELL_ORDER:
            raise ValueError(f"order must be in [0, {MAX_CELL_ORDER}], got {order}")
        self.root = Path(root)
        self.catalog = catalog
        self.source = source
        self.order = int(order)
        self.folder = self.root / catalog / source / f"order{self.order}"

    def data_path(self, cell: int) -> Path:
        """The Parquet file of ``cell``."""
        return self.folder / f"{int(cell):07d}.parquet"

    def sidecar_path(self, cell: int) -> Path:
        """The JSON sidecar of ``cell``."""
        return self.folder / f"{int(cell):07d}.json"

    def entry(self, cell: int) -> CellEntry | None:
        """The sidecar of ``cell``, or None when the cell is not cached (or unreadable)."""
        try:
            return CellEntry.from_json(self.sidecar_path(cell).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, cell: int) -> CacheLookup:
        """Read ``cell``, verifying its checksum and row count."""
        sidecar = self.sidecar_path(cell)
        if not sidecar.exists():
            return CacheLookup(status="missing")
        entry = self.entry(cell)
        if entry is None:
            return CacheLookup(status="corrupt", reason=f"{sidecar}: unreadable sidecar")
        path = self.data_path(cell)
        if not path.exists():
            return CacheLookup(status="corrupt", reason=f"{path}: file is missing")
        digest = _sha256(path)
        if digest != entry.sha256:
            return CacheLookup(status="corrupt", reason=f"{path}: SHA-256 {digest[:12]}... "
                               f"does not match the sidecar's {entry.sha256[:12]}...")
        try:
            table = conform_table(Table.read(path, format="parquet"), self.catalog,
                                  origin=path)
        except InputError as exc:
            return CacheLookup(status="corrupt", reason=str(exc))
        except Exception as exc:  # pyarrow raises several types for damaged files
            return CacheLookup(status="corrupt", reason=f"{path}: unreadable ({exc})")
        if len(table) != entry.rows:
            return CacheLookup(status="corrupt", reason=f"{path}: {len(table)} rows, the "
                               f"sidecar says {entry.rows}")
        return CacheLookup(status="hit", table=table)

    def store(self, cell: int, table: Table, *, service: str,
              queries: tuple[str, ...] | list[str]) -> CellEntry:
        """Write ``table`` as ``cell`` (Parquet, then the sidecar; both atomic)."""
        path = self.data_path(cell)
        plain = Table(table, copy=False)
        plain.meta = {}
        with atomic_path(path) as tmp:
            plain.write(tmp, format="parquet")
        entry = CellEntry(
            catalog=self.catalog, source=self.source, order=self.order, cell=int(cell),
            service=service, queries=tuple(queries),
            fetched_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            rows=len(table), sha256=_sha256(path),
        )
        atomic_write_text(self.sidecar_path(cell), entry.to_json())
        return entry

    def entries(self) -> list[CellEntry]:
        """Sidecars of every cached cell, by cell number."""
        if not self.folder.is_dir():
            return []
        found = []
        for sidecar in sorted(self.folder.glob("*.json")):
            entry = self.entry(int(sidecar.stem)) if sidecar.stem.isdigit() else None
            if entry is not None:
                found.append(entry)
        return found

    def summary(self) -> dict[str, Any]:
        """Cells, rows, bytes and date range of the cache, for ``refcat info``."""
        entries = self.entries()
        size = sum(self.data_path(e.cell).stat().st_size for e in entries
                   if self.data_path(e.cell).exists())
        dates = sorted(e.fetched_utc for e in entries)
        return {"catalog": self.catalog, "source": self.source, "order": self.order,
                "folder": str(self.folder), "cells": len(entries),
                "rows": sum(e.rows for e in entries), "bytes": size,
                "first_fetch": dates[0] if dates else "", "last_fetch": dates[-1] if dates else ""}
