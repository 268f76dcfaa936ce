"""TAP queries through the real pyvo client against a loopback TAP service (sync and async).

Every outcome is either the correct rows or an error naming the service and the query; a
truncated result never comes back as a short table.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from refcat_servers import ArchiveServer

from ks4release.config import RefcatSection, RefcatSource
from ks4release.refcat import (
    FetchStats,
    QueryLimits,
    RefcatOverflowError,
    RefcatServiceError,
    Region,
    build_cell_query,
    cell_bounds,
    cell_of,
    fetch_region,
    tap_query,
)

FAST = QueryLimits(row_limit=100_000, timeout_s=5.0, retries=2, backoff_s=0.01,
                   async_timeout_s=10.0)
CELL_ORDER = 7


@pytest.fixture
def server():
    with ArchiveServer() as srv:
        yield srv


def _cell_query(catalog="gaia_dr3", ra=0.1, dec=-60.5, order=CELL_ORDER):
    cell = int(cell_of(ra, dec, order))
    bounds = cell_bounds(cell, order)
    return cell, bounds, build_cell_query(catalog, bounds)


def _truth_in_box(srv, bounds, table="gaiadr3.gaia_source"):
    truth = srv.tables["gaiadr3.gaia_source"]
    ra, dec = np.asarray(truth["ra"]), np.asarray(truth["dec"])
    inside = (dec >= bounds.dec_min) & (dec <= bounds.dec_max)
    in_ra = np.zeros(len(truth), bool)
    for lo, hi in bounds.ra_ranges:
        in_ra |= (ra >= lo) & (ra <= hi)
    ids = set(np.asarray(truth["source_id"][inside & in_ra]).tolist())
    if table == "gaiadr3.synthetic_photometry_gspc":
        ids &= set(np.asarray(srv.tables[table]["source_id"]).tolist())
    return ids


def test_sync_query_returns_every_row(server):
    _, bounds, query = _cell_query()
    table = tap_query(server.tap_url, query, limits=FAST)
    assert set(table["source_id"].tolist()) == _truth_in_box(server, bounds)
    assert len(table) > 50
    assert server.requests == [("POST", "/tap/sync")]
    assert str(table["ra"].unit) == "deg"


def test_gaia_xp_joins_gaia_source_for_positions(server):
    _, bounds, query = _cell_query("gaia_xp")
    assert "JOIN gaiadr3.gaia_source" in query
    table = tap_query(server.tap_url, query, limits=FAST)
    assert set(table["source_id"].tolist()) == _truth_in_box(
        server, bounds, "gaiadr3.synthetic_photometry_gspc")
    assert {"ra", "dec", "b_jkc_mag", "i_jkc_flag"} <= set(table.colnames)


def test_async_job_is_created_polled_fetched_and_deleted(server):
    server.async_polls = 2
    _, bounds, query = _cell_query()
    table = tap_query(server.tap_url, query, limits=FAST, use_async=True)
    assert set(table["source_id"].tolist()) == _truth_in_box(server, bounds)
    methods = [m + " " + p.split("/")[-1] for m, p in server.requests]
    assert methods[0] == "POST async" and "POST phase" in methods
    assert methods.count("GET j1") >= 3  # polled while EXECUTING
    assert methods[-2:] == ["GET result", "DELETE j1"]


@pytest.mark.parametrize("use_async", [False, True])
def test_bad_query_gives_the_error_document(server, use_async):
    query = "SELECT g.nonexistent FROM gaiadr3.gaia_source AS g WHERE g.dec BETWEEN 1.0 AND 2.0"
    with pytest.raises(RefcatServiceError) as info:
        tap_query(server.tap_url, query, limits=FAST, use_async=use_async)
    text = str(info.value)
    assert server.tap_url in text and query in text
    assert "query rejected" in text and "nonexistent" in text
    endpoint = "/tap/async" if use_async else "/tap/sync"
    assert server.requests.count(("POST", endpoint)) == 1  # not retried


def test_server_error_is_retried_then_reported(server):
    server.fail_statuses = [500] * 3
    _, _, query = _cell_query()
    with pytest.raises(RefcatServiceError) as info:
        tap_query(server.tap_url, query, limits=FAST)
    text = str(info.value)
    assert "HTTP 500" in text and "3 attempts" in text
    assert server.tap_url in text and query in text
    assert server.count("/tap/sync") == 3


def test_transient_error_recovers_with_back_off(server):
    server.fail_statuses = [503]
    _, bounds, query = _cell_query()
    table = tap_query(server.tap_url, query, limits=FAST)
    assert set(table["source_id"].tolist()) == _truth_in_box(server, bounds)
    assert server.count("/tap/sync") == 2


def test_timeout_names_service_and_query(server):
    server.delay_s = 1.0
    _, _, query = _cell_query()
    limits = QueryLimits(row_limit=1000, timeout_s=0.2, retries=1, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(RefcatServiceError) as info:
        tap_query(server.tap_url, query, limits=limits)
    assert time.monotonic() - start < 3.0
    text = str(info.value)
    assert "timeout of 0.2 s" in text and "2 attempts" in text and query in text


def test_overflow_is_an_error_not_a_short_table(server):
    server.max_rows = 10
    _, _, query = _cell_query()
    with pytest.raises(RefcatOverflowError) as info:
        tap_query(server.tap_url, query, limits=FAST)
    assert "truncated at 10 rows" in str(info.value) and "OVERFLOW" in str(info.value)
    assert query in str(info.value)


def test_hitting_the_row_limit_counts_as_overflow(server):
    _, _, query = _cell_query()
    with pytest.raises(RefcatOverflowError, match="row limit 20"):
        tap_query(server.tap_url, query, limits=QueryLimits(row_limit=20, retries=0))


@pytest.mark.parametrize("use_async", [False, True])
def test_malformed_votable_is_a_clear_error(server, use_async):
    server.malformed = True
    _, _, query = _cell_query()
    with pytest.raises(RefcatServiceError) as info:
        tap_query(server.tap_url, query, limits=FAST, use_async=use_async)
    assert "malformed VOTable" in str(info.value) and server.tap_url in str(info.value)


def test_unreachable_service_is_reported():
    with ArchiveServer() as srv:
        url = srv.tap_url
    _, _, query = _cell_query()
    with pytest.raises(RefcatServiceError, match="cannot connect"):
        tap_query(url, query, limits=QueryLimits(retries=1, backoff_s=0.01, timeout_s=1.0))


def _section(tmp_path, srv, **kwargs):
    return RefcatSection(
        cache_dir=str(tmp_path / "cache"), retries=1, backoff_s=0.01, timeout_s=5.0,
        gaia_dr3=RefcatSource(source="tap", tap_url=srv.tap_url),
        gaia_xp=RefcatSource(source="tap", tap_url=srv.tap_url),
        delve_dr2=RefcatSource(source="tap", tap_url=srv.tap_url), **kwargs)


def _truth_in_region(srv, region, table="gaiadr3.gaia_source", key="source_id"):
    truth = srv.tables[table]
    if table == "gaiadr3.synthetic_photometry_gspc":
        gaia = srv.tables["gaiadr3.gaia_source"]
        inside = region.contains(np.asarray(gaia["ra"]), np.asarray(gaia["dec"]))
        return set(gaia["source_id"][inside].tolist()) & set(truth["source_id"].tolist())
    inside = region.contains(np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    return set(truth[key][inside].tolist())


def test_large_region_is_paged_by_splitting_cells(server, tmp_path):
    """A cell whose answer overflows is queried again as four sub-cells (async here)."""
    server.max_rows = 150
    section = _section(tmp_path, server, cache_order=6, async_area_deg2=0.0)
    region = Region.cone(0.3, -60.5, 0.4)
    stats = FetchStats()
    table = fetch_region("gaia_dr3", region, section, stats=stats)
    assert set(table["source_id"].tolist()) == _truth_in_region(server, region)
    assert stats.queries > stats.cells  # some cells were split
    assert server.count("/tap/async") > 0 and server.count("/tap/sync") == 0


def test_overflow_beyond_the_finest_split_is_an_error(server, tmp_path):
    server.max_rows = 5
    section = _section(tmp_path, server, cache_order=6, split_max_order=7)
    with pytest.raises(RefcatOverflowError, match="truncated"):
        fetch_region("gaia_dr3", Region.cone(0.3, -60.5, 0.5), section)


@pytest.mark.parametrize(("catalog", "table", "key"), [
    ("gaia_xp", "gaiadr3.synthetic_photometry_gspc", "source_id"),
    ("delve_dr2", "delve_dr2.objects", "quick_object_id"),
])
def test_fetch_region_other_catalogs(server, tmp_path, catalog, table, key):
    region = Region.cone(359.8, -60.2, 0.5)  # straddles RA 0
    result = fetch_region(catalog, region, _section(tmp_path, server))
    assert set(result[key].tolist()) == _truth_in_region(server, region, table, key)
    assert result.meta["service"] == server.tap_url
    assert all(result[c].unit is not None for c in ("ra", "dec"))
