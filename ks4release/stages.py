"""The stage graph: which stages make a release and which tasks each stage runs.

A stage's ``plan`` turns a context (the release configuration and directory) into tasks; the
engine runs them, skips those whose stamps are current, and isolates failures. Stages talk
through files in the release directory (layout in the README), so each can be rerun alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ks4release.config import CONFIG_FILENAME, ReleaseConfig
from ks4release.engine import Stage, Task
from ks4release.errors import ConfigError
from ks4release.grid import Tile, tile_by_name
from ks4release.layout import (
    coadd_excluded_path,
    coadd_exposures_path,
    coadd_path,
    export_dir,
    ingest_json_path,
    inventory_path,
    mask_path,
    master_catalog_path,
    scaled_path,
    site_pattern_path,
    sources_path,
    tile_refcat_path,
    wcs_path,
    zeropoint_path,
    zeropoint_stars_path,
)
from ks4release.publish.export import export_catalog
from ks4release.publish.master import build_idual_master, build_single_master
from ks4release.reduction.artificial_stars import auto_noise_path, run_auto_noise_calibration
from ks4release.reduction.astrometry import run_astrometry
from ks4release.reduction.calibration_maps import map_paths, run_maps
from ks4release.reduction.coadd import run_coadd
from ks4release.reduction.detect import run_detect
from ks4release.reduction.ingest import ingest_exposure, write_inventory
from ks4release.reduction.masks import run_masks
from ks4release.reduction.photometry import measured_path, run_photometry
from ks4release.reduction.scale import run_scale
from ks4release.reduction.tile_catalog import run_tile_catalog, summary_path
from ks4release.reduction.zeropoint_pattern import run_site_pattern
from ks4release.reduction.zeropoint_tile import run_exposure_stars, run_tile_zeropoints
from ks4release.refcat.tile import write_tile_refcat
from ks4release.simulate import (
    SOURCES_PATH,
    SimulationConfig,
    plan_survey,
    write_exposure,
    write_release_config,
    write_sky,
)
from ks4release.simulate import mask_path as truth_mask_path
from ks4release.tile_catalogs import dual_catalog_path, single_catalog_path

__all__ = [
    "ReleaseContext",
    "SimulationContext",
    "dr1_stages",
    "simulation_stages",
]


@dataclass(frozen=True, kw_only=True)
class ReleaseContext:
    """What the stages of a release need to plan their tasks."""

    config: ReleaseConfig
    release_dir: Path

    @classmethod
    def from_config(cls, config: ReleaseConfig) -> ReleaseContext:
        """The context of the release that ``config`` describes."""
        return cls(config=config, release_dir=config.release_dir)

    def exposure_files(self) -> list[Path]:
        """Every exposure file matched by ``[inputs] exposures``, sorted, without repeats."""
        found: set[Path] = set()
        for pattern in self.config.inputs.exposures:
            found.update(p.resolve() for p in self.config.base_dir.glob(pattern) if p.is_file())
        files = sorted(found)
        if not files:
            raise ConfigError(
                self.config.source_path or "release.toml",
                "inputs.exposures",
                f"no exposure file matches {list(self.config.inputs.exposures)} under "
                f"{self.config.base_dir}",
            )
        stems: dict[str, Path] = {}
        for path in files:
            if path.stem in stems:
                raise ConfigError(
                    self.config.source_path or "release.toml",
                    "inputs.exposures",
                    f"two exposures share the name {path.stem!r}: {stems[path.stem]} and {path}",
                )
            stems[path.stem] = path
        return files

    def known_tiles(self) -> list[str] | None:
        """Tile names an exposure may carry; None means any KS4 grid tile."""
        tiles = self.config.tiles()
        return [t.name for t in tiles] if tiles else None


def _ingested(ctx: ReleaseContext) -> list[tuple[Path, Path, dict]]:
    """(exposure file, summary path, summary) of every exposure that passed ingest, in file
    order. The exposure file is where it is now: the summary's ``file`` records where ingest
    read it, which a release moved or copied to another folder no longer is."""
    found = []
    for path in ctx.exposure_files():
        summary = ingest_json_path(ctx.release_dir, path.stem)
        if summary.is_file():  # otherwise its ingest failed and the engine has reported it
            found.append((path, summary, json.loads(summary.read_text())))
    return found


def _release_tiles(ctx: ReleaseContext) -> list[Tile]:
    """The configured tiles, or else the grid tiles of the validated exposures."""
    configured = ctx.config.tiles()
    if configured:
        return configured
    names = sorted({info["tile"] for _, _, info in _ingested(ctx)})
    return [tile_by_name(name) for name in names]


def _plan_ingest(ctx: ReleaseContext) -> list[Task]:
    """One task per exposure file: validate it and summarise it as JSON."""
    known = ctx.known_tiles()
    return [
        Task(
            stage="ingest",
            key=path.stem,
            func=ingest_exposure,
            kwargs={"path": path, "out_json": ingest_json_path(ctx.release_dir, path.stem),
                    "known_tiles": known},
            inputs=(path,),
            outputs=(ingest_json_path(ctx.release_dir, path.stem),),
            file=path,
        )
        for path in ctx.exposure_files()
    ]


def _plan_inventory(ctx: ReleaseContext) -> list[Task]:
    """One task per tile and band: the table of its validated exposures."""
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for _, summary, info in _ingested(ctx):
        if info["band"] in ctx.config.survey.bands:
            groups[(info["tile"], info["band"])].append(summary)
    return [
        Task(
            stage="inventory",
            key=f"{tile}/{band}",
            func=write_inventory,
            kwargs={"tile": tile, "band": band, "summaries": sorted(paths),
                    "out_path": inventory_path(ctx.release_dir, tile, band)},
            inputs=tuple(sorted(paths)),
            outputs=(inventory_path(ctx.release_dir, tile, band),),
            tile=tile,
            band=band,
        )
        for (tile, band), paths in sorted(groups.items())
    ]


@dataclass(frozen=True, kw_only=True)
class _Exposure:
    """A validated exposure as the per-exposure stages see it."""

    path: Path
    stem: str
    tile: str
    band: str
    site: str
    mjd: float


def _exposures(ctx: ReleaseContext) -> list[_Exposure]:
    """Every exposure that passed ingest, in the configured bands."""
    return [
        _Exposure(path=path, stem=summary.stem, tile=info["tile"],
                  band=info["band"], site=info["site"], mjd=float(info["mjd"]))
        for path, summary, info in _ingested(ctx)
        if info["band"] in ctx.config.survey.bands
    ]


def _per_exposure(ctx: ReleaseContext, stage: str, func: Callable[..., None],
                  output: Callable[[Path, str], Path],
                  reads: Callable[[_Exposure], dict[str, Path]],
                  settings: object, extra_inputs: tuple[Path, ...] = ()) -> list[Task]:
    """One task per exposure calling ``func(**reads(e), out_path=output(...), settings=...)``.

    ``reads`` names the files a task reads (its keyword arguments); they are also its inputs,
    so a task reruns when any of them changes and is blocked when one could not be made.
    """
    tasks = []
    for e in _exposures(ctx):
        files = reads(e)
        out = output(ctx.release_dir, e.stem)
        tasks.append(Task(
            stage=stage, key=e.stem, func=func,
            kwargs={**files, "out_path": out, "settings": settings},
            inputs=(*files.values(), *extra_inputs), outputs=(out,),
            tile=e.tile, band=e.band, file=e.path,
        ))
    return tasks


def _plan_masks(ctx: ReleaseContext) -> list[Task]:
    """Bad-pixel masks of every exposure (DR1 bits 1, 2, 4, 8)."""
    settings = ctx.config.masks
    bpm: tuple[Path, ...] = ()
    if settings.bad_pixel_map:
        bpm = (ctx.config.resolve(settings.bad_pixel_map),)
        settings = dataclasses.replace(settings, bad_pixel_map=str(bpm[0]))
    return _per_exposure(ctx, "masks", run_masks, mask_path,
                         lambda e: {"exposure": e.path}, settings, extra_inputs=bpm)


def _plan_detect(ctx: ReleaseContext) -> list[Task]:
    """Single-epoch detections of every exposure, masked pixels excluded."""
    rd = ctx.release_dir
    return _per_exposure(ctx, "detect", run_detect, sources_path,
                         lambda e: {"exposure": e.path, "mask": mask_path(rd, e.stem)},
                         ctx.config.detect)


def _plan_astrometry(ctx: ReleaseContext) -> list[Task]:
    """Astrometric solution of every exposure against its tile's Gaia DR3 sources."""
    rd = ctx.release_dir
    return _per_exposure(
        ctx, "astrometry", run_astrometry, wcs_path,
        lambda e: {"exposure": e.path, "sources": sources_path(rd, e.stem),
                   "gaia": tile_refcat_path(rd, e.tile, "gaia_dr3"),
                   "mask": mask_path(rd, e.stem)},
        ctx.config.astrometry)


