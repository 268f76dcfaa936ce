"""Shared fixtures: where the read-only reference files of ``../shared`` are, when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import sep

#: The KS4 team's public reference files, beside the repository (absent on some machines).
SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "kmtnet"

#: sep's process-wide extraction limits as the library starts (pixel stack, sub-objects).
_SEP_LIMITS = (sep.get_extract_pixstack(), sep.get_sub_object_limit())


def pytest_runtest_setup(item: pytest.Item) -> None:
    """sep's limits back to the library's defaults before each test and its fixtures: the
    pipeline sizes them to each image it extracts (an extraction on a small stamp leaves a stack
    of the stamp's size), and a test calling ``sep.extract`` itself must not depend on which test
    ran before (tests/test_calibration_maps.py failed after tests/test_detect.py)."""
    sep.set_extract_pixstack(_SEP_LIMITS[0])
    sep.set_sub_object_limit(_SEP_LIMITS[1])


@pytest.fixture(scope="session")
def kmtnet_reference() -> Path:
    """Folder of the KS4 reference files; skips the test when it is absent."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference files not found at {SHARED_REFERENCE}")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory) -> Path:
    """A simulated one-tile survey in V and I at 1/16 scale, made once per test session.

    Read-only: a test that changes files copies it first (``shutil.copytree``). Its truth is in
    ``truth/`` (see the README's "The demo survey").
    """
    from ks4release.simulate import SimulationConfig, simulate_survey

    directory = tmp_path_factory.mktemp("tiny_survey") / "survey"
    simulate_survey(SimulationConfig(n_tiles_ra=1, n_tiles_dec=1, bands=("V", "I")), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_coadds(tiny_survey, tmp_path_factory) -> dict:
    """The V and I co-adds of ``tiny_survey``'s tile, made once per session (~40 s).

    Built by the co-add stage from exposures scaled with the true zero points and masked with
    the truth's DR1 bits (``truth_release.write_scaled_from_truth``), backgrounds matched as in
    the demo's release.toml (I_04's stray-light ring would otherwise show wherever masked pixels
    of two other exposures leave a median of two), so that tests of
    detection, photometry, maps and post-processing measure their own stage against truth.
    Read-only. Keys: ``survey``, ``release`` (folders), ``tile``, ``ra``, ``dec``, ``bands``,
    ``stems`` (band -> exposure stems), ``refcat`` (catalog name -> Parquet file of the
    survey's reference catalog: gaia_dr3, gaia_xp, delve_dr2).
    """
    from truth_release import write_scaled_from_truth

    from ks4release.layout import mask_path, scaled_path
    from ks4release.reduction.coadd import CoaddSettings, run_coadd

    release = tmp_path_factory.mktemp("tiny_coadds") / "release"
    tile, ra, dec = "0000.000-62", 0.0, -62.0
    stems = {}
    for band in ("V", "I"):
        stems[band] = write_scaled_from_truth(tiny_survey, release, band)
        run_coadd(tile=tile, band=band, ra=ra, dec=dec,
                  scaled=[scaled_path(release, s) for s in stems[band]],
                  masks=[mask_path(release, s) for s in stems[band]], release_dir=release,
                  settings=CoaddSettings(nthreads=2, background_match=True))
    refcat = {name: tiny_survey / "refcat" / f"{name}.parquet"
              for name in ("gaia_dr3", "gaia_xp", "delve_dr2")}
    return {"survey": tiny_survey, "release": release, "tile": tile, "ra": ra, "dec": dec,
            "bands": ("V", "I"), "stems": stems, "refcat": refcat}
