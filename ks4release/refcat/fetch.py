"""Reference sources for a region, from the source ``release.toml`` names, through the cache.

:func:`fetch_region` is what the calibration and validation stages call::

    region = Region.from_tile(tile, camera, margin_deg=config.refcat.tile_margin_deg)
    gaia = fetch_region("gaia_dr3", region, config)

* ``source = "local"``: the file is read (and checked) with
  :func:`~ks4release.refcat.formats.read_refcat`; no cache.
* ``source = "tap"`` or ``"vizier"``: the region is covered by HEALPix cells at
  ``cache_order``; each cell is read from the cache when present and intact, otherwise queried
  (one query per cell; a truncated answer is split into the four sub-cells, down to
  ``split_max_order``) and stored. Offline, a missing or corrupt cell is an error that names it.

The result holds the rows inside the region, in canonical columns with units, optionally with
positions propagated to ``propagate_to_epoch``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from ks4release.errors import InputError
from ks4release.refcat.adql import build_cell_query
from ks4release.refcat.cache import RefcatCache
from ks4release.refcat.exceptions import (
    RefcatOfflineError,
    RefcatOverflowError,
    RefcatServiceError,
)
from ks4release.refcat.formats import REFCAT_FORMATS, conform_table, read_refcat
from ks4release.refcat.propagate import propagate_positions
from ks4release.refcat.region import Region, cell_bounds, cell_of
from ks4release.refcat.tap import QueryLimits, tap_query
from ks4release.refcat.vizier import DEFAULT_VIZIER_URL, vizier_query

__all__ = ["DEFAULT_TAP_URLS", "FetchStats", "fetch_region", "service_url"]

_log = logging.getLogger(__name__)

#: The archives' TAP services, by catalog.
DEFAULT_TAP_URLS = {
    "gaia_dr3": "https://gea.esac.esa.int/tap-server/tap",
    "gaia_xp": "https://gea.esac.esa.int/tap-server/tap",
    "delve_dr2": "https://datalab.noirlab.edu/tap",
}


@dataclass
class FetchStats:
    """Counts of one :func:`fetch_region` call (pass one in to collect them)."""

    cells: int = 0
    cache_hits: int = 0
    fetched: int = 0
    refetched_corrupt: int = 0
    queries: int = 0
    rows: int = 0
    corrupt: list[str] = field(default_factory=list)


def _section_and_base(config: Any, base_dir: str | os.PathLike[str] | None):
    """``(RefcatSection, base folder)`` from a ReleaseConfig or a RefcatSection."""
    if hasattr(config, "refcat") and hasattr(config, "base_dir"):
        return config.refcat, Path(base_dir) if base_dir else config.base_dir
    if hasattr(config, "gaia_dr3") and hasattr(config, "cache_dir"):
        return config, Path(base_dir) if base_dir else Path.cwd()
    raise TypeError("config must be a ReleaseConfig or a RefcatSection, got "
                    f"{type(config).__name__}")


def service_url(catalog: str, source_cfg: Any) -> str:
    """The service a catalog is fetched from (configured URL or the archive's default)."""
    if source_cfg.source == "tap":
        return (source_cfg.tap_url or DEFAULT_TAP_URLS[catalog]).rstrip("/")
    if source_cfg.source == "vizier":
        return (source_cfg.vizier_url or DEFAULT_VIZIER_URL).rstrip("/")
    return ""


def _limits(section: Any) -> QueryLimits:
    return QueryLimits(row_limit=section.row_limit, timeout_s=section.timeout_s,
                       retries=section.retries, backoff_s=section.backoff_s,
                       async_timeout_s=section.async_timeout_s)


def _conform(raw: Table, catalog: str, service: str, query: str) -> Table:
    try:
        return conform_table(raw, catalog, origin=service)
    except InputError as exc:
        raise RefcatServiceError(f"unusable answer: {exc.message}", service=service,
                                 query=query) from exc


def _query_cell(catalog: str, source: str, url: str, cell: int, order: int, section: Any,
                stats: FetchStats) -> tuple[Table, list[str]]:
    """Rows of ``catalog`` inside ``cell``, and the queries that fetched them."""
    bounds = cell_bounds(cell, order)
    limits = _limits(section)
    try:
        if source == "tap":
            query = build_cell_query(catalog, bounds)
            stats.queries += 1
            raw = tap_query(url, query, limits=limits,
                            use_async=bounds.area_deg2 > section.async_area_deg2)
        else:
            cone = bounds.cone()
            query = (f"{catalog} cone ra={cone[0]:.9f} dec={cone[1]:.9f} "
                     f"radius={cone[2]:.9f} deg")
            stats.queries += 1
            raw = vizier_query(url, catalog, cone, limits=limits)
    except RefcatOverflowError:
        if order >= section.split_max_order:
            raise
        _log.info("%s cell %d (order %d) overflowed; splitting into four", catalog, cell, order)
        parts, queries = [], []
        for child in range(4 * cell, 4 * cell + 4):
            table, child_queries = _query_cell(catalog, source, url, child, order + 1,
                                               section, stats)
            parts.append(table)
            queries.extend(child_queries)
        return _stack(parts, catalog), queries
    table = _conform(raw, catalog, url, query)
    inside = cell_of(np.asarray(table["ra"]), np.asarray(table["dec"]), order) == cell
    return table[inside], [query]


def _stack(parts: list[Table], catalog: str) -> Table:
    parts = [p for p in parts if p is not None]
    if not parts:
        return conform_table(_empty_raw(catalog), catalog, origin="(empty)")
    if len(parts) == 1:
        return parts[0]
    return vstack(parts, join_type="outer", metadata_conflicts="silent")


def _empty_raw(catalog: str) -> Table:
    dtypes = {"f": np.float64, "i": np.int64, "U": str}
    fmt = REFCAT_FORMATS[catalog]
    return Table({c.name: np.zeros(0, dtype=dtypes[c.kind]) for c in fmt.columns})


def _fetch_cells(catalog: str, source_cfg: Any, section: Any, base: Path, cells: np.ndarray,
                 offline: bool, stats: FetchStats) -> Table:
    source = source_cfg.source
    url = service_url(catalog, source_cfg)
    cache = RefcatCache(base / section.cache_dir, catalog, source, section.cache_order)
    tables: list[Table] = []
    missing: list[str] = []
    for cell in (int(c) for c in cells):
        stats.cells += 1
        found = cache.load(cell)
        if found.status == "hit":
            stats.cache_hits += 1
            tables.append(found.table)
            continue
        if found.status == "corrupt":
            stats.corrupt.append(found.reason)
            _log.warning("cache cell corrupt, %s: %s", "cannot refetch offline" if offline
                         else "fetching it again", found.reason)
        if offline:
            missing.append(found.reason or f"{cache.data_path(cell)}: not cached")
            continue
        table, queries = _query_cell(catalog, source, url, cell, section.cache_order, section,
                                     stats)
        cache.store(cell, table, service=url, queries=queries)
        stats.fetched += 1
        stats.refetched_corrupt += found.status == "corrupt"
        tables.append(table)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise RefcatOfflineError(
            f"offline: {len(missing)} of {len(cells)} cache cell(s) of {catalog} from {source} "
            f"are missing or corrupt: {'; '.join(missing[:3])}{more}. Fetch them online first "
            f"(ks4release refcat fetch --catalog {catalog} --tiles ...).")
    return _stack(tables, catalog)


def fetch_region(catalog: str, region: Region, config: Any, *, source: str | None = None,
                 offline: bool | None = None, base_dir: str | os.PathLike[str] | None = None,
                 propagate_to_epoch: float | None = None,
                 stats: FetchStats | None = None) -> Table:
    """The reference sources of ``catalog`` inside ``region``.

    Parameters
    ----------
    catalog : str
        ``gaia_dr3``, ``gaia_xp`` or ``delve_dr2``.
    region : Region
        From :meth:`Region.cone`, :meth:`Region.from_tile` or :meth:`Region.from_moc`.
    config : ReleaseConfig or RefcatSection
        The ``[refcat]`` settings; relative paths are taken from the release.toml's folder
        (or from ``base_dir``, or the working directory for a bare RefcatSection).
    source : str, optional
        Override the configured source (``local``, ``tap``, ``vizier``).
    offline : bool, optional
        Override ``[refcat] offline``: use cached cells only.
    propagate_to_epoch : float, optional
        Override ``[refcat] propagate_to_epoch`` (0 = off).
    stats : FetchStats, optional
        Filled with cache hits, fetched cells and query counts.

    Returns
    -------
    astropy.table.Table
        Canonical columns with units; ``meta`` holds catalog, source, service and region.

    Raises
    ------
    RefcatOfflineError, RefcatServiceError, InputError
    """
    if catalog not in REFCAT_FORMATS:
        raise ValueError(f"unknown reference catalog {catalog!r}; known: "
                         f"{', '.join(REFCAT_FORMATS)}")
    section, base = _section_and_base(config, base_dir)
    source_cfg = getattr(section, catalog)
    if source is not None:
        source_cfg = type(source_cfg)(source=source, path=source_cfg.path,
                                      tap_url=source_cfg.tap_url,
                                      vizier_url=source_cfg.vizier_url)
    if catalog == "delve_dr2" and source_cfg.source == "vizier":
        raise ValueError("delve_dr2 is not in VizieR: use source 'tap' or 'local'")
    offline = section.offline if offline is None else offline
    epoch = section.propagate_to_epoch if propagate_to_epoch is None else propagate_to_epoch
    stats = stats if stats is not None else FetchStats()
    if source_cfg.source == "local":
        path = base / source_cfg.path
        table = read_refcat(path, catalog)
        service = str(path)
    else:
        cells = region.cells(section.cache_order)
        table = _fetch_cells(catalog, source_cfg, section, base, cells, offline, stats)
        service = service_url(catalog, source_cfg)
    if len(table):
        table = table[region.contains(np.asarray(table["ra"]), np.asarray(table["dec"]))]
    stats.rows = len(table)
    if epoch and catalog == "gaia_dr3":
        table = propagate_positions(table, epoch)
    table.meta.update({"refcat": catalog, "source": source_cfg.source, "service": service,
                       "region": region.describe(),
                       "archive_table": REFCAT_FORMATS[catalog].archive_table})
    if catalog.startswith("gaia"):
        table.meta.setdefault("epoch", 2016.0)
    return table
