"""Tests of ks4release.simulate: a tiny survey (1 tile, 2 bands, scale 1/32) written once."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ks4release.simulate import (
    DR1_BITS,
    VEGA_TO_AB,
    MaskBit,
    SimulationConfig,
    ccd_true_wcs,
    make_sources,
    mask_path,
    plan_survey,
    positions_at,
    render_exposure,
    simulate_survey,
    write_exposure,
)
from ks4release.survey import DR1_MJD_RANGE, SITES

TINY = dict(scale=1 / 32, tiles=("0000.000-62",), bands=("V", "I"))


def _sha(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationConfig, Path]:
    """A 1-tile, 2-band survey at scale 1/32, written once for the module."""
    cfg = SimulationConfig(seed=7, **TINY)
    out = tmp_path_factory.mktemp("tiny")
    simulate_survey(cfg, out)
    return cfg, out


def _raw_files(out: Path) -> list[Path]:
    """Raw exposure files of a simulated survey."""
    return sorted((out / "raw").rglob("*.fits"))


# --- configuration and plan -------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(scale=0.0), "scale"), (dict(bands=("U",)), "bands"),
    (dict(tiles=("0376.321-70",)), "tiles"),
    (dict(dead_amp=9), "dead_amp"), (dict(satellite_fraction=2.0), "satellite_fraction"),
    (dict(moffat_beta=0.5), "moffat_beta"), (dict(dead_ccd="XX"), "dead_ccd"),
])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    """Invalid settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        SimulationConfig(**kwargs)


def test_default_plan_follows_dr1() -> None:
    """Counts, sites, MJDs, dithers and artifact flags of the default plan."""
    cfg = SimulationConfig()
    plan = plan_survey(cfg)
    assert [t.name for t in plan.tiles] == ["0000.000-62", "0001.004-62", "0088.000-64",
                                             "0089.004-64"]
    assert cfg.camera.ccds[0].shape == (576, 576)
    per = {}
    for e in plan.exposures:
        per.setdefault((e.tile, e.band), []).append(e)
        assert DR1_MJD_RANGE[0] <= e.mjd <= DR1_MJD_RANGE[1] + 1
        assert e.site in {s.name for s in SITES}
        assert e.dither == (e.number - 1) % 4 + 1
        assert 1.0 <= e.pointing_error_arcsec <= 2.0
    assert len(per) == 16
    assert all(4 <= len(v) <= 9 for v in per.values())
    # Nominal visits: one site and night; extra exposures come from another site, later.
    for v in per.values():
        nominal = [e for e in v if e.number <= 4 and not e.replacement]
        assert len({e.site for e in nominal}) <= 1
        for e in v:
            if e.number > 4 or e.replacement:
                assert e.site != nominal[0].site if nominal else True
    assert any(e.satellite for e in plan.exposures)
    assert any(e.stray_light for e in plan.exposures)


def test_demo_tiles_overlap_like_real_tiles() -> None:
    """Adjacent demo tiles are scale x their real separation apart, so they overlap."""
    cfg = SimulationConfig()
    a, b = plan_survey(cfg).tiles[:2]
    sep = math.hypot((b.ra_deg - a.ra_deg) * math.cos(math.radians(a.dec_deg)),
                     b.dec_deg - a.dec_deg)
    width = cfg.camera.field_size_deg[0]
    assert 0.5 * width < sep < width


# --- files -----------------------------------------------------------------------------


_PRIMARY = ("TILE", "FILTER", "EXPTIME", "MJD-OBS", "DATE-OBS", "OBSERVAT", "DITHER", "RA", "DEC",
            "CAMSCALE", "ORIGIN", "SIMSEED")
_EXT = ("EXTNAME", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2",
        "CD2_1", "CD2_2", "RADESYS", "GAIN", "RDNOISE", "SATURATE", "BUNIT", "NAMPS",
        *(f"AMPSEC{i}" for i in range(1, 9)))