def _plan_zeropoint_stars(ctx: ReleaseContext) -> list[Task]:
    """The measured zero-point tie stars of every exposure."""
    rd = ctx.release_dir
    return _per_exposure(
        ctx, "zp-stars", run_exposure_stars, zeropoint_stars_path,
        lambda e: {"exposure": e.path, "mask": mask_path(rd, e.stem),
                   "sources": sources_path(rd, e.stem), "wcs": wcs_path(rd, e.stem)},
        ctx.config.zeropoint)


def _plan_site_pattern(ctx: ReleaseContext) -> list[Task]:
    """One fit of every site's amplifier pattern from all exposures (``site_pattern``).

    An exposure whose tie stars could not be measured (its zp-stars task failed or was
    blocked, and the engine has reported it) is left out rather than blocking every zero point
    of the release. A site with more than ``pattern_max_exposures`` exposures contributes that
    many, spread evenly over its dates (:func:`_spread_in_time`).
    """
    rd = ctx.release_dir
    settings = ctx.config.zeropoint
    if not settings.site_pattern:
        return []
    measured = [e for e in _exposures(ctx) if zeropoint_stars_path(rd, e.stem).is_file()]
    by_site: dict[str, list[_Exposure]] = defaultdict(list)
    for e in measured:
        by_site[e.site].append(e)
    exposures = [e for site in sorted(by_site)
                 for e in _spread_in_time(by_site[site], settings.pattern_max_exposures)]
    if not exposures:
        return []
    stars = [zeropoint_stars_path(rd, e.stem) for e in exposures]
    gaia_xp = [tile_refcat_path(rd, tile, "gaia_xp")
               for tile in sorted({e.tile for e in exposures})]
    out = site_pattern_path(rd)
    return [Task(stage="zp-pattern", key="sites", func=run_site_pattern,
                 kwargs={"stars": stars, "gaia_xp": gaia_xp, "out_path": out,
                         "settings": ctx.config.zeropoint},
                 inputs=(*stars, *gaia_xp), outputs=(out,))]


