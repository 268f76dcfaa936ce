"""A tile catalog from its measurement table: calibrated, cleaned, and in the release format.

DR1 section 3.2 in the order the paper gives it. For one tile and detection mode the task
:func:`run_tile_catalog` reads the measurement table of :mod:`reduction.photometry` and

1. takes the sites' colour terms out of every band's fluxes when the maps were made so
   (:mod:`reduction.site_colour`; the colours from the tile's dual-mode measurement table) and
   turns the fluxes into AB magnitudes with the zero-point maps of every band
   (:func:`reduction.calibration_maps.apply_zp_maps`);
2. removes spurious detections against every reference catalog of the tile (Gaia DR3 and
   DELVE DR2; :func:`reduction.postprocess.flag_spurious`), their stars moved by their proper
   motions to the co-add's mean epoch (``[postprocess] propagate_proper_motion``; DR1 matched
   at Gaia's 2016.0); in dual mode the detection band decides and the forced bands carry the
   same SSFLAG and SSCOUNT_30;
3. adds NDITH, EDGE and the MJDs of every band from its exposures' footprints
   (:func:`reduction.postprocess.coverage_columns`) and the share of every source's 5"
   aperture light that its detected neighbours put there (:mod:`reduction.blending`, ours);
4. corrects point sources' MAG_AUTO per band: first for the PSF light outside their own Kron
   ellipse (:func:`reduction.postprocess.kron_loss_correction`) and, where the ellipse comes
   from the band's own noise (single mode, dual mode's detection band), for the noise bias
   that the ``auto-noise`` stage calibrated with artificial stars
   (:mod:`reduction.artificial_stars`, ``work/catalog/auto_noise_<BAND>.json``), then with
   DR1's empirical curve (:func:`reduction.postprocess.auto_bias_correction`), calibrated on
   the point sources of ``[postprocess] bias_reference``;
5. writes the tile catalog (:mod:`ks4release.tile_catalogs`): a band without a co-add has
   null measurements and NDITH = 0; single-mode catalogs get position errors from the
   windowed-centroid variances with the co-add's astrometric floor against Gaia DR3 added in
   quadrature (:mod:`reduction.astrometric_floor`);

and a JSON summary beside the measurement table with the false detection rate, the MAG_AUTO
bias curve of every band and the astrometric floor, for the log and the validation report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from ks4release.atomic import atomic_write_text
from ks4release.errors import InputError
from ks4release.layout import coadd_exposures_path, coadd_path, tile_refcat_path
from ks4release.reduction.artificial_stars import AutoNoiseBias, auto_noise_path, read_auto_noise
from ks4release.reduction.astrometric_floor import AstrometricFloor, astrometric_floor
from ks4release.reduction.blending import blend_column
from ks4release.reduction.calibration_maps import apply_zp_maps, read_maps, zp_tile_path
from ks4release.reduction.coadd_maps import coadd_wcs, read_exposures_json
from ks4release.reduction.photometry import measured_path, psf_beta, read_measured
from ks4release.reduction.postprocess import (
    PostprocessSettings,
    auto_bias_correction,
    coverage_columns,
    flag_spurious,
    float_column,
    kron_loss_correction,
    moffat_index,
    point_source_targets,
)
from ks4release.reduction.site_colour import site_colour_correction
from ks4release.refcat.formats import read_refcat
from ks4release.refcat.propagate import propagate_positions
from ks4release.settings import MapSettings
from ks4release.tile_catalogs import (
    BANDS,
    dual_catalog_path,
    single_catalog_path,
    tile_catalog_schema,
    write_tile_catalog,
)

__all__ = [
    "REFERENCES",
    "SPURIOUS_REFERENCES",
    "run_tile_catalog",
    "summary_path",
    "tile_catalog_columns",
]

logger = logging.getLogger(__name__)

#: Reference catalogs whose sources make a detection real (DR1 used eight; the demo has two).
SPURIOUS_REFERENCES = ("gaia_dr3", "delve_dr2")

#: Every reference catalog a tile catalog reads.
REFERENCES = ("gaia_dr3", "gaia_xp", "delve_dr2")


def summary_path(release_dir: Path, tile: str, mode: str, band: str | None = None) -> Path:
    """``work/catalog/<tile>_<mode>[_<BAND>]_summary.json`` beside the measurement table."""
    measured = measured_path(release_dir, tile, mode, band)
    return measured.with_name(measured.name.replace("_measured.parquet", "_summary.json"))


def _coadd_geometry(release_dir: Path, tile: str, band: str
                    ) -> tuple[tuple[int, int], WCS, float, float | None]:
    """Shape, celestial WCS, pixel scale (arcsec) and mean epoch (Julian year, from the header's
    MJD-MEAN; None without it) of a tile's co-add."""
    header = fits.getheader(coadd_path(release_dir, tile, band, "coadd"))
    wcs = coadd_wcs(header)
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    mjd = header.get("MJD-MEAN")
    epoch = float(Time(float(mjd), format="mjd").jyear) if mjd is not None else None
    return (int(header["NAXIS2"]), int(header["NAXIS1"])), wcs, scale, epoch


