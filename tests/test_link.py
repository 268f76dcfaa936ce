"""Cross-tile linking, the band merge and DR1's aggregation rules (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.publish.aggregate import aggregate_groups, weighted_median
from ks4release.publish.bandmerge import merge_bands
from ks4release.publish.link import (
    link_detections,
    match_nearest,
    mean_positions,
    merge_disjoint_groups,
)
from ks4release.tile_catalogs import BANDS, band_columns

ARCSEC = 1.0 / 3600.0


def _partition(labels: np.ndarray, keys: np.ndarray) -> set[frozenset]:
    groups: dict[int, set] = {}
    for label, key in zip(labels, keys, strict=True):
        groups.setdefault(int(label), set()).add(int(key))
    return {frozenset(g) for g in groups.values()}


@st.composite
def detections(draw):
    """Clusters of detections near a few sources on a few tiles (offsets up to ~0.7")."""
    n_sources = draw(st.integers(1, 6))
    rows = []
    for s in range(n_sources):
        ra0 = 150.0 + draw(st.integers(0, 3)) * 1.5 * ARCSEC
        dec0 = -30.0 + s * 1.2 * ARCSEC
        for tile in draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)):
            dx = draw(st.floats(-0.35, 0.35)) * ARCSEC
            dy = draw(st.floats(-0.35, 0.35)) * ARCSEC
            rows.append((ra0 + dx, dec0 + dy, tile))
    arr = np.array(rows)
    return arr[:, 0], arr[:, 1], arr[:, 2].astype(int)


@settings(max_examples=60, deadline=None)
@given(detections(), st.randoms(use_true_random=False))
def test_linking_is_invariant_under_row_and_tile_permutation(data, rnd):
    ra, dec, tile = data
    base = _partition(link_detections(ra, dec, tile, 0.5), np.arange(len(ra)))
    order = np.array(rnd.sample(range(len(ra)), len(ra)))
    tile_map = np.array(rnd.sample(range(4), 4))
    permuted = link_detections(ra[order], dec[order], tile_map[tile[order]], 0.5)
    assert _partition(permuted, order) == base


def _two_pass(ra, dec, tile):
    return merge_disjoint_groups(ra, dec, link_detections(ra, dec, tile, 0.5), tile, 1.0)


@settings(max_examples=60, deadline=None)
@given(detections(), st.randoms(use_true_random=False))
def test_second_pass_is_invariant_and_never_joins_one_tile_twice(data, rnd):
    ra, dec, tile = data
    labels = _two_pass(ra, dec, tile)
    base = _partition(labels, np.arange(len(ra)))
    order = np.array(rnd.sample(range(len(ra)), len(ra)))
    tile_map = np.array(rnd.sample(range(4), 4))
    permuted = _two_pass(ra[order], dec[order], tile_map[tile[order]])
    assert _partition(permuted, order) == base
    # the first pass's groups are kept whole, and a joined group holds a tile at most as
    # often as the first pass's groups it joined did
    first = link_detections(ra, dec, tile, 0.5)
    for group in set(first.tolist()):
        assert len(set(labels[first == group].tolist())) == 1
    for group in set(labels.tolist()):
        members = first[labels == group]
        parts = [tile[first == g] for g in set(members.tolist())]
        assert sum(len(set(p.tolist())) for p in parts) == len(set(tile[labels == group]))
    # the rounds run until nothing is left to join: another pass changes nothing
    again = merge_disjoint_groups(ra, dec, labels, tile, 1.0)
    assert _partition(again, np.arange(len(ra))) == base


def test_second_pass_joins_a_noisy_duplicate_but_not_a_resolved_pair():
    dec = np.full(3, -30.0)
    step = ARCSEC / np.cos(np.radians(30.0))
    # one source on tiles 0 and 1, 0.8" apart: two groups after DR1's 0.5", one after the pass
    ra = np.array([150.0, 150.0 + 0.8 * step])
    assert len(set(link_detections(ra, dec[:2], np.array([0, 1]), 0.5))) == 2
    assert len(set(_two_pass(ra, dec[:2], np.array([0, 1])))) == 1
    # tile 0 resolves two sources 0.9" apart; tile 1 sees one of them: it joins its nearest
    # and the two sources of tile 0 stay apart
    ra = np.array([150.0, 150.0 + 0.9 * step, 150.0 + 0.7 * step])
    labels = _two_pass(ra, dec, np.array([0, 0, 1]))
    assert labels[0] != labels[1] and labels[2] == labels[1]
    # beyond the second radius nothing is joined
    ra = np.array([150.0, 150.0 + 1.2 * step])
    assert len(set(_two_pass(ra, dec[:2], np.array([0, 1])))) == 2