def _spread_in_time(exposures: list[_Exposure], limit: int) -> list[_Exposure]:
    """At most ``limit`` of ``exposures``, evenly spaced in their MJD order (all of them when
    there are not more)."""
    ordered = sorted(exposures, key=lambda e: (e.mjd, e.stem))
    if len(ordered) <= limit:
        return ordered
    keep = np.unique(np.round(np.linspace(0, len(ordered) - 1, limit)).astype(int))
    return [ordered[i] for i in keep]


def _plan_zeropoint(ctx: ReleaseContext) -> list[Task]:
    """Per-amplifier zero points of all exposures of each tile and band, fitted together."""
    rd = ctx.release_dir
    groups: dict[tuple[str, str], list[_Exposure]] = defaultdict(list)
    for e in _exposures(ctx):
        groups[(e.tile, e.band)].append(e)
    pattern = site_pattern_path(rd) if ctx.config.zeropoint.site_pattern else None
    tasks = []
    for (tile, band), exposures in sorted(groups.items()):
        stars = [zeropoint_stars_path(rd, e.stem) for e in exposures]
        gaia_xp = tile_refcat_path(rd, tile, "gaia_xp")
        outs = [zeropoint_path(rd, e.stem) for e in exposures]
        tasks.append(Task(
            stage="zeropoint", key=f"{tile}/{band}", func=run_tile_zeropoints,
            kwargs={"stars": stars, "gaia_xp": gaia_xp, "out_paths": outs,
                    "settings": ctx.config.zeropoint, "pattern": pattern},
            inputs=(*stars, gaia_xp, *(() if pattern is None else (pattern,))),
            outputs=tuple(outs), tile=tile, band=band,
        ))
    return tasks


