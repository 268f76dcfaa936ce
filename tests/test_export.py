"""Exports (Parquet, FITS, VOTable, CSV + TAP_SCHEMA, VizieR) read back with their own readers."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.io.votable import parse as parse_votable
from astropy.io.votable import validate as validate_votable
from astropy.table import Table, vstack
from catalog_factories import make_valid_catalog
from click.testing import CliRunner
from felis.cli import cli as felis_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ks4release.errors import StageError
from ks4release.publish.export import EXPORT_FORMATS, ExportSettings, export_catalog
from ks4release.schemas import CATALOGS, catalog_schema, schema_path, tap_schema_sql

SMALL = ExportSettings(chunk_rows=40, part_rows=80)


def _values(table: Table | pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, null mask) of a column from astropy or Arrow."""
    if isinstance(table, pa.Table):
        column = table[name]
        null = column.is_null().to_numpy(zero_copy_only=False)
        values = pa.compute.cast(column, pa.float64()).fill_null(0).to_numpy()
        return values, null
    column = table[name]
    null = np.asarray(np.ma.getmaskarray(column))
    values = np.asarray(np.ma.getdata(column)).astype(np.float64)
    null = null | np.isnan(values)
    return np.where(null, 0, values), null


def _read_back(out_dir, fmt: str, catalog: str):
    if fmt == "parquet":
        return pq.read_table(out_dir / f"{catalog}.parquet"), None
    if fmt == "fits":
        table = Table.read(out_dir / f"{catalog}.fits")
        return table, {n: str(table[n].unit or "") for n in table.colnames}
    if fmt == "votable":
        parts = sorted((out_dir / "votable").glob("*.vot"))
        table = vstack([parse_votable(str(p)).get_first_table().to_table() for p in parts])
        return table, {n: str(table[n].unit or "") for n in table.colnames}
    if fmt == "csv":
        schema = catalog_schema(catalog)
        table = pacsv.read_csv(out_dir / "datalab" / f"{catalog}.csv",
                               convert_options=pacsv.ConvertOptions(
                                   column_types=schema.arrow_schema()))
        return table, None
    parts = sorted((out_dir / "vizier").glob(f"{catalog}_*"))
    if not parts:  # an empty catalog has no VizieR bundle
        return pq.read_table(out_dir / f"{catalog}.parquet").slice(0, 0), None
    table = vstack([Table.read(p / f"{catalog}.dat", format="ascii.cds", readme=str(p / "ReadMe"))
                    for p in parts], metadata_conflicts="silent")  # parts differ in [min/max]
    return table, {n: str(table[n].unit or "") for n in table.colnames}


def _assert_same(master: pa.Table, back, units, catalog: str, fmt: str) -> None:
    schema = catalog_schema(catalog)
    assert len(back) == master.num_rows, fmt
    for spec in schema.columns:
        if spec.datatype == "long":  # compare 64-bit integers exactly
            got = np.asarray(np.ma.getdata(back[spec.name])).astype(np.int64) \
                if not isinstance(back, pa.Table) else back[spec.name].to_numpy()
            np.testing.assert_array_equal(got, master[spec.name].to_numpy(), err_msg=spec.name)
            continue
        expected, expected_null = _values(master, spec.name)
        got, got_null = _values(back, spec.name)
        got = got.astype(spec.dtype).astype(np.float64)  # text formats read floats as float64
        np.testing.assert_array_equal(got_null, expected_null, err_msg=f"{fmt} {spec.name} nulls")
        np.testing.assert_array_equal(got, expected, err_msg=f"{fmt} {spec.name} values")
        if units is not None:
            assert u.Unit(units[spec.name] or "") == u.Unit(spec.unit or ""), (fmt, spec.name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for catalog in CATALOGS:
        root = tmp_path_factory.mktemp(catalog)
        master = make_valid_catalog(catalog, 150, seed=4)
        pq.write_table(master, root / "master.parquet")
        export_catalog(root / "master.parquet", root / "export", EXPORT_FORMATS, SMALL)
        out[catalog] = (master, root / "export")
    return out


@pytest.mark.parametrize("catalog", CATALOGS)
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_reads_back_the_same(exported, catalog, fmt):
    master, out_dir = exported[catalog]
    back, units = _read_back(out_dir, fmt, catalog)
    _assert_same(master, back, units, catalog, fmt)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(CATALOGS), st.integers(0, 40), st.integers(0, 2**31),
       st.sampled_from([0.0, 0.3, 1.0]))
def test_round_trip_property(tmp_path_factory, catalog, n, seed, null_fraction):
    root = tmp_path_factory.mktemp("prop")
    master = make_valid_catalog(catalog, n, seed=seed, null_fraction=null_fraction)
    pq.write_table(master, root / "master.parquet")
    export_catalog(root / "master.parquet", root / "out", EXPORT_FORMATS,
                   ExportSettings(chunk_rows=16, part_rows=32))
    for fmt in EXPORT_FORMATS:
        back, units = _read_back(root / "out", fmt, catalog)
        _assert_same(master, back, units, catalog, fmt)


