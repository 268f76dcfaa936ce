"""The schema checker: valid catalogs pass in every format, every single mutation is caught."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from catalog_factories import make_valid_catalog
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ks4release.publish.export import EXPORT_FORMATS, ExportSettings, export_catalog
from ks4release.publish.schema_check import check_catalog
from ks4release.schema_cli import schema_group
from ks4release.schemas import catalog_schema

CATALOG = "single_master"
SCHEMA = catalog_schema(CATALOG)
VALID = make_valid_catalog(CATALOG, 60, seed=9)

_RETYPE = {"boolean": pa.int16(), "short": pa.int32(), "int": pa.int64(), "long": pa.float64(),
           "float": pa.float64(), "double": pa.float32()}


def _replace(table: pa.Table, name: str, array: pa.Array,
             field: pa.Field | None = None) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, field or table.schema.field(index), array)


def _mutate(table: pa.Table, kind: str, name: str) -> pa.Table:
    spec = SCHEMA.column(name)
    field = table.schema.field(name)
    column = table[name].combine_chunks()
    if kind == "rename":
        return table.rename_columns([f"{n}_x" if n == name else n for n in table.column_names])
    if kind == "drop":
        return table.drop([name])
    if kind == "retype":
        new_type = _RETYPE[spec.datatype]
        return _replace(table, name, pa.compute.cast(column, new_type, safe=False),
                        field.with_type(new_type))
    if kind == "reunit":
        meta = dict(field.metadata)
        meta[b"unit"] = b"km" if spec.unit != "km" else b"m"
        return _replace(table, name, column, field.with_metadata(meta))
    if kind == "range":
        values = column.to_pylist()
        values[3] = (spec.low - 1 if spec.datatype in ("short", "int", "long")
                     else spec.high + abs(spec.high) + 1)
        return _replace(table, name, pa.array(values, type=field.type))
    if kind == "null":
        values = column.to_pylist()
        values[5] = None
        return _replace(table, name, pa.array(values, type=field.type), field.with_nullable(True))
    if kind == "duplicate":
        values = column.to_pylist()
        values[7] = values[40]
        return _replace(table, name, pa.array(values, type=field.type))
    if kind == "inconsistent":
        values = column.to_pylist()
        values[7] = values[7] + (2**35 if name == "coadd_object_id" else 1)
        return _replace(table, name, pa.array(values, type=field.type))
    raise AssertionError(kind)


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["rename", "drop", "retype", "reunit", "range", "null",
                                 "duplicate", "inconsistent"]))
    if kind == "range":
        names = [c.name for c in SCHEMA.columns if c.has_range]
    elif kind == "null":
        names = [c.name for c in SCHEMA.columns if not c.nullable]
    elif kind == "duplicate":
        names = ["coadd_object_id"]
    elif kind == "inconsistent":
        names = ["coadd_object_id", "healpix_index"]
    else:
        names = list(SCHEMA.names)
    return kind, draw(st.sampled_from(names))


def test_valid_catalog_passes(tmp_path):
    pq.write_table(VALID, tmp_path / "ok.parquet")
    report = check_catalog(tmp_path / "ok.parquet")
    assert report.ok, report.summary()
    assert report.rows == 60 and report.catalog == CATALOG


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations())
def test_every_single_mutation_is_rejected_naming_the_column(tmp_path, mutation):
    kind, name = mutation
    path = tmp_path / "mutated.parquet"
    pq.write_table(_mutate(VALID, kind, name), path)
    report = check_catalog(path, CATALOG, chunk_rows=16)
    assert not report.ok, (kind, name)
    assert any(name in failure.message for failure in report.failures), report.summary()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    pq.write_table(VALID, root / "master.parquet")
    export_catalog(root / "master.parquet", root / "out", EXPORT_FORMATS,
                   ExportSettings(chunk_rows=20, part_rows=40))
    return root / "out"


def _data_files(out_dir):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return [out_dir / f["path"] for f in manifest["files"] if f["kind"] == "data"]


def test_every_export_format_passes_with_the_manifest(exports):
    files = _data_files(exports)
    assert {check_catalog(f).format for f in files} == set(EXPORT_FORMATS)
    for path in files:
        report = check_catalog(path, manifest=exports / "manifest.json", chunk_rows=7)
        assert report.ok, report.summary()
        assert any(r.check == "manifest" for r in report.results)


def test_fits_mutations_are_caught(exports, tmp_path):
    with fits.open(exports / f"{CATALOG}.fits") as hdul:
        names = [hdul[1].header[f"TTYPE{i}"] for i in range(1, hdul[1].header["TFIELDS"] + 1)]
        i = names.index("mag_auto_r") + 1
        hdul[1].header[f"TUNIT{i}"] = "Jy"
        hdul[1].header[f"TUCD{names.index('glat') + 1}"] = "pos.galactic.lon"
        hdul[1].data["dec"][2] = np.nan
        hdul.writeto(tmp_path / "bad.fits")
    report = check_catalog(tmp_path / "bad.fits")
    messages = " | ".join(f.message for f in report.failures)
    assert "mag_auto_r: unit 'Jy'" in messages
    assert "glat: UCD" in messages
    assert "dec: 1 null(s)" in messages


def test_csv_mutations_are_caught(exports, tmp_path):
    csv = (exports / "datalab" / f"{CATALOG}.csv").read_text().splitlines()
    header = csv[0].split(",")
    row = csv[1].split(",")
    row[header.index('"flags_v"')] = "300"
    row[header.index('"n_det"')] = "1.5"
    (tmp_path / f"{CATALOG}.csv").write_text("\n".join([csv[0], ",".join(row)] + csv[2:]) + "\n")
    (tmp_path / f"{CATALOG}_tap_schema.sql").write_text(
        (exports / "datalab" / f"{CATALOG}_tap_schema.sql").read_text())
    report = check_catalog(tmp_path / f"{CATALOG}.csv")
    messages = " | ".join(f.message for f in report.failures)
    assert "n_det: values do not parse as short" in messages
    assert "flags_v: 1 value(s) outside [0, 255]" in messages


def test_manifest_row_count_mismatch(exports, tmp_path):
    manifest = json.loads((exports / "manifest.json").read_text())
    for entry in manifest["files"]:
        entry["rows"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / f"{CATALOG}.parquet").write_bytes((exports / f"{CATALOG}.parquet").read_bytes())
    report = check_catalog(tmp_path / f"{CATALOG}.parquet", manifest=tmp_path / "manifest.json")
    assert [f.message for f in report.failures] == ["row count 60, manifest says 61"]


def test_duplicates_across_chunks_are_found(tmp_path):
    table = _mutate(VALID, "duplicate", "coadd_object_id")
    pq.write_table(table, tmp_path / "dup.parquet")
    report = check_catalog(tmp_path / "dup.parquet", chunk_rows=5)  # rows 7 and 40 far apart
    assert "coadd_object_id: 1 duplicated identifier(s)" in report.summary()


def test_cli_exit_status_and_json(exports, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(schema_group, ["check", str(exports / f"{CATALOG}.fits"),
                                      "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    pq.write_table(_mutate(VALID, "drop", "glon"), tmp_path / "bad.parquet")
    bad = runner.invoke(schema_group, ["check", str(tmp_path / "bad.parquet"),
                                       "--catalog", CATALOG])
    assert bad.exit_code == 1
    assert "glon: column missing" in bad.output
    (tmp_path / "x.txt").write_text("nothing")
    unreadable = runner.invoke(schema_group, ["check", str(tmp_path / "x.txt")])
    assert unreadable.exit_code == 2