def test_layout_and_headers(tiny: tuple[SimulationConfig, Path]) -> None:
    """File layout and every required header keyword, with comments."""
    cfg, out = tiny
    files = _raw_files(out)
    assert files and (out / "release.toml").is_file()
    for name in ("gaia_dr3", "gaia_xp", "delve_dr2"):
        assert (out / "refcat" / f"{name}.parquet").is_file()
    for f in files:
        assert f.parent.name in cfg.bands and f.parent.parent.name == "0000.000-62"
        with fits.open(f) as hdul:
            h0 = hdul[0].header
            assert hdul[0].data is None
            for key in _PRIMARY:
                assert key in h0 and h0.comments[key], key
            assert f.stem == f"{h0['TILE']}_{h0['FILTER']}_{f.stem[-2:]}"
            assert [h.name for h in hdul[1:]] == ["KK", "MM", "NN", "TT"]
            for h in hdul[1:]:
                for key in _EXT:
                    assert key in h.header and h.header.comments[key], key
                assert h.data.dtype.kind == "f" and h.data.dtype.itemsize == 4
                assert h.header["CD1_1"] < 0 and "PC1_1" not in h.header
                assert "CDELT1" not in h.header and h.header["BUNIT"] == "adu"
                assert h.header["AMPSEC1"] == f"[1:{h.data.shape[1] // 8},1:{h.data.shape[0]}]"
        assert mask_path(out, _plan_for(cfg, f)).is_file()


def _plan_for(cfg: SimulationConfig, f: Path):
    """The exposure plan of a raw file."""
    return next(e for e in plan_survey(cfg).exposures if e.stem == f.stem)


def test_release_config_loads(tiny: tuple[SimulationConfig, Path]) -> None:
    """release.toml loads with ks4release.config and points at the files."""
    from ks4release.config import load_config

    cfg, out = tiny
    rel = load_config(out / "release.toml")
    assert rel.survey.camera_scale == cfg.scale
    assert [t.name for t in rel.survey.custom_tiles] == ["0000.000-62"]
    assert rel.resolve(rel.refcat.gaia_xp.path).is_file()


def test_same_seed_same_bytes_other_seed_differs(tiny: tuple[SimulationConfig, Path],
                                                 tmp_path: Path) -> None:
    """Same seed: byte-identical files; other seed: different raw files."""
    cfg, out = tiny
    simulate_survey(cfg, tmp_path / "again")
    first, again = _sha(out), _sha(tmp_path / "again")
    assert first == again
    simulate_survey(SimulationConfig(seed=8, **TINY), tmp_path / "other")
    other = _sha(tmp_path / "other")
    raw = [k for k in first if k.startswith("raw/") and k in other]
    assert raw and all(first[k] != other[k] for k in raw)


def test_write_exposure_from_truth_parquet_matches(tiny: tuple[SimulationConfig, Path],
                                                   tmp_path: Path) -> None:
    """The per-exposure task (engine path) gives the same bytes as the serial run."""
    cfg, out = tiny
    exposure = plan_survey(cfg).exposures[-1]
    paths = write_exposure(exposure, out / "truth" / "sources.parquet", cfg, tmp_path)
    for p in paths:
        ref = out / p.relative_to(tmp_path)
        assert p.read_bytes() == ref.read_bytes()
    assert not list(tmp_path.rglob(".*.tmp"))


# --- truth and artifacts --------------------------------------------------------------


def test_every_artifact_class_in_masks(tiny: tuple[SimulationConfig, Path]) -> None:
    """Every mask bit (artifact class) appears; cosmic rays apart from crosstalk."""
    _, out = tiny
    seen = 0
    cosmic_only = 0
    for f in sorted((out / "truth" / "masks").glob("*_mask.fits")):
        with fits.open(f) as hdul:
            for h in hdul[1:]:
                m = h.data
                seen |= int(np.bitwise_or.reduce(m, axis=None))
                cosmic_only += int(np.count_nonzero((m & 1) & ~(m >> 7) & 1))
    assert seen == 255, f"missing bits: {[b.name for b in MaskBit if not seen & b]}"
    assert cosmic_only > 0
    assert int(DR1_BITS) == 15


def test_saturation_clipped_and_masked(tiny: tuple[SimulationConfig, Path]) -> None:
    """No pixel above SATURATE; clipped pixels are masked as saturated or bleed."""
    _, out = tiny
    n_sat = 0
    for f in _raw_files(out):
        with fits.open(f) as raw, fits.open(out / "truth" / "masks" / f"{f.stem}_mask.fits") as m:
            for h in raw[1:]:
                sat = h.header["SATURATE"]
                d, mk = h.data, m[h.name].data
                assert d.max() <= sat
                at = d >= sat
                n_sat += int(at.sum())
                assert np.all(mk[at] & (MaskBit.SATURATED | MaskBit.BLEED))
                core = (mk & MaskBit.SATURATED) > 0
                if core.any():
                    assert np.median(d[core]) > 0.98 * sat
    assert n_sat > 0


