"""Photometry in blocks: the plan, the crops, and a co-add measured in blocks against whole."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from ks4release.layout import coadd_path
from ks4release.reduction.photometry import (
    PhotometrySettings,
    _sky,
    blockwise_noise_factors,
    coverage_noise_factors,
    measured_path,
    run_photometry,
)
from ks4release.reduction.photometry_blocks import (
    Block,
    central_block,
    crop_excluded,
    crop_header,
    plan_blocks,
)
from ks4release.reduction.stellarity import DEFAULT_NNW


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(1, 3000), nx=st.integers(1, 3000), size=st.integers(1, 1200),
       margin=st.integers(0, 400), mesh=st.sampled_from([1, 16, 64, 256]))
def test_cores_tile_the_coadd_once_and_blocks_hold_core_and_margin(ny, nx, size, margin, mesh):
    blocks = plan_blocks((ny, nx), size, margin, mesh)
    owner = np.zeros((ny, nx), dtype=np.int32)
    pad = -(-margin // mesh) * mesh
    for block in blocks:
        y0, y1, x0, x1 = block.core
        oy0, oy1, ox0, ox1 = block.outer
        owner[y0:y1, x0:x1] += 1
        assert (oy0, ox0) == (max(y0 - pad, 0), max(x0 - pad, 0))
        assert (oy1, ox1) == (min(y1 + pad, ny), min(x1 + pad, nx))
        if len(blocks) > 1:
            assert y0 % mesh == 0 and x0 % mesh == 0 and oy0 % mesh == 0 and ox0 % mesh == 0
            # no sliver: every core but the last of a row or column is a full step
            assert y1 - y0 <= -(-size // mesh) * mesh and x1 - x0 <= -(-size // mesh) * mesh
        rows, cols = block.core_slices
        assert (rows.stop - rows.start, cols.stop - cols.start) == (y1 - y0, x1 - x0)
    assert (owner == 1).all()
    if ny <= size and nx <= size:
        assert len(blocks) == 1
    centre = central_block((ny, nx), size, margin, mesh)
    y0, y1, x0, x1 = centre.outer
    assert centre.core == centre.outer and y0 % mesh == 0 and x0 % mesh == 0
    side = -(-size // mesh) * mesh + 2 * pad  # one block's outer side
    for start, stop, n in ((y0, y1, ny), (x0, x1, nx)):
        assert 0 <= start < stop <= n and stop - start == min(side, n)
        # central: the pixels left out on either side differ by less than a mesh
        assert abs(start - (n - stop)) < 2 * mesh or n <= side


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), ny=st.integers(2, 60), nx=st.integers(2, 60))
def test_cropped_excluded_pixels_are_the_blocks_own(seed, ny, nx):
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(ny * nx, size=rng.integers(0, ny * nx), replace=False))
    y0, x0 = rng.integers(0, ny - 1), rng.integers(0, nx - 1)
    y1, x1 = rng.integers(y0 + 1, ny + 1), rng.integers(x0 + 1, nx + 1)
    block = Block((y0, y1, x0, x1), (y0, y1, x0, x1))
    full = np.zeros(ny * nx, dtype=bool)
    full[flat] = True
    local = crop_excluded({"e": flat}, (ny, nx), block)["e"]
    expected = np.flatnonzero(full.reshape(ny, nx)[y0:y1, x0:x1])
    np.testing.assert_array_equal(local, expected)


def test_cropped_header_puts_each_pixel_on_the_same_sky():
    header = fits.Header({"NAXIS": 2, "NAXIS1": 900, "NAXIS2": 700, "CTYPE1": "RA---TAN",
                          "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -60.0,
                          "CRPIX1": 450.5, "CRPIX2": 350.5, "CD1_1": -1.1e-4, "CD1_2": 0.0,
                          "CD2_1": 0.0, "CD2_2": 1.1e-4, "SEEING": 1.5})
    block = Block((256, 512, 512, 768), (0, 700, 256, 900))
    cropped = crop_header(header, block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        full, part = WCS(header), WCS(cropped)
    x, y = np.array([300.0, 512.0, 899.0]), np.array([0.0, 256.0, 699.0])
    np.testing.assert_allclose(part.all_pix2world(x - 256, y - 0, 0),
                               full.all_pix2world(x, y, 0), rtol=0, atol=1e-10)
    assert (cropped["NAXIS1"], cropped["NAXIS2"]) == (644, 700)
    assert header["CRPIX1"] == 450.5  # the co-add's own header is untouched


# --------------------------------------------------------------------------------------------
# A demo co-add measured whole and in blocks

#: Blocks that cut the 1368^2 tiny co-add into 2 x 2, margins of 3 meshes (as the defaults).
BLOCKED = PhotometrySettings(back_size_px=128, block_size_px=684, block_margin_px=384)
WHOLE = PhotometrySettings(back_size_px=128)


@pytest.fixture(scope="module")
def whole_and_blocks(tiny_coadds, tmp_path_factory) -> dict:
    """Single-mode I and dual-mode tables of the tiny co-adds, whole and in 2 x 2 blocks."""
    if not DEFAULT_NNW.is_file():
        pytest.skip(f"SExtractor's network {DEFAULT_NNW} is not installed (source-extractor)")
    tile = tiny_coadds["tile"]
    out = {}
    for name, config in (("whole", WHOLE), ("blocks", BLOCKED)):
        release = tmp_path_factory.mktemp(name) / "release"
        shutil.copytree(tiny_coadds["release"] / "images", release / "images")
        shutil.copytree(tiny_coadds["release"] / "work" / "coadd", release / "work" / "coadd")
        common = {"release_dir": release, "tile": tile, "settings": config,
                  "nnw_path": DEFAULT_NNW}
        run_photometry(mode="single", bands=("I",), **common)
        run_photometry(mode="dual", bands=("V", "I"), **common)
        out[name] = {"single": Table.read(measured_path(release, tile, "single", "I")),
                     "dual": Table.read(measured_path(release, tile, "dual"))}
    out["release"], out["tile"] = tiny_coadds["release"], tile
    return out


def _matched(whole: Table, blocks: Table) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``whole`` with a detection of ``blocks`` within 0.5 px, and that detection."""
    d, j = cKDTree(np.c_[blocks["x_image"], blocks["y_image"]]).query(
        np.c_[whole["x_image"], whole["y_image"]])
    rows = np.flatnonzero(d < 0.5)
    return rows, j[rows]


