"""The tile-catalog format (ks4release.tile_catalogs): schema, writer, and the masters reading it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ks4release.publish.master import build_idual_master
from ks4release.settings import MasterSettings
from ks4release.sfd import SfdMapMissingWarning
from ks4release.tile_catalogs import (
    BANDS,
    dual_catalog_path,
    tile_catalog_schema,
    write_tile_catalog,
)


def _columns(schema, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = {}
    for spec in schema.columns:
        if spec.datatype == "boolean":
            cols[spec.name] = np.zeros(n)
        elif spec.name.startswith(("flags_", "imaflags_", "ssflag_", "sscount_", "ndith_")):
            cols[spec.name] = rng.integers(0, 3, n).astype(float)
        else:
            cols[spec.name] = rng.uniform(0.1, 1.0, n)
    cols["ra"], cols["dec"] = rng.uniform(10.0, 10.1, n), rng.uniform(-30.1, -30.0, n)
    for b in BANDS:
        if f"mag_auto_{b}" in cols:
            cols[f"mag_auto_{b}"] = rng.uniform(15.0, 22.0, n)
            cols[f"mag_auto_{b}"][0] = np.nan  # a forced measurement without flux
            cols[f"snr_{b}"] = np.full(n, 50.0)
            cols[f"flags_{b}"] = np.zeros(n)
            for k in ("min", "max", "mean"):
                cols[f"{k}_mjd_{b}"] = np.full(n, 59000.0)
    return cols


def test_schema_modes():
    dual, single = tile_catalog_schema("dual"), tile_catalog_schema("single", "v")
    assert {"snr_b", "mag_auto_i", "ndith_r", "x_image"} <= set(dual.names)
    assert "raerr" not in dual.names and {"raerr", "decerr", "mag_auto_v"} <= set(single.names)
    assert not any(n.endswith("_i") for n in single.names)
    with pytest.raises(ValueError, match="mode"):
        tile_catalog_schema("single")
    with pytest.raises(ValueError, match="mode"):
        tile_catalog_schema("dual", "i")


def test_written_catalog_carries_units_nulls_and_feeds_the_master(tmp_path):
    schema = tile_catalog_schema("dual")
    rng = np.random.default_rng(3)
    path = dual_catalog_path(tmp_path, "T00")
    write_tile_catalog(path, _columns(schema, 40, rng), tile="T00", schema=schema)
    table = pq.read_table(path)
    assert table.column_names == [*schema.names, "tile"]
    field = table.schema.field("mag_auto_v")
    assert field.metadata[b"unit"] == b"mag" and field.metadata[b"description"]
    assert table.column("mag_auto_v").null_count == 1
    assert table.schema.field("flags_i").type == "int16"
    out = tmp_path / "idual_master.parquet"
    with pytest.warns(SfdMapMissingWarning):
        build_idual_master([path], out, MasterSettings())
    assert pq.read_metadata(out).num_rows == 40
