"""The MAG_AUTO noise-bias calibration with artificial stars (reduction/artificial_stars.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.reduction.artificial_stars import (
    SNR_FLOOR,
    AutoNoiseBias,
    auto_noise_path,
    fit_auto_noise,
    inject_coadd,
    read_auto_noise,
    run_auto_noise_calibration,
)
from ks4release.reduction.stellarity import DEFAULT_NNW, read_nnw
from ks4release.settings import PhotometrySettings


@settings(max_examples=25, deadline=None)
@given(k=st.floats(0.0, 12.0), seed=st.integers(0, 2**16))
def test_fit_recovers_the_injected_bias(k, seed):
    """Offsets -k / snr^2 plus each star's noise (1.0857 / snr mag) give back k within four
    of its stated errors, and the error is that of the medians."""
    rng = np.random.default_rng(seed)
    snr = np.exp(rng.uniform(math.log(10), math.log(70), 3000))
    offset = -k / snr ** 2 + rng.normal(0.0, 1.0857 / snr)
    fit = fit_auto_noise("I", snr, offset)
    assert fit.applied and fit.n_stars == 3000 and len(fit.snr) == 5
    assert abs(fit.k - k) < 4 * fit.k_err
    assert 0.1 < fit.k_err < 2.0


def test_fit_refuses_too_few_stars():
    fit = fit_auto_noise("V", np.array([12.0, 25.0, 50.0]), np.array([-0.03, -0.01, 0.0]))
    assert not fit.applied and fit.k == 0.0 and "bins" in fit.reason
    assert np.array_equal(fit.correction(np.array([12.0, 30.0])), np.zeros(2))


def test_correction_holds_below_the_floor_and_skips_missing_snr():
    bias = AutoNoiseBias("R", 5.0, 0.3, 1000)
    out = bias.correction(np.array([5.0, 10.0, 20.0, np.nan, np.inf]))
    assert out == pytest.approx([5.0 / SNR_FLOOR ** 2, 0.05, 5.0 / 400.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def calibrated(tiny_coadds, tmp_path_factory):
    """The I co-add of the tiny survey calibrated with 6 grids of artificial stars, in a copy
    of its release folder (``tiny_coadds`` is read-only)."""
    release = tmp_path_factory.mktemp("auto_noise") / "release"
    for part in ("images", "work/coadd"):
        shutil.copytree(tiny_coadds["release"] / part, release / part)
    photometry = PhotometrySettings(auto_noise_runs=6)
    run_auto_noise_calibration(release_dir=release, band="I", tiles=(tiny_coadds["tile"],),
                               settings=photometry, nnw_path=DEFAULT_NNW)
    payload = json.loads(auto_noise_path(release, "I").read_text())
    return payload, {**tiny_coadds, "release": release}, photometry


def test_calibration_on_a_coadd_finds_faint_stars_too_bright(calibrated):
    """On a real (simulated) co-add the faint injected stars' Kron-corrected MAG_AUTO reads
    brighter than the bright ones': k > 0, and within the 2-10 the demo's co-adds give."""
    payload, _, photometry = calibrated
    assert payload["applied"] and payload["band"] == "I"
    assert payload["runs"] == photometry.auto_noise_runs
    assert payload["n_stars"] > 300
    assert payload["k"] > 0 and payload["k"] - 3 * payload["k_err"] < 10
    assert payload["k"] + 3 * payload["k_err"] > 2
    assert all(o < 0.01 for o in payload["offset"])


def test_calibration_is_reproducible_and_read_back(calibrated, tmp_path):
    """The same seed gives the same stars; the JSON reads back as the calibration."""
    payload, coadds, photometry = calibrated
    network = read_nnw(DEFAULT_NNW)
    a = inject_coadd(coadds["release"], coadds["tile"], "I", photometry, network, 1, 2048, 7)
    b = inject_coadd(coadds["release"], coadds["tile"], "I", photometry, network, 1, 2048, 7)
    assert len(a) > 50 and np.array_equal(np.asarray(a["x"]), np.asarray(b["x"]))
    assert np.allclose(np.asarray(a["flux_auto_i"]), np.asarray(b["flux_auto_i"]),
                       equal_nan=True)
    path = tmp_path / "auto_noise_I.json"
    path.write_text(json.dumps(payload))
    bias = read_auto_noise(path)
    assert bias.k == payload["k"] and bias.applied
    assert bias.correction(np.array([20.0]))[0] == pytest.approx(payload["k"] / 400.0)
