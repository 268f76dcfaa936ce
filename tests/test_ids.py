"""The coadd_object_id codec: Gaia's source_id scheme with level-12 nested HEALPix cells."""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.ids import (
    ID_SHIFT,
    MAX_RUNNING_NUMBER,
    N_CELLS,
    decode_ids,
    encode_ids,
    healpix_index,
    running_numbers,
)

cells_st = st.integers(min_value=0, max_value=N_CELLS - 1)
numbers_st = st.integers(min_value=0, max_value=MAX_RUNNING_NUMBER)


@settings(deadline=None)  # timing varies on a shared machine
@given(st.lists(st.tuples(cells_st, numbers_st), min_size=1, max_size=50))
def test_codec_round_trips(pairs):
    cells = np.array([c for c, _ in pairs], dtype=np.int64)
    numbers = np.array([n for _, n in pairs], dtype=np.int64)
    ids = encode_ids(cells, numbers)
    assert ids.dtype == np.int64 and np.all(ids >= 0)
    back_cells, back_numbers = decode_ids(ids)
    np.testing.assert_array_equal(back_cells, cells)
    np.testing.assert_array_equal(back_numbers, numbers)
    np.testing.assert_array_equal(ids >> ID_SHIFT, cells)


@settings(deadline=None)  # timing varies on a shared machine
@given(st.tuples(cells_st, numbers_st), st.tuples(cells_st, numbers_st))
def test_ids_order_by_cell_then_number(a, b):
    id_a, id_b = encode_ids(np.array([a[0], b[0]]), np.array([a[1], b[1]]))
    assert (id_a < id_b) == (a < b)


def test_codec_refuses_out_of_range():
    with pytest.raises(ValueError, match="HEALPix index"):
        encode_ids(np.array([N_CELLS]), np.array([0]))
    with pytest.raises(ValueError, match="running number"):
        encode_ids(np.array([0]), np.array([MAX_RUNNING_NUMBER + 1]))


@settings(deadline=None)  # timing varies on a shared machine
@given(st.floats(0, 360, exclude_max=True), st.floats(-90, 90))
def test_healpix_index_is_order12_nested(ra, dec):
    expected = hp.ang2pix(4096, ra, dec, nest=True, lonlat=True)
    assert healpix_index(np.array([ra]), np.array([dec]))[0] == expected


def test_gaia_example():
    # Gaia: source_id // 2**35 is the level-12 nested HEALPix index.
    cell = int(healpix_index(np.array([266.4168]), np.array([-29.0078]))[0])
    oid = int(encode_ids(np.array([cell]), np.array([7]))[0])
    assert oid // 2**35 == cell and oid % 2**35 == 7


def test_running_numbers_count_within_cells():
    np.testing.assert_array_equal(running_numbers(np.array([3, 3, 5, 9, 9, 9])),
                                  [0, 1, 0, 0, 1, 2])
    with pytest.raises(ValueError, match="sorted"):
        running_numbers(np.array([5, 3]))
