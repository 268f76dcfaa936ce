"""Writing the mini-survey to disk: raw exposures, reference catalogs, truth, release.toml.

Every file is written under a temporary name in its final folder and renamed into place
(``os.replace``), so an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from ks4release.atomic import atomic_path
from ks4release.config import (
    CustomTile,
    InputsSection,
    RefcatSection,
    RefcatSource,
    ReleaseConfig,
    ReleaseSection,
    SurveySection,
    save_config,
)
from ks4release.settings import CoaddSettings, PhotometrySettings
from ks4release.simulate.arguments import SimulationConfig
from ks4release.simulate.plan import ExposurePlan, SurveyPlan, plan_survey
from ks4release.simulate.refcat import delve_catalog, gaia_dr3_catalog, gaia_xp_catalog
from ks4release.simulate.render import (
    amp_zeropoints,
    exposure_zeropoint_e,
    render_exposure,
    sky_level_e,
)
from ks4release.simulate.sky import make_sources

__all__ = [
    "write_exposure",
    "write_reference_catalogs",
    "write_truth_tables",
    "write_release_config",
    "write_sky",
    "simulate_survey",
    "SOURCES_PATH",
    "mask_path",
]

#: Truth source table, relative to the output folder.
SOURCES_PATH = "truth/sources.parquet"


def mask_path(out_dir: Path, exposure: ExposurePlan) -> Path:
    """Where the truth masks of ``exposure`` go."""
    return Path(out_dir) / "truth" / "masks" / f"{exposure.stem}_mask.fits"


def _write_fits(hdul: fits.HDUList, path: Path) -> Path:
    """Write an HDUList atomically (hidden temporary name, so input globs never match it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        hdul.writeto(tmp)
    return path


def _write_parquet(table: Table, path: Path) -> Path:
    """Write a Table as Parquet (units and descriptions in the metadata) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.write(tmp, format="parquet")
    return path


@lru_cache(maxsize=2)
def _load_sources(path: str, mtime_ns: int) -> Table:
    """The truth sources, cached per file version for repeated tasks in one worker."""
    del mtime_ns  # part of the cache key only
    return Table.read(path, format="parquet")


def write_exposure(exposure: ExposurePlan, sources_path: str | Path, cfg: SimulationConfig,
                   out_dir: str | Path) -> list[Path]:
    """Render one exposure and write its raw file and truth masks; returns both paths.

    Top-level and picklable so an engine can run exposures in parallel, in any order.
    """
    sources_path = Path(sources_path)
    sources = _load_sources(str(sources_path), sources_path.stat().st_mtime_ns)
    return _write_rendered(exposure, sources, cfg, Path(out_dir))


def _write_rendered(exposure: ExposurePlan, sources: Table, cfg: SimulationConfig,
                    out_dir: Path) -> list[Path]:
    """Render one exposure from in-memory sources and write its two files."""
    raw, masks, _ = render_exposure(exposure, sources, cfg)
    return [_write_fits(raw, out_dir / exposure.rel_path),
            _write_fits(masks, mask_path(out_dir, exposure))]


def write_reference_catalogs(sources: Table, cfg: SimulationConfig, out_dir: str | Path
                             ) -> list[Path]:
    """Gaia DR3-, Gaia XP- and DELVE DR2-like catalogs under ``<out>/refcat/``."""
    out = Path(out_dir) / "refcat"
    gaia = gaia_dr3_catalog(sources, cfg.seed)
    return [_write_parquet(gaia, out / "gaia_dr3.parquet"),
            _write_parquet(gaia_xp_catalog(sources, gaia, cfg.seed), out / "gaia_xp.parquet"),
            _write_parquet(delve_catalog(sources, cfg.seed), out / "delve_dr2.parquet")]


def exposures_table(plan: SurveyPlan, cfg: SimulationConfig) -> Table:
    """Truth of every exposure: observing conditions, pointing error, artifacts."""
    rows = []
    for e in plan.exposures:
        sky_e = sky_level_e(e, cfg.camera.pixel_scale_arcsec)
        row = {"file": e.rel_path, "stem": e.stem, "tile": e.tile, "band": e.band,
               "number": e.number, "site": e.site, "mjd": e.mjd, "dither": e.dither,
               "replacement": e.replacement, "exptime": e.exptime_s,
               "ra_nominal": e.ra_deg, "dec_nominal": e.dec_deg,
               "ra_true": e.true_ra_deg, "dec_true": e.true_dec_deg,
               "pointing_error_arcsec": e.pointing_error_arcsec, "rotation_deg": e.rotation_deg,
               "seeing_fwhm_arcsec": e.seeing_fwhm_arcsec, "sky_mag_arcsec2": e.sky_mag_arcsec2,
               "zp_exposure_e": exposure_zeropoint_e(e), "transparency_mag": e.transparency_mag,
               "satellite": e.satellite, "stray_light": e.stray_light}
        for ccd in cfg.camera.ccds:
            row[f"sky_adu_{ccd.name}"] = sky_e / ccd.gain_e_per_adu
        rows.append(row)
    t = Table(rows=rows, names=list(rows[0]))
    for c in ("ra_nominal", "dec_nominal", "ra_true", "dec_true", "rotation_deg"):
        t[c].unit = u.deg
    t["exptime"].unit = u.s
    t["mjd"].unit = u.d
    t["seeing_fwhm_arcsec"].unit = t["pointing_error_arcsec"].unit = u.arcsec
    t["zp_exposure_e"].unit = t["transparency_mag"].unit = u.mag
    t["zp_exposure_e"].description = "AB mag giving 1 e- (band, exptime, site, clouds)"
    t["sky_mag_arcsec2"].unit = u.mag / u.arcsec**2
    return t


def zeropoints_table(plan: SurveyPlan, cfg: SimulationConfig) -> Table:
    """True zero-point model per amplifier (see ``ks4release.simulate.render``)."""
    rows = [r for e in plan.exposures for r in amp_zeropoints(e, cfg)]
    t = Table(rows=rows, names=list(rows[0]))
    t["zp_y0"].unit = t["zp_slope"].unit = u.mag
    t["zp_y0"].description = "zp at row y = 0 (AB mag giving 1 ADU)"
    t["zp_slope"].description = "zp(y) = zp_y0 + zp_slope * y / ny (y 0-based row)"
    t["colour_term"].description = ("ADU = 10**(-0.4 (m_AB - zp(y) - colour_term * colour)), "
                                    "colour = true V - I (AB)")
    t["x_start"].description = "first column of the amplifier (0-based)"
    t["x_stop"].description = "one past its last column (0-based)"
    return t


def write_truth_tables(plan: SurveyPlan, sources: Table, cfg: SimulationConfig,
                       out_dir: str | Path) -> list[Path]:
    """``truth/sources.parquet``, ``exposures.parquet`` and ``zeropoints.parquet``."""
    out = Path(out_dir)
    return [_write_parquet(sources, out / SOURCES_PATH),
            _write_parquet(exposures_table(plan, cfg), out / "truth" / "exposures.parquet"),
            _write_parquet(zeropoints_table(plan, cfg), out / "truth" / "zeropoints.parquet")]


def write_release_config(cfg: SimulationConfig, out_dir: str | Path) -> Path:
    """``<out>/release.toml`` describing the simulated survey for ``ks4release build``.

    Written last: its presence marks a finished simulation.
    """
    plan = plan_survey(cfg)
    release = ReleaseConfig(
        release=ReleaseSection(name=f"ks4-demo-seed{cfg.seed}"),
        inputs=InputsSection(exposures=("raw/**/*.fits",)),
        survey=SurveySection(
            bands=tuple(cfg.bands), camera_scale=cfg.scale,
            custom_tiles=tuple(CustomTile(name=t.name, ra=float(t.ra_deg) % 360.0,
                                          dec=float(t.dec_deg)) for t in plan.tiles)),
        refcat=RefcatSection(
            gaia_dr3=RefcatSource(source="local", path="refcat/gaia_dr3.parquet"),
            gaia_xp=RefcatSource(source="local", path="refcat/gaia_xp.parquet"),
            delve_dr2=RefcatSource(source="local", path="refcat/delve_dr2.parquet")),
        # The demo shrinks the camera, its background structure and the co-adds but not the
        # sources: a 128 px background mesh instead of DR1's 256 keeps faint galaxies
        # (completeness at true S/N >= 10: V 95.3% -> 96.0%, I 95.0% -> 95.7% on the demo).
        photometry=PhotometrySettings(back_size_px=128),
        # Some demo exposures carry a stray-light ring that the median alone does not reject.
        coadd=CoaddSettings(background_match=True),
    )
    return save_config(release, Path(out_dir) / "release.toml")


def write_sky(cfg: SimulationConfig, out_dir: str | Path) -> Path:
    """Plan the survey and write the true sources, truth tables and reference catalogs.

    The first step of a simulation; every exposure is then rendered from
    ``truth/sources.parquet`` by :func:`write_exposure`. Returns the sources path.
    """
    out = Path(out_dir)
    plan = plan_survey(cfg)
    sources = make_sources(cfg, plan)
    write_truth_tables(plan, sources, cfg, out)
    write_reference_catalogs(sources, cfg, out)
    return out / SOURCES_PATH


def simulate_survey(cfg: SimulationConfig, out_dir: str | Path,
                    progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Simulate the whole mini-survey into ``out_dir`` in this process; returns release.toml.

    ``progress(done, total, stem)`` is called after each exposure. The command line runs the
    same steps as engine stages (parallel, resumable); this is the one-call library form.
    """
    out = Path(out_dir)
    plan = plan_survey(cfg)
    sources = make_sources(cfg, plan)
    write_truth_tables(plan, sources, cfg, out)
    write_reference_catalogs(sources, cfg, out)
    total = len(plan.exposures)
    for k, e in enumerate(plan.exposures):
        _write_rendered(e, sources, cfg, out)
        if progress:
            progress(k + 1, total, e.stem)
    return write_release_config(cfg, out)