#: An isolated source has no other detection within this many pixels (6").
ISOLATION_PX = 15.0


def _isolated(table: Table, band: str, rows: np.ndarray, snr: float) -> np.ndarray:
    """Which ``rows`` are isolated (FLAGS 0, no detection within :data:`ISOLATION_PX`) with S/N
    above ``snr`` in ``band``: in blends a 0.01 ADU change of the background, as a block's edge
    leaves, moves knife-edge deblends as any tiny change of the co-add does."""
    xy = np.c_[table["x_image"], table["y_image"]]
    nearest = cKDTree(xy).query(xy[rows], k=2)[0][:, 1]
    return (np.asarray(table[f"flags_{band}"])[rows] == 0) & (nearest > ISOLATION_PX) \
        & (np.asarray(table[f"snr_{band}"])[rows] > snr)


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_blocks_find_the_whole_coadds_sources_once(whole_and_blocks, mode):
    whole, blocks = whole_and_blocks["whole"][mode], whole_and_blocks["blocks"][mode]
    assert blocks.meta["blocks"] == 4 and "blocks" not in whole.meta
    np.testing.assert_array_equal(blocks["number"], np.arange(1, len(blocks) + 1))
    # no source listed by two blocks: detections closer than 0.5 px are one source's twins
    assert not cKDTree(np.c_[blocks["x_image"], blocks["y_image"]]).query_pairs(0.5)
    rows, _ = _matched(whole, blocks)
    isolated = np.flatnonzero(_isolated(whole, "i", np.arange(len(whole)), 10.0))
    found = np.isin(isolated, rows).mean()
    assert isolated.size > 80 and found == 1.0, f"{found:.4f} of {isolated.size}"
    assert abs(len(blocks) - len(whole)) <= 0.05 * len(whole)