def _plan_scale(ctx: ReleaseContext) -> list[Task]:
    """Every exposure background-subtracted and scaled to ZP = 30 with its fitted WCS."""
    rd = ctx.release_dir
    return _per_exposure(
        ctx, "scale", run_scale, scaled_path,
        lambda e: {"exposure": e.path, "mask": mask_path(rd, e.stem), "wcs": wcs_path(rd, e.stem),
                   "zeropoints": zeropoint_path(rd, e.stem)},
        ctx.config.scale)


def _coadd_groups(ctx: ReleaseContext) -> dict[tuple[str, str], list[_Exposure]]:
    """The exposures of every (tile, band) of the release that gets a co-add, sorted by key."""
    centres = {t.name for t in _release_tiles(ctx)}
    groups: dict[tuple[str, str], list[_Exposure]] = defaultdict(list)
    for e in _exposures(ctx):
        if e.tile in centres:
            groups[(e.tile, e.band)].append(e)
    return dict(sorted(groups.items()))


def _plan_coadd(ctx: ReleaseContext) -> list[Task]:
    """One co-add per tile and band from its scaled exposures and their masks."""
    rd = ctx.release_dir
    centres = {t.name: t for t in _release_tiles(ctx)}
    tasks = []
    for (tile, band), exposures in _coadd_groups(ctx).items():
        scaled = [scaled_path(rd, e.stem) for e in exposures]
        masks = [mask_path(rd, e.stem) for e in exposures]
        tasks.append(Task(
            stage="coadd", key=f"{tile}/{band}", func=run_coadd,
            kwargs={"tile": tile, "band": band, "ra": centres[tile].ra_deg,
                    "dec": centres[tile].dec_deg, "scaled": scaled, "masks": masks,
                    "release_dir": rd, "settings": ctx.config.coadd},
            inputs=(*scaled, *masks),
            outputs=(*(coadd_path(rd, tile, band, kind) for kind in ("coadd", "mask", "ndith")),
                     coadd_exposures_path(rd, tile, band), coadd_excluded_path(rd, tile, band)),
            tile=tile, band=band,
        ))
    return tasks


#: Reference catalogs that the reduction reads per tile (astrometry, zero points, maps,
#: spurious-source cleaning).
_TILE_REFCATS = ("gaia_dr3", "gaia_xp", "delve_dr2")


def _plan_refcat(ctx: ReleaseContext) -> list[Task]:
    """One task per tile and reference catalog: its sources over the tile, as Parquet."""
    config_path = ctx.config.source_path
    refcat = ctx.config.refcat
    tasks = []
    for tile in _release_tiles(ctx):
        for catalog in _TILE_REFCATS:
            source = getattr(refcat, catalog)
            out = tile_refcat_path(ctx.release_dir, tile.name, catalog)
            tasks.append(Task(
                stage="refcat",
                key=f"{tile.name}/{catalog}",
                func=write_tile_refcat,
                kwargs={"catalog": catalog, "tile": tile, "config_path": config_path,
                        "out_path": out},
                inputs=(ctx.config.resolve(source.path),) if source.source == "local" else (),
                outputs=(out,),
                params={"refcat": refcat, "camera_scale": ctx.config.survey.camera_scale},
                tile=tile.name,
            ))
    return tasks


def _tile_bands(ctx: ReleaseContext) -> dict[str, list[str]]:
    """The co-added bands of every tile, in wavelength order."""
    order = {b: i for i, b in enumerate(("B", "V", "R", "I"))}
    bands: dict[str, list[str]] = defaultdict(list)
    for tile, band in _coadd_groups(ctx):
        bands[tile].append(band)
    return {t: sorted(b, key=lambda x: order.get(x, len(order))) for t, b in bands.items()}


