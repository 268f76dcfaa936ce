"""Co-adds (ks4release.reduction.coadd*) against the truth of a simulated survey.

The scaled exposures and masks that the photometry and mask stages will write are made here from
the truth (:func:`write_scaled_from_truth`): raw data minus the true sky, times
``10**(0.4 * (30 - zp(y)))`` per amplifier, with the true TAN-SIP WCS and the DR1 bits of the
truth masks. The survey is the demo model (one tile, V and I, 1/16 scale) with a tenth of the
galaxies, so that one small tile holds enough isolated stars for a 0.005 mag photometric check;
everything else (seeing, noise, artifacts, distortion) is the demo's.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import sep
from astropy.io import fits
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.ndimage import binary_dilation, uniform_filter
from scipy.spatial import cKDTree
from truth_release import dr1_bits, quiet_wcs, write_scaled_from_truth

from ks4release.camera import CCD_NAMES, Camera
from ks4release.errors import InputError, StageError
from ks4release.layout import coadd_exposures_path, coadd_path, mask_path, scaled_path
from ks4release.reduction.coadd import (
    CoaddSettings,
    background_offset_blocks,
    background_offsets,
    fill_masked_pixels,
    limiting_magnitude,
    run_coadd,
    tile_grid,
)
from ks4release.reduction.coadd_maps import (
    FOOTPRINT_VERTICES_PER_SIDE,
    ccd_footprint_deg,
    project_ccd,
)
from ks4release.reduction.coadd_swarp import run_swarp, sip_to_tpv_header, tpv_terms
from ks4release.simulate import SimulationConfig, simulate_survey
from ks4release.simulate.artifacts import StrayLightRing, stray_light
from ks4release.simulate.astrometry import sip_coefficient, true_wcs
from ks4release.simulate.plan import rng_for
from ks4release.simulate.sky import positions_at
from ks4release.survey import site

TILE = "0000.000-62"
BAND = "V"
TILE_RA, TILE_DEC = 0.0, -62.0
# Truth-only mask bits (ks4release.simulate.masks.MaskBit).
COSMIC, SATELLITE, STRAY_LIGHT, CROSSTALK = 1, 16, 32, 128


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The sparse-galaxy survey, its scaled exposures and the V co-add (SWarp, background
    matching on as in the demo survey's release.toml, ~20 s)."""
    root = tmp_path_factory.mktemp("coadd")
    survey = root / "survey"
    simulate_survey(SimulationConfig(n_tiles_ra=1, n_tiles_dec=1, bands=("V", "I"),
                                     galaxy_density_deg2=3000.0), survey)
    release = root / "release"
    stems = write_scaled_from_truth(survey, release, BAND)
    result = run_coadd(tile=TILE, band=BAND, ra=TILE_RA, dec=TILE_DEC,
                       scaled=[scaled_path(release, s) for s in stems],
                       masks=[mask_path(release, s) for s in stems], release_dir=release,
                       settings=CoaddSettings(nthreads=2, background_match=True))
    paths = {kind: coadd_path(release, TILE, BAND, kind) for kind in ("coadd", "mask", "ndith")}
    with fits.open(paths["coadd"]) as hdul:
        image, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
    return {"survey": survey, "release": release, "band": BAND, "stems": stems, "result": result,
            "image": image, "header": header, "wcs": quiet_wcs(header),
            "mask": fits.getdata(paths["mask"]), "ndith": fits.getdata(paths["ndith"]),
            "truth_sources": pd.read_parquet(survey / "truth" / "sources.parquet"),
            "truth_exposures": pd.read_parquet(survey / "truth" / "exposures.parquet")
            .query("band == @BAND")}


def _load_coadd(built: dict, release, band: str, result: dict) -> dict:
    """The ``built``-like dict of another co-add of the same survey."""
    paths = {kind: coadd_path(release, TILE, band, kind) for kind in ("coadd", "mask", "ndith")}
    with fits.open(paths["coadd"]) as hdul:
        image, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
    exposures = pd.read_parquet(built["survey"] / "truth" / "exposures.parquet")
    return {**built, "release": release, "band": band, "result": result, "image": image,
            "header": header, "wcs": quiet_wcs(header), "mask": fits.getdata(paths["mask"]),
            "ndith": fits.getdata(paths["ndith"]),
            "stems": exposures.query("band == @band").stem.tolist(),
            "truth_exposures": exposures.query("band == @band")}


def _remove_true_rings(survey, release, oracle, stems: list[str]) -> None:
    """Copy scaled exposures and masks into ``oracle``, the true stray-light ring (the
    simulator's model, in scaled units) subtracted from those that carry one."""
    exposures = pd.read_parquet(survey / "truth" / "exposures.parquet").set_index("stem")
    zps = pd.read_parquet(survey / "truth" / "zeropoints.parquet")
    camera = Camera.kmtnet(1 / 16)
    for stem in stems:
        target = scaled_path(oracle, stem)
        for path in (target, mask_path(oracle, stem)):
            path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mask_path(release, stem), mask_path(oracle, stem))
        exp = exposures.loc[stem]
        with fits.open(scaled_path(release, stem)) as hdul:
            if exp.stray_light:
                for ccd in camera.ccds:
                    sky_e = exp[f"sky_adu_{ccd.name}"] * ccd.gain_e_per_adu
                    ring = StrayLightRing(camera, rng_for(SimulationConfig().seed, "stray", stem),
                                          sky_e)
                    light = stray_light(ccd, ring, np.zeros(ccd.shape, dtype=np.uint8))
                    light /= ccd.gain_e_per_adu
                    rows = np.arange(ccd.ny)[:, None]
                    for _, amp in zps[(zps.file == exp.file) & (zps.ccd == ccd.name)].iterrows():
                        zp = amp.zp_y0 + amp.zp_slope * rows / ccd.ny
                        light[:, amp.x_start:amp.x_stop] *= 10 ** (0.4 * (30.0 - zp))
                    hdul[ccd.name].data = (hdul[ccd.name].data - light).astype(np.float32)
            hdul.writeto(target)


@pytest.fixture(scope="module")
def matching(built, tmp_path_factory) -> dict:
    """Co-adds with and without background matching (~20 s): V without (matched: ``built``, in
    two blocks of rows), I with (in one block: the whole grid) and without, and I from
    exposures whose true stray-light ring was subtracted (the "oracle"). I_04 of this survey
    carries a stray-light ring of ~8 sigma of a pixel (V_03 one below 1 sigma); the scaled
    exposures keep it (truth sky subtracted, no mesh)."""
    plain = tmp_path_factory.mktemp("plain")
    grid_rows = tile_grid(TILE_RA, TILE_DEC, Camera.kmtnet(1 / 16))[1][0]
    whole_grid = 16 * math.ceil(grid_rows / 16)  # one block of background_match_mesh_px rows
    release = built["release"]
    out = {}
    for band in ("V", "I"):
        stems = (built["stems"] if band == BAND
                 else write_scaled_from_truth(built["survey"], release, band))
        inputs = {"scaled": [scaled_path(release, s) for s in stems],
                  "masks": [mask_path(release, s) for s in stems]}
        if band != BAND:
            oracle = tmp_path_factory.mktemp("oracle")
            _remove_true_rings(built["survey"], release, oracle, stems)
            result = run_coadd(tile=TILE, band=band, ra=TILE_RA, dec=TILE_DEC, release_dir=oracle,
                               settings=CoaddSettings(nthreads=2, background_match=False),
                               scaled=[scaled_path(oracle, s) for s in stems],
                               masks=[mask_path(oracle, s) for s in stems])
            out[(band, "oracle")] = _load_coadd(built, oracle, band, result)
        for match, folder in ((False, plain), (True, release)):
            if band == BAND and match:
                out[(band, match)] = built
                continue
            result = run_coadd(tile=TILE, band=band, ra=TILE_RA, dec=TILE_DEC, release_dir=folder,
                               settings=CoaddSettings(nthreads=2, background_match=match,
                                                      background_match_block_rows=whole_grid),
                               **inputs)
            out[(band, match)] = _load_coadd(built, folder, band, result)
    return out


