"""The cell cache (reuse, checksums, offline mode), local files, and proper-motion propagation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table
from refcat_servers import ArchiveServer

from ks4release.camera import Camera
from ks4release.config import RefcatSection, RefcatSource, ReleaseConfig
from ks4release.errors import InputError
from ks4release.grid import Tile
from ks4release.refcat import (
    FetchStats,
    RefcatCache,
    RefcatOfflineError,
    Region,
    epoch_position_error,
    fetch_region,
    propagate_positions,
)

CAMERA = Camera.kmtnet(0.25)  # a small footprint keeps the number of cells low


@pytest.fixture
def server():
    with ArchiveServer() as srv:
        yield srv


def _section(tmp_path, srv, **kwargs):
    return RefcatSection(
        cache_dir=str(tmp_path / "cache"), retries=0, timeout_s=5.0,
        gaia_dr3=RefcatSource(source="tap", tap_url=srv.tap_url), **kwargs)


def _tile(name, ra, dec):
    return Tile(index=-1, name=name, ra_deg=ra, dec_deg=dec)


def test_second_fetch_of_a_region_makes_no_request(server, tmp_path):
    section = _section(tmp_path, server)
    region = Region.from_tile(_tile("T1", 0.2, -60.5), CAMERA, 0.05)
    first_stats, second_stats = FetchStats(), FetchStats()
    first = fetch_region("gaia_dr3", region, section, stats=first_stats)
    n_requests = len(server.requests)
    second = fetch_region("gaia_dr3", region, section, stats=second_stats)
    assert len(server.requests) == n_requests
    assert first_stats.fetched == first_stats.cells > 0 and second_stats.cache_hits == \
        second_stats.cells
    assert second_stats.queries == 0
    assert sorted(first["source_id"].tolist()) == sorted(second["source_id"].tolist())
    np.testing.assert_array_equal(np.sort(first["ra"]), np.sort(second["ra"]))
    assert second["pmra"].unit == u.mas / u.yr


def test_overlapping_tiles_reuse_cells(server, tmp_path):
    section = _section(tmp_path, server)
    left = Region.from_tile(_tile("L", 0.0, -60.5), CAMERA, 0.05)
    right = Region.from_tile(_tile("R", 0.4, -60.5), CAMERA, 0.05)
    shared = set(left.cells(7).tolist()) & set(right.cells(7).tolist())
    assert shared
    fetch_region("gaia_dr3", left, section)
    stats = FetchStats()
    table = fetch_region("gaia_dr3", right, section, stats=stats)
    assert stats.cache_hits == len(shared)
    assert stats.fetched == stats.cells - len(shared)
    truth = server.tables["gaiadr3.gaia_source"]
    inside = right.contains(np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    assert sorted(table["source_id"].tolist()) == sorted(truth["source_id"][inside].tolist())


def test_sidecar_records_query_service_date_rows_and_checksum(server, tmp_path):
    section = _section(tmp_path, server)
    region = Region.cone(0.2, -60.5, 0.1)
    fetch_region("gaia_dr3", region, section)
    cache = RefcatCache(tmp_path / "cache", "gaia_dr3", "tap", 7)
    entries = cache.entries()
    assert len(entries) == len(region.cells(7))
    data = json.loads(cache.sidecar_path(entries[0].cell).read_text())
    assert data["service"] == server.tap_url
    assert data["queries"][0].startswith("SELECT g.source_id")
    assert data["fetched_utc"].endswith("+00:00")
    assert data["rows"] == len(Table.read(cache.data_path(entries[0].cell)))
    assert len(data["sha256"]) == 64 and data["format_version"] == 1


def test_corrupted_cache_file_is_detected_and_refetched(server, tmp_path):
    section = _section(tmp_path, server)
    region = Region.cone(0.2, -60.5, 0.1)
    expected = fetch_region("gaia_dr3", region, section)
    cache = RefcatCache(tmp_path / "cache", "gaia_dr3", "tap", 7)
    victim = cache.entries()[0].cell
    path = cache.data_path(victim)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    # Offline, the damage is an error that names the file.
    with pytest.raises(RefcatOfflineError) as info:
        fetch_region("gaia_dr3", region, section, offline=True)
    assert str(path) in str(info.value) and "SHA-256" in str(info.value)
    # Online, the cell is fetched again (one query) and the result is whole.
    stats = FetchStats()
    again = fetch_region("gaia_dr3", region, section, stats=stats)
    assert stats.refetched_corrupt == 1 and stats.queries == 1
    assert sorted(again["source_id"].tolist()) == sorted(expected["source_id"].tolist())
    assert cache.load(victim).status == "hit"


def test_offline_mode_fails_clearly_on_a_missing_cell(server, tmp_path):
    section = _section(tmp_path, server, offline=True)
    with pytest.raises(RefcatOfflineError) as info:
        fetch_region("gaia_dr3", Region.cone(0.2, -60.5, 0.1), section)
    text = str(info.value)
    assert "offline" in text and "gaia_dr3" in text and "not cached" in text
    assert "ks4release refcat fetch" in text
    assert server.requests == []


def test_offline_mode_works_from_the_cache(server, tmp_path):
    region = Region.cone(0.2, -60.5, 0.1)
    online = fetch_region("gaia_dr3", region, _section(tmp_path, server))
    server.stop()  # no service at all any more
    offline = fetch_region("gaia_dr3", region, _section(tmp_path, server, offline=True))
    assert sorted(offline["source_id"].tolist()) == sorted(online["source_id"].tolist())


def test_local_source_reads_and_cuts_the_file(tmp_path):
    rng = np.random.default_rng(3)
    n = 500
    table = Table({"source_id": np.arange(n, dtype=np.int64), "ra": rng.uniform(9, 11, n),
                   "dec": rng.uniform(-51, -49, n), "phot_g_mean_mag": rng.uniform(12, 19, n),
                   "pmra": rng.normal(0, 5, n), "pmdec": rng.normal(0, 5, n)})
    (tmp_path / "refcat").mkdir()
    table.write(tmp_path / "refcat" / "gaia_dr3.parquet")
    config = ReleaseConfig(source_path=tmp_path / "release.toml")
    region = Region.cone(10.0, -50.0, 0.5)
    result = fetch_region("gaia_dr3", region, config)
    inside = region.contains(table["ra"], table["dec"])
    assert sorted(result["source_id"].tolist()) == sorted(table["source_id"][inside].tolist())
    assert result.meta["source"] == "local" and result["ra"].unit == u.deg
    assert not (tmp_path / "refcat" / "cache").exists()  # local files are not cached
    with pytest.raises(InputError, match="does not exist"):
        fetch_region("delve_dr2", region, config)


def test_proper_motion_propagation_is_off_by_default_and_optional(tmp_path):
    table = Table({"source_id": np.array([1, 2], dtype=np.int64), "ra": [10.0, 10.0],
                   "dec": [-50.0, -50.0], "phot_g_mean_mag": [15.0, 16.0],
                   "pmra": [100.0, np.nan], "pmdec": [-50.0, np.nan],
                   "parallax": [2.0, np.nan], "ref_epoch": [2016.0, 2016.0]})
    (tmp_path / "refcat").mkdir()
    table.write(tmp_path / "refcat" / "gaia_dr3.parquet")
    config = ReleaseConfig(source_path=tmp_path / "release.toml")
    region = Region.cone(10.0, -50.0, 0.1)
    plain = fetch_region("gaia_dr3", region, config)
    assert config.refcat.propagate_to_epoch == 0.0
    np.testing.assert_array_equal(plain["ra"], table["ra"])
    assert plain.meta["epoch"] == 2016.0
    moved = fetch_region("gaia_dr3", region, config, propagate_to_epoch=2026.0)
    assert moved.meta["epoch"] == 2026.0
    dra = (moved["ra"][0] - 10.0) * np.cos(np.radians(-50.0)) * 3.6e6  # mas
    ddec = (moved["dec"][0] + 50.0) * 3.6e6
    assert dra == pytest.approx(1000.0, rel=1e-3) and ddec == pytest.approx(-500.0, rel=1e-3)
    assert moved["ra"][1] == 10.0 and moved["ra_gaia"][0] == 10.0  # no pm: unchanged


def test_propagation_refuses_silly_epochs():
    table = Table({"ra": [1.0], "dec": [2.0]})
    with pytest.raises(ValueError, match="epoch"):
        propagate_positions(table, 3000.0)
    with pytest.raises(ValueError, match="propagate_to_epoch"):
        RefcatSection(propagate_to_epoch=50.0)


def test_epoch_position_error_counts_the_motion_or_its_error():
    table = Table({"ra": [1.0, 1.0, 1.0], "dec": [2.0, 2.0, 2.0],
                   "pmra": [30.0, np.nan, 3.0], "pmdec": [-40.0, np.nan, 4.0],
                   "pmra_error": [0.3, np.nan, 0.03], "pmdec_error": [0.4, np.nan, 0.04],
                   "ref_epoch": [2016.0, 2016.0, 2016.0]})
    # Not moved: the 50 mas/yr motion over 6 years is 300 mas, 212 mas per axis.
    ignored = epoch_position_error(table, 2022.0, propagated=False)
    np.testing.assert_allclose(ignored, [300.0 / np.sqrt(2), 0.0, 30.0 / np.sqrt(2)])
    # Moved: only the proper-motion errors grow with time (0.5 mas/yr over 6 years).
    moved = epoch_position_error(table, 2022.0, propagated=True)
    np.testing.assert_allclose(moved, [3.0 / np.sqrt(2), 0.0, 0.3 / np.sqrt(2)])
    # Earlier epochs count the same way; a table without motions adds nothing.
    np.testing.assert_allclose(epoch_position_error(table, 2010.0, propagated=False), ignored)
    assert not epoch_position_error(Table({"ra": [1.0], "dec": [2.0]}), 2022.0,
                                    propagated=True).any()
