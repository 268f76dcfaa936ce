"""Reference-catalog formats: local Parquet and FITS files read with units, bad files named."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.table import MaskedColumn, Table

from ks4release.errors import InputError
from ks4release.refcat.formats import (
    DELVE_DR2,
    GAIA_DR3,
    GAIA_XP,
    REFCAT_FORMATS,
    read_refcat,
    refcat_format,
)


def _gaia(n=5, seed=1) -> Table:
    rng = np.random.default_rng(seed)
    return Table({
        "source_id": np.arange(n, dtype=np.int64) + 4_000_000_000_000_000_000,
        "ra": rng.uniform(359.0, 359.99, n),
        "dec": rng.uniform(-63.0, -61.0, n),
        "phot_g_mean_mag": rng.uniform(12, 19, n).astype(np.float32),
        "pmra": rng.normal(0, 5, n),
        "extra_column": np.zeros(n),
    })


@pytest.mark.parametrize("suffix", [".parquet", ".fits"])
def test_gaia_roundtrip_with_units(tmp_path, suffix):
    table = _gaia()
    path = tmp_path / f"gaia{suffix}"
    table.write(path)
    out = read_refcat(path, "gaia_dr3")
    assert out.colnames == ["source_id", "ra", "dec", "phot_g_mean_mag", "pmra"]
    assert out["ra"].unit == u.deg and out["pmra"].unit == u.mas / u.yr
    assert out["phot_g_mean_mag"].unit == u.mag
    assert out["source_id"].dtype == np.int64
    np.testing.assert_array_equal(out["source_id"], table["source_id"])
    np.testing.assert_allclose(out["dec"], table["dec"])
    assert out.meta["archive_table"] == "gaiadr3.gaia_source"
    assert out["ra"].description


def test_case_insensitive_names_and_unit_conversion(tmp_path):
    table = _gaia()
    table.rename_columns(["ra", "dec", "source_id"], ["RA", "Dec", "SOURCE_ID"])
    table["RA"].unit = u.arcmin
    table["RA"] = table["RA"] * 60.0
    path = tmp_path / "upper.fits"
    table.write(path)
    out = read_refcat(path, GAIA_DR3)
    assert {"ra", "dec", "source_id"} <= set(out.colnames)
    np.testing.assert_allclose(out["ra"], _gaia()["ra"])


def test_xp_and_delve_formats(tmp_path):
    n = 4
    xp = Table({f"{b}_jkc_mag": np.full(n, 15.0) for b in "bvri"})
    xp["source_id"] = np.arange(n)
    xp["b_jkc_flag"] = np.ones(n, dtype=np.int16)
    xp.write(tmp_path / "xp.parquet")
    out = read_refcat(tmp_path / "xp.parquet", GAIA_XP)
    assert out.colnames[0] == "source_id" and "ra" not in out.colnames
    assert out["b_jkc_flag"].dtype == np.int64
    delve = Table({"ra": [10.0, 20.0], "dec": [-50.0, -51.0],
                   **{f"mag_auto_{b}": [20.0, 21.0] for b in "griz"}})
    delve["extended_class_g"] = MaskedColumn([0, 3], mask=[False, True])
    delve.write(tmp_path / "delve.parquet")
    out = read_refcat(tmp_path / "delve.parquet", DELVE_DR2)
    assert out["mag_auto_z"].unit == u.mag
    assert out["extended_class_g"].mask.tolist() == [False, True]


def test_formats_are_data():
    assert set(REFCAT_FORMATS) == {"gaia_dr3", "gaia_xp", "delve_dr2"}
    assert GAIA_XP.required == ("source_id", "b_jkc_mag", "v_jkc_mag", "r_jkc_mag", "i_jkc_mag")
    assert DELVE_DR2.column("MAG_AUTO_G").unit == "mag"
    for fmt in REFCAT_FORMATS.values():
        for col in fmt.columns:
            if col.unit:
                u.Unit(col.unit)  # every unit string parses
            assert col.description
    with pytest.raises(ValueError, match="unknown reference catalog"):
        refcat_format("sdss")


def test_missing_required_column(tmp_path):
    table = _gaia()
    del table["phot_g_mean_mag"]
    path = tmp_path / "nomag.parquet"
    table.write(path)
    with pytest.raises(InputError, match=r"nomag.parquet: required column 'phot_g_mean_mag'") as e:
        read_refcat(path, "gaia_dr3")
    assert e.value.column == "phot_g_mean_mag"


@pytest.mark.parametrize("bad, fragment", [
    (360.0, "out of range (first: 360.0 at row 2"),
    (-0.5, "out of range"),
    (np.nan, "non-finite"),
])
def test_bad_ra_is_named(tmp_path, bad, fragment):
    table = _gaia()
    table["ra"][2] = bad
    path = tmp_path / "badra.fits"
    table.write(path)
    with pytest.raises(InputError, match=r"badra.fits: column 'ra'") as e:
        read_refcat(path, "gaia_dr3")
    assert fragment in str(e.value) and e.value.column == "ra"


def test_bad_dec_and_null_ra(tmp_path):
    table = _gaia()
    table["dec"][0] = -91.0
    table.write(tmp_path / "baddec.parquet")
    with pytest.raises(InputError, match=r"column 'dec' has 1 value\(s\) out of range"):
        read_refcat(tmp_path / "baddec.parquet", "gaia_dr3")
    table = _gaia()
    table["ra"] = MaskedColumn(table["ra"], mask=[False, True, False, False, False])
    table.write(tmp_path / "nullra.parquet")
    with pytest.raises(InputError, match=r"column 'ra' has 1 null or non-finite"):
        read_refcat(tmp_path / "nullra.parquet", "gaia_dr3")


def test_wrong_type_is_named(tmp_path):
    table = _gaia()
    table["source_id"] = table["source_id"].astype(float)
    table.write(tmp_path / "floatid.parquet")
    with pytest.raises(InputError, match=r"'source_id' has dtype float64 \(expected integer\)"):
        read_refcat(tmp_path / "floatid.parquet", "gaia_dr3")
    table = _gaia()
    table["dec"] = np.array(["x"] * len(table))
    table.write(tmp_path / "strdec.fits")
    with pytest.raises(InputError, match=r"strdec.fits: column 'dec' has dtype .*expected float"):
        read_refcat(tmp_path / "strdec.fits", "gaia_dr3")


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"junk.parquet: not a readable parquet table"):
        read_refcat(tmp_path / "junk.parquet", "gaia_dr3")
    (tmp_path / "cat.csv").write_text("ra,dec\n")
    with pytest.raises(InputError, match=r"cat.csv: unknown table file type"):
        read_refcat(tmp_path / "cat.csv", "gaia_dr3")
    with pytest.raises(InputError, match="does not exist"):
        read_refcat(tmp_path / "gone.fits", "gaia_dr3")


def test_columns_differing_only_in_case(tmp_path):
    table = _gaia()
    table["RA"] = table["ra"]
    table.write(tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="differ only in case"):
        read_refcat(tmp_path / "dup.parquet", "gaia_dr3")