def _truth_masks(built: dict) -> dict[str, fits.HDUList]:
    return {s: fits.open(built["survey"] / "truth" / "masks" / f"{s}_mask.fits")
            for s in built["stems"]}


# --------------------------------------------------------------------------------------------
# Pure functions


def test_tpv_terms_skip_the_radial_terms():
    ks = [k for k, _, _ in tpv_terms(7)]
    assert ks[:4] == [0, 1, 2, 4] and 3 not in ks and 11 not in ks and 23 not in ks
    assert max(ks) == 38 and len(ks) == 36
    with pytest.raises(ValueError, match="order"):
        tpv_terms(8)


@settings(max_examples=25, deadline=None)
@given(order=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       rotation=st.floats(-180.0, 180.0), crpix=st.floats(-3000.0, 3000.0))
def test_sip_to_tpv_reproduces_the_sip_wcs(order, seed, rotation, crpix):
    """TPV converted from any SIP (order 2-5, any rotation, CRPIX off the chip) maps every
    pixel of the chip to the same sky position to 1e-6 arcsec."""
    rng = np.random.default_rng(seed)
    scale = 0.395 / 3600.0
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    header = fits.Header()
    header.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "CRVAL1": 10.0,
                   "CRVAL2": -62.0, "CRPIX1": crpix, "CRPIX2": -crpix / 2,
                   "CD1_1": -scale * c, "CD1_2": scale * s, "CD2_1": scale * s,
                   "CD2_2": scale * c, "A_ORDER": order, "B_ORDER": order})
    for p in range(order + 1):
        for q in range(order + 1 - p):
            if p + q >= 2:  # up to ~3 px at 4000 px from CRPIX
                header[f"A_{p}_{q}"] = rng.normal(0, 3.0 / 4000.0 ** (p + q - 1))
                header[f"B_{p}_{q}"] = rng.normal(0, 3.0 / 4000.0 ** (p + q - 1))
    shape = (600, 500)
    tpv = sip_to_tpv_header(header, shape)
    assert tpv["CTYPE1"] == "RA---TPV" and "A_ORDER" not in tpv
    x, y = np.meshgrid(np.linspace(0, 499, 13), np.linspace(0, 599, 11))
    ra1, dec1 = quiet_wcs(header).all_pix2world(x.ravel(), y.ravel(), 0)
    ra2, dec2 = quiet_wcs(tpv).all_pix2world(x.ravel(), y.ravel(), 0)
    sep_arcsec = np.hypot((ra1 - ra2) * math.cos(math.radians(-62.0)), dec1 - dec2) * 3600
    assert sep_arcsec.max() < 1e-6


def test_tile_grid_is_dr1_sized_and_centred():
    wcs, shape = tile_grid(321.23, -70.0, Camera.kmtnet(1.0))
    assert shape == (21886, 21886)  # DR1: ~22000 x 22000
    assert wcs.wcs.crpix[0] == wcs.wcs.crpix[1] == (21886 + 1) / 2
    assert np.allclose(wcs.wcs.cd, [[-0.4 / 3600, 0], [0, 0.4 / 3600]])
    ra, dec = wcs.wcs_pix2world([[(21886 - 1) / 2, (21886 - 1) / 2]], 0)[0]
    assert (ra, dec) == pytest.approx((321.23, -70.0), abs=1e-9)
    again, shape_again = tile_grid(321.23, -70.0, Camera.kmtnet(1.0))
    assert shape_again == shape and again.to_header() == wcs.to_header()
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        tile_grid(0.0, 0.0, Camera.kmtnet(1.0), pixel_scale_arcsec=0.0)


@pytest.mark.parametrize("field, value", [("nthreads", 0), ("pixel_scale_arcsec", -1.0),
                                          ("ignore_bits", 300), ("combine_type", "SUM"),
                                          ("grid_margin_arcsec", -5.0),
                                          ("background_match_mesh_px", 1),
                                          ("background_match_source_sigma", 0.0),
                                          ("background_match_min_sigma", -1.0),
                                          ("background_match_block_rows", 100),
                                          ("background_match_block_rows", 0)])
