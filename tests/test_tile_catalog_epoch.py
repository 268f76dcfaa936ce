"""The tile catalog matches detections to reference stars where the co-add saw them: the
reference catalogs' proper motions carry them to the co-add's mean epoch (MJD-MEAN)."""

from __future__ import annotations

import math

import numpy as np
from astropy import units as u
from astropy.table import Table

from ks4release.projection import unit_vectors
from ks4release.reduction.postprocess import PostprocessSettings, flag_spurious
from ks4release.reduction.tile_catalog import _at_epoch


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    a, b = unit_vectors(np.array([ra1]), np.array([dec1]))[0], \
        unit_vectors(np.array([ra2]), np.array([dec2]))[0]
    return math.degrees(2 * math.asin(min(1.0, np.linalg.norm(a - b) / 2))) * 3600


def _gaia() -> Table:
    """A fast star (0.8"/yr towards the south) among slow ones, at Gaia DR3's epoch."""
    n = 12
    rng = np.random.default_rng(3)
    table = Table({"ra": 10.0 + rng.uniform(-0.02, 0.02, n),
                   "dec": -60.0 + rng.uniform(-0.01, 0.01, n),
                   "pmra": np.zeros(n), "pmdec": np.zeros(n), "parallax": np.full(n, 1.0)})
    table["pmdec"][0] = -800.0
    table["ra"].unit = table["dec"].unit = u.deg
    table["pmra"].unit = table["pmdec"].unit = u.mas / u.yr
    return table


def test_fast_star_is_matched_at_the_coadd_epoch_not_gaias():
    gaia = _gaia()
    moved = _at_epoch({"gaia_dr3": gaia}, 2020.0, "T")["gaia_dr3"]
    shift = _separation_arcsec(gaia["ra"][0], gaia["dec"][0], moved["ra"][0], moved["dec"][0])
    assert abs(shift - 3.2) < 0.01
    assert _separation_arcsec(gaia["ra"][1], gaia["dec"][1], moved["ra"][1],
                              moved["dec"][1]) < 1e-6
    # Detections where the co-add saw the stars in 2020, plus a second copy of the fast star
    # so that DBSCAN (min_samples 2) would call an unmatched fast star spurious.
    detections = Table({"ra": np.r_[np.asarray(moved["ra"]), moved["ra"][0] + 2e-5],
                        "dec": np.r_[np.asarray(moved["dec"]), moved["dec"][0]]})
    settings = PostprocessSettings()
    kept, _ = flag_spurious(detections, [(moved["ra"], moved["dec"])], "i", settings)
    assert len(kept) == len(detections)
    lost, _ = flag_spurious(detections, [(gaia["ra"], gaia["dec"])], "i", settings)
    assert len(lost) == len(detections) - 2


def test_without_an_epoch_the_references_stay_as_they_are(caplog):
    gaia = _gaia()
    same = _at_epoch({"gaia_dr3": gaia}, None, "0001.004-62")
    assert same["gaia_dr3"] is gaia
    assert "0001.004-62" in caplog.text and "MJD-MEAN" in caplog.text
