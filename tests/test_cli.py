"""The command line end to end: simulate, build dr1, bad input, a killed build, help texts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from ks4release.cli import cli, main
from ks4release.errors import InputError
from ks4release.layout import mask_path, scaled_path
from ks4release.projection import unit_vectors
from ks4release.reduction.postprocess import PostprocessSettings
from ks4release.reduction.tile_catalog import run_tile_catalog
from ks4release.settings import MapSettings
from ks4release.simulate.sky import positions_at

#: A survey small enough for end-to-end tests: one tile, two bands, 1/16-size chips (the
#: smallest with enough Gaia XP stars per exposure for the zero points).
TINY = ["--tiles-ra", "1", "--tiles-dec", "1", "--bands", "VI", "--scale", "0.0625"]


def digests(root: Path, *, skip: tuple[str, ...] = ("logs", "work/stamps")) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path, leaving out ``skip``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(rel.startswith(s) for s in skip):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_survey(tmp_path_factory) -> Path:
    """A simulated one-tile survey, made once for the module (copied by tests that change it)."""
    directory = tmp_path_factory.mktemp("survey") / "demo"
    assert main(["simulate", str(directory), *TINY, "--local", "--no-progress"]) == 0
    return directory


def copy_of(survey: Path, tmp_path: Path) -> Path:
    """A private copy of the survey without build products."""
    target = tmp_path / "release"
    shutil.copytree(survey, target, ignore=shutil.ignore_patterns("work", "logs"))
    return target


def test_every_command_has_help(capsys):
    for args in (["--help"], ["simulate", "--help"], ["build", "--help"], ["build", "dr1", "--help"],
                 ["config", "--help"], ["config", "show", "--help"], ["config", "check", "--help"],
                 ["refcat", "--help"], ["refcat", "fetch", "--help"], ["refcat", "info", "--help"],
                 ["schema", "--help"], ["schema", "check", "--help"]):
        assert main(args) == 0, args
        assert "Usage:" in capsys.readouterr().out


def test_star_density_multiplies_the_simulated_stars(tiny_survey, tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "bad"), "--star-density", "0"]) == 2
    assert "--star-density" in capsys.readouterr().err
    dense = tmp_path / "dense"
    assert main(["simulate", str(dense), *TINY, "--bands", "I", "--star-density", "4",
                 "--no-progress"]) == 0
    stars = [int(np.sum(np.asarray(Table.read(d / "truth" / "sources.parquet")["type"])
                        == "star")) for d in (tiny_survey, dense)]
    # The forced bright star of each CCD is not multiplied.
    assert 3.5 < (stars[1] - 4) / (stars[0] - 4) < 4.5, stars


def test_simulated_survey_builds(tiny_survey, tmp_path, capsys):
    release = copy_of(tiny_survey, tmp_path)
    assert main(["build", "dr1", str(release), "--local", "--no-progress"]) == 0
    assert "build OK" in capsys.readouterr().err
    for band in "VI":
        inventory = Table.read(release / "work" / "0000.000-62" / band / "inventory.ecsv")
        raws = sorted((release / "raw" / "0000.000-62" / band).glob("*.fits"))
        assert len(inventory) == len(raws) >= 4
        assert np.all(np.diff(inventory["mjd"]) >= 0)
    # The tile's reference sources: every local row inside the footprint and margin, no other.
    for catalog in ("gaia_dr3", "gaia_xp"):
        tile_rows = Table.read(release / "work" / "refcat" / f"0000.000-62_{catalog}.parquet")
        all_rows = Table.read(release / "refcat" / f"{catalog}.parquet")
        assert 0 < len(tile_rows) <= len(all_rows)
        assert set(tile_rows["source_id"]) <= set(all_rows["source_id"])
        assert tile_rows.meta["tile"] == "0000.000-62"
    # Every stage ran: one co-add, mask and NDITH map per band.
    for band in "VI":
        for kind in ("coadd", "mask", "ndith"):
            assert (release / "images" / "0000.000-62" / f"0000.000-62_{band}_{kind}.fits").is_file()
        # the co-add used the crosstalk victims the scale stage corrected; its mask has DR1's
        # bits only (the internal XTALK_CORRECTED stays in the exposure masks)
        mask = fits.getdata(release / "images" / "0000.000-62" / f"0000.000-62_{band}_mask.fits")
        assert mask.any() and not np.any(mask & ~np.uint8(15))
    for stem in Table.read(release / "truth" / "exposures.parquet")["stem"]:
        with fits.open(scaled_path(release, stem)) as scaled, \
                fits.open(mask_path(release, stem)) as masks:
            for hdu in scaled[1:]:
                assert hdu.header["XTCORR"] is masks[hdu.name].header["XTCORR"] is True
    # ... then the tile catalogs, their maps, both release catalogs and their checked exports.
    tile = "0000.000-62"
    for name in (f"{tile}_dual", f"{tile}_single_v", f"{tile}_single_i"):
        catalog = pq.read_table(release / "catalogs" / "tiles" / f"{name}.parquet")
        column = "mag_auto_i" if "dual" in name else f"mag_auto_{name[-1]}"
        assert catalog.num_rows > 50
        assert catalog.schema.field(column).metadata[b"unit"] == b"mag"
    for band in "VI":
        assert (release / "maps" / tile / f"zp_map_{tile}_{band}_dual_APER5.npy").is_file()
        # the Kron loss correction models the PSF with the co-add's measured Moffat index
        header = fits.getheader(release / "images" / tile / f"{tile}_{band}_coadd.fits")
        summary = json.loads((release / "work" / "catalog" / f"{tile}_single_{band}_summary.json")
                             .read_text())
        assert summary["bands"][band]["kron_loss"]["psf_beta"] == header["PSFBETA"]
        _check_position_errors(release, tile, band.lower(), summary["astrometric_floor"])
        # the sites' colour terms came out of the sources, for the maps and the catalog alike
        exposures_json = json.loads((release / "images" / tile / f"{tile}_{band}_exposures.json")
                                    .read_text())
        terms = {e["stem"]: e["colour_term"] for e in exposures_json["exposures"] if e["ok"]}
        sidecar = json.loads((release / "maps" / tile / f"zp_tile_{tile}_{band}_single.json")
                             .read_text())["site_colour_correction"]
        done = summary["bands"][band]["site_colour_correction"]
        assert sidecar["applied"] and done["applied"] and done["colour_terms"] == terms
        assert done["n_corrected"] > 0.5 * done["n_sources"]
    for catalog in ("idual_master", "single_master"):
        assert (release / "catalogs" / f"{catalog}.parquet").is_file()
        assert (release / "export" / catalog / "READY").is_file()
    # The zero points are departures from the site pattern fitted from every exposure.
    pattern = Table.read(release / "work" / "photometry" / "site_pattern.ecsv")
    exposures = Table.read(release / "truth" / "exposures.parquet")
    assert pattern.meta["exposures"] == {s: int(np.sum(exposures["site"] == s))
                                         for s in set(exposures["site"])}
    zp = Table.read(release / "work" / "photometry" / f"{exposures['stem'][0]}_zp.ecsv")
    assert zp.meta["site_pattern"] is True and zp.meta["apcorr"] == pytest.approx(
        pattern.meta["aperture_corrections"][str(exposures["band"][0])][0])
    # A second build has nothing to do, also once the release has moved to another folder: the
    # exposures are read where they are now, not where ingest found them.
    stamps = digests(release / "work" / "stamps", skip=())
    moved = release.rename(tmp_path / "moved")
    assert main(["build", "dr1", str(moved), "--local", "--no-progress"]) == 0
    assert "build OK" in capsys.readouterr().err
    assert digests(moved / "work" / "stamps", skip=()) == stamps
    assert len(list((moved / "logs").glob("build-*.log"))) == 2
    # maps made on colour-corrected fluxes cannot calibrate sources that cannot be corrected
    dual = moved / "work" / "catalog" / f"{tile}_dual_measured.parquet"
    dual.rename(dual.with_suffix(".moved"))
    with pytest.raises(InputError, match=f"zp_tile_{tile}_V_single.json.*cannot be corrected"):
        run_tile_catalog(release_dir=moved, tile=tile, mode="single", bands=("V",),
                         settings=PostprocessSettings(), map_settings=MapSettings())
    # a noise calibration left by an earlier build is not applied once the release stops
    # calibrating (auto_noise_runs = 0)
    dual.with_suffix(".moved").rename(dual)
    summary_file = moved / "work" / "catalog" / f"{tile}_single_I_summary.json"
    assert json.loads(summary_file.read_text())["bands"]["I"]["kron_loss"]["auto_noise_k"] > 0
    run_tile_catalog(release_dir=moved, tile=tile, mode="single", bands=("I",),
                     settings=PostprocessSettings(), map_settings=MapSettings(), auto_noise=False)
    assert json.loads(summary_file.read_text())["bands"]["I"]["kron_loss"]["auto_noise_k"] is None


def _check_position_errors(release: Path, tile: str, b: str, floor: dict) -> None:
    """RAERR/DECERR (pixel noise plus the astrometric floor) describe how far bright stars lie
    from their true positions at the catalog's epoch; without the floor, S/N > 50 stars
    scattered by 2-3 times their errors."""
    assert floor["n_stars"] >= 10 and 0.0 <= floor["floor_arcsec"] < 0.02, floor
    catalog = pq.read_table(release / "catalogs" / "tiles" / f"{tile}_single_{b}.parquet")
    cols = {n: catalog.column(n).to_numpy() for n in
            ("ra", "dec", "raerr", "decerr", f"snr_{b}", f"flags_{b}", f"mean_mjd_{b}")}
    keep = (cols[f"snr_{b}"] > 50) & (cols[f"flags_{b}"] == 0)
    bright = {n: v[keep] for n, v in cols.items()}
    truth = Table.read(release / "truth" / "sources.parquet")
    ra, dec = positions_at(truth, float(np.median(bright[f"mean_mjd_{b}"])))
    tree = cKDTree(unit_vectors(ra, dec))
    dist, i = tree.query(unit_vectors(bright["ra"], bright["dec"]))
    star = (dist < np.radians(0.5 / 3600.0)) & (np.asarray(truth["type"])[i] == "star")
    z = np.concatenate([
        ((np.asarray(bright["ra"]) - ra[i]) * np.cos(np.radians(dec[i])))[star] * 3600.0
        / np.asarray(bright["raerr"])[star],
        (np.asarray(bright["dec"]) - dec[i])[star] * 3600.0 / np.asarray(bright["decerr"])[star]])
    assert star.sum() >= 15
    assert 0.6 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.6


def break_exposures(release: Path) -> dict[str, str]:
    """Add three broken exposures; returns file name -> what the error must say."""
    raw = sorted((release / "raw" / "0000.000-62" / "V").glob("*.fits"))[0]
    folder = release / "raw" / "0000.000-62" / "V"
    (folder / "garbage.fits").write_bytes(b"this is not a FITS file" * 200)
    with fits.open(raw) as hdul:
        del hdul["NN"]
        hdul.writeto(folder / "no_nn.fits")
    with fits.open(raw) as hdul:
        hdul[0].header["FILTER"] = "Z"
        hdul.writeto(folder / "filter_z.fits")
    return {
        "garbage.fits": "not a readable FITS file",
        "no_nn.fits": "extension 'NN' is missing",
        "filter_z.fits": "FILTER 'Z' is not a KS4 band",
    }


def test_bad_exposures_are_named_and_the_rest_is_built(tiny_survey, tmp_path, capsys):
    release = copy_of(tiny_survey, tmp_path)
    expected = break_exposures(release)
    assert main(["build", "dr1", str(release), "--local", "--no-progress"]) == 1
    err = capsys.readouterr().err
    for name, message in expected.items():
        assert name in err and message in err, (name, err)
    # Nothing else is lost: both bands are inventoried from their valid exposures.
    for band in "VI":
        inventory = Table.read(release / "work" / "0000.000-62" / band / "inventory.ecsv")
        assert not any(Path(f).name in expected for f in inventory["file"])
        assert len(inventory) >= 4
    # Once the bad files are gone the rerun is clean and redoes only what they touched.
    for name in expected:
        (release / "raw" / "0000.000-62" / "V" / name).unlink()
    assert main(["build", "dr1", str(release), "--local", "--no-progress"]) == 0


def test_misspelt_config_key_is_named(tiny_survey, tmp_path, capsys):
    release = copy_of(tiny_survey, tmp_path)
    config = release / "release.toml"
    config.write_text(config.read_text().replace("[engine]\n", "[engine]\nworkrs = 2\n"))
    assert main(["build", "dr1", str(release), "--local"]) == 2
    err = capsys.readouterr().err
    assert "engine.workrs" in err and "did you mean 'workers'" in err
    assert main(["config", "check", str(release)]) == 2
    assert not (release / "work").exists()


def test_config_show_is_a_valid_default_config(tmp_path, capsys):
    assert main(["config", "show"]) == 0
    (tmp_path / "release.toml").write_text(capsys.readouterr().out)
    assert main(["config", "check", str(tmp_path / "release.toml")]) == 0


def test_simulation_on_a_cluster_equals_the_local_one(tiny_survey, tmp_path):
    """Same seed, different execution (2 Dask worker processes): byte-identical files."""
    other = tmp_path / "cluster"
    assert main(["simulate", str(other), *TINY, "--workers", "2", "--no-progress"]) == 0
    assert digests(other) == digests(tiny_survey)


def _ks4release(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ks4release.cli import main; sys.exit(main())",
            *args]


@pytest.mark.slow
def test_killed_simulation_and_build_resume_to_the_same_files(tiny_survey, tmp_path):
    """SIGKILL a simulate+build in the middle; the rerun finishes with identical outputs."""
    release = tmp_path / "killed"
    stamps = release / "work" / "stamps" / "simulate-exposures"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_ks4release("simulate", str(release), *TINY, "--local",
                                        "--no-progress"),
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if stamps.is_dir() and len(list(stamps.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the simulation ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(stamps.glob("*.json")))
    assert 3 <= n_done < 8
    assert not (release / "release.toml").exists(), "an unfinished survey must not look finished"

    assert main(["simulate", str(release), *TINY, "--local", "--no-progress"]) == 0
    assert digests(release, skip=("logs", "work")) == digests(tiny_survey, skip=("logs", "work"))
    assert not [p for p in release.rglob(".*") if ".tmp" in p.name]


def test_cli_group_lists_only_working_commands():
    assert sorted(cli.commands) == ["build", "config", "refcat", "schema", "simulate"]