def test_dead_amp_matches_mask_bit_8(tiny: tuple[SimulationConfig, Path]) -> None:
    """Bit 8 covers exactly the dead amplifier, whose data are read noise only."""
    cfg, out = tiny
    ccd = cfg.camera.ccd(cfg.dead_ccd)
    amp = ccd.amplifiers[cfg.dead_amp]
    for f in _raw_files(out):
        with fits.open(f) as raw, fits.open(out / "truth" / "masks" / f"{f.stem}_mask.fits") as m:
            for h in raw[1:]:
                dead = (m[h.name].data & MaskBit.DEAD_AMP) > 0
                if h.name != cfg.dead_ccd:
                    assert not dead.any()
                    continue
                expect = np.zeros_like(dead)
                expect[:, amp.x_start:amp.x_stop] = True
                assert np.array_equal(dead, expect)
                strip = h.data[:, amp.x_start:amp.x_stop]
                assert abs(np.median(strip)) < 2.0
                assert np.std(strip) == pytest.approx(ccd.read_noise_e / ccd.gain_e_per_adu,
                                                      rel=0.1)


def test_header_wcs_within_arcsec_of_true_wcs(tiny: tuple[SimulationConfig, Path]) -> None:
    """Approximate header WCS within a few arcsec of the true TAN-SIP WCS."""
    _, out = tiny
    worst = 0.0
    for f in _raw_files(out):
        with fits.open(f) as raw, fits.open(out / "truth" / "masks" / f"{f.stem}_mask.fits") as m:
            for h in raw[1:]:
                ny, nx = h.data.shape
                x = np.array([0, nx - 1, 0, nx - 1, nx / 2])
                y = np.array([0, 0, ny - 1, ny - 1, ny / 2])
                approx = WCS(h.header).pixel_to_world(x, y)
                true = WCS(m[h.name].header).pixel_to_world(x, y)
                worst = max(worst, float(approx.separation(true).arcsec.max()))
    assert 0.5 < worst < 8.0


def test_truth_tables(tiny: tuple[SimulationConfig, Path]) -> None:
    """Truth tables agree with the raw files."""
    cfg, out = tiny
    files = _raw_files(out)
    zp = Table.read(out / "truth" / "zeropoints.parquet")
    assert len(zp) == len(files) * 4 * 8
    assert np.all(np.abs(zp["zp_slope"]) <= cfg.amp_gradient_max_mag)
    ex = Table.read(out / "truth" / "exposures.parquet")
    assert len(ex) == len(files)
    for row in ex:
        with fits.open(out / row["file"]) as hdul:
            assert hdul[0].header["MJD-OBS"] == pytest.approx(row["mjd"])
            assert hdul[0].header["OBSERVAT"] == row["site"]
    src = Table.read(out / "truth" / "sources.parquet")
    assert set(src["type"]) == {"star", "galaxy"}
    assert src["ra"].unit == "deg"


def test_amplifier_pattern_belongs_to_the_site(tiny: tuple[SimulationConfig, Path]) -> None:
    """DR1: the amplifier zero-point variations are consistent across filters (instrumental):
    every exposure of a site, whatever its band, shows its site's gradients to within the
    per-exposure jitter, and the sites' patterns differ."""
    cfg, out = tiny
    zp = Table.read(out / "truth" / "zeropoints.parquet").to_pandas()
    ex = Table.read(out / "truth" / "exposures.parquet").to_pandas()
    zp = zp.merge(ex[["file", "site", "band"]], on="file")
    spread = zp.groupby(["site", "ccd", "amp"])["zp_slope"].std().dropna()
    assert 0 < spread.max() < 5 * cfg.amp_jitter_mag
    assert zp.groupby("site")["band"].nunique().max() > 1  # the same pattern in several bands
    slopes = zp.groupby(["site", "ccd", "amp"])["zp_slope"].mean().unstack(0)
    assert slopes.shape[1] >= 2 and slopes.diff(axis=1).abs().max().max() > 0.05


def test_every_site_observes_a_tile() -> None:
    """Three tiles or more: each site observes one of them (the demo exercises every camera)."""
    plan = plan_survey(SimulationConfig(n_tiles_ra=3, n_tiles_dec=1, bands=("V",)))
    own: dict[str, str] = {}
    for e in plan.exposures:  # a tile's first exposure is from its own night and site
        own.setdefault(e.tile, e.site)
    assert len(own) == 3 and sorted(own.values()) == ["CTIO", "SAAO", "SSO"]


