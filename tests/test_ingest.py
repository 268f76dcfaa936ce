"""Ingest: per-exposure JSON summaries and the per-tile, per-band inventory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table
from factories import write_exposure, write_garbage

from ks4release.camera import CCD_NAMES
from ks4release.errors import InputError
from ks4release.reduction.ingest import (
    SUMMARY_SCHEMA,
    ccd_stats,
    ingest_exposure,
    write_inventory,
)

TILE = "0000.000-62"


def test_ccd_stats_on_known_array():
    rng = np.random.default_rng(3)
    data = (500.0 + 20.0 * rng.standard_normal((300, 200))).astype(np.float32)
    data[0, :10] = np.nan
    data[1, :4] = 60000.0
    s = ccd_stats("KK", data, saturation=55000.0)
    assert s.median_adu == pytest.approx(500.0, abs=1.0)
    assert s.sigma_adu == pytest.approx(20.0, rel=0.05)
    assert s.finite_fraction == pytest.approx(1 - 10 / 60000)
    assert s.saturated_fraction == pytest.approx(4 / 60000)


def test_ingest_writes_summary(tmp_path):
    raw = write_exposure(tmp_path / "raw" / "e1.fits", sky_adu=800.0, noise_adu=25.0)
    out = tmp_path / "work" / "ingest" / "e1.json"
    ingest_exposure(raw, out, [TILE])
    summary = json.loads(out.read_text())
    assert summary["schema"] == SUMMARY_SCHEMA
    assert (summary["tile"], summary["band"], summary["site"]) == (TILE, "B", "CTIO")
    assert [c["name"] for c in summary["ccds"]] == list(CCD_NAMES)
    for c in summary["ccds"]:
        assert c["median_adu"] == pytest.approx(800.0, abs=3.0)
        assert c["sigma_adu"] == pytest.approx(25.0, rel=0.1)
        assert c["finite_fraction"] == 1.0 and c["saturated_fraction"] == 0.0
        assert len(c["amplifier_columns"]) == 8
    assert [p.name for p in out.parent.iterdir()] == ["e1.json"]  # no temporary left behind


def test_ingest_rejects_bad_pixels(tmp_path):
    shape = (144, 144)
    nan = np.full(shape, np.nan, np.float32)
    raw = write_exposure(tmp_path / "nan.fits", ccd_data={"MM": nan})
    with pytest.raises(InputError, match=r"nan.fits: extension 'MM': only 0.0% of the pixels"):
        ingest_exposure(raw, tmp_path / "nan.json", [TILE])
    raw = write_exposure(tmp_path / "zero.fits", ccd_data={"TT": np.zeros(shape, np.float32)})
    with pytest.raises(InputError, match=r"zero.fits: extension 'TT': all pixels are zero"):
        ingest_exposure(raw, tmp_path / "zero.json", [TILE])
    assert not (tmp_path / "zero.json").exists()


def test_ingest_rejects_bad_file_and_tile(tmp_path):
    with pytest.raises(InputError, match="not a readable FITS file"):
        ingest_exposure(write_garbage(tmp_path / "g.fits"), tmp_path / "g.json", [TILE])
    raw = write_exposure(tmp_path / "e.fits")
    with pytest.raises(InputError, match="not a tile of this release"):
        ingest_exposure(raw, tmp_path / "e.json", ["0376.321-70"])


def test_inventory_sorted_with_units(tmp_path):
    summaries = []
    for i, (mjd, site) in enumerate([(59003.1, "SAAO"), (59001.2, "CTIO"), (59002.3, "SSO")]):
        raw = write_exposure(tmp_path / "raw" / f"e{i}.fits", mjd=mjd, site=site, dither=i + 1,
                             sky_adu=1000.0 + 100 * i, seed=i)
        out = tmp_path / "work" / "ingest" / f"e{i}.json"
        ingest_exposure(raw, out, [TILE])
        summaries.append(out)
    inventory = tmp_path / "work" / TILE / "B" / "inventory.ecsv"
    write_inventory(TILE, "B", summaries, inventory)
    table = Table.read(inventory)
    assert list(table["mjd"]) == [59001.2, 59002.3, 59003.1]
    assert list(table["site"]) == ["CTIO", "SSO", "SAAO"]
    assert table["mjd"].unit == u.d and table["exptime"].unit == u.s
    assert table["sky_kk"].unit == u.adu and table["noise_tt"].unit == u.adu
    assert table["sky_nn"][0] == pytest.approx(1100.0, abs=5.0)
    assert table.meta["tile"] == TILE and table.meta["band"] == "B"
    assert table["file"][0].endswith("e1.fits")


def test_inventory_rejects_foreign_and_broken_summaries(tmp_path):
    raw = write_exposure(tmp_path / "v.fits", band="V")
    out = tmp_path / "v.json"
    ingest_exposure(raw, out, [TILE])
    with pytest.raises(InputError, match=r"v.fits: exposure belongs to tile 0000.000-62 band V"):
        write_inventory(TILE, "B", [out], tmp_path / "inv.ecsv")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json: not a readable ingest summary"):
        write_inventory(TILE, "B", [bad], tmp_path / "inv.ecsv")
    assert not (tmp_path / "inv.ecsv").exists()
