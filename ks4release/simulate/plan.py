"""Which exposures the mini-survey takes, with every per-exposure parameter drawn up front.

The plan is pure data (frozen dataclasses of plain numbers), so each exposure can be rendered by
an independent, picklable task. Random draws come from ``numpy.random.SeedSequence`` keyed by
(seed, purpose, tile, band) so that adding a band does not change the others.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ks4release.grid import Tile, tile_by_name
from ks4release.projection import gnomonic, inverse_gnomonic
from ks4release.simulate.arguments import SimulationConfig
from ks4release.survey import (
    DITHER_OFFSETS_ARCMIN,
    DR1_MJD_RANGE,
    EXPOSURES_PER_TILE_DR1,
    SITES,
    band,
)

__all__ = ["ExposurePlan", "SurveyPlan", "plan_survey", "demo_tiles", "rng_for"]

#: Seconds between consecutive exposures of one visit (120 s exposure plus readout and slew).
_CADENCE_S = 180.0


def rng_for(seed: int, *key: str) -> np.random.Generator:
    """A generator for one purpose, independent of every other key (order-free, stable)."""
    words = [zlib.crc32(k.encode("utf-8")) for k in key]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


@dataclass(frozen=True, kw_only=True)
class ExposurePlan:
    """One exposure: where, when, with what conditions, and which artifacts it carries.

    ``ra_deg``/``dec_deg`` are the nominal pointing written to the header; ``true_ra_deg``/
    ``true_dec_deg`` and ``rotation_deg`` define the true WCS. ``sky_mag_arcsec2`` is the sky of
    this exposure, ``transparency_mag`` the cloud loss (added to every magnitude).
    """

    stem: str
    tile: str
    band: str
    number: int
    site: str
    mjd: float
    dither: int
    replacement: bool
    exptime_s: float
    ra_deg: float
    dec_deg: float
    true_ra_deg: float
    true_dec_deg: float
    pointing_error_arcsec: float
    rotation_deg: float
    seeing_fwhm_arcsec: float
    sky_mag_arcsec2: float
    transparency_mag: float
    satellite: bool
    stray_light: bool
    seed: int

    @property
    def rel_path(self) -> str:
        """Path of the raw file relative to the output folder."""
        return f"raw/{self.tile}/{self.band}/{self.stem}.fits"


@dataclass(frozen=True, kw_only=True)
class SurveyPlan:
    """The tiles (with their scaled demo centres) and every exposure of the mini-survey."""

    tiles: tuple[Tile, ...]
    exposures: tuple[ExposurePlan, ...]
    footprint_deg: tuple[float, float, float, float]
    centre_deg: tuple[float, float]


def demo_tiles(cfg: SimulationConfig) -> list[Tile]:
    """The simulated tiles: real names, centres moved towards the anchor by ``cfg.scale``."""
    anchor = tile_by_name(cfg.anchor_tile)
    out = []
    for tile in cfg.block_tiles:
        if tile.name not in cfg.tile_names:
            continue
        xi, eta = gnomonic(anchor.ra_deg, anchor.dec_deg, np.array([tile.ra_deg]),
                                 np.array([tile.dec_deg]))
        ra, dec = inverse_gnomonic(anchor.ra_deg, anchor.dec_deg, xi * cfg.scale, eta * cfg.scale)
        out.append(Tile(index=tile.index, name=tile.name, ra_deg=float(ra[0]),
                        dec_deg=float(dec[0])))
    return out


def _footprint(cfg: SimulationConfig, tiles: list[Tile]) -> tuple[float, float, float, float]:
    """(xi_min, xi_max, eta_min, eta_max) in degrees about the anchor covering every exposure."""
    anchor = tile_by_name(cfg.anchor_tile)
    w, h = cfg.camera.field_size_deg
    dx = max(abs(d[0]) for d in DITHER_OFFSETS_ARCMIN) / 60.0 * cfg.scale
    dy = max(abs(d[1]) for d in DITHER_OFFSETS_ARCMIN) / 60.0 * cfg.scale
    margin = 60.0 / 3600.0 + 3.0 * cfg.dither_jitter_arcsec * cfg.scale / 3600.0
    xi, eta = gnomonic(anchor.ra_deg, anchor.dec_deg, np.array([t.ra_deg for t in tiles]),
                             np.array([t.dec_deg for t in tiles]))
    hx = w / 2 * 1.05 + dx + margin
    hy = h / 2 * 1.05 + dy + margin
    return (float(xi.min() - hx), float(xi.max() + hx), float(eta.min() - hy),
            float(eta.max() + hy))


def _n_exposures(rng: np.random.Generator) -> int:
    """Number of exposures of one tile/band, drawn from the DR1 distribution."""
    counts = np.array(list(EXPOSURES_PER_TILE_DR1))
    p = np.array(list(EXPOSURES_PER_TILE_DR1.values()))
    return int(rng.choice(counts, p=p / p.sum()))


def _site_weights() -> np.ndarray:
    """Probability of each site, proportional to its DR1 exposure count."""
    w = np.array([s.dr1_exposures for s in SITES], dtype=float)
    return w / w.sum()


def _other_site(rng: np.random.Generator, site_name: str) -> str:
    """A site other than ``site_name`` (replacements and extra exposures)."""
    names = [s.name for s in SITES]
    w = _site_weights() * np.array([n != site_name for n in names])
    return str(rng.choice(names, p=w / w.sum()))


def _visits(cfg: SimulationConfig, rng: np.random.Generator, night: float, site_name: str,
            band_slot: int) -> list[tuple[str, float, bool]]:
    """(site, mjd, replacement) of each exposure of one tile/band."""
    n = _n_exposures(rng)
    start = night + 0.1 + band_slot * 4 * _CADENCE_S / 86400.0
    out = []
    for k in range(n):
        extra = k >= 4
        redo = (not extra) and rng.random() < cfg.replacement_fraction
        if extra or redo:
            s = _other_site(rng, site_name)
            mjd = night + rng.uniform(1.0, 365.0) + 0.1 + rng.uniform(0, 0.3)
            out.append((s, min(mjd, DR1_MJD_RANGE[1] + 0.3), redo))
        else:
            out.append((site_name, start + k * _CADENCE_S / 86400.0, False))
    return out


def _pointing(cfg: SimulationConfig, rng: np.random.Generator, tile: Tile, number: int
              ) -> tuple[int, float, float]:
    """Dither point (1-4) and nominal pointing of exposure ``number`` (1-based)."""
    dither = (number - 1) % 4 + 1
    dra, ddec = DITHER_OFFSETS_ARCMIN[dither - 1]
    xi = dra / 60.0 * cfg.scale
    eta = ddec / 60.0 * cfg.scale
    if number > 4:
        jitter = rng.normal(0.0, cfg.dither_jitter_arcsec * cfg.scale / 3600.0, 2)
        xi, eta = xi + jitter[0], eta + jitter[1]
    ra, dec = inverse_gnomonic(tile.ra_deg, tile.dec_deg, np.array([xi]), np.array([eta]))
    return dither, float(ra[0]), float(dec[0])


def _conditions(cfg: SimulationConfig, rng: np.random.Generator, band_name: str
                ) -> dict[str, float]:
    """Seeing, sky, clouds, pointing error and rotation of one exposure."""
    b = band(band_name)
    lo, hi = cfg.pointing_error_arcsec
    return {
        "seeing_fwhm_arcsec": float(
            b.seeing_arcsec * math.exp(rng.normal(0.0, cfg.seeing_scatter))),
        "sky_mag_arcsec2": float(b.sky_mag_arcsec2 - abs(rng.normal(0.0, cfg.sky_scatter_mag))),
        "transparency_mag": float(rng.uniform(0.0, cfg.transparency_max_mag)),
        "pointing_error_arcsec": float(rng.uniform(lo, hi)),
        "pointing_angle": float(rng.uniform(0.0, 2 * math.pi)),
        "rotation_deg": float(rng.normal(0.0, cfg.rotation_sigma_deg)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _exposure(cfg: SimulationConfig, tile: Tile, band_name: str, number: int,
              visit: tuple[str, float, bool], rng: np.random.Generator) -> ExposurePlan:
    """The plan of exposure ``number`` of a tile/band."""
    dither, ra, dec = _pointing(cfg, rng, tile, number)
    c = _conditions(cfg, rng, band_name)
    err_deg = c["pointing_error_arcsec"] / 3600.0
    tra, tdec = inverse_gnomonic(ra, dec, np.array([err_deg * math.cos(c["pointing_angle"])]),
                              np.array([err_deg * math.sin(c["pointing_angle"])]))
    stem = f"{tile.name}_{band_name}_{number:02d}"
    return ExposurePlan(
        stem=stem, tile=tile.name, band=band_name, number=number, site=visit[0],
        mjd=round(visit[1], 6), dither=dither, replacement=visit[2], exptime_s=cfg.exptime_s,
        ra_deg=ra, dec_deg=dec, true_ra_deg=float(tra[0]), true_dec_deg=float(tdec[0]),
        pointing_error_arcsec=c["pointing_error_arcsec"], rotation_deg=c["rotation_deg"],
        seeing_fwhm_arcsec=c["seeing_fwhm_arcsec"], sky_mag_arcsec2=c["sky_mag_arcsec2"],
        transparency_mag=c["transparency_mag"], satellite=False, stray_light=False,
        seed=c["seed"],
    )


def _tile_sites(cfg: SimulationConfig, tiles: list[Tile]) -> dict[str, str]:
    """The site that observes each tile: the first three tiles one site each, in random order,
    so that a survey of three tiles or more exercises every site's camera; the others drawn in
    proportion to DR1's exposure counts."""
    rng = rng_for(cfg.seed, "tile-sites")
    names = [s.name for s in SITES]
    first = [str(n) for n in rng.permutation(names)]
    return {t.name: first[i] if i < len(first) else str(rng.choice(names, p=_site_weights()))
            for i, t in enumerate(tiles)}