def test_parquet_and_fits_carry_units_ucds_and_descriptions(exported):
    _, out_dir = exported["idual_master"]
    field = pq.read_schema(out_dir / "idual_master.parquet").field("mag_auto_b")
    assert field.metadata[b"unit"] == b"mag"
    assert field.metadata[b"ucd"] == b"phot.mag;em.opt.B"
    with fits.open(out_dir / "idual_master.fits") as hdul:
        hdul.verify("exception")
        header = hdul[1].header
        index = [header[f"TTYPE{i}"] for i in range(1, header["TFIELDS"] + 1)].index("ra") + 1
        assert header[f"TUNIT{index}"] == "deg"
        assert header[f"TUCD{index}"] == "pos.eq.ra;meta.main"
        assert header[f"TCOMM{index}"] == "Right Ascension (J2000)"


def test_votable_passes_astropys_validator_with_ucds(exported):
    _, out_dir = exported["single_master"]
    parts = sorted((out_dir / "votable").glob("*.vot"))
    assert len(parts) == 2  # 150 rows in parts of 80
    for path in parts:
        assert validate_votable(str(path), output=io.StringIO()) is True
    fields = {f.name: f for f in parse_votable(str(parts[0])).get_first_table().fields}
    assert fields["class_star_i"].ucd == "src.class.starGalaxy;em.opt.I"
    assert fields["ebmv_sfd"].ucd == "phot.color.excess"


def test_vizier_readme_is_cdspyreadmes_and_astropy_reads_it(exported):
    _, out_dir = exported["idual_master"]
    readme = (out_dir / "vizier" / "idual_master_0001" / "ReadMe").read_text()
    assert "Byte-by-byte Description of file: idual_master.dat" in readme
    assert "mag_auto_b" in readme and "Right Ascension" in readme
    folder = out_dir / "vizier" / "idual_master_0001"
    table = Table.read(folder / "idual_master.dat", format="ascii.cds",
                       readme=str(folder / "ReadMe"))
    assert table["ra"].unit == u.deg and len(table) == 80


def test_manifest_and_ready_marker(exported):
    _, out_dir = exported["idual_master"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["catalog"] == "idual_master" and manifest["rows"] == 150
    data = [f for f in manifest["files"] if f["kind"] == "data"]
    assert {f["format"] for f in data} == set(EXPORT_FORMATS)
    assert sum(f["rows"] for f in data if f["format"] == "vizier") == 150
    assert (out_dir / "READY").exists()
    reports = json.loads((out_dir / "check_report.json").read_text())
    assert len(reports) == len(data) and all(r["ok"] for r in reports)
    # files named as in the manifest, relative to the export folder that an archive receives
    assert [r["path"] for r in reports] == [f["path"] for f in data]


def test_a_failing_check_blocks_the_ready_marker(tmp_path):
    master = make_valid_catalog("idual_master", 30, seed=2)
    ids = master["coadd_object_id"].to_numpy().copy()
    ids[1] = ids[0]  # a duplicated identifier
    master = master.set_column(0, master.schema.field(0), pa.array(ids))
    pq.write_table(master, tmp_path / "master.parquet")
    with pytest.raises(StageError, match="coadd_object_id"):
        export_catalog(tmp_path / "master.parquet", tmp_path / "out", ("parquet", "csv"), SMALL)
    assert not (tmp_path / "out" / "READY").exists()


def test_tap_schema_sql_is_what_felis_load_tap_schema_dry_run_writes(tmp_path):
    result = CliRunner().invoke(felis_cli, [
        "--log-level", "WARNING", "load-tap-schema", "--dry-run", "--engine-url", "sqlite://",
        "--output-file", str(tmp_path / "cli.sql"), str(schema_path("idual_master"))])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.sql").read_text() == tap_schema_sql("idual_master")


def test_tap_schema_sql_lists_every_column():
    sql = tap_schema_sql("single_master")
    for name in catalog_schema("single_master").names:
        assert f"'ks4_dr1.single_master', '{name}'" in sql
    assert "INSERT INTO tables" in sql


@pytest.mark.parametrize("catalog", CATALOGS)
def test_felis_validate_passes(catalog):
    result = CliRunner().invoke(felis_cli, [
        "validate", "--check-description", "--check-tap-principal", "--check-tap-table-indexes",
        str(schema_path(catalog))])
    assert result.exit_code == 0, result.output


def test_schema_has_every_table3_column():
    bands = "bvri"
    per_band = ["mag_auto", "magerr_auto", "min_mjd", "max_mjd", "mean_mjd", "fwhm_image",
                "class_star", "flux_radius", "kron_radius", "flux_max", "theta_image",
                "ellipticity", "a_image", "b_image", "flags", "imaflags_iso", "ssflag",
                "sscount_30", "ndith", "edge"]
    per_band += [f"{p}{n}" for n in (3, 5, 10) for p in ("mag_aper", "magerr_aper")]
    expected = {"coadd_object_id", "ra", "dec", "healpix_index", "n_det", "glon", "glat",
                "ebmv_sfd"} | {f"{p}_{b}" for p in per_band for b in bands}
    for catalog in CATALOGS:
        names = set(catalog_schema(catalog).names)
        assert expected <= names
        assert names - expected == (set() if catalog == "idual_master" else {"raerr", "decerr"})


def test_export_settings_are_validated():
    with pytest.raises(ValueError, match="chunk_rows"):
        ExportSettings(chunk_rows=0)
    with pytest.raises(ValueError, match="part_rows"):
        ExportSettings(chunk_rows=10, part_rows=5)
    with pytest.raises(ValueError, match="formats"):
        export_catalog(None, None, ("hdf5",), SMALL)
