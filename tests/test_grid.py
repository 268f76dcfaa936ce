"""The tile grid generated in code against the KS4 team's kmtnet_grid.fits."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given
from hypothesis import strategies as st

from ks4release import grid


@pytest.fixture(scope="module")
def reference_grid(kmtnet_reference):
    with fits.open(kmtnet_reference / "kmtnet_grid.fits") as hdul:
        return hdul[1].data.copy()


def test_all_centres_match_the_reference_grid(reference_grid):
    table = grid.grid_table()
    assert len(table) == len(reference_grid) == 8335
    assert np.array_equal(np.asarray(table["index"]), reference_grid["field_name1"])
    np.testing.assert_allclose(np.asarray(table["ra"]), reference_grid["ra[deg]"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(table["dec"]), reference_grid["dec[deg]"], rtol=0, atol=1e-6)


def test_survey_field_names_match_the_reference_grid(reference_grid):
    names = np.asarray(grid.grid_table()["field_name"])
    expected = np.char.strip(reference_grid["field_name2"].astype(str))
    n = grid.N_SURVEY_FIELDS
    assert np.array_equal(names[:n], expected[:n])


def test_northern_names_differ_only_at_exact_integer_ra(reference_grid):
    """North of -30 the original truncated RAs that its arithmetic left 1e-14 below an integer."""
    n = grid.N_SURVEY_FIELDS
    names = np.asarray(grid.grid_table()["field_name"])[n:]
    expected = np.char.strip(reference_grid["field_name2"].astype(str))[n:]
    ra = reference_grid["ra[deg]"][n:]
    differ = names != expected
    assert np.all(np.abs(ra[differ] - np.round(ra[differ])) < 1e-9)
    assert differ.sum() <= 10


def test_dr1_example_tile():
    tile = grid.tile_by_name("0376.321-70")
    assert tile.index == 376
    assert tile.ra_deg == pytest.approx(321.23, abs=0.01)
    assert tile.dec_deg == -70.0
    assert grid.tile_by_name("0376") == tile


@pytest.mark.parametrize("bad", ["0376.322-70", "9999", "banana", "12345.000-62"])
def test_bad_tile_names_are_rejected_with_the_name(bad):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        grid.tile_by_name(bad)


def test_survey_tiles_are_south_of_minus_30():
    tiles = grid.survey_tiles()
    assert len(tiles) == grid.N_SURVEY_FIELDS
    assert max(t.dec_deg for t in tiles) == -30.0


def test_neighbour_block_is_adjacent():
    anchor = grid.tile_by_name("0000.000-62")
    names = [t.name for t in grid.neighbour_tiles(anchor, 2, 2)]
    assert names == ["0000.000-62", "0001.004-62", "0088.000-64", "0089.004-64"]


@given(st.integers(min_value=0, max_value=grid.N_SURVEY_FIELDS - 1))
def test_every_survey_tile_name_round_trips(index):
    tile = grid.survey_tiles()[index]
    assert grid.tile_by_name(tile.name) == tile


def test_adjacent_tiles_overlap_like_ks4():
    """Neighbouring fields in one band are closer than the 2-degree camera field."""
    table = grid.grid_table()
    band = table[np.asarray(table["dec"]) == -62.0]
    step = np.diff(np.asarray(band["ra"]))[0] * np.cos(np.radians(62.0))
    assert 1.8 < step < 2.0
