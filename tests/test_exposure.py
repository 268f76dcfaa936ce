"""The exposure format: a valid file reads back its values, each broken variant is named."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.io import fits
from factories import (
    DELETE,
    DEMO_SCALE,
    amp_sections,
    write_exposure,
    write_garbage,
    write_truncated,
)
from hypothesis import given
from hypothesis import strategies as st

from ks4release.camera import CCD_NAMES, Camera
from ks4release.errors import ConfigError, InputError, StageError
from ks4release.exposure import (
    parse_amp_sections,
    parse_iraf_section,
    read_ccd,
    read_exposure_header,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return write_exposure(tmp_path_factory.mktemp("raw") / "good.fits", band="V", site="SSO",
                          dither=3, mjd=59123.5, exptime=90.0)


def test_valid_exposure_reads_back(valid):
    info = read_exposure_header(valid)
    assert (info.tile, info.band, info.site, info.dither) == ("0000.000-62", "V", "SSO", 3)
    assert info.exptime == 90.0 and info.mjd == 59123.5
    assert info.date_obs.startswith("2020-10-01T12:00:00")
    assert info.camera_scale == DEMO_SCALE
    assert info.dec == pytest.approx(-62.0 - 7.0 / 60.0)
    camera = Camera.kmtnet(DEMO_SCALE)
    assert [c.name for c in info.ccds] == list(CCD_NAMES)
    for ccd in info.ccds:
        model = camera.ccd(ccd.name)
        assert ccd.shape == model.shape
        assert ccd.gain == model.gain_e_per_adu and ccd.saturation == model.saturation_adu
        assert ccd.amplifiers == tuple((a.x_start, a.x_stop) for a in model.amplifiers)
        # Each chip centre lies within a chip size of the pointing.
        assert abs(ccd.center_dec - info.dec) < 2 * model.ny * camera.pixel_scale_arcsec / 3600
    kk, nn = info.ccd("KK"), info.ccd("NN")
    assert kk.center_dec > info.dec > nn.center_dec  # KK is north (+Y), NN south


def test_known_tiles_accepts_custom_tile(tmp_path):
    path = write_exposure(tmp_path / "custom.fits", tile="deep-field-1")
    assert read_exposure_header(path, known_tiles={"deep-field-1"}).tile == "deep-field-1"


def test_read_ccd_is_native_float32(valid):
    data, header = read_ccd(valid, "NN")
    assert data.dtype == np.float32 and data.dtype.isnative
    assert data.shape == Camera.kmtnet(DEMO_SCALE).ccd("NN").shape
    assert header["EXTNAME"] == "NN"
    assert 900 < float(np.median(data)) < 1100


def test_read_ccd_unknown_name(valid):
    with pytest.raises(ValueError, match="XX"):
        read_ccd(valid, "XX")


BROKEN = {
    # variant id: (writer kwargs, expected fragments of the message, hdu, key)
    "missing NN": (dict(drop_ccds=("NN",)), ["extension 'NN' is missing", "KK, MM, NN, TT"],
                   "NN", None),
    "filter Z": (dict(band="Z"), ["FILTER 'Z' is not a KS4 band (B, V, R, I)"], None, "FILTER"),
    "site": (dict(site="LCO"), ["OBSERVAT 'LCO'", "CTIO, SSO, SAAO"], None, "OBSERVAT"),
    "missing GAIN": (dict(ccd_headers={"MM": {"GAIN": DELETE}}),
                     ["extension 'MM'", "GAIN is missing", "e-/ADU"], "MM", "GAIN"),
    "text GAIN": (dict(ccd_headers={"MM": {"GAIN": "high"}}),
                  ["extension 'MM'", "GAIN = 'high' is not a number"], "MM", "GAIN"),
    "missing EXPTIME": (dict(primary={"EXPTIME": DELETE}), ["EXPTIME is missing"], None, "EXPTIME"),
    "wrong shape": (dict(ccd_data={"TT": np.ones((100, 144), np.float32)}),
                    ["extension 'TT'", "100 x 144", "expected 144 x 144"], "TT", "NAXIS"),
    "no CAMSCALE": (dict(primary={"CAMSCALE": DELETE}),
                    ["extension 'KK'", "CAMSCALE 1", "expected 9216 x 9232"], "KK", "NAXIS"),
    "overlapping AMPSEC": (dict(ccd_headers={"KK": {"AMPSEC2": "[17:36,1:144]"}}),
                           ["extension 'KK'", "overlap at column 17"], "KK", "AMPSEC"),
    "gap in AMPSEC": (dict(ccd_headers={"MM": {"AMPSEC2": "[20:36,1:144]"}}),
                      ["extension 'MM'", "leave a gap at column 19"], "MM", "AMPSEC"),
    "bad AMPSEC syntax": (dict(ccd_headers={"MM": {"AMPSEC3": "37:54,1:144"}}),
                          ["extension 'MM'", "AMPSEC3", "IRAF section"], "MM", "AMPSEC"),
    "NAMPS": (dict(ccd_headers={"MM": {"NAMPS": 4}}), ["NAMPS = 4", "expected 8"], "MM", "NAMPS"),
    "bad WCS": (dict(ccd_headers={"NN": {"CTYPE1": "RA---XYZ"}}),
                ["extension 'NN'", "WCS cannot be used"], "NN", "WCS"),
    "no WCS": (dict(ccd_headers={"NN": {"CTYPE1": DELETE, "CTYPE2": DELETE}}),
               ["extension 'NN'", "no celestial axes"], "NN", "WCS"),
    "dither 5": (dict(primary={"DITHER": 5}), ["DITHER = 5 is out of range"], None, "DITHER"),
    "RA 360": (dict(primary={"RA": 360.0}), ["RA = 360.0 is out of range"], None, "RA"),
    "bad DATE-OBS": (dict(primary={"DATE-OBS": "last night"}), ["DATE-OBS 'last night'"],
                     None, "DATE-OBS"),
    "grid tile": (dict(tile="9999.999-99"), ["TILE", "not a KS4 grid tile"], None, "TILE"),
}


@pytest.mark.parametrize("variant", list(BROKEN))
def test_broken_variant_is_named(tmp_path, variant):
    kwargs, fragments, hdu, key = BROKEN[variant]
    path = write_exposure(tmp_path / "x.fits", **kwargs)
    with pytest.raises(InputError) as excinfo:
        read_exposure_header(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message
    assert excinfo.value.hdu == hdu and excinfo.value.key == key
    assert excinfo.value.path == str(path)


def test_unknown_tile_with_known_tiles(tmp_path):
    path = write_exposure(tmp_path / "x.fits")  # a valid grid tile, but not in this release
    with pytest.raises(InputError, match=r"TILE '0000.000-62' is not a tile of this release"):
        read_exposure_header(path, known_tiles=["0376.321-70"])


def test_garbage_file(tmp_path):
    path = write_garbage(tmp_path / "junk.fits")
    with pytest.raises(InputError, match=r"junk.fits: not a readable FITS file"):
        read_exposure_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere.fits: file does not exist"):
        read_exposure_header(tmp_path / "nothere.fits")


def test_truncated_file(tmp_path):
    path = write_truncated(tmp_path / "short.fits")
    with pytest.raises(InputError, match=r"short.fits: extension 'TT': file is truncated"):
        read_exposure_header(path)
    with pytest.raises(InputError, match=r"short.fits: extension 'TT'"):
        read_ccd(path, "TT")


def test_errors_pickle_with_context():
    err = InputError("a.fits", "extension 'NN' is missing", hdu="NN")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.hdu) == (str(err), "a.fits", "NN")
    cfg = pickle.loads(pickle.dumps(ConfigError("release.toml", "[engine] workrs", "unknown key")))
    assert str(cfg) == "release.toml: [engine] workrs: unknown key"
    stage = StageError("no stars", stage="astrometry", tile="0000.000-62", band="B", path="x.fits")
    back = pickle.loads(pickle.dumps(stage))
    assert str(back) == "astrometry [tile 0000.000-62, band B, file x.fits]: no stars"
    assert back.tile == "0000.000-62"


# --- amplifier sections: property tests ------------------------------------------------------

_widths = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12)


def _ranges(widths):
    edges = np.concatenate([[0], np.cumsum(widths)]).tolist()
    return list(zip(edges[:-1], edges[1:]))


@given(widths=_widths, ny=st.integers(1, 500), order=st.randoms(use_true_random=False))
def test_tiling_sections_parse_to_contiguous_ranges(widths, ny, order):
    ranges = _ranges(widths)
    order.shuffle(ranges)
    nx = sum(widths)
    parsed = parse_amp_sections(amp_sections(ranges, ny), nx=nx, ny=ny)
    assert list(parsed) == ranges  # in the order given
    ordered = sorted(parsed)
    assert ordered[0][0] == 0 and ordered[-1][1] == nx
    assert all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))


@given(widths=st.lists(st.integers(2, 40), min_size=2, max_size=12), data=st.data())
def test_overlap_or_gap_is_rejected(widths, data):
    ranges = _ranges(widths)
    nx = sum(widths)
    i = data.draw(st.integers(0, len(ranges) - 1), label="amplifier")
    start, stop = ranges[i]
    shift = data.draw(st.sampled_from([-1, 1]), label="shift")
    # Move one edge of amplifier i by one column: a gap or an overlap with a neighbour or the
    # chip edge (a section that starts before column 1 is not representable, so shift stop).
    if start == 0 and shift < 0:
        ranges[i] = (start, stop + 1 if i < len(ranges) - 1 else stop - 1)
    else:
        ranges[i] = (start + shift, stop)
    with pytest.raises(ValueError, match="overlap|gap|cover columns"):
        parse_amp_sections(amp_sections(ranges, 10), nx=nx, ny=10)


def test_section_syntax():
    assert parse_iraf_section("[1:18, 1:144]") == (1, 18, 1, 144)
    for bad in ("[0:18,1:144]", "[18:1,1:144]", "1:18,1:144", "[1:18]"):
        with pytest.raises(ValueError):
            parse_iraf_section(bad)
    with pytest.raises(ValueError, match="rows 1:100"):
        parse_amp_sections(["[1:10,1:100]"], nx=10, ny=144)


def test_tile_compressed_exposure_reads(tmp_path, valid):
    """fpack-style tile compression is accepted (not mistaken for a truncated file)."""
    with fits.open(valid) as hdul:
        hdus = [hdul[0].copy()] + [
            fits.CompImageHDU(data=h.data, header=h.header, name=h.name) for h in hdul[1:]
        ]
        fits.HDUList(hdus).writeto(tmp_path / "c.fits.fz")
    info = read_exposure_header(tmp_path / "c.fits.fz")
    assert info.ccd("TT").shape == (144, 144)
    data, _ = read_ccd(tmp_path / "c.fits.fz", "TT")
    assert data.dtype == np.float32 and data.shape == (144, 144)
