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