def test_second_pass_repeats_until_nothing_is_left_to_join():
    """Three bands of one faint source at 0, 0.9" and 1.9": the middle one's nearest is the
    first, the last one's the middle one, so one round joins only the first two; their mean
    (0.45") is then 1.45" from the last one, its mutual nearest neighbour, and a second round
    joins it (the demo's galaxy 2778 had I, R and V centroids like these)."""
    step = ARCSEC / np.cos(np.radians(30.0))
    ra = 150.0 + np.array([0.0, 0.9, 1.9]) * step
    dec = np.full(3, -30.0)
    labels = merge_disjoint_groups(ra, dec, np.arange(3), np.arange(3), 1.5)
    assert len(set(labels.tolist())) == 1
    # a fourth detection in the first one's band 0.6" beyond the last one: the last one
    # joins it, not the first two, and the two groups then share band 0 and stay apart
    ra = np.append(ra, 150.0 + 2.5 * step)
    labels = merge_disjoint_groups(ra, np.full(4, -30.0), np.arange(4), np.array([0, 1, 2, 0]),
                                   1.5)
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_same_tile_detections_are_never_linked_directly():
    ra = np.array([150.0, 150.0 + 0.3 * ARCSEC, 150.0 + 5 * ARCSEC])
    dec = np.full(3, -30.0)
    labels = link_detections(ra, dec, np.array([0, 0, 1]), 0.5)
    assert len(set(labels)) == 3
    labels = link_detections(ra, dec, np.array([0, 1, 1]), 0.5)
    assert labels[0] == labels[1] != labels[2]


def test_linking_radius():
    dec = np.full(2, -30.0)
    for sep, linked in ((0.49, True), (0.51, False)):
        ra = np.array([150.0, 150.0 + sep * ARCSEC / np.cos(np.radians(30.0))])
        labels = link_detections(ra, dec, np.array([0, 1]), 0.5)
        assert (labels[0] == labels[1]) == linked


def test_mean_position_across_ra_zero():
    ra, dec = mean_positions(np.array([359.9999, 0.0001]), np.array([0.0, 0.0]),
                             np.array([0, 0]), 1)
    assert ra[0] == pytest.approx(0.0, abs=1e-9) or ra[0] == pytest.approx(360.0, abs=1e-9)


values_st = st.lists(st.tuples(st.floats(10, 30), st.floats(0.001, 1.0)), min_size=1,
                     max_size=7)


@settings(deadline=None)  # timing varies on a shared machine
@given(values_st)
def test_weighted_median_lies_within_the_inputs(pairs):
    values = np.array([v for v, _ in pairs])
    sigmas = np.array([s for _, s in pairs])
    median, error = weighted_median(values, sigmas, np.zeros(len(values), int), 1)
    assert values.min() <= median[0] <= values.max()
    assert error[0] == pytest.approx(1.0 / np.sqrt(np.sum(1.0 / sigmas**2)))


@settings(deadline=None)  # timing varies on a shared machine
@given(st.floats(10, 30), st.lists(st.floats(0.001, 1.0), min_size=1, max_size=7))
def test_weighted_median_of_equal_values_is_that_value(value, sigmas):
    median, _ = weighted_median(np.full(len(sigmas), value), np.array(sigmas),
                                np.zeros(len(sigmas), int), 1)
    assert median[0] == value


def test_weighted_median_follows_the_weights():
    median, _ = weighted_median(np.array([20.0, 21.0, 22.0]), np.array([0.01, 1.0, 1.0]),
                                np.zeros(3, int), 1)
    assert median[0] == pytest.approx(20.0, abs=1e-3)
    median, _ = weighted_median(np.array([20.0, np.nan, 22.0]), np.array([1.0, 0.01, 0.5]),
                                np.array([0, 0, 1]), 2)
    np.testing.assert_array_equal(median, [20.0, 22.0])