def test_settings_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        CoaddSettings(**{field: value})


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), max_gap=st.integers(1, 8))
def test_fill_masked_pixels_restores_planes_and_keeps_long_runs(seed, max_gap):
    """On a plane, filled pixels equal the plane; only runs longer than max_gap or touching a
    row end stay bad (and hold 0); good pixels never change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:20, :30]
    plane = (3.0 + 0.5 * x - 0.25 * y).astype(np.float32)
    bad = rng.random(plane.shape) < 0.3
    filled, still_bad = fill_masked_pixels(np.where(bad, 1e6, plane), bad, max_gap)
    assert np.allclose(filled[~still_bad], plane[~still_bad], atol=1e-4)
    assert np.all(filled[still_bad] == 0) and np.all(still_bad <= bad)
    for row in range(bad.shape[0]):
        runs = np.flatnonzero(np.diff(np.concatenate([[0], still_bad[row].astype(int), [0]])))
        for start, stop in zip(runs[::2], runs[1::2]):
            assert stop - start > max_gap or start == 0 or stop == bad.shape[1]


def test_limiting_magnitude_of_white_noise():
    """On white noise of sigma 10 an aperture of area A has noise 10 sqrt(A) (a large aperture:
    for small ones partial pixels and the 1-sigma source mask lower the figure by up to 6%)."""
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 10.0, (600, 600)).astype(np.float32)
    depth, sigma, n, cells = limiting_magnitude(image, np.ones(image.shape, bool), 16.0,
                                                n_apertures=500, seed=2, grid=2)
    expected = 10.0 * math.sqrt(math.pi * 64.0)
    assert cells == 4 and n > 1000 and sigma == pytest.approx(expected, rel=0.06)
    assert depth == pytest.approx(30 - 2.5 * math.log10(5 * expected), abs=0.07)


def test_swarp_failure_is_a_stage_error(tmp_path):
    command = ["SWarp", str(tmp_path / "missing.fits"), "-IMAGEOUT_NAME",
               str(tmp_path / "out.fits"), "-WRITE_XML", "N"]
    with pytest.raises(StageError) as info:
        run_swarp(command, timeout_s=60, tile=TILE, band=BAND, cwd=tmp_path)
    text = str(info.value)
    assert TILE in text and "band V" in text and "missing.fits" in text and "SWarp" in text


# --------------------------------------------------------------------------------------------
# The co-add against truth


def _on_unmasked_artifact(built: dict, ra: np.ndarray, dec: np.ndarray, radius_arcsec: float,
                          bits: int = SATELLITE | STRAY_LIGHT) -> np.ndarray:
    """True where a satellite trail or stray-light ring (truth bits DR1 does not mask; ``bits``
    says which) of any exposure lies within ``radius_arcsec``: without background matching the
    median leaves ~0.4 sigma of one exposure there."""
    hit = np.zeros(ra.size, dtype=bool)
    reach = math.ceil(radius_arcsec / 0.395) + 2
    for hdul in _truth_masks(built).values():
        for name in CCD_NAMES:
            artifact = (hdul[name].data & bits) != 0
            if not artifact.any():
                continue
            cx, cy = quiet_wcs(hdul[name].header).all_world2pix(ra, dec, 0)
            ny, nx = artifact.shape
            for k in np.flatnonzero((cx > -reach) & (cx < nx + reach) & (cy > -reach)
                                    & (cy < ny + reach)):
                x0, y0 = max(0, round(float(cx[k])) - reach), max(0, round(float(cy[k])) - reach)
                hit[k] |= bool(artifact[y0:round(float(cy[k])) + reach + 1,
                                        x0:round(float(cx[k])) + reach + 1].any())
    return hit


def _isolated_stars(built: dict, radius_px: float, on_ring: bool = False) -> np.ndarray:
    """Indices of truth stars (15 < m < 18.5: bright enough that the aperture noise stays well
    below 0.005 mag) whose neighbours put < 0.1% of the star's flux into the aperture (as point
    sources, every truth source within 60"), with no bleed trail or amplifier defect (bits 2, 8)
    in the aperture, at least two exposures over all of it and no satellite trail or
    stray-light ring of any exposure near it; with ``on_ring``, those whose aperture does touch
    a stray-light ring (and no satellite trail). Cosmic rays and crosstalk ghosts (bit 1) may
    lie in the aperture: ``run_coadd`` keeps every masked pixel out of the median and so do the
    data maps of the expectation (:func:`_exposure_data_maps`); the I star of this survey that
    sits on ghosts in all four exposures has NDITH 0 over its core and fails the coverage
    condition (rejecting any bit 1 would leave 3 stars on the I_04 ring)."""
    src, wcs = built["truth_sources"], built["wcs"]
    mean_mjd = float(built["truth_exposures"].mjd.mean())
    ra, dec = positions_at(src, mean_mjd)
    x, y = wcs.all_world2pix(ra, dec, 0)
    mag = src[f"mag_{built['band']}"].to_numpy()
    ny, nx = built["image"].shape
    fwhm_px = built["header"]["SEEING"] / 0.4
    alpha = fwhm_px / (2 * math.sqrt(2 ** (1 / 3) - 1))
    tree = cKDTree(np.c_[x, y])
    keep = []
    candidates = np.flatnonzero((src.type == "star").to_numpy() & (mag > 15) & (mag < 18.5)
                                & (x > 100) & (x < nx - 100) & (y > 100) & (y < ny - 100))
    yy, xx = np.mgrid[:ny, :nx]
    r = math.ceil(radius_px)
    ay, ax = np.mgrid[-r:r + 1, -r:r + 1]
    in_aperture = ax**2 + ay**2 <= radius_px**2
    ax, ay = ax[in_aperture], ay[in_aperture]
    reach_arcsec = radius_px * 0.4 + 2.0
    candidates = candidates[~_on_unmasked_artifact(
        built, ra[candidates], dec[candidates], reach_arcsec,
        SATELLITE if on_ring else SATELLITE | STRAY_LIGHT)]
    if on_ring:
        candidates = candidates[_on_unmasked_artifact(built, ra[candidates], dec[candidates],
                                                      reach_arcsec, STRAY_LIGHT)]
    for i in candidates:
        near = [j for j in tree.query_ball_point([x[i], y[i]], 150) if j != i]
        # share of each neighbour's flux inside the aperture, as a point source (Moffat 3)
        ox, oy = x[near] - x[i], y[near] - y[i]
        density = (1 + ((ax[None] - ox[:, None]) ** 2 + (ay[None] - oy[:, None]) ** 2)
                   / alpha**2) ** -3 * 2 / (math.pi * alpha**2)
        contamination = np.sum(10 ** (-0.4 * (mag[near] - mag[i])) * density.sum(axis=1))
        box = (slice(int(y[i] - radius_px - 1), int(y[i] + radius_px + 2)),
               slice(int(x[i] - radius_px - 1), int(x[i] + radius_px + 2)))
        inside = (xx[box] - x[i]) ** 2 + (yy[box] - y[i]) ** 2 <= (radius_px + 1) ** 2
        clean = not np.any(built["mask"][box][inside] & 10)
        covered = built["ndith"][box][inside].min() >= 2
        if contamination < 1e-3 and clean and covered:
            keep.append(i)
    return np.array(keep, dtype=int), x, y


# Half size (co-add px) of the model stamps: the 8" aperture (20 px) and a margin.
_MODEL_HALF_PX = 30


def _without_data(truth: np.ndarray, filled: bool = False) -> np.ndarray:
    """Pixels of a truth mask (one CCD) whose data do not enter the co-add's median: the DR1
    bits the co-add ignores (short runs are filled before resampling, but only to keep LANCZOS3
    from spreading the holes; the filled values stay out of the median). With ``filled``, those
    left without data where every exposure is masked: the runs too long to fill."""
    settings_ = CoaddSettings()
    masked = (dr1_bits(truth) & settings_.ignore_bits) != 0
    if not filled:
        return masked
    return fill_masked_pixels(np.zeros(truth.shape), masked, settings_.fill_max_gap_px)[1]


def _exposure_data_maps(built: dict, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Per exposure of ``built["truth_exposures"]`` (first axis), whether it has data entering
    the co-add's median at the co-add pixels (gx, gy; stamps round stars, star first): on one of
    its CCDs by the true WCS, and not within one pixel of one whose nearest input pixel is
    :func:`_without_data` (as ``run_coadd`` excludes them). Per pixel, not per star: a star's
    aperture may straddle a CCD edge, one exposure's dead amplifier or cosmic ray."""
    ra, dec = built["wcs"].all_pix2world(gx.ravel(), gy.ravel(), 0)
    unmasked, usable = [], []
    for stem in built["truth_exposures"].stem:
        on_ccd, masked = np.zeros(gx.size, dtype=bool), np.zeros(gx.size, dtype=bool)
        unfilled = np.zeros(gx.size, dtype=bool)
        with fits.open(built["survey"] / "truth" / "masks" / f"{stem}_mask.fits") as hdul:
            for name in CCD_NAMES:
                no_data = _without_data(hdul[name].data)
                still_bad = _without_data(hdul[name].data, filled=True)
                cx, cy = quiet_wcs(hdul[name].header).all_world2pix(ra, dec, 0)
                ix, iy = np.rint(cx).astype(int), np.rint(cy).astype(int)
                on = (ix >= 0) & (ix < no_data.shape[1]) & (iy >= 0) & (iy < no_data.shape[0])
                on_ccd |= on
                masked[on] |= no_data[iy[on], ix[on]]
                unfilled[on] |= still_bad[iy[on], ix[on]]
        grown = binary_dilation(masked.reshape(gx.shape), np.ones((1, 3, 3), dtype=bool))
        unmasked.append(on_ccd.reshape(gx.shape) & ~grown)
        usable.append((on_ccd & ~unfilled).reshape(gx.shape))
    unmasked, usable = np.array(unmasked), np.array(usable)
    # where every exposure is masked the co-add keeps the filled values (see run_coadd)
    return np.where(unmasked.any(axis=0), unmasked, usable)