def _read_references(release_dir: Path, tile: str) -> dict[str, Table]:
    """The tile's reference catalogs that exist (Gaia DR3, Gaia XP, DELVE DR2), by name."""
    found = {}
    for catalog in REFERENCES:
        path = tile_refcat_path(release_dir, tile, catalog)
        if path.is_file():
            found[catalog] = read_refcat(path, catalog)
        else:
            logger.warning("tile %s: no %s reference catalog (%s); the steps that use it go "
                           "without it", tile, catalog, path)
    return found


def _at_epoch(references: dict[str, Table], epoch: float | None, tile: str
              ) -> dict[str, Table]:
    """The reference catalogs with every source that has a proper motion moved to the co-add's
    ``epoch`` (:func:`ks4release.refcat.propagate_positions`), so that a fast star is matched
    where the co-add saw it: the demo's fastest stars (0.4-0.8"/yr) lie 2-3" from their Gaia
    position four years later, beyond the 1.1" of the spurious-source match. Unchanged when
    ``epoch`` is None (a co-add header without MJD-MEAN)."""
    if epoch is None:
        logger.warning("tile %s: the co-add header has no MJD-MEAN; reference catalogs are "
                       "matched at their own epochs", tile)
        return references
    return {name: propagate_positions(table, epoch) for name, table in references.items()}


def tile_catalog_columns(table: Table, *, mode: str, band: str | None,
                         pixel_scale_arcsec: float) -> dict[str, np.ndarray]:
    """The columns of the tile-catalog schema from a processed table (NaN for null).

    Bands absent from ``table`` (dual mode: no co-add) get null measurements and NDITH = 0.
    Single mode: ``raerr``/``decerr`` (arcsec) from the windowed-centroid variances
    ``errx2win_image``, ``erry2win_image`` (pixels squared) of a north-up co-add.
    """
    schema = tile_catalog_schema(mode, band)
    n = len(table)
    cols: dict[str, np.ndarray] = {}
    for spec in schema.columns:
        if spec.name in table.colnames:
            cols[spec.name] = float_column(table, spec.name)
        elif spec.name.startswith(("ndith_", "edge_")):
            cols[spec.name] = np.zeros(n)  # not observed in this band
        elif spec.name in ("raerr", "decerr"):
            axis = "x" if spec.name == "raerr" else "y"
            cols[spec.name] = np.sqrt(float_column(table, f"err{axis}2win_image")) \
                * pixel_scale_arcsec
        else:
            cols[spec.name] = np.full(n, np.nan)
    return cols


def _positions(table: Table, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) arrays of a reference table, optionally of some rows only."""
    ra, dec = np.asarray(table["ra"], float), np.asarray(table["dec"], float)
    return (ra, dec) if rows is None else (ra[rows], dec[rows])


def _calibration(references: dict[str, Table], band: str, settings: PostprocessSettings
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions of the MAG_AUTO bias calibration sources of ``band`` (lower case), or None
    without the configured reference catalog."""
    table = references.get(settings.bias_reference)
    if table is None:
        return None
    if settings.bias_reference == "gaia_xp":
        return _positions(table, np.isfinite(float_column(table, f"{band}_jkc_mag")))
    return _positions(table)