def test_reference_catalogs(tiny: tuple[SimulationConfig, Path]) -> None:
    """Archive columns, limits, and Vega->AB offsets consistent with the truth."""
    _, out = tiny
    src = Table.read(out / "truth" / "sources.parquet")
    gaia = Table.read(out / "refcat" / "gaia_dr3.parquet")
    xp = Table.read(out / "refcat" / "gaia_xp.parquet")
    delve = Table.read(out / "refcat" / "delve_dr2.parquet")
    assert gaia["source_id"].dtype == np.int64 and np.all(gaia["ref_epoch"] == 2016.0)
    assert gaia["phot_g_mean_mag"].max() < 21.6 and gaia["ra_error"].unit == "mas"
    assert xp.colnames[:3] == ["source_id", "ra", "dec"] and len(xp) > 0
    # Vega -> AB with the documented offsets recovers the true AB magnitude.
    truth = {int(i): k for k, i in enumerate(src["id"])}
    idx = [truth[int(s) % 2**35] for s in xp["source_id"]]
    for b in "BVRI":
        ab = np.asarray(xp[f"{b.lower()}_jkc_mag"]) + VEGA_TO_AB[b]
        assert np.median(ab - np.asarray(src[f"mag_{b}"])[idx]) == pytest.approx(0.0, abs=0.01)
    assert set(np.unique(delve["extended_class_r"])) <= {-9, 0, 1, 2, 3}
    galaxies = np.sum(np.asarray(src["type"]) == "galaxy")
    assert len(delve) > 0.5 * galaxies


# --- photometry ---------------------------------------------------------------------------


def test_aperture_photometry_recovers_injected_flux() -> None:
    """sep.sum_circle on isolated truth stars matches the injected ADU within the noise."""
    import sep

    cfg = SimulationConfig(seed=11, scale=1 / 8, tiles=("0000.000-62",), bands=("V",))
    plan = plan_survey(cfg)
    sources = make_sources(cfg, plan)
    pulls = []
    for exposure in plan.exposures[:2]:
        pulls += _pulls(cfg, exposure, sources, sep)
    pulls = np.array(pulls)
    assert pulls.size >= 20
    assert abs(np.median(pulls)) < 0.4
    assert 0.7 < np.std(pulls) < 1.4
    assert np.mean(pulls**2) < 2.0