@pytest.mark.parametrize("mode, band", [("single", "i"), ("dual", "i"), ("dual", "v")])
def test_blocks_measure_isolated_sources_as_the_whole_coadd(whole_and_blocks, mode, band):
    whole, blocks = whole_and_blocks["whole"][mode], whole_and_blocks["blocks"][mode]
    rows, other = _matched(whole, blocks)
    keep = _isolated(whole, band, rows, 20.0)
    rows, other = rows[keep], other[keep]
    assert rows.size > 40
    # 3e-5 px with the whole co-add's PSF radius in every block (each block's own median put
    # a large galaxy's windowed centroid 0.065 px off)
    for axis in ("x_image", "y_image"):
        np.testing.assert_allclose(blocks[axis][other], whole[axis][rows], atol=0.002)
    np.testing.assert_allclose(blocks["dec"][other], whole["dec"][rows], atol=0.002 * 0.4 / 3600)
    # a neighbour's knife-edge deblend changes the pixels an aperture mirrors: a few 0.001 mag;
    # judged where that flux itself has S/N > 20 (a galaxy of S/N 48 in its Kron ellipse held
    # 310 +- 121 ADU in 5" beside a larger one, 4 ADU apart whole and in blocks as the neighbour
    # model's second mesh differs)
    for column, tolerance, share in ((f"flux_aper5_{band}", 0.002, 0.95),
                                     (f"flux_aper5_{band}", 0.01, 1.0),
                                     (f"flux_auto_{band}", 0.01, 0.95)):
        flux = np.asarray(whole[column])[rows]
        measured = flux > 20.0 * np.asarray(whole[column.replace("flux", "fluxerr")])[rows]
        dmag = np.abs(2.5 * np.log10(np.asarray(blocks[column])[other][measured]
                                     / flux[measured]))
        assert measured.sum() > 40 and np.mean(dmag <= tolerance) >= share, \
            (column, np.sort(dmag)[-5:])
    assert np.mean(np.asarray(blocks[f"flags_{band}"])[other] == 0) >= 0.98


def test_blockwise_noise_factors_equal_the_whole_coadds(tiny_coadds):
    tile = tiny_coadds["tile"]
    read = {kind: fits.getdata(coadd_path(tiny_coadds["release"], tile, "I", kind))
            for kind in ("coadd", "mask", "ndith")}
    image = read["coadd"].astype(np.float32)
    mask, ndith = read["mask"].astype(np.uint8), read["ndith"].astype(np.int16)
    sky = _sky(image, mask, ndith, WHOLE)
    whole = coverage_noise_factors(sky.sub, sky.rms, ndith, ~sky.missing)
    blocks = plan_blocks(image.shape, BLOCKED.block_size_px, BLOCKED.block_margin_px,
                         BLOCKED.back_size_px)

    def crop(block: Block):
        rows, cols = block.slices
        return (np.ascontiguousarray(image[rows, cols]), np.ascontiguousarray(mask[rows, cols]),
                np.ascontiguousarray(ndith[rows, cols]))

    blockwise = blockwise_noise_factors(crop, blocks, image.shape, BLOCKED)
    assert len(blocks) == 4 and blockwise.shape == whole.shape and (whole != 1).sum() >= 2
    np.testing.assert_allclose(blockwise, whole, rtol=2e-3)



def test_blockwise_noise_factors_keep_the_whole_coadds_sparser_lattice(monkeypatch):
    """Beyond _NOISE_MAX_SAMPLES the blocks sample every k-th pixel of the whole co-add's
    lattice (here k = 3; the cores start at multiples of 256), not of their own: the factors
    equal the whole co-add's on it."""
    from ks4release.reduction import photometry

    rng = np.random.default_rng(5)
    shape = (1000, 1000)
    ndith = np.repeat(np.array([1, 2, 3, 4]), 250)[None, :].repeat(shape[0], axis=0)
    image = (rng.normal(0.0, 1.0, shape) * 2.0 / np.sqrt(ndith)).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    config = PhotometrySettings(back_size_px=64, block_size_px=300, block_margin_px=192)
    monkeypatch.setattr(photometry, "_NOISE_MAX_SAMPLES", 2**17)
    blocks = plan_blocks(shape, config.block_size_px, config.block_margin_px,
                         config.back_size_px)
    assert len(blocks) == 16 and any(b.core[0] % 3 for b in blocks)

    def crop(block: Block):
        rows, cols = block.slices
        return image[rows, cols].copy(), mask[rows, cols].copy(), ndith[rows, cols].copy()

    blockwise = blockwise_noise_factors(crop, blocks, shape, config)
    sky = _sky(image, mask, ndith, config)
    whole = coverage_noise_factors(sky.sub, sky.rms, ndith, ~sky.missing, step=3)
    np.testing.assert_allclose(blockwise, whole, rtol=1e-3)