def _process_band(table: Table, *, release_dir: Path, tile: str, band: str, mode: str,
                  shape: tuple[int, int], wcs: WCS, pixel_scale_arcsec: float,
                  references: dict[str, Table], settings: PostprocessSettings,
                  dual: Callable[[], Table | None], map_settings: MapSettings,
                  noise: AutoNoiseBias | None = None) -> tuple[Table, dict]:
    """Steps 1, 3 and 4 of the module docstring for one band (upper-case ``band``); ``dual``
    gives the tile's dual-mode measurement table as measured (the colours of the site colour
    correction; read only when the maps ask for it), None when the tile has none."""
    b = band.lower()
    header = fits.getheader(coadd_path(release_dir, tile, band, "coadd"))
    seeing_arcsec = float(header["SEEING"])
    zp, _ = read_maps(release_dir, tile, band, mode, shape=shape)
    exposures_path = coadd_exposures_path(release_dir, tile, band)
    exposures = read_exposures_json(exposures_path)
    summary: dict = {}
    if any(m.colour_corrected for m in zp.values()):
        table, colour = site_colour_correction(table, band, dual=dual(), wcs=wcs,
                                               exposures_path=exposures_path,
                                               settings=map_settings)
        if not colour.applied:
            raise InputError(zp_tile_path(release_dir, tile, band, mode),
                             f"tile {tile} band {band}: the maps hold for colour-corrected "
                             f"fluxes but the sources cannot be corrected ({colour.reason})")
        summary["site_colour_correction"] = colour.as_dict()
    table = apply_zp_maps(table, zp, band)
    table = coverage_columns(table, exposures, b, edge_px=settings.edge_px, shape=shape,
                             wcs=wcs)
    table = blend_column(table, b, seeing_arcsec, moffat_index(psf_beta(header), settings),
                         pixel_scale_arcsec)
    calibration = _calibration(references, b, settings)
    if calibration is None:
        reason = f"no {settings.bias_reference} catalog for tile {tile}"
        logger.warning("MAG_AUTO bias correction %s: not applied (%s)", b, reason)
        return table, {**summary, "bias_curve": None, "reason": reason}
    gaia = references.get("gaia_dr3")
    gaia_positions = None if gaia is None else _positions(gaia)
    if settings.kron_loss_correction:
        targets = point_source_targets(table, b, settings, gaia_positions)
        noise_term = None if noise is None else noise.correction(float_column(table, f"snr_{b}"))
        table, summary["kron_loss"] = kron_loss_correction(
            table, b, seeing_arcsec, pixel_scale_arcsec, settings, targets=targets,
            psf_beta=psf_beta(header), noise_term=noise_term)
        summary["kron_loss"]["auto_noise_k"] = None if noise is None else noise.k
    table, curve = auto_bias_correction(table, calibration, b, settings, gaia=gaia_positions)
    summary["bias_curve"] = asdict(curve)
    return table, summary


def _auto_noise(release_dir: Path, band: str, own_ellipse: bool) -> AutoNoiseBias | None:
    """The band's MAG_AUTO noise-bias calibration (:mod:`.artificial_stars`) when the band's
    Kron ellipses come from its own noise (single mode, dual mode's detection band) and the
    release has one."""
    path = auto_noise_path(release_dir, band)
    if not own_ellipse or not path.is_file():
        return None
    try:
        return read_auto_noise(path)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(path, f"cannot read the MAG_AUTO noise calibration ({exc})") from exc


def _position_floor(cols: dict[str, np.ndarray], b: str, gaia: Table | None,
                    settings: PostprocessSettings) -> AstrometricFloor:
    """The astrometric floor of a single-mode tile catalog (:mod:`.astrometric_floor`) from its
    clean bright sources, at the median of their mean epochs; none without Gaia DR3."""
    if gaia is None:
        return AstrometricFloor(0.0, 0, "no gaia_dr3 reference catalog")
    usable = (cols[f"snr_{b}"] >= settings.astrometric_floor_snr_min) & (cols[f"flags_{b}"] == 0)
    mjd = cols[f"mean_mjd_{b}"][usable & np.isfinite(cols[f"mean_mjd_{b}"])]
    if mjd.size == 0:
        return AstrometricFloor(0.0, 0, "no bright clean source with an epoch")
    epoch = float(Time(float(np.median(mjd)), format="mjd").jyear)
    return astrometric_floor(cols["ra"], cols["dec"], cols["raerr"], cols["decerr"], usable,
                             gaia, epoch=epoch, min_stars=settings.astrometric_floor_min_stars)


