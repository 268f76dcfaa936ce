"""The astrometric floor of co-add position errors, on catalogs with a known floor."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.reduction.astrometric_floor import MAX_FLOOR_ARCSEC, astrometric_floor


def _field(n: int, floor: float, seed: int, pm_mas_yr: float = 0.0, years: float = 0.0
           ) -> tuple[Table, dict[str, np.ndarray]]:
    """Gaia stars at 2016.0 and a catalog of them observed ``years`` later: per-axis noise of
    the reported errors (2-20 mas) plus ``floor`` arcsec."""
    rng = np.random.default_rng(seed)
    ra = 10.0 + rng.uniform(-0.1, 0.1, n)
    dec = -60.0 + rng.uniform(-0.1, 0.1, n)
    pmra = rng.normal(0.0, pm_mas_yr, n) if pm_mas_yr else np.zeros(n)
    pmdec = rng.normal(0.0, pm_mas_yr, n) if pm_mas_yr else np.zeros(n)
    gaia = Table({"ra": ra, "dec": dec, "ra_error": np.full(n, 0.05),
                  "dec_error": np.full(n, 0.05), "pmra": pmra, "pmdec": pmdec,
                  "parallax": np.full(n, 0.5), "ref_epoch": np.full(n, 2016.0)})
    err = rng.uniform(0.002, 0.02, n)
    dra = (pmra * years / 3.6e6 + (rng.normal(0, 1, n) * np.hypot(err, floor)) / 3600.0) \
        / np.cos(np.radians(dec))
    ddec = pmdec * years / 3.6e6 + rng.normal(0, 1, n) * np.hypot(err, floor) / 3600.0
    cat = {"ra": ra + dra, "dec": dec + ddec, "raerr": err, "decerr": err,
           "usable": np.ones(n, bool)}
    return gaia, cat


def _floor(gaia: Table, cat: dict, epoch: float = 2016.0, min_stars: int = 10):
    return astrometric_floor(cat["ra"], cat["dec"], cat["raerr"], cat["decerr"], cat["usable"],
                             gaia, epoch=epoch, min_stars=min_stars)


@pytest.mark.parametrize("true_floor", [0.005, 0.01, 0.03])
def test_a_known_floor_is_recovered(true_floor):
    gaia, cat = _field(2000, true_floor, seed=1)
    result = _floor(gaia, cat)
    assert result.n_stars == 2000 and result.reason == ""
    assert result.floor_arcsec == pytest.approx(true_floor, rel=0.2)


def test_errors_that_are_right_get_no_floor():
    gaia, cat = _field(2000, 0.0, seed=2)
    assert _floor(gaia, cat).floor_arcsec < 0.002


def test_gaia_is_moved_to_the_catalog_epoch():
    """Stars moving 20 mas/yr for 6 years would read as a 0.1" floor at Gaia's epoch."""
    gaia, cat = _field(2000, 0.01, seed=3, pm_mas_yr=20.0, years=6.0)
    assert _floor(gaia, cat, epoch=2022.0).floor_arcsec == pytest.approx(0.01, rel=0.2)
    assert _floor(gaia, cat, epoch=2016.0).floor_arcsec > 0.05


def test_too_few_stars_give_no_floor_and_say_why():
    gaia, cat = _field(30, 0.02, seed=4)
    cat["usable"][5:] = False
    result = _floor(gaia, cat)
    assert result.floor_arcsec == 0.0 and result.n_stars == 5
    assert "5 Gaia-matched bright stars (need 10)" in result.reason
    empty = _floor(gaia[:0], cat)
    assert empty.floor_arcsec == 0.0 and "no Gaia star" in empty.reason


@settings(max_examples=25, deadline=None)
@given(true_floor=st.floats(0.0, 0.05), seed=st.integers(0, 10_000))
def test_the_floor_makes_the_residuals_consistent_with_the_errors(true_floor, seed):
    gaia, cat = _field(400, true_floor, seed=seed)
    floor = _floor(gaia, cat).floor_arcsec
    assert 0.0 <= floor <= MAX_FLOOR_ARCSEC
    d = np.concatenate([(cat["ra"] - gaia["ra"]) * np.cos(np.radians(gaia["dec"])),
                        cat["dec"] - gaia["dec"]]) * 3600.0
    err = np.concatenate([np.hypot(cat["raerr"], 5e-5), np.hypot(cat["decerr"], 5e-5)])
    z = d / np.hypot(err, floor)
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    assert robust <= 1.0 + 1e-6
    if floor > 0:
        assert robust == pytest.approx(1.0, abs=1e-3)