def _median_over_valid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median along the first axis of the ``valid`` values (the mean of the middle two for an
    even count, as SWarp's median), 0 where none is valid."""
    n = valid.sum(axis=0)
    ordered = np.sort(np.where(valid, values, np.inf), axis=0)
    low = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    high = np.take_along_axis(ordered, (n // 2)[None], axis=0)[0]
    return np.where(n > 0, (low + high) / 2, 0.0)


def _moffat(dx: np.ndarray, dy: np.ndarray, fwhm_arcsec: float) -> np.ndarray:
    """Moffat (beta = 3, the simulator's PSF) of unit flux at offsets (arcsec) from its centre,
    per 0.4" co-add pixel (sampled at pixel centres, as the simulator does)."""
    alpha = fwhm_arcsec / (2 * math.sqrt(2 ** (1 / 3) - 1))
    return 2 / (math.pi * alpha**2) * (1 + (dx**2 + dy**2) / alpha**2) ** -3 * 0.4**2


def _exposure_noise(built: dict) -> np.ndarray:
    """Per exposure of ``built["truth_exposures"]``: the pixel noise of its scaled exposure
    (scaled units per input pixel, mean over the CCDs), from the injected sky, read noise and
    zero points."""
    zps = pd.read_parquet(built["survey"] / "truth" / "zeropoints.parquet")
    sigmas = []
    for _, exp in built["truth_exposures"].iterrows():
        per_ccd = []
        for ccd in Camera.kmtnet(1 / 16).ccds:
            zp = zps[(zps.file == exp.file) & (zps.ccd == ccd.name)]
            zp_mean = float(np.mean(zp.zp_y0 + zp.zp_slope / 2))
            sky_e = exp[f"sky_adu_{ccd.name}"] * ccd.gain_e_per_adu
            noise_adu = math.sqrt(sky_e + ccd.read_noise_e**2) / ccd.gain_e_per_adu
            per_ccd.append(noise_adu * 10 ** (0.4 * (30 - zp_mean)))
        sigmas.append(np.mean(per_ccd))
    return np.array(sigmas)


def _noisy_median(model: np.ndarray, has_data: np.ndarray, noise: np.ndarray,
                  rng: np.random.Generator, draws: int = 100) -> np.ndarray:
    """Mean over noise draws of the per-pixel median of the exposures' pixels (first axis of
    ``model`` and ``has_data``) with their pixel noise added. Where the exposures differ (site
    colour terms, seeing) the median of noisy pixels is not the median of the noise-free ones:
    0.001-0.005 mag on the stars of this survey. Draws come in +/- pairs (antithetic: the
    noise's linear part cancels, so few draws do)."""
    half = rng.normal(size=(draws // 2, *model.shape)) * noise[:, None]
    noisy = np.concatenate([half, -half]) + model
    valid = np.broadcast_to(has_data, noisy.shape)
    return _median_over_valid(noisy.swapaxes(0, 1), valid.swapaxes(0, 1)).mean(axis=0)


def _aperture_magnitudes(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius_arcsec: float,
                         seeing_arcsec: float) -> np.ndarray:
    """Magnitudes (zero point 30) in circular apertures at (x, y), with the Moffat (beta = 3)
    aperture correction at ``seeing_arcsec``."""
    flux, _, _ = sep.sum_circle(image, x, y, radius_arcsec / 0.4, subpix=5)
    alpha = seeing_arcsec / (2 * math.sqrt(2 ** (1 / 3) - 1))
    enclosed = 1 - (1 + (radius_arcsec / alpha) ** 2) ** -2
    return 30 - 2.5 * np.log10(flux / enclosed)


def _expected_magnitudes(built: dict, stars: np.ndarray, x: np.ndarray, y: np.ndarray,
                         radius_arcsec: float) -> np.ndarray:
    """What the aperture photometry of ``_aperture_offsets`` gives for the truth sources
    ``stars`` (point sources at co-add pixels x, y) on average over the co-add's noise.

    Per exposure, the star at its true magnitude with its site's colour term times the true
    V-I (as the simulator injects it) and a Moffat PSF at the exposure's true seeing, on a
    stamp of co-add pixels; the per-pixel median over the exposures with data there
    (:func:`_exposure_data_maps`) with their pixel noise (:func:`_noisy_median`); measured as
    the co-add is. The median of exposures from sites with different colour terms, or of
    different seeing, is not the exposure with the median colour term: in I of this survey (one
    SAAO exposure, colour term 0.04, three CTIO, 0.02) the red stars come out up to 0.02 mag
    brighter than that. The noise is the input pixels' (resampling lowers it by ~10%, which
    moves the expectation by < 0.0003 mag).
    """
    src = built["truth_sources"].iloc[stars]
    colour = (src.mag_V - src.mag_I).to_numpy()
    mag = src[f"mag_{built['band']}"].to_numpy()
    offsets = np.arange(-_MODEL_HALF_PX, _MODEL_HALF_PX + 1)
    cx, cy = np.rint(x), np.rint(y)
    row, column = np.meshgrid(offsets, offsets, indexing="ij")
    gx, gy = cx[:, None, None] + column, cy[:, None, None] + row
    dx, dy = (gx - x[:, None, None]) * 0.4, (gy - y[:, None, None]) * 0.4
    exposures = built["truth_exposures"]
    model = np.array([
        10 ** (-0.4 * (mag - site(exp.site).colour_term * colour - 30))[:, None, None]
        * _moffat(dx, dy, exp.seeing_fwhm_arcsec) for exp in exposures.itertuples()])
    has_data = _exposure_data_maps(built, gx, gy)
    noise = _exposure_noise(built)
    near = np.hypot(*np.meshgrid(offsets, offsets)) <= radius_arcsec / 0.4 + 1
    rng = np.random.default_rng(5)
    median = np.zeros(gx.shape)
    for k in range(len(stars)):
        median[k][near] = _noisy_median(model[:, k][:, near], has_data[:, k][:, near], noise,
                                        rng)
    seeing = built["header"]["SEEING"]
    return np.array([_aperture_magnitudes(stamp, x[k:k + 1] - cx[k] + _MODEL_HALF_PX,
                                          y[k:k + 1] - cy[k] + _MODEL_HALF_PX, radius_arcsec,
                                          seeing)[0] for k, stamp in enumerate(median)])


def _aperture_offsets(built: dict, on_ring: bool = False) -> np.ndarray:
    """Co-add minus expected magnitudes of the isolated stars (``_isolated_stars``): 8" radius
    apertures, Moffat (beta = 3, the simulator's PSF) aperture correction at the measured
    seeing, the expectation from truth by :func:`_expected_magnitudes`."""
    radius_arcsec = 8.0
    idx, x, y = _isolated_stars(built, radius_arcsec / 0.4, on_ring)
    # as the catalogs will: minus the background map
    image = np.ascontiguousarray(built["image"])
    no_data = built["ndith"] == 0
    first = sep.Background(image, mask=no_data, bw=64, bh=64)
    _, segmap = sep.extract(image - first.back(), 1.5, err=first.globalrms, mask=no_data,
                            minarea=5, segmentation_map=True)
    sources = binary_dilation(segmap > 0, np.ones((21, 21), dtype=bool))
    background = sep.Background(image, mask=no_data | sources, bw=128, bh=128)
    measured = _aperture_magnitudes(image - background.back(), x[idx], y[idx], radius_arcsec,
                                    built["header"]["SEEING"])
    return measured - _expected_magnitudes(built, idx, x[idx], y[idx], radius_arcsec)


@pytest.mark.parametrize("band", ["V", "I"])
def test_aperture_photometry_of_isolated_stars_matches_truth(matching, band):
    """Stars away from every unmasked artifact (V: all exposures from CTIO; I: one from SAAO,
    whose colour term differs): median offset from the expectation < 0.005 mag."""
    offset = _aperture_offsets(matching[(band, True)])
    logging.getLogger(__name__).info("photometry %s: %d stars, median offset %.4f mag", band,
                                     offset.size, np.median(offset))
    assert offset.size >= 8
    assert abs(np.median(offset)) < 0.005, f"{band}: median offset {np.median(offset):.4f} mag"


def test_background_matching_removes_the_stray_light_ring(matching):
    """Stars whose aperture touches the I_04 stray-light ring (4; V has 1, at NDITH 2 where no
    difference tells which exposure is lifted): the median offset from truth (the photometric
    check's method) is within 0.005 mag with matching, lifted by more than 0.03 mag without.
    Against the co-add of the exposures with the true ring subtracted (same noise): where the
    ring lifts the plain co-add (by > 3 on average over 25 px, at NDITH >= 3), matching leaves
    less than 10% of the mean lift."""
    plain, matched, oracle = (matching[("I", key)] for key in (False, True, "oracle"))
    before = _aperture_offsets(plain, on_ring=True)
    after = _aperture_offsets(matched, on_ring=True)
    ideal = _aperture_offsets(oracle, on_ring=True)
    lift = uniform_filter(plain["image"] - oracle["image"], 25)
    ring = (lift > 3.0) & (plain["ndith"] >= 3)
    lift_before = float(np.mean((plain["image"] - oracle["image"])[ring]))
    lift_after = float(np.mean((matched["image"] - oracle["image"])[ring]))
    logging.getLogger(__name__).info(
        "I ring stars (%d): median offset from truth %.4f mag plain, %.4f matched, %.4f with the "
        "true ring subtracted; per star minus the latter %s plain, %s matched; mean lift over "
        "%d ring pixels %.2f plain, %.2f matched", after.size, np.median(before),
        np.median(after), np.median(ideal), np.round(before - ideal, 3),
        np.round(after - ideal, 3), ring.sum(), lift_before, lift_after)
    assert after.size >= 4 and ring.sum() > 10_000
    assert np.median(before) < -0.03
    assert abs(np.median(after)) < 0.005, f"median offset {np.median(after):.4f} mag"
    assert abs(lift_after) < 0.1 * lift_before


def _bright_galaxies(built: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth galaxies brighter than 21.5 mag away from the edges: x, y and aperture radius
    (px: 4 r_eff + 2 FWHM, at least 6")."""
    src = built["truth_sources"]
    x, y = built["wcs"].all_world2pix(*positions_at(src, float(built["truth_exposures"].mjd
                                                                .mean())), 0)
    ny, nx = built["image"].shape
    pick = ((src.type == "galaxy").to_numpy() & (src[f"mag_{built['band']}"].to_numpy() < 21.5)
            & (x > 50) & (x < nx - 50) & (y > 50) & (y < ny - 50))
    radius = np.maximum(6.0, 4 * src.r_eff_arcsec.to_numpy() + 2 * built["header"]["SEEING"])
    return x[pick], y[pick], radius[pick] / 0.4


def test_background_matching_keeps_stars_galaxies_and_maps(matching):
    """Away from the ring, matching changes nothing that matters (V, ring in V_03 only): the
    isolated stars' offsets from truth move by < 0.002 mag in the median and none gets further
    from truth by more than its aperture noise (or 0.002 mag); the total flux of every bright
    galaxy changes by less than its aperture noise and the median by < 0.5%; NDITH and the mask
    are identical."""
    plain, matched = matching[("V", False)], matching[("V", True)]
    noise = sep.Background(np.ascontiguousarray(plain["image"]),
                           mask=plain["ndith"] == 0).globalrms
    before, after = _aperture_offsets(plain), _aperture_offsets(matched)
    idx, _, _ = _isolated_stars(plain, 8.0 / 0.4)
    star_flux = 10 ** (0.4 * (30 - plain["truth_sources"][f"mag_{BAND}"].to_numpy()[idx]))
    star_noise_mag = 1.0857 * noise * math.sqrt(math.pi) * (8.0 / 0.4) / star_flux
    assert before.size == after.size >= 8
    x, y, radius = _bright_galaxies(plain)
    assert x.size >= 5
    flux = {}
    for name, built in (("plain", plain), ("matched", matched)):
        image = np.ascontiguousarray(built["image"])
        flux[name], _, _ = sep.sum_circle(image, x, y, radius, subpix=5)
    aperture_noise = noise * np.sqrt(np.pi * radius**2)
    ratio = flux["matched"] / flux["plain"]
    logging.getLogger(__name__).info(
        "V: isolated stars median offset %.4f -> %.4f mag, change / aperture noise %s; %d "
        "bright galaxies, flux ratio matched/plain %s, change / aperture noise %s",
        np.median(before), np.median(after), np.round((after - before) / star_noise_mag, 2),
        x.size, np.round(ratio, 4), np.round((flux["matched"] - flux["plain"]) / aperture_noise,
                                             2))
    assert abs(np.median(after - before)) < 0.002
    # matching may take out ring wings and halo below the STRAY_LIGHT bit (one star: 4 sigma
    # closer to truth), never make a star worse by more than its noise (at least 0.002 mag)
    assert np.all(np.abs(after) < np.abs(before) + np.maximum(star_noise_mag, 0.002))
    assert abs(np.median(ratio) - 1) < 0.005
    assert np.all(np.abs(flux["matched"] - flux["plain"]) < aperture_noise)
    assert np.array_equal(plain["ndith"], matched["ndith"])
    assert np.array_equal(plain["mask"], matched["mask"])
    assert matched["result"]["background_offset_max"] > 0 == plain["result"][
        "background_offset_max"]


def test_background_matching_in_blocks_equals_the_whole_grid(matching, tmp_path):
    """I matched in blocks of 256 rows (6 on the 1368 px grid, the inner ones reading neither
    end of it) vs in one block: NDITH and mask identical, the largest offset the same, nearly
    every pixel within 1e-3 of the co-add's noise and none beyond 0.1 (a source pixel at sep's
    threshold or a pairwise map at the cut may flip between the two and move a mesh-sized
    patch, see background_offset_blocks; measured: 9e-6 on one survey, 0.023 on another)."""
    whole = matching[("I", True)]
    release = whole["release"]
    result = run_coadd(tile=TILE, band="I", ra=TILE_RA, dec=TILE_DEC, release_dir=tmp_path,
                       scaled=[scaled_path(release, s) for s in whole["stems"]],
                       masks=[mask_path(release, s) for s in whole["stems"]],
                       settings=CoaddSettings(nthreads=2, background_match=True,
                                              background_match_block_rows=256))
    blocks = _load_coadd(whole, tmp_path, "I", result)
    noise = sep.Background(np.ascontiguousarray(whole["image"]),
                           mask=whole["ndith"] == 0).globalrms
    difference = np.abs(blocks["image"] - whole["image"]) / noise
    logging.getLogger(__name__).info(
        "I in blocks of 256 rows vs the whole grid: max difference %.2g sigma, %.3f%% of the "
        "pixels differ; match %.2f s vs %.2f s", difference.max(), 100 * np.mean(difference > 0),
        result["timings_s"]["match_s"], whole["result"]["timings_s"]["match_s"])
    assert np.array_equal(blocks["ndith"], whole["ndith"])
    assert np.array_equal(blocks["mask"], whole["mask"])
    assert abs(result["background_offset_max"] - whole["result"]["background_offset_max"]) < (
        1e-3 * noise)
    assert difference.max() < 0.1 and np.mean(difference > 1e-3) < 0.01


def _smooth_bump(shape: tuple[int, int], cx: float, cy: float, sigma: float) -> np.ndarray:
    y, x = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / sigma**2)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 6), lifted=st.integers(0, 5),
       amplitude=st.floats(2.0, 10.0), shift=st.floats(-50.0, 50.0))
def test_background_offsets_find_the_lifted_exposure(seed, n, lifted, amplitude, shift):
    """n exposures of unit noise sharing stars (different seeing), one lifted by a smooth bump
    (sigma 24 px), another with a chip gap: the lifted one's offset is the bump, the others' are
    ~0, wherever >= 3 exposures cover; a constant added to every exposure changes no offset;
    without the bump the 3-sigma cut zeroes the maps."""
    lifted %= n
    rng = np.random.default_rng(seed)
    shape = (128, 128)
    stars = rng.uniform(5, 123, (12, 2))
    stack = rng.normal(0.0, 1.0, (n, *shape)).astype(np.float32)
    for i in range(n):
        for sx, sy in stars:
            stack[i] += 50.0 * _smooth_bump(shape, sx, sy, rng.uniform(1.2, 2.0))
    bump = amplitude * _smooth_bump(shape, 64 + shift, 64 - shift, 24.0)
    stack[lifted] += bump
    valid = np.ones(stack.shape, dtype=bool)
    valid[(lifted + 1) % n, :, 40:52] = False
    stack[~valid] = 0.0
    offsets = background_offsets(stack, valid, mesh_px=16, filter_size=1, min_sigma=0.0)
    covered = valid.sum(axis=0) >= 3
    error = np.abs(offsets[lifted] - bump)[covered & valid[lifted]]
    others = np.abs(np.delete(offsets, lifted, axis=0))[:, covered]
    # the map's noise: ~0.1 of a pixel's sigma at a 16 px mesh, up to ~1 at the image edges
    assert np.median(error) < 0.15 + 0.02 * amplitude
    assert np.percentile(error, 95) < 0.5 + 0.1 * amplitude
    assert np.median(others) < 0.1 and np.percentile(others, 95) < 0.5
    assert np.all(offsets[~valid] == 0)
    shifted = background_offsets(stack + np.float32(7.0), valid, mesh_px=16, filter_size=1,
                                 min_sigma=0.0)
    change = np.abs(shifted - offsets)  # float rounding may flip a source pixel at threshold
    assert np.median(change) < 1e-4 and change.max() < 0.1
    # without the bump, the 3-sigma cut leaves little of the maps' noise (8 x 8 meshes: a
    # coarse MAD, so 4-15% of the pixels keep an offset, mostly at the image edges)
    stack[lifted] -= bump
    quiet = background_offsets(stack, valid, mesh_px=16)
    assert np.mean(quiet[valid] != 0) < 0.25


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 5), block_meshes=st.integers(2, 8),
       gap_row=st.integers(0, 620))
@example(seed=885085458, n=4, block_meshes=2, gap_row=114)
def test_background_offsets_in_blocks_equal_the_whole_grid(seed, n, block_meshes, gap_row):
    """Block-wise offsets (rows of block_meshes x 16 px, their margins as run_coadd's, so that
    inner blocks see neither end of the grid) equal the whole grid's, block edges included:
    within 1e-3 of a pixel's sigma (measured on 16 stacks: <= 4e-5, median 3e-6), with or
    without the min_sigma cut; except that a pair value right at the min_sigma threshold may
    flip and move one mesh-sized patch by ~0.1 sigma (about 1 case in 200: 0.127 at seed
    885085458, n 4, 2 meshes, gap row 114), so 99% of the pixels must agree and none by 0.2."""
    rng = np.random.default_rng(seed)
    shape = (640, 96)
    stack = rng.normal(0.0, 1.0, (n, *shape)).astype(np.float32)
    fwhm = rng.uniform(1.2, 2.0, n)
    for sx, sy in rng.uniform(3, [shape[1] - 3, shape[0] - 3], (80, 2)):
        for i in range(n):
            stack[i] += 50.0 * _smooth_bump(shape, sx, sy, fwhm[i])
    stack[0] += 6.0 * _smooth_bump(shape, 48, rng.uniform(0, shape[0]), 30.0)
    valid = np.ones(stack.shape, dtype=bool)
    valid[1, :, 40:52] = False  # a chip gap along the columns, one along the rows
    valid[2, gap_row:gap_row + 12] = False
    stack[~valid] = 0.0
    block_rows = 16 * block_meshes
    for min_sigma in (0.0, 3.0):
        whole = background_offsets(stack, valid, mesh_px=16, min_sigma=min_sigma)
        reads = []

        def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
            reads.append((r0, r1))
            return stack[:, r0:r1], valid[:, r0:r1]

        blocks = list(background_offset_blocks(read_rows, shape[0], block_rows=block_rows,
                                                mesh_px=16, min_sigma=min_sigma))
        assert [(y0, y1) for y0, y1, _ in blocks] == [
            (y0, min(y0 + block_rows, shape[0])) for y0 in range(0, shape[0], block_rows)]
        assert any(r0 > 0 and r1 < shape[0] for r0, r1 in reads)
        difference = np.abs(np.concatenate([o for _, _, o in blocks], axis=1) - whole)
        assert np.mean(difference < 1e-3) >= 0.99 and difference.max() < 0.2, difference.max()
    with pytest.raises(ValueError, match="block_rows"):
        next(background_offset_blocks(lambda r0, r1: (stack, valid), shape[0], block_rows=24,
                                      mesh_px=16))


def test_masked_pixels_leave_the_median_unless_every_exposure_is_masked(tmp_path):
    """Three exposures' weight frames on a 40 x 40 grid (one shifted by 5 px): a pixel masked
    in one exposure loses that exposure's weight (grown by one pixel) where another exposure
    has unmasked data; where every covering exposure is masked, all keep their weight."""
    from astropy.wcs import WCS

    from ks4release.reduction.coadd import (
        _exclude_masked_pixels,
        _masked_on_grid,
        read_excluded,
        write_excluded,
    )
    from ks4release.reduction.coadd_maps import CcdProjection

    shape = (40, 40)
    grid = WCS(naxis=2)
    grid.wcs.crpix, grid.wcs.crval = [20.5, 20.5], [10.0, -30.0]
    grid.wcs.ctype, grid.wcs.cdelt = ["RA---TAN", "DEC--TAN"], [-1e-4, 1e-4]
    frames = {}
    for stem, x0 in (("a", 0), ("b", 0), ("c", 5)):
        header = fits.Header({"CRPIX1": 20.5 - x0, "CRPIX2": 20.5, "CRVAL1": 10.0,
                              "CRVAL2": -30.0})
        frame = tmp_path / f"{stem}.1.resamp.fits"
        fits.PrimaryHDU(np.zeros((40, 35), np.float32), header).writeto(frame)
        fits.PrimaryHDU(np.ones((40, 35), np.float32), header).writeto(
            tmp_path / f"{stem}.1.resamp.weight.fits")
        frames[stem] = [frame]
    bits = {stem: np.zeros(shape, np.uint8) for stem in frames}
    bits["a"][10, 10] = 1           # only a: b and c (shifted, x >= 5) have data -> a loses it
    for stem in frames:
        bits[stem][30, 20] = 4      # all three masked -> all keep it
    masked = {stem: _masked_on_grid([CcdProjection(y0=0, y1=40, x0=0, x1=40, bits=b)], 15,
                                    shape) for stem, b in bits.items()}
    excluded = _exclude_masked_pixels(frames, masked, grid, shape)
    weights = {stem: fits.getdata(tmp_path / f"{stem}.1.resamp.weight.fits") for stem in frames}
    assert np.array_equal(np.argwhere(weights["a"] == 0), [[y, x] for y in (9, 10, 11)
                                                           for x in (9, 10, 11)])
    assert np.all(weights["b"] == 1) and np.all(weights["c"] == 1)
    # what is returned (and written for the photometry) is exactly where the weight went to 0
    assert np.array_equal(excluded["a"], np.ravel_multi_index(np.nonzero(weights["a"] == 0),
                                                              shape))
    assert excluded["b"].size == 0 and excluded["c"].size == 0
    path = tmp_path / "excluded.npz"
    write_excluded(path, excluded, shape)
    back = read_excluded(path, shape)
    assert back.keys() == excluded.keys()
    assert all(np.array_equal(back[k], excluded[k]) for k in excluded)
    with pytest.raises(InputError, match="shape"):
        read_excluded(path, (41, 40))
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="excluded.npz"):
        read_excluded(path, shape)


def test_star_positions_match_truth(built):
    """Windowed centroids of bright stars on the co-add vs true positions at the mean epoch."""
    idx, x, y = _isolated_stars(built, 8.0 / 0.4)
    xw, yw, flag = sep.winpos(built["image"], x[idx], y[idx], 0.6 * built["header"]["SEEING"]
                              / 0.4 / 2.355 * 2)
    assert np.all(flag == 0)
    offset = np.hypot(xw - x[idx], yw - y[idx]) * 0.4
    logging.getLogger(__name__).info("astrometry: %d stars, median offset %.4f arcsec",
                                     idx.size, np.median(offset))
    assert np.median(offset) < 0.03


def _output_pixels_in_exposures(built: dict, step: int):
    """Every ``step``-th output pixel, and per exposure its CCD and pixel via the true WCS."""
    ny, nx = built["image"].shape
    gy, gx = np.mgrid[step // 2:ny:step, step // 2:nx:step]
    ra, dec = built["wcs"].wcs_pix2world(gx.ravel(), gy.ravel(), 0)
    per_exposure = {}
    for stem, hdul in _truth_masks(built).items():
        hits = []
        for name in CCD_NAMES:
            w = quiet_wcs(hdul[name].header)
            cx, cy = w.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50)
            hits.append((name, cx, cy, hdul[name].data))
        per_exposure[stem] = hits
    return gy.ravel(), gx.ravel(), per_exposure


def test_ndith_equals_true_coverage_away_from_edges(built):
    """NDITH = exposures whose CCD holds the pixel on unmasked data, or, where every exposure
    is masked, on data the filling kept (runs short enough to fill), wherever the pixel is more
    than 4 input pixels from the edge of a CCD or of such a region (LANCZOS3 reaches 3
    pixels)."""
    gy, gx, per_exposure = _output_pixels_in_exposures(built, step=3)
    unmasked = np.zeros(gy.size, dtype=int)
    usable = np.zeros(gy.size, dtype=int)
    ambiguous = np.zeros(gy.size, dtype=bool)
    pad, reach = 8, 4
    square = np.ones((2 * reach + 1, 2 * reach + 1), dtype=bool)
    for hits in per_exposure.values():
        for _, cx, cy, truth in hits:
            for filled, count in ((False, unmasked), (True, usable)):
                no_data = np.pad(_without_data(truth, filled), pad, constant_values=True)
                band = binary_dilation(no_data, square) & binary_dilation(~no_data, square)
                ny, nx = no_data.shape
                ix = np.rint(cx).astype(int) + pad
                iy = np.rint(cy).astype(int) + pad
                on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
                ambiguous[on] |= band[iy[on], ix[on]]
                count[on] += ~no_data[iy[on], ix[on]]
    count = np.where(unmasked > 0, unmasked, usable)
    ndith = built["ndith"][gy, gx]
    clear = ~ambiguous
    agree = np.mean(ndith[clear] == count[clear])
    logging.getLogger(__name__).info("NDITH agrees on %.5f of %d pixels", agree, clear.sum())
    assert clear.sum() > 0.6 * clear.size
    assert agree == 1.0, f"NDITH agrees with truth on {agree:.5f} of the pixels"
    assert set(np.unique(built["ndith"])) <= set(range(len(built["stems"]) + 1))


def test_no_cosmic_ray_or_satellite_residual_above_5_sigma(built):
    """5-sigma detections (sep, 3x3 conv kernel, minarea 5) that match no truth source within
    3" must not lie on a cosmic ray or satellite trail of any exposure (at NDITH >= 3)."""
    image = np.ascontiguousarray(built["image"])
    valid = built["ndith"] >= 3
    bkg = sep.Background(image, mask=~valid)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
    objects = sep.extract(image - bkg.back(), 5.0, err=bkg.globalrms, mask=~valid, minarea=5,
                          filter_kernel=kernel)
    wcs = built["wcs"]
    ra, dec = wcs.all_pix2world(objects["x"], objects["y"], 0)
    src = built["truth_sources"]
    tx, ty = wcs.all_world2pix(*positions_at(src, float(built["truth_exposures"].mjd.mean())), 0)
    distance, _ = cKDTree(np.c_[tx, ty]).query(np.c_[objects["x"], objects["y"]])
    unmatched = distance > 3.0 / 0.4
    on_artifact = np.zeros(objects.size, dtype=bool)
    n_cosmic, n_satellite = 0, 0
    for hdul in _truth_masks(built).values():
        for name in CCD_NAMES:
            truth = hdul[name].data
            cosmic = ((truth & COSMIC) != 0) & ((truth & CROSSTALK) == 0)
            satellite = (truth & SATELLITE) != 0
            artifact = cosmic | satellite
            n_cosmic += int(cosmic.sum())
            n_satellite += int(satellite.sum())
            cx, cy = quiet_wcs(hdul[name].header).all_world2pix(ra, dec, 0)
            ny, nx = truth.shape
            for dx in range(-3, 4):
                for dy in range(-3, 4):
                    jx, jy = np.rint(cx).astype(int) + dx, np.rint(cy).astype(int) + dy
                    ok = (jx >= 0) & (jx < nx) & (jy >= 0) & (jy < ny)
                    on_artifact[ok] |= artifact[jy[ok], jx[ok]]
    assert n_cosmic > 20 and n_satellite > 1000  # the inputs do have both
    assert objects.size > 30
    residuals = objects[unmatched & on_artifact]
    logging.getLogger(__name__).info(
        "residuals: %d detections, %d unmatched, %d of them on an artifact", objects.size,
        unmatched.sum(), residuals.size)
    assert residuals.size == 0, f"residuals at {list(zip(residuals['x'], residuals['y']))}"


def test_seeing_and_depth_match_what_was_injected(built):
    """Seeing within 10% of the median injected FWHM; the 5-sigma flux limit within 10% of the
    one predicted from the injected sky, read noise and zero points (median of N exposures)."""
    exposures = built["truth_exposures"]
    header = built["header"]
    assert header["SEEING"] == pytest.approx(np.median(exposures.seeing_fwhm_arcsec), rel=0.10)
    # the simulator's PSF is a Moffat of beta 3; the median of exposures of different seeing
    # has slightly broader wings (measured 2.88 in V and I)
    assert header["PSFBETA"] == pytest.approx(SimulationConfig().moffat_beta, rel=0.10)
    camera = Camera.kmtnet(1 / 16)
    sigmas = _exposure_noise(built)
    rng = np.random.default_rng(0)
    draws = rng.normal(0, 1, (200_000, len(sigmas))) * np.array(sigmas)
    sigma_median = float(np.std(np.median(draws, axis=1)))
    diameter = header["DEPTHAPD"]
    n_input_pixels = math.pi * diameter**2 / 4 / camera.pixel_scale_arcsec**2
    predicted = 30 - 2.5 * math.log10(5 * sigma_median * math.sqrt(n_input_pixels))
    flux_ratio = 10 ** (-0.4 * (header["MAGLIM"] - predicted))
    logging.getLogger(__name__).info(
        "seeing %.3f vs injected %.3f; MAGLIM %.3f vs predicted %.3f (5-sigma flux ratio %.3f)",
        header["SEEING"], np.median(exposures.seeing_fwhm_arcsec), header["MAGLIM"], predicted,
        flux_ratio)
    assert flux_ratio == pytest.approx(1.0, abs=0.10)


def test_products_headers_and_exposures_json(built):
    header, release = built["header"], built["release"]
    assert header["MAGZERO"] == 30.0 and header["NCOMBINE"] == len(built["stems"])
    assert header["MJD-OBS"] == pytest.approx(built["truth_exposures"].mjd.min())
    assert header["MJD-END"] == pytest.approx(built["truth_exposures"].mjd.max())
    assert "CD1_1" in header and "PC1_1" not in header
    wcs, shape = tile_grid(TILE_RA, TILE_DEC, Camera.kmtnet(1 / 16))
    assert built["image"].shape == shape
    assert np.allclose(built["wcs"].wcs.crpix, wcs.wcs.crpix)
    assert built["mask"].dtype == np.uint8 and not np.any(built["mask"] & ~np.uint8(15))
    payload = json.loads(coadd_exposures_path(release, TILE, BAND).read_text())
    assert payload["tile"] == TILE and payload["band"] == BAND
    by_stem = {e["stem"]: e for e in payload["exposures"]}
    assert set(by_stem) == set(built["stems"])
    for _, exp in built["truth_exposures"].iterrows():
        entry = by_stem[exp.stem]
        assert entry["ok"] and entry["mjd"] == pytest.approx(exp.mjd) and entry["site"] == exp.site
        assert sorted(entry["ccds"]) == sorted(CCD_NAMES) and entry["excluded_ccds"] == {}
        # PSFR50 of the scaled CCDs (here the true Moffat's, beta 3: r50 = 0.6312 FWHM)
        assert entry["psf_r50_arcsec"] == pytest.approx(0.6312 * exp.seeing_fwhm_arcsec,
                                                        rel=0.01)
        # the scaled exposures' colour term and pivot (ZPCOLT, ZPCOLPIV), for site_colour
        assert entry["colour_term"] == pytest.approx(site(exp.site).colour_term)
        assert entry["colour_pivot"] == 0.0
    # the dead amplifier (bit 8) shows in the mask map wherever only it covers a pixel
    assert np.any(built["mask"] & 8)


def _segment_distance(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance of every point (n, 2) to the closed polygon's sides (same units)."""
    best = np.full(len(points), np.inf)
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        ab = b - a
        t = np.clip((points - a) @ ab / (ab @ ab), 0.0, 1.0)
        best = np.minimum(best, np.hypot(*(points - (a + t[:, None] * ab)).T))
    return best


def test_exposure_footprints_follow_the_true_ccd_edges(built):
    """Joined by straight lines on the co-add grid (as the catalog stage does), the footprint
    vertices follow every true CCD edge, bowed by the field distortion, within 0.1 co-add px;
    the four corners alone would miss it by more than 0.5 px."""
    payload = json.loads(coadd_exposures_path(built["release"], TILE, BAND).read_text())
    grid = built["wcs"]
    n = FOOTPRINT_VERTICES_PER_SIDE
    t = np.linspace(0.0, 1.0, 200, endpoint=False)
    worst, worst_corners = 0.0, 0.0
    truth = _truth_masks(built)
    for entry in payload["exposures"]:
        for name, vertices in entry["ccds"].items():
            vertices = np.asarray(vertices)
            assert vertices.shape == (4 * n, 2)
            header = truth[entry["stem"]][name].header
            w, nx, ny = quiet_wcs(header), header["NAXIS1"], header["NAXIS2"]
            x, y = w.all_world2pix(vertices[:, 0], vertices[:, 1], 0)
            on_edge = np.minimum.reduce([np.abs(x + 0.5), np.abs(x - nx + 0.5),
                                         np.abs(y + 0.5), np.abs(y - ny + 0.5)])
            assert np.all(on_edge < 1e-3)
            edge_x = np.concatenate([t * nx, np.full_like(t, nx), (1 - t) * nx, 0 * t]) - 0.5
            edge_y = np.concatenate([0 * t, t * ny, np.full_like(t, ny), (1 - t) * ny]) - 0.5
            ra, dec = w.all_pix2world(edge_x, edge_y, 0)
            edge = np.column_stack(grid.wcs_world2pix(ra, dec, 0))
            polygon = np.column_stack(grid.wcs_world2pix(vertices[:, 0], vertices[:, 1], 0))
            worst = max(worst, _segment_distance(edge, polygon).max())
            worst_corners = max(worst_corners, _segment_distance(edge, polygon[::n]).max())
    assert worst < 0.1 and worst_corners > 0.5


@settings(max_examples=30, deadline=None)
@given(per_side=st.integers(1, 40), ccd=st.sampled_from(range(4)),
       rotation=st.floats(-1.0, 1.0))
def test_ccd_footprint_vertices_walk_the_outer_pixel_edges(per_side, ccd, rotation):
    """4 x per_side vertices, corner (-0.5, -0.5) first, in pixel order round the outer pixel
    edges, with every corner among them, through a TAN-SIP WCS."""
    camera = Camera.kmtnet(1 / 16)
    chip = camera.ccds[ccd]
    w = true_wcs(chip, 359.9, -62.0, rotation, sip_coefficient(1 / 16))
    vertices = np.asarray(ccd_footprint_deg(w, (chip.ny, chip.nx), vertices_per_side=per_side))
    assert vertices.shape == (4 * per_side, 2)
    assert np.all((vertices[:, 0] >= 0) & (vertices[:, 0] < 360))
    x, y = w.all_world2pix(vertices[:, 0], vertices[:, 1], 0)
    corners = [(-0.5, -0.5), (chip.nx - 0.5, -0.5), (chip.nx - 0.5, chip.ny - 0.5),
               (-0.5, chip.ny - 0.5)]
    assert np.allclose(np.column_stack([x, y])[::per_side], corners, atol=1e-4)
    # the shoelace area in pixel coordinates: counter-clockwise, the whole chip
    area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    assert area == pytest.approx(chip.nx * chip.ny, rel=1e-6)


def test_ccd_footprint_needs_a_vertex_per_side():
    w = true_wcs(Camera.kmtnet(1 / 16).ccds[0], 0.0, -62.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="vertices_per_side"):
        ccd_footprint_deg(w, (576, 576), vertices_per_side=0)


def test_mask_projection_spline_matches_exact_mapping(built):
    """The mask projected with the coarse spline mapping (every 16 px) equals the one from the
    exact WCS at every output pixel but a handful at bit boundaries."""
    with fits.open(built["survey"] / "truth" / "masks" / f"{built['stems'][0]}_mask.fits") as h:
        mask, wcs = h["MM"].data & 15, quiet_wcs(h["MM"].header)
    shape = built["image"].shape
    coarse = project_ccd(mask, wcs, built["wcs"], shape, step=16)
    exact = project_ccd(mask, wcs, built["wcs"], shape, step=1)
    assert (coarse.y0, coarse.x0) == (exact.y0, exact.x0) and np.any(exact.bits)
    assert np.mean(coarse.bits != exact.bits) < 1e-4


def test_excluded_ccds_are_logged_and_left_out(built, tmp_path, caplog):
    """ASTOK = F drops a CCD: NDITH is 0 where only it covered, the JSON says why."""
    release = built["release"]
    stem = built["stems"][0]
    copy = tmp_path / "work" / "scaled" / f"{stem}.fits"
    copy.parent.mkdir(parents=True)
    with fits.open(scaled_path(release, stem)) as hdul:
        for name in ("MM", "NN", "TT"):
            hdul[name].header["ASTOK"] = False
        hdul.writeto(copy)
    with caplog.at_level(logging.WARNING, logger="ks4release.reduction.coadd"):
        run_coadd(tile=TILE, band=BAND, ra=TILE_RA, dec=TILE_DEC, scaled=[copy],
                  masks=[mask_path(release, stem)], release_dir=tmp_path,
                  settings=CoaddSettings(depth_apertures=100))
    assert sum("excluded" in r.getMessage() for r in caplog.records) == 3
    ndith = fits.getdata(coadd_path(tmp_path, TILE, BAND, "ndith"))
    image = fits.getdata(coadd_path(tmp_path, TILE, BAND, "coadd"))
    assert ndith.max() == 1 and 0.15 < np.mean(ndith) < 0.35  # one CCD of four
    assert np.all(image[ndith == 0] == 0)
    entry = json.loads(coadd_exposures_path(tmp_path, TILE, BAND).read_text())["exposures"][0]
    assert list(entry["ccds"]) == ["KK"] and entry["excluded_ccds"]["NN"] == "ASTOK = False"
