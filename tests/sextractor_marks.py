"""Whether SExtractor (Debian ``source-extractor``, the parity yardstick) is installed here."""

from __future__ import annotations

import pytest

from ks4release.reduction.sextractor import SExtractorNotFound, find_sextractor

__all__ = ["has_sextractor", "needs_sextractor"]


def has_sextractor() -> bool:
    """True when a SExtractor binary is on the PATH."""
    try:
        find_sextractor()
    except SExtractorNotFound:
        return False
    return True


#: Skip a test that runs SExtractor where it is not installed.
needs_sextractor = pytest.mark.skipif(not has_sextractor(),
                                      reason="SExtractor (source-extractor) not installed")
