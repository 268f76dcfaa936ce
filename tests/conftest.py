"""Shared fixtures: where the read-only reference files of ``../shared`` are, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The KS4 team's public reference files, beside the repository (absent on some machines).
SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "kmtnet"


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
