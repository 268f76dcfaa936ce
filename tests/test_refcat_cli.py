"""``ks4release refcat fetch`` and ``refcat info``, and the [refcat] keys of release.toml."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from refcat_servers import ArchiveServer

from ks4release.config import (
    ConfigError,
    RefcatSection,
    RefcatSource,
    ReleaseConfig,
    load_config,
    save_config,
)
from ks4release.refcat import RefcatOfflineError
from ks4release.refcat.cli import refcat_group


def _release(tmp_path, srv) -> str:
    text = f"""
[survey]
camera_scale = 0.25
[[survey.custom_tiles]]
name = "T1"
ra = 0.2
dec = -60.5
[[survey.custom_tiles]]
name = "T2"
ra = 1.3
dec = -60.5

[refcat]
cache_dir = "cache"
retries = 0
tile_margin_deg = 0.05

[refcat.gaia_dr3]
source = "tap"
tap_url = "{srv.tap_url}"

[refcat.gaia_xp]
source = "vizier"
vizier_url = "{srv.vizier_url}"
"""
    (tmp_path / "release.toml").write_text(text)
    return str(tmp_path)


def test_fetch_then_offline_then_info(tmp_path):
    runner = CliRunner()
    with ArchiveServer() as srv:
        release = _release(tmp_path, srv)
        result = runner.invoke(refcat_group, ["fetch", "--release", release, "--tiles", "T1",
                                              "--catalog", "gaia_dr3"])
        assert result.exit_code == 0, result.output
        assert "T1:" in result.output and "0 cached" in result.output
        result = runner.invoke(refcat_group, ["fetch", "--release", release, "--tiles", "T1,T2",
                                              "--catalog", "gaia_xp"])
        assert result.exit_code == 0, result.output
        n_requests = len(srv.requests)
    # The server is gone: offline runs from the cache.
    result = runner.invoke(refcat_group, ["fetch", "--release", release, "--tiles", "T1",
                                          "--catalog", "gaia_dr3", "--offline"])
    assert result.exit_code == 0, result.output
    assert "0 fetched" in result.output and n_requests > 0
    # A tile never fetched is a clear offline error.
    result = runner.invoke(refcat_group, ["fetch", "--release", release, "--tiles", "T2",
                                          "--catalog", "gaia_dr3", "--offline"])
    assert isinstance(result.exception, RefcatOfflineError)
    result = runner.invoke(refcat_group, ["info", "--release", release])
    assert result.exit_code == 0, result.output
    assert "gaia_dr3: tap" in result.output and "gaia_xp: vizier" in result.output
    assert "delve_dr2: local" in result.output
    assert "cached from tap:" in result.output and "cached from vizier:" in result.output


def test_refcat_keys_round_trip_and_are_checked(tmp_path):
    section = RefcatSection(
        cache_order=8, offline=True, row_limit=5000, timeout_s=30.0, retries=1,
        propagate_to_epoch=2021.5,
        gaia_dr3=RefcatSource(source="tap", tap_url="https://gea.esac.esa.int/tap-server/tap"),
        gaia_xp=RefcatSource(source="vizier"),
    )
    config = ReleaseConfig(refcat=section)
    path = save_config(config, tmp_path / "release.toml")
    assert load_config(path) == config
    assert load_config(_empty(tmp_path)).refcat == RefcatSection()
    assert RefcatSection().gaia_dr3.source == "local"  # the demo's files stay the default
    bad = tmp_path / "bad.toml"
    bad.write_text("[refcat]\ncache_order = 20\n")
    with pytest.raises(ConfigError, match="cache_order"):
        load_config(bad)
    bad.write_text("[refcat.gaia_dr3]\nsource = 'tap'\ntap_url = 'ftp://x'\n")
    with pytest.raises(ConfigError, match="tap_url must start with http"):
        load_config(bad)


def _empty(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path