def _tile_exposures(cfg: SimulationConfig, tile: Tile, site_name: str) -> list[ExposurePlan]:
    """All exposures of one tile: one night and site, bands in sequence."""
    rng = rng_for(cfg.seed, "night", tile.name)
    night = float(np.floor(rng.uniform(DR1_MJD_RANGE[0], DR1_MJD_RANGE[1] - 365.0)))
    out = []
    for slot, band_name in enumerate(cfg.bands):
        brng = rng_for(cfg.seed, "exposures", tile.name, band_name)
        for k, visit in enumerate(_visits(cfg, brng, night, site_name, slot)):
            out.append(_exposure(cfg, tile, band_name, k + 1, visit, brng))
    return out


def _flag_artifacts(cfg: SimulationConfig, exposures: list[ExposurePlan]) -> list[ExposurePlan]:
    """Choose the exposures with a satellite trail and a stray-light ghost (at least one each)."""
    from dataclasses import replace

    rng = rng_for(cfg.seed, "artifact-exposures")
    sat = rng.random(len(exposures)) < cfg.satellite_fraction
    stray = rng.random(len(exposures)) < cfg.stray_light_fraction
    if not sat.any():
        sat[rng.integers(len(exposures))] = True
    if not stray.any():
        stray[rng.integers(len(exposures))] = True
    return [replace(e, satellite=bool(a), stray_light=bool(b))
            for e, a, b in zip(exposures, sat, stray)]


def plan_survey(cfg: SimulationConfig) -> SurveyPlan:
    """Every exposure of the mini-survey with its conditions (no pixels yet)."""
    tiles = demo_tiles(cfg)
    sites = _tile_sites(cfg, tiles)
    exposures = [e for t in tiles for e in _tile_exposures(cfg, t, sites[t.name])]
    anchor = tile_by_name(cfg.anchor_tile)
    return SurveyPlan(tiles=tuple(tiles), exposures=tuple(_flag_artifacts(cfg, exposures)),
                      footprint_deg=_footprint(cfg, tiles),
                      centre_deg=(anchor.ra_deg, anchor.dec_deg))
