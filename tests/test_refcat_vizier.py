"""VizieR through the real astroquery client against a loopback VizieR endpoint."""

from __future__ import annotations

import numpy as np
import pytest
from refcat_servers import ArchiveServer

from ks4release.config import RefcatSection, RefcatSource
from ks4release.refcat import (
    VIZIER_TABLES,
    QueryLimits,
    RefcatOverflowError,
    RefcatServiceError,
    Region,
    fetch_region,
    vizier_query,
)

FAST = QueryLimits(row_limit=100_000, timeout_s=5.0, retries=1, backoff_s=0.01)
CONE = (0.2, -60.5, 0.3)


@pytest.fixture
def server():
    with ArchiveServer() as srv:
        yield srv


def _truth(srv, catalog, cone=CONE):
    gaia = srv.tables["gaiadr3.gaia_source"]
    inside = Region.cone(*cone).contains(np.asarray(gaia["ra"]), np.asarray(gaia["dec"]))
    rows = gaia[inside]
    if catalog == "gaia_xp":
        xp = srv.tables["gaiadr3.synthetic_photometry_gspc"]
        keep = np.isin(xp["source_id"], rows["source_id"])
        return xp[keep], rows
    return rows, rows


def test_gaia_dr3_columns_are_mapped_onto_archive_names(server):
    table = vizier_query(server.vizier_url, "gaia_dr3", CONE, limits=FAST)
    truth, _ = _truth(server, "gaia_dr3")
    assert set(table["source_id"].tolist()) == set(truth["source_id"].tolist())
    assert [name for _, name in VIZIER_TABLES["gaia_dr3"].columns] + ["ref_epoch"] == \
        table.colnames
    by_id = {int(s): k for k, s in enumerate(truth["source_id"])}
    order = [by_id[int(s)] for s in table["source_id"]]
    for name in ("ra", "dec", "phot_g_mean_mag", "pmra", "parallax", "phot_bp_mean_mag"):
        np.testing.assert_allclose(np.ma.filled(table[name], np.nan),
                                   np.asarray(truth[name][order]), equal_nan=True)
    assert np.all(table["ref_epoch"] == 2016.0)
    assert server.requests == [("POST", "/viz-bin/votable")]


def test_gaia_xp_syntphot_columns_are_mapped(server):
    table = vizier_query(server.vizier_url, "gaia_xp", CONE, limits=FAST)
    truth, _ = _truth(server, "gaia_xp")
    assert set(table["source_id"].tolist()) == set(truth["source_id"].tolist())
    by_id = {int(s): k for k, s in enumerate(truth["source_id"])}
    order = [by_id[int(s)] for s in table["source_id"]]
    for band in "bvri":
        np.testing.assert_allclose(table[f"{band}_jkc_mag"], truth[f"{band}_jkc_mag"][order])
        expected = truth[f"{band}_jkc_flag"][order]
        got = table[f"{band}_jkc_flag"]
        np.testing.assert_array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(expected))
        np.testing.assert_array_equal(np.ma.filled(got, -1), np.ma.filled(expected, -1))


def test_vizier_overflow_is_an_error(server):
    with pytest.raises(RefcatOverflowError) as info:
        vizier_query(server.vizier_url, "gaia_dr3", CONE,
                     limits=QueryLimits(row_limit=10, retries=0))
    text = str(info.value)
    assert "truncated at 10 rows" in text and "/viz-bin/votable" in text
    assert "-source=I/355/gaiadr3" in text  # the request is named


def test_vizier_server_error_and_malformed_answer(server):
    server.fail_statuses = [502, 502]
    with pytest.raises(RefcatServiceError, match="HTTP 502.*2 attempts"):
        vizier_query(server.vizier_url, "gaia_dr3", CONE, limits=FAST)
    server.malformed = True
    with pytest.raises(RefcatServiceError, match="malformed VOTable"):
        vizier_query(server.vizier_url, "gaia_dr3", CONE, limits=FAST)


def test_vizier_timeout(server):
    server.delay_s = 1.0
    with pytest.raises(RefcatServiceError, match="timeout of 0.2 s"):
        vizier_query(server.vizier_url, "gaia_dr3", CONE,
                     limits=QueryLimits(timeout_s=0.2, retries=0))


def test_delve_is_not_in_vizier(server):
    with pytest.raises(ValueError, match="not available from VizieR"):
        vizier_query(server.vizier_url, "delve_dr2", CONE, limits=FAST)
    with pytest.raises(ValueError, match="delve_dr2 is not in VizieR"):
        RefcatSection(delve_dr2=RefcatSource(source="vizier"))


def test_fetch_region_through_vizier(server, tmp_path):
    region = Region.cone(359.9, -60.3, 0.35)
    section = RefcatSection(
        cache_dir=str(tmp_path / "cache"), retries=0,
        gaia_xp=RefcatSource(source="vizier", vizier_url=server.vizier_url))
    via_vizier = fetch_region("gaia_xp", region, section)
    truth, _ = _truth(server, "gaia_xp", (359.9, -60.3, 0.35))
    assert set(via_vizier["source_id"].tolist()) == set(truth["source_id"].tolist())
    assert via_vizier.meta["source"] == "vizier"
    assert (tmp_path / "cache" / "gaia_xp" / "vizier").is_dir()