def test_weighted_median_of_equal_weights_is_the_median():
    for values in ([21.0, 19.0, 20.5], [21.0, 19.0, 20.5, 20.0], [18.0, 18.4]):
        median, _ = weighted_median(np.array(values), np.full(len(values), 0.05),
                                    np.zeros(len(values), int), 1)
        assert median[0] == pytest.approx(np.median(values), abs=1e-12)


@settings(deadline=None)  # timing varies on a shared machine
@given(st.tuples(st.floats(10, 30), st.floats(0.001, 1.0)),
       st.tuples(st.floats(10, 30), st.floats(0.001, 1.0)))
def test_weighted_median_of_two_is_their_weighted_mean(a, b):
    """Two detections (a tile overlap): neither is preferred for being the brighter."""
    values, sigmas = np.array([a[0], b[0]]), np.array([a[1], b[1]])
    median, _ = weighted_median(values, sigmas, np.zeros(2, int), 1)
    weights = 1.0 / sigmas**2
    assert median[0] == pytest.approx(np.sum(weights * values) / np.sum(weights), abs=1e-9)


def _midpoint_weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The midpoint rule written out for one group: interpolate the sorted values, placed at
    the centres of their weights, at half the total weight."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    return float(np.interp(0.5 * w.sum(), np.cumsum(w) - 0.5 * w, v))


@settings(deadline=None)  # timing varies on a shared machine
@given(st.lists(values_st, min_size=1, max_size=6))
def test_weighted_median_per_group_equals_the_rule_written_out(groups):
    values = np.array([v for grp in groups for v, _ in grp])
    sigmas = np.array([s for grp in groups for _, s in grp])
    group = np.repeat(np.arange(len(groups)), [len(grp) for grp in groups])
    median, _ = weighted_median(values, sigmas, group, len(groups))
    for k, grp in enumerate(groups):
        expected = _midpoint_weighted_median(np.array([v for v, _ in grp]),
                                             1.0 / np.array([s for _, s in grp]) ** 2)
        assert median[k] == pytest.approx(expected, rel=0, abs=1e-9)


def _detection_columns(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = {"ra": 150.0 + rng.uniform(0, 1e-5, n), "dec": -30.0 + rng.uniform(0, 1e-5, n)}
    for band in BANDS:
        for name in band_columns(band):
            cols[name] = rng.uniform(0.1, 1.0, n)
        cols[f"fwhm_image_{band}"] = rng.uniform(1.0, 2.0, n)
    return cols


flag_groups = st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=5), min_size=1,
                       max_size=6)


@settings(deadline=None)  # timing varies on a shared machine
@given(flag_groups, st.integers(0, 2**32 - 1))
def test_or_merged_flags_contain_every_input_flag(groups, seed):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    cols = _detection_columns(len(group), rng)
    flags = np.concatenate([np.array(g, float) for g in groups])
    cols["flags_b"] = flags
    cols["imaflags_iso_b"] = flags % 16
    cols["edge_b"] = (flags % 2).astype(float)
    out = aggregate_groups(cols, group, len(groups), BANDS)
    merged = out["flags_b"].astype(int)[group]
    assert np.all((merged & flags.astype(int)) == flags.astype(int))
    assert np.all(out["flags_b"] == [np.bitwise_or.reduce(g) for g in groups])
    assert np.all(out["edge_b"][group] >= cols["edge_b"])