def _dual_reader(measured: Table | None, path: Path) -> Callable[[], Table | None]:
    """The tile's dual-mode measurement table when asked for, read once: ``measured`` itself in
    dual mode, else the file at ``path`` (None when there is none)."""
    cache: list[Table | None] = [] if measured is None else [measured]

    def read() -> Table | None:
        if not cache:
            cache.append(read_measured(path) if path.is_file() else None)
        return cache[0]

    return read


def _jsonable(value: object) -> object:
    """numpy scalars and arrays of a summary as plain JSON values."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_tile_catalog(*, release_dir: Path, tile: str, mode: str, bands: tuple[str, ...],
                     settings: PostprocessSettings, detection_band: str = "I",
                     map_settings: MapSettings | None = None, auto_noise: bool = True) -> None:
    """Make the tile catalog of one tile and mode (task function).

    ``bands`` (upper case): in dual mode every band with a co-add of the tile, in single mode
    the one band. Reads the measurement table, the maps (``read_maps``), the co-adds'
    headers and exposures JSON, the tile's reference catalogs (Gaia DR3, Gaia XP, DELVE
    DR2), the MAG_AUTO noise calibration of the band whose noise drew the Kron ellipses when
    ``auto_noise`` (``[photometry] auto_noise_runs`` > 0: a calibration left by an earlier
    build is not applied once the release stops calibrating) and, in single mode when the
    maps were made on colour-corrected fluxes, the tile's dual-mode measurement table (the
    colours of the site colour correction, done with ``map_settings``; an InputError when it
    is missing); writes the tile catalog
    (``dual_catalog_path`` / ``single_catalog_path``) and :func:`summary_path`, each
    atomically.
    """
    release_dir = Path(release_dir)
    single = mode == "single"
    if single and len(bands) != 1:
        raise ValueError(f"single mode takes one band, got {bands}")
    band = bands[0] if single else None
    source = measured_path(release_dir, tile, mode, band)
    if not source.is_file():
        raise InputError(source, f"tile {tile}: no {mode}-mode measurement table")
    table = read_measured(source)
    dual = _dual_reader(table if not single else None, measured_path(release_dir, tile, "dual"))
    detection = band if single else detection_band
    shape, wcs, scale, epoch = _coadd_geometry(release_dir, tile, detection)
    references = _read_references(release_dir, tile)
    matching = (_at_epoch(references, epoch, tile) if settings.propagate_proper_motion
                else references)
    spurious_refs = [_positions(matching[c]) for c in SPURIOUS_REFERENCES if c in matching]
    table, stats = flag_spurious(table, spurious_refs, detection.lower(), settings,
                                 copy_to=[b.lower() for b in bands if b != detection])
    summary: dict = {"tile": tile, "mode": mode, "spurious": stats.as_dict(), "bands": {}}
    for b in bands:
        table, summary["bands"][b] = _process_band(
            table, release_dir=release_dir, tile=tile, band=b, mode=mode, shape=shape,
            wcs=wcs, pixel_scale_arcsec=scale, references=matching, settings=settings,
            dual=dual, map_settings=map_settings or MapSettings(),
            noise=_auto_noise(release_dir, b,
                              auto_noise and (single or b == detection_band.upper())))
    band_letter = band.lower() if single else None
    cols = tile_catalog_columns(table, mode=mode, band=band_letter, pixel_scale_arcsec=scale)
    if single:
        floor = _position_floor(cols, band_letter, references.get("gaia_dr3"), settings)
        cols["raerr"] = np.hypot(cols["raerr"], floor.floor_arcsec)
        cols["decerr"] = np.hypot(cols["decerr"], floor.floor_arcsec)
        summary["astrometric_floor"] = asdict(floor)
    out = (single_catalog_path(release_dir, tile, band_letter) if single
           else dual_catalog_path(release_dir, tile))
    write_tile_catalog(out, cols, tile=tile, schema=tile_catalog_schema(mode, band_letter))
    summary["rows"] = len(table)
    atomic_write_text(summary_path(release_dir, tile, mode, band),
                      json.dumps(_jsonable(summary), indent=2) + "\n")
    missing = [b for b in BANDS if not single and b.upper() not in bands]
    logger.info("tile %s %s: %d sources written to %s%s", tile, mode, len(table), out.name,
                f" (no co-add in {', '.join(missing)})" if missing else "")
