"""Configuration of the simulator: one keyword-only dataclass, every default documented.

Numbers marked DR1 come from the KS4 DR1 paper (see ``ks4release.survey``); the others are our
choices where the paper states nothing, chosen to look like KMTNet data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ks4release.camera import CCD_NAMES, N_AMPLIFIERS, Camera
from ks4release.grid import Tile, neighbour_tiles, tile_by_name
from ks4release.survey import BANDS, EXPTIME_S

__all__ = ["SimulationConfig", "DEMO_ANCHOR_TILE", "DEMO_SCALE"]

#: The real KS4 tile the demo survey is centred on (RA 0, Dec -62; Galactic b ~ -54).
DEMO_ANCHOR_TILE = "0000.000-62"
#: Default camera scale of the demo survey: 576 x 576 px CCDs, 8 amplifiers of 72 columns.
DEMO_SCALE = 1.0 / 16.0

_BAND_NAMES = tuple(b.name for b in BANDS)


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """Everything that defines a simulated mini-survey; the same config and seed give the same
    bytes.

    Geometry
        ``anchor_tile``, ``n_tiles_ra``, ``n_tiles_dec``: a block of real adjacent grid tiles
        (``ks4release.grid.neighbour_tiles``); ``tiles`` keeps only the named ones of that block
        (empty = all). ``scale`` shrinks CCDs, gaps, dithers and tile spacing together; pixel
        scale and seeing stay real. ``bands``: subset of B, V, R, I.
    Observing
        ``exptime_s`` (DR1 120 s), ``seeing_scatter`` (log-normal sigma of the seeing around the
        DR1 median of the band), ``moffat_beta`` (PSF), ``sky_scatter_mag`` (night-to-night sky
        brightness, mag), ``transparency_max_mag`` (clouds dim an exposure by 0..this),
        ``replacement_fraction`` (nominal exposures redone from another site up to a year
        later), ``dither_jitter_arcsec`` (extra random offset of revisits, real arcsec, scaled).
    Photometry
        ``amp_gradient_max_mag`` (DR1: up to 0.1 mag along Y within an amplifier),
        ``amp_offset_sigma_mag`` (amplifier-to-amplifier offsets): the instrumental pattern,
        one per site and the same in every band (DR1: "their consistency across filters
        suggests a common instrumental origin"); ``amp_jitter_mag`` (how much an exposure's
        amplifier offsets and gradients depart from their site's pattern).
    Astrometry
        ``pointing_error_arcsec`` (range of the true pointing error), ``rotation_sigma_deg``
        (camera rotation), ``distortion_scale`` (fraction of the .ahead cubic distortion).
    Sky
        ``star_mag_limit`` (faintest star, V AB), ``galaxy_mag_limit`` (faintest galaxy, R AB),
        ``star_density_factor`` (star counts relative to tile 0000's at b = -54 deg; about 10
        sources per arcmin2 in all, like DR1's sparse validation tile 0698. DR1 also covers the
        Galactic plane: its dense tile 0294 holds 54 sources per arcmin2, ~30 times the stars),
        ``galaxy_density_deg2`` (galaxies brighter than R = 24 per deg2),
        ``bright_stars_per_ccd`` (stars of V 11.5-13 placed on every CCD of every tile so that
        saturation, bleed trails and crosstalk appear even on a tiny survey).
    Artifacts
        ``cosmic_rays_per_full_ccd`` (per full-size CCD per 120 s, scaled by area and time),
        ``crosstalk_coefficient`` (ghost / source for neighbouring amplifiers),
        ``dead_ccd`` and ``dead_amp`` (one dead amplifier in every exposure; empty ``dead_ccd``
        = none), ``bad_columns_per_ccd`` (static), ``satellite_fraction`` and
        ``stray_light_fraction`` (share of exposures hit; at least one of each is forced).
    """

    seed: int = 1
    scale: float = DEMO_SCALE
    anchor_tile: str = DEMO_ANCHOR_TILE
    n_tiles_ra: int = 2
    n_tiles_dec: int = 2
    tiles: tuple[str, ...] = ()
    bands: tuple[str, ...] = _BAND_NAMES
    exptime_s: float = EXPTIME_S
    seeing_scatter: float = 0.15
    moffat_beta: float = 3.0
    sky_scatter_mag: float = 0.25
    transparency_max_mag: float = 0.05
    replacement_fraction: float = 0.15
    dither_jitter_arcsec: float = 20.0
    amp_gradient_max_mag: float = 0.1
    amp_offset_sigma_mag: float = 0.01
    amp_jitter_mag: float = 0.003
    pointing_error_arcsec: tuple[float, float] = (1.0, 2.0)
    rotation_sigma_deg: float = 0.02
    distortion_scale: float = 1.0
    star_mag_limit: float = 24.0
    galaxy_mag_limit: float = 24.0
    star_density_factor: float = 1.0
    galaxy_density_deg2: float = 30000.0
    bright_stars_per_ccd: int = 1
    cosmic_rays_per_full_ccd: float = 400.0
    crosstalk_coefficient: float = 2.0e-3
    dead_ccd: str = "NN"
    dead_amp: int = 5
    bad_columns_per_ccd: int = 2
    satellite_fraction: float = 0.1
    stray_light_fraction: float = 0.05

    def __post_init__(self) -> None:
        """Check every field; errors name the field (no file-system access)."""
        self._check_geometry()
        self._check_fractions()
        self._check_positive()
        if self.dead_ccd and self.dead_ccd not in CCD_NAMES:
            raise ValueError(f"dead_ccd must be one of {', '.join(CCD_NAMES)} or '', "
                             f"got {self.dead_ccd!r}")
        if not 0 <= self.dead_amp < N_AMPLIFIERS:
            raise ValueError(f"dead_amp must be in 0..{N_AMPLIFIERS - 1}, got {self.dead_amp}")
        lo, hi = self.pointing_error_arcsec
        if not 0.0 <= lo <= hi:
            raise ValueError(f"pointing_error_arcsec must be (min, max) with 0 <= min <= max, "
                             f"got {self.pointing_error_arcsec}")

    def _check_geometry(self) -> None:
        """Seed, scale, tile block, tile subset and bands."""
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.n_tiles_ra < 1 or self.n_tiles_dec < 1:
            raise ValueError(f"n_tiles_ra and n_tiles_dec must be >= 1, got "
                             f"{self.n_tiles_ra} x {self.n_tiles_dec}")
        if not self.bands or any(b not in _BAND_NAMES for b in self.bands):
            raise ValueError(f"bands must be a non-empty subset of {_BAND_NAMES}, got {self.bands}")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"bands must be unique, got {self.bands}")
        tile_by_name(self.anchor_tile)
        block = {t.name for t in self.block_tiles}
        unknown = [t for t in self.tiles if t not in block]
        if unknown:
            raise ValueError(f"tiles {unknown} are not in the {self.n_tiles_ra} x "
                             f"{self.n_tiles_dec} block at {self.anchor_tile}: {sorted(block)}")

    def _check_fractions(self) -> None:
        """Fractions must lie in [0, 1]."""
        for name in ("replacement_fraction", "satellite_fraction", "stray_light_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def _check_positive(self) -> None:
        """Strictly positive and non-negative numeric fields."""
        for name in ("exptime_s", "moffat_beta", "galaxy_density_deg2", "star_density_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.moffat_beta <= 1.0:
            raise ValueError(f"moffat_beta must be > 1, got {self.moffat_beta}")
        for name in ("seeing_scatter", "sky_scatter_mag", "transparency_max_mag",
                     "dither_jitter_arcsec", "amp_gradient_max_mag", "amp_offset_sigma_mag",
                     "amp_jitter_mag", "rotation_sigma_deg", "distortion_scale",
                     "cosmic_rays_per_full_ccd",
                     "crosstalk_coefficient", "bright_stars_per_ccd", "bad_columns_per_ccd"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @cached_property
    def camera(self) -> Camera:
        """The KMTNet camera at this config's scale."""
        return Camera.kmtnet(self.scale)

    @cached_property
    def block_tiles(self) -> list[Tile]:
        """The real grid tiles of the ``n_tiles_ra`` x ``n_tiles_dec`` block (real centres)."""
        return neighbour_tiles(tile_by_name(self.anchor_tile), self.n_tiles_ra, self.n_tiles_dec)

    @property
    def tile_names(self) -> tuple[str, ...]:
        """Names of the simulated tiles, in block order."""
        names = [t.name for t in self.block_tiles]
        return tuple(n for n in names if not self.tiles or n in self.tiles)