def test_aggregation_rules():
    rng = np.random.default_rng(3)
    cols = _detection_columns(3, rng)
    cols["fwhm_image_v"] = np.array([1.5, 1.1, 1.8])
    cols["class_star_v"] = np.array([0.1, 0.9, 0.5])
    cols["min_mjd_v"] = np.array([58000.0, 58100.0, 57999.0])
    cols["max_mjd_v"] = np.array([58001.0, 58101.0, 58000.0])
    cols["mean_mjd_v"] = np.array([58000.5, 58100.5, 57999.5])
    cols["ndith_v"] = np.array([3.0, 7.0, 5.0])
    cols["sscount_30_v"] = np.array([2.0, 0.0, 1.0])
    cols["mag_auto_v"] = np.array([20.0, np.nan, 20.4])
    cols["magerr_auto_v"] = np.array([0.1, 0.1, 0.2])
    out = aggregate_groups(cols, np.zeros(3, int), 1, BANDS)
    assert out["class_star_v"][0] == 0.9  # best seeing is the second detection
    assert out["fwhm_image_v"][0] == pytest.approx(np.mean([1.5, 1.1, 1.8]))
    assert (out["min_mjd_v"][0], out["max_mjd_v"][0]) == (57999.0, 58101.0)
    assert out["mean_mjd_v"][0] == pytest.approx(58033.5)
    assert (out["ndith_v"][0], out["sscount_30_v"][0], out["n_det"][0]) == (7.0, 2.0, 3.0)
    # Two finite magnitudes: their weighted mean, (100 x 20.0 + 25 x 20.4) / 125.
    assert out["mag_auto_v"][0] == pytest.approx(20.08)
    assert out["magerr_auto_v"][0] == pytest.approx(1 / np.sqrt(1 / 0.01 + 1 / 0.04))


def test_match_nearest_is_one_to_one():
    ra1 = np.array([150.0, 150.0 + 0.2 * ARCSEC, 151.0])
    dec1 = np.full(3, -30.0)
    rows1, rows2 = match_nearest(ra1, dec1, np.array([150.0 + 0.15 * ARCSEC]), np.array([-30.0]),
                                 0.8)
    np.testing.assert_array_equal(rows1, [1])
    np.testing.assert_array_equal(rows2, [0])


def _band_table(ra, dec, band, mag):
    n = len(ra)
    table = {"ra": np.asarray(ra, float), "dec": np.asarray(dec, float),
             "raerr": np.full(n, 0.1), "decerr": np.full(n, 0.2)}
    for name in band_columns(band):
        table[name] = np.ones(n)
    table[f"mag_auto_{band}"] = np.full(n, mag)
    table[f"ndith_{band}"] = np.full(n, 4.0)
    return table


def test_band_merge_nulls_and_non_observations():
    ra_i = [150.0, 150.01]
    tables = {
        "i": _band_table(ra_i, [-30.0, -30.0], "i", 20.0),
        "r": _band_table([150.0 + 0.3 * ARCSEC, 150.02], [-30.0, -30.0], "r", 20.5),
    }
    out = merge_bands(tables, order=("i", "r", "v", "b"), radius_arcsec=0.8,
                      ndith_lookup={"r": lambda ra, dec: np.full(len(ra), 6.0)})
    assert len(out["ra"]) == 3
    np.testing.assert_array_equal(out["mag_auto_i"], [20.0, 20.0, np.nan])
    np.testing.assert_array_equal(out["mag_auto_r"], [20.5, np.nan, 20.5])
    np.testing.assert_array_equal(out["ndith_r"], [4.0, 6.0, 4.0])  # map for the non-detection
    np.testing.assert_array_equal(out["ndith_i"], [4.0, 4.0, np.nan])  # no map: null
    np.testing.assert_array_equal(out["ndith_b"], [0.0, 0.0, 0.0])  # not observed
    assert np.all(np.isnan(out["mag_auto_b"]))
    assert out["ra"][0] == pytest.approx(150.0 + 0.15 * ARCSEC)
    assert out["raerr"][0] == pytest.approx(np.sqrt(2 * 0.1**2) / 2)
    assert out["decerr"][1] == pytest.approx(0.2)


def test_band_merge_second_pass_joins_bands_beyond_the_radius():
    step = ARCSEC / np.cos(np.radians(30.0))
    tables = {
        "i": _band_table([150.0, 150.01], [-30.0, -30.0], "i", 20.0),
        "r": _band_table([150.0 + 0.9 * step, 150.02], [-30.0, -30.0], "r", 20.5),
    }
    single = merge_bands(tables, order=("i", "r", "v", "b"), radius_arcsec=0.8)
    joined = merge_bands(tables, order=("i", "r", "v", "b"), radius_arcsec=0.8,
                         merge_radius_arcsec=1.0)
    assert len(single["ra"]) == 4 and len(joined["ra"]) == 3
    both = np.flatnonzero(np.isfinite(joined["mag_auto_i"]) & np.isfinite(joined["mag_auto_r"]))
    assert both.size == 1
    assert joined["ra"][both[0]] == pytest.approx(150.0 + 0.45 * step)