def _pulls(cfg: SimulationConfig, exposure, sources: Table, sep) -> list[float]:
    """(measured - injected) / error of isolated, unmasked stars of V 15.5-20.5."""
    raw, masks, zp_rows = render_exposure(exposure, sources, cfg)
    ra, dec = positions_at(sources, exposure.mjd)
    mags = np.asarray(sources["mag_V"])
    colour = mags - np.asarray(sources["mag_I"])
    fwhm = exposure.seeing_fwhm_arcsec / cfg.camera.pixel_scale_arcsec
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / cfg.moffat_beta) - 1))
    radius = 3.0 * fwhm
    frac = 1 - (1 + radius**2 / alpha**2) ** (1 - cfg.moffat_beta)
    pulls = []
    for ccd in cfg.camera.ccds:
        data = raw[ccd.name].data.astype(np.float64)
        mask = masks[ccd.name].data
        # Sky: sep background with the truth mask and every detected source masked.
        first = sep.Background(data, mask=mask > 0, bw=64, bh=64)
        _, seg = sep.extract(data - first.back(), 1.5, err=first.rms(), minarea=5,
                             segmentation_map=True)
        bkg = sep.Background(data, mask=(mask > 0) | (seg > 0), bw=64, bh=64)
        w = ccd_true_wcs(exposure, ccd, cfg)
        x, y = w.all_world2pix(ra, dec, 0)
        inside = (x > radius + 5) & (x < ccd.nx - radius - 5) & (y > radius + 5) & (
            y < ccd.ny - radius - 5)
        star = (np.asarray(sources["type"]) == "star") & (mags > 15.5) & (mags < 20.5) & inside
        for i in np.flatnonzero(star):
            d = np.hypot(x - x[i], y - y[i])
            near = (d < radius + 4 * fwhm) & (mags < 23.0)
            near[i] = False
            if near.any() or mask[int(y[i]) - int(radius):int(y[i]) + int(radius) + 1,
                                  int(x[i]) - int(radius):int(x[i]) + int(radius) + 1].any():
                continue
            rows = [r for r in zp_rows if r["ccd"] == ccd.name]
            r = rows[int(x[i]) // rows[0]["x_stop"]]
            zp = r["zp_y0"] + r["zp_slope"] * y[i] / ccd.ny
            expected = 10 ** (-0.4 * (mags[i] - zp - r["colour_term"] * colour[i])) * frac
            flux, err, _ = sep.sum_circle(data - bkg.back(), [x[i]], [y[i]], radius,
                                          err=bkg.rms(), gain=ccd.gain_e_per_adu)
            pulls.append(float((flux[0] - expected) / err[0]))
    return pulls


# --- realism against the real Gaia XP stars of tile 0000 ------------------------------


def test_stellar_locus_and_counts_match_real_gaia_xp(kmtnet_reference: Path) -> None:
    """Simulated B-V locus and V 14-17.5 star density match the real field."""
    real = Table.read(kmtnet_reference / "gaiaxp_0000.fits")
    cfg = SimulationConfig(seed=3, scale=1 / 4, tiles=("0000.000-62",), bands=("V",))
    plan = plan_survey(cfg)
    src = make_sources(cfg, plan)
    stars = src[(src["type"] == "star") & (src["mag_V"] > 14) & (src["mag_V"] < 17.5)]
    rv = np.asarray(real["XP_V"])
    ok = (rv > 14) & (rv < 17.5) & np.isfinite(np.asarray(real["XP_B"]))
    for lo, hi in ((0.2, 0.4), (0.4, 0.6), (0.8, 1.2)):
        vi_s = stars["mag_V"] - stars["mag_I"]
        vi_r = rv - np.asarray(real["XP_I"])
        s = (vi_s > lo) & (vi_s < hi)
        r = ok & (vi_r > lo) & (vi_r < hi)
        bv_s = np.median(np.asarray(stars["mag_B"] - stars["mag_V"])[s])
        bv_r = np.median((np.asarray(real["XP_B"]) - rv)[r])
        assert bv_s == pytest.approx(bv_r, abs=0.06)
    # Density of V 14-17.5 stars per deg2 within 30% of the real field.
    x0, x1, y0, y1 = plan.footprint_deg
    ra = np.where(np.asarray(real["RA"]) > 180, np.asarray(real["RA"]) - 360, real["RA"])
    area_real = (ra.max() - ra.min()) * math.cos(math.radians(62)) * 3.586
    assert len(stars) / ((x1 - x0) * (y1 - y0)) == pytest.approx(ok.sum() / area_real, rel=0.3)


# --- geometry helpers ----------------------------------------------------------------------


def test_tangent_plane_round_trip() -> None:
    """inverse_gnomonic inverts gnomonic."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from ks4release.projection import gnomonic, inverse_gnomonic

    @settings(max_examples=200, deadline=None)
    @given(st.floats(0, 359.999), st.floats(-89.0, 89.0), st.floats(-2, 2), st.floats(-2, 2))
    def check(ra0: float, dec0: float, xi: float, eta: float) -> None:
        """Round trip of one point."""
        ra, dec = inverse_gnomonic(ra0, dec0, np.array([xi]), np.array([eta]))
        x2, e2 = gnomonic(ra0, dec0, ra, dec)
        assert abs(x2[0] - xi) < 1e-9 and abs(e2[0] - eta) < 1e-9

    check()


def test_true_positions_follow_proper_motion() -> None:
    """Stars move with their proper motions; galaxies do not."""
    cfg = SimulationConfig(seed=2, **TINY)
    src = make_sources(cfg, plan_survey(cfg))
    ra0, dec0 = positions_at(src, 57388.5)
    ra1, dec1 = positions_at(src, 57388.5 + 365.25 * 5)
    assert np.allclose(ra0, np.asarray(src["ra"]) % 360) and np.allclose(dec0, src["dec"])
    moved_mas = (dec1 - dec0) * 3.6e6
    assert np.allclose(moved_mas, 5 * np.asarray(src["pmdec"]), atol=1e-6)
    galaxy = np.asarray(src["type"]) == "galaxy"
    assert np.all(moved_mas[galaxy] == 0) and np.any(moved_mas[~galaxy] != 0)


def test_reference_catalogs_pass_the_refcat_reader(tiny: tuple[SimulationConfig, Path]) -> None:
    """The pipeline's own reader accepts the simulated catalogs (columns, kinds, ranges)."""
    formats = pytest.importorskip("ks4release.refcat.formats")
    _, out = tiny
    for name in ("gaia_dr3", "gaia_xp", "delve_dr2"):
        table = formats.read_refcat(out / "refcat" / f"{name}.parquet", name)
        assert len(table) > 0
        assert set(formats.refcat_format(name).required) <= set(table.colnames)