def _modes(ctx: ReleaseContext) -> list[tuple[str, str, tuple[str, ...]]]:
    """(tile, mode, bands) of every measurement: one dual per tile that has the detection band,
    one single per tile and band."""
    detection = ctx.config.master.detection_band.upper()
    found = []
    for tile, bands in _tile_bands(ctx).items():
        if detection in bands:
            found.append((tile, "dual", tuple(bands)))
        found += [(tile, "single", (band,)) for band in bands]
    return found


def _coadd_files(rd: Path, tile: str, bands: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(coadd_path(rd, tile, band, kind) for band in bands
                 for kind in ("coadd", "mask", "ndith"))


def _measured(rd: Path, tile: str, mode: str, bands: tuple[str, ...]) -> Path:
    return measured_path(rd, tile, mode, bands[0] if mode == "single" else None)


def _plan_photometry(ctx: ReleaseContext) -> list[Task]:
    """Detection and photometry with sep: dual mode per tile, single mode per tile and band."""
    rd = ctx.release_dir
    settings = ctx.config.photometry
    nnw = ctx.config.resolve(settings.nnw_path)
    detection = ctx.config.master.detection_band.upper()
    return [
        Task(stage="photometry", key=f"{tile}/{mode}" + ("" if mode == "dual" else f"/{bands[0]}"),
             func=run_photometry,
             kwargs={"release_dir": rd, "tile": tile, "mode": mode, "bands": bands,
                     "settings": settings, "nnw_path": nnw, "detection_band": detection},
             inputs=(*_coadd_files(rd, tile, bands),
                     *(coadd_exposures_path(rd, tile, band) for band in bands),
                     *(coadd_excluded_path(rd, tile, band) for band in bands), nnw),
             outputs=(_measured(rd, tile, mode, bands),),
             tile=tile, band=bands[0] if mode == "single" else None)
        for tile, mode, bands in _modes(ctx)
    ]


def _plan_maps(ctx: ReleaseContext) -> list[Task]:
    """Zero-point and alignment maps per tile, band and mode."""
    rd = ctx.release_dir
    tasks = []
    modes = _modes(ctx)
    duals = {tile: _measured(rd, tile, mode, bands) for tile, mode, bands in modes
             if mode == "dual"} if ctx.config.maps.site_colour_correction else {}
    for tile, mode, bands in modes:
        measured = _measured(rd, tile, mode, bands)
        dual = duals.get(tile)
        for band in bands:
            tasks.append(Task(
                stage="maps", key=f"{tile}/{mode}/{band}", func=run_maps,
                kwargs={"release_dir": rd, "tile": tile, "band": band, "mode": mode,
                        "measured_path": measured, "settings": ctx.config.maps,
                        "dual_path": dual},
                inputs=(measured, coadd_path(rd, tile, band, "coadd"),
                        coadd_exposures_path(rd, tile, band),
                        *((dual,) if dual is not None and dual != measured else ()),
                        tile_refcat_path(rd, tile, "gaia_xp"),
                        tile_refcat_path(rd, tile, "gaia_dr3")),
                outputs=tuple(map_paths(rd, tile, band, mode)), tile=tile, band=band))
    return tasks


def _plan_auto_noise(ctx: ReleaseContext) -> list[Task]:
    """Per band: artificial stars in each tile's co-add calibrate faint MAG_AUTO's noise bias
    (none when ``[photometry] auto_noise_runs`` is 0)."""
    rd = ctx.release_dir
    settings = ctx.config.photometry
    if settings.auto_noise_runs == 0:
        return []
    nnw = ctx.config.resolve(settings.nnw_path)
    tiles: dict[str, list[str]] = defaultdict(list)
    for tile, bands in _tile_bands(ctx).items():
        for band in bands:
            tiles[band].append(tile)
    return [
        Task(stage="auto-noise", key=band, func=run_auto_noise_calibration,
             kwargs={"release_dir": rd, "band": band, "tiles": tuple(names),
                     "settings": settings, "nnw_path": nnw},
             inputs=(*(p for tile in names for p in _coadd_files(rd, tile, (band,))),
                     *(coadd_exposures_path(rd, tile, band) for tile in names),
                     *(coadd_excluded_path(rd, tile, band) for tile in names), nnw),
             outputs=(auto_noise_path(rd, band),), band=band)
        for band, names in sorted(tiles.items())
    ]


def _auto_noise_inputs(ctx: ReleaseContext, mode: str, bands: tuple[str, ...]) -> tuple[Path, ...]:
    """The calibration a tile catalog reads: its band's (single mode) or the detection band's
    (dual mode), when the release calibrates."""
    if ctx.config.photometry.auto_noise_runs == 0:
        return ()
    band = bands[0] if mode == "single" else ctx.config.master.detection_band.upper()
    return (auto_noise_path(ctx.release_dir, band),)


def _plan_tile_catalogs(ctx: ReleaseContext) -> list[Task]:
    """Calibrated, cleaned tile catalogs per tile (dual) and per tile and band (single)."""
    rd = ctx.release_dir
    detection = ctx.config.master.detection_band.upper()
    tasks = []
    modes = _modes(ctx)
    duals = {tile for tile, mode, _ in modes
             if mode == "dual"} if ctx.config.maps.site_colour_correction else set()
    for tile, mode, bands in modes:
        single = mode == "single"
        out = (single_catalog_path(rd, tile, bands[0].lower()) if single
               else dual_catalog_path(rd, tile))
        refs = tuple(tile_refcat_path(rd, tile, c) for c in _TILE_REFCATS)
        dual = (measured_path(rd, tile, "dual"),) if single and tile in duals else ()
        tasks.append(Task(
            stage="catalogs", key=out.stem, func=run_tile_catalog,
            kwargs={"release_dir": rd, "tile": tile, "mode": mode, "bands": bands,
                    "settings": ctx.config.postprocess, "detection_band": detection,
                    "map_settings": ctx.config.maps,
                    "auto_noise": ctx.config.photometry.auto_noise_runs > 0},
            inputs=(_measured(rd, tile, mode, bands), *dual, *refs,
                    *_auto_noise_inputs(ctx, mode, bands),
                    *(p for band in bands for p in map_paths(rd, tile, band, mode)),
                    *(coadd_exposures_path(rd, tile, band) for band in bands)),
            outputs=(out, summary_path(rd, tile, mode, bands[0] if single else None)),
            tile=tile, band=bands[0] if single else None))
    return tasks


def _plan_masters(ctx: ReleaseContext) -> list[Task]:
    """The two release catalogs, each from every tile catalog of its mode."""
    rd = ctx.release_dir
    groups = _coadd_groups(ctx)
    detection = ctx.config.master.detection_band
    dual = sorted({dual_catalog_path(rd, tile) for tile, band in groups
                   if band.lower() == detection})
    single = [single_catalog_path(rd, tile, band.lower()) for tile, band in groups]
    ndith = [coadd_path(rd, tile, band, "ndith") for tile, band in groups]
    settings = ctx.config.master
    tasks = []
    if dual:
        out = master_catalog_path(rd, "idual_master")
        tasks.append(Task(stage="masters", key="idual_master", func=build_idual_master,
                          kwargs={"tile_catalogs": dual, "out_path": out, "settings": settings},
                          inputs=tuple(dual), outputs=(out,)))
    if single:
        out = master_catalog_path(rd, "single_master")
        tasks.append(Task(stage="masters", key="single_master", func=build_single_master,
                          kwargs={"tile_catalogs": single, "out_path": out,
                                  "settings": settings, "ndith_maps": ndith},
                          inputs=(*single, *ndith), outputs=(out,)))
    return tasks


def _plan_export(ctx: ReleaseContext) -> list[Task]:
    """Every configured export of each release catalog, schema-checked before READY."""
    rd = ctx.release_dir
    settings = ctx.config.export
    tasks = []
    for master in _plan_masters(ctx):
        catalog = master.key
        out_dir = export_dir(rd, catalog)
        tasks.append(Task(stage="export", key=catalog, func=export_catalog,
                          kwargs={"master": master_catalog_path(rd, catalog), "out_dir": out_dir,
                                  "formats": settings.formats, "settings": settings},
                          inputs=master.outputs, outputs=(out_dir / "READY",)))
    return tasks


def dr1_stages() -> list[Stage]:
    """Every stage of ``ks4release build dr1``, in order."""
    return [
        Stage(name="ingest", description="Validate exposures", plan=_plan_ingest),
        Stage(name="inventory", description="Inventory per tile and band", plan=_plan_inventory),
        Stage(name="refcat", description="Reference catalogs per tile", plan=_plan_refcat),
        Stage(name="masks", description="Bad-pixel masks", plan=_plan_masks),
        Stage(name="detect", description="Single-epoch detection", plan=_plan_detect),
        Stage(name="astrometry", description="Astrometry against Gaia DR3",
              plan=_plan_astrometry),
        Stage(name="zp-stars", description="Zero-point stars per exposure",
              plan=_plan_zeropoint_stars),
        Stage(name="zp-pattern", description="Amplifier pattern of each site",
              plan=_plan_site_pattern),
        Stage(name="zeropoint", description="Zero points against Gaia XP", plan=_plan_zeropoint),
        Stage(name="scale", description="Scale exposures to ZP = 30", plan=_plan_scale),
        Stage(name="coadd", description="Co-adds per tile and band", plan=_plan_coadd),
        Stage(name="photometry", description="Detection and photometry on the co-adds",
              plan=_plan_photometry),
        Stage(name="auto-noise", description="Artificial stars: faint MAG_AUTO's noise bias",
              plan=_plan_auto_noise),
        Stage(name="maps", description="Zero-point and alignment maps", plan=_plan_maps),
        Stage(name="catalogs", description="Tile catalogs (calibrated, cleaned)",
              plan=_plan_tile_catalogs),
        Stage(name="masters", description="Release catalogs idual_master and single_master",
              plan=_plan_masters),
        Stage(name="export", description="Archive exports, schema-checked", plan=_plan_export),
    ]


@dataclass(frozen=True, kw_only=True)
class SimulationContext:
    """What the simulation stages need: the settings and the folder to write into."""

    config: SimulationConfig
    directory: Path


_REFCAT_FILES = ("refcat/gaia_dr3.parquet", "refcat/gaia_xp.parquet", "refcat/delve_dr2.parquet")
_TRUTH_TABLES = (SOURCES_PATH, "truth/exposures.parquet", "truth/zeropoints.parquet")


def _plan_sky(ctx: SimulationContext) -> list[Task]:
    """One task: the true sources, the truth tables and the reference catalogs."""
    out = ctx.directory
    return [
        Task(
            stage="simulate-sky",
            key="sky",
            func=write_sky,
            kwargs={"cfg": ctx.config, "out_dir": out},
            outputs=tuple(out / p for p in _TRUTH_TABLES + _REFCAT_FILES),
        )
    ]


def _plan_exposures(ctx: SimulationContext) -> list[Task]:
    """One task per simulated exposure: its raw file and its truth masks."""
    out = ctx.directory
    sources = out / SOURCES_PATH
    return [
        Task(
            stage="simulate-exposures",
            key=exposure.stem,
            func=write_exposure,
            kwargs={"exposure": exposure, "sources_path": sources, "cfg": ctx.config,
                    "out_dir": out},
            inputs=(sources,),
            outputs=(out / exposure.rel_path, truth_mask_path(out, exposure)),
            tile=exposure.tile,
            band=exposure.band,
        )
        for exposure in plan_survey(ctx.config).exposures
    ]


def _plan_release_config(ctx: SimulationContext) -> list[Task]:
    """Last, the release.toml that marks the simulated survey as complete."""
    out = ctx.directory
    exposures = plan_survey(ctx.config).exposures
    return [
        Task(
            stage="simulate-config",
            key="release.toml",
            func=write_release_config,
            kwargs={"cfg": ctx.config, "out_dir": out},
            inputs=tuple(out / e.rel_path for e in exposures),
            outputs=(out / CONFIG_FILENAME,),
        )
    ]


def simulation_stages() -> list[Stage]:
    """The stages of ``ks4release simulate``, in order."""
    return [
        Stage(name="simulate-sky", description="Simulate the sky and reference catalogs",
              plan=_plan_sky),
        Stage(name="simulate-exposures", description="Simulate exposures",
              plan=_plan_exposures),
        Stage(name="simulate-config", description="Write release.toml", plan=_plan_release_config),
    ]
