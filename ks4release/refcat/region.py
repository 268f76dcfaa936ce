"""Sky regions for reference-catalog queries, and the HEALPix cells that cover them.

A :class:`Region` is a cone, a tile footprint with a margin (a rectangle in the tangent plane
of the tile centre, whose edges are great circles), or a MOC. Each region answers two questions:

* :meth:`Region.contains`: which of these positions lie inside?
* :meth:`Region.cells`: which nested HEALPix cells at a given order cover it? Every point of the
  region lies in one of the returned cells (a property the tests check with hypothesis); a few
  cells that only touch the region may be included.

The cache stores reference sources per cell, so overlapping regions share cells. Positions are
plain degrees (ICRS) throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import healpy as hp
import numpy as np

__all__ = [
    "MAX_CELL_ORDER",
    "Region",
    "ConeRegion",
    "BoxRegion",
    "MocRegion",
    "cell_of",
    "cell_bounds",
    "CellBounds",
]

#: Finest HEALPix order accepted for cache cells (Gaia's source_id uses order 12).
MAX_CELL_ORDER = 12
# Inclusive healpy queries test overlap at _FACT times the cell resolution.
_FACT = 4


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
        raise TypeError(f"order must be an integer, got {type(order).__name__}")
    if not 0 <= int(order) <= MAX_CELL_ORDER:
        raise ValueError(f"order must be in [0, {MAX_CELL_ORDER}], got {order}")
    return int(order)


def _check_position(ra_deg: float, dec_deg: float) -> tuple[float, float]:
    ra, dec = float(ra_deg), float(dec_deg)
    if not (math.isfinite(ra) and math.isfinite(dec)):
        raise ValueError(f"ra and dec must be finite, got ({ra_deg}, {dec_deg})")
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"dec must be in [-90, 90] deg, got {dec_deg}")
    return ra % 360.0, dec


def cell_of(ra_deg: Any, dec_deg: Any, order: int) -> np.ndarray:
    """Nested HEALPix cell index at ``order`` of each position (degrees)."""
    order = _check_order(order)
    return np.asarray(
        hp.ang2pix(2**order, np.asarray(ra_deg, dtype=np.float64),
                   np.asarray(dec_deg, dtype=np.float64), nest=True, lonlat=True),
        dtype=np.int64,
    )


@dataclass(frozen=True, kw_only=True)
class CellBounds:
    """A declination range and one or two RA ranges (degrees) that together hold a cell.

    ``ra_ranges`` is a tuple of ``(low, high)`` pairs with 0 <= low <= high <= 360; a cell that
    crosses RA 0 has two, a cell that holds a pole has ``((0, 360),)``.
    """

    dec_min: float
    dec_max: float
    ra_ranges: tuple[tuple[float, float], ...]

    @property
    def area_deg2(self) -> float:
        """Area of the RA/Dec box in square degrees."""
        band = math.degrees(math.sin(math.radians(self.dec_max))
                            - math.sin(math.radians(self.dec_min)))
        return band * sum(hi - lo for lo, hi in self.ra_ranges)

    def cone(self) -> tuple[float, float, float]:
        """A cone (ra, dec, radius, degrees) that holds the whole box."""
        ras, decs = [], []
        for lo, hi in self.ra_ranges:
            for ra in np.linspace(lo, hi, 9):
                for dec in np.linspace(self.dec_min, self.dec_max, 9):
                    ras.append(ra)
                    decs.append(dec)
        vec = hp.ang2vec(np.array(ras), np.array(decs), lonlat=True)
        centre = vec.sum(axis=0)
        norm = np.linalg.norm(centre)
        if norm < 1e-9:
            return 0.0, 90.0, 180.0
        centre /= norm
        radius = float(np.degrees(np.arccos(np.clip(vec @ centre, -1.0, 1.0))).max())
        ra_c, dec_c = hp.vec2ang(centre, lonlat=True)
        # The box edges bulge between samples; pad by one sample spacing.
        pad = max(self.dec_max - self.dec_min, 1e-6) / 8.0
        return float(ra_c[0]) % 360.0, float(dec_c[0]), min(radius + pad, 180.0)


def cell_bounds(cell: int, order: int) -> CellBounds:
    """A Dec range and RA range(s) that hold HEALPix cell ``cell`` at ``order`` (nested).

    The cell boundary is sampled finely and the box padded by a small fraction of the cell size,
    so that no point of the cell falls outside (rows outside the cell are dropped after the
    query by :func:`cell_of`).
    """
    order = _check_order(order)
    nside = 2**order
    cell = int(cell)
    if not 0 <= cell < 12 * nside * nside:
        raise ValueError(f"cell {cell} does not exist at order {order}")
    step = 16
    vec = hp.boundaries(nside, cell, step=step, nest=True)  # (3, 4 * step)
    ra, dec = hp.vec2ang(vec.T, lonlat=True)
    ra_c, dec_c = hp.pix2ang(nside, cell, nest=True, lonlat=True)
    size = math.degrees(hp.max_pixrad(nside))
    pad = size / step + 1e-9
    dec_min = max(-90.0, float(dec.min()) - pad)
    dec_max = min(90.0, float(dec.max()) + pad)
    if dec_max >= 90.0 - 1e-9 or dec_min <= -90.0 + 1e-9:
        # A cell with the pole as a vertex: every RA.
        return CellBounds(dec_min=dec_min, dec_max=dec_max, ra_ranges=((0.0, 360.0),))
    offset = ((ra - ra_c + 180.0) % 360.0) - 180.0
    widest = max(abs(dec_min), abs(dec_max))
    ra_pad = pad / math.cos(math.radians(widest))
    low = float(ra_c + offset.min() - ra_pad)
    high = float(ra_c + offset.max() + ra_pad)
    if high - low >= 360.0:
        ranges: tuple[tuple[float, float], ...] = ((0.0, 360.0),)
    elif low < 0.0:
        ranges = ((0.0, high), (low + 360.0, 360.0))
    elif high > 360.0:
        ranges = ((0.0, high - 360.0), (low, 360.0))
    else:
        ranges = ((low, high),)
    return CellBounds(dec_min=dec_min, dec_max=dec_max, ra_ranges=ranges)


class Region:
    """A region of the sky: build one with :meth:`cone`, :meth:`from_tile` or :meth:`from_moc`."""

    def contains(self, ra_deg: Any, dec_deg: Any) -> np.ndarray:
        """Boolean array: which positions (degrees) lie inside the region."""
        raise NotImplementedError

    def cells(self, order: int) -> np.ndarray:
        """Sorted nested HEALPix cells at ``order`` that cover the region."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what the region is (numbers only)."""
        raise NotImplementedError

    @staticmethod
    def cone(ra_deg: float, dec_deg: float, radius_deg: float) -> ConeRegion:
        """A cone of ``radius_deg`` around (``ra_deg``, ``dec_deg``)."""
        return ConeRegion(ra_deg=ra_deg, dec_deg=dec_deg, radius_deg=radius_deg)

    @staticmethod
    def from_tile(tile: Any, camera: Any, margin_deg: float = 0.1) -> BoxRegion:
        """The footprint of ``camera`` centred on ``tile`` (a :class:`~ks4release.grid.Tile`),
        widened by ``margin_deg`` on every side.

        ``camera`` is a :class:`~ks4release.camera.Camera`; its ``field_size_deg`` (gaps
        included) sets the rectangle, aligned with RA and Dec at the tile centre. The margin
        should cover the dither offsets (4' in RA, 7' in Dec) plus any matching radius.
        """
        if not math.isfinite(margin_deg) or margin_deg < 0:
            raise ValueError(f"margin_deg must be >= 0, got {margin_deg}")
        width, height = camera.field_size_deg
        return BoxRegion(
            ra_deg=tile.ra_deg, dec_deg=tile.dec_deg,
            half_width_deg=width / 2.0 + margin_deg, half_height_deg=height / 2.0 + margin_deg,
            name=getattr(tile, "name", ""),
        )

    @staticmethod
    def box(ra_deg: float, dec_deg: float, half_width_deg: float,
            half_height_deg: float) -> BoxRegion:
        """A rectangle in the tangent plane at (``ra_deg``, ``dec_deg``), aligned with RA/Dec."""
        return BoxRegion(ra_deg=ra_deg, dec_deg=dec_deg, half_width_deg=half_width_deg,
                         half_height_deg=half_height_deg)

    @staticmethod
    def from_moc(moc: Any) -> MocRegion:
        """The area of a :class:`mocpy.MOC`."""
        return MocRegion(moc=moc)


@dataclass(frozen=True, kw_only=True)
class ConeRegion(Region):
    """All positions within ``radius_deg`` of the centre."""

    ra_deg: float
    dec_deg: float
    radius_deg: float

    def __post_init__(self) -> None:
        ra, dec = _check_position(self.ra_deg, self.dec_deg)
        object.__setattr__(self, "ra_deg", ra)
        object.__setattr__(self, "dec_deg", dec)
        if not (math.isfinite(self.radius_deg) and 0.0 < self.radius_deg <= 180.0):
            raise ValueError(f"radius_deg must be in (0, 180], got {self.radius_deg}")

    def contains(self, ra_deg: Any, dec_deg: Any) -> np.ndarray:
        from astropy.coordinates import angular_separation

        sep = angular_separation(np.radians(np.asarray(ra_deg, dtype=np.float64)),
                                 np.radians(np.asarray(dec_deg, dtype=np.float64)),
                                 math.radians(self.ra_deg), math.radians(self.dec_deg))
        return np.asarray(np.degrees(sep) <= self.radius_deg)

    def cells(self, order: int) -> np.ndarray:
        order = _check_order(order)
        centre = hp.ang2vec(self.ra_deg, self.dec_deg, lonlat=True)
        # inclusive=True returns every cell that overlaps the disc (and perhaps a few more).
        cells = hp.query_disc(2**order, centre, math.radians(self.radius_deg) * (1 + 1e-9)
                              + 1e-12, inclusive=True, fact=_FACT, nest=True)
        return np.unique(np.asarray(cells, dtype=np.int64))

    def describe(self) -> str:
        return (f"cone ra={self.ra_deg:.6f} dec={self.dec_deg:.6f} "
                f"radius={self.radius_deg:.6f} deg")


@dataclass(frozen=True, kw_only=True)
class BoxRegion(Region):
    """A rectangle ``|xi| <= half_width_deg``, ``|eta| <= half_height_deg`` in the gnomonic
    (tangent-plane) projection at the centre; its edges are great circles."""

    ra_deg: float
    dec_deg: float
    half_width_deg: float
    half_height_deg: float
    name: str = ""

    def __post_init__(self) -> None:
        ra, dec = _check_position(self.ra_deg, self.dec_deg)
        object.__setattr__(self, "ra_deg", ra)
        object.__setattr__(self, "dec_deg", dec)
        for label, value in (("half_width_deg", self.half_width_deg),
                             ("half_height_deg", self.half_height_deg)):
            if not (math.isfinite(value) and 0.0 < value <= 20.0):
                raise ValueError(f"{label} must be in (0, 20] deg, got {value}")

    def _tangent(self, ra_deg: Any, dec_deg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gnomonic (xi, eta) in degrees, and whether the point is on the near hemisphere."""
        ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
        dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
        ra0, dec0 = math.radians(self.ra_deg), math.radians(self.dec_deg)
        cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
        front = cos_c > 1e-9
        safe = np.where(front, cos_c, 1.0)
        xi = np.cos(dec) * np.sin(ra - ra0) / safe
        eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / safe
        return np.degrees(np.arctan(xi)), np.degrees(np.arctan(eta)), front

    def _from_tangent(self, xi_deg: Any, eta_deg: Any) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`_tangent` (xi, eta as angles whose tangent is the plane coordinate)."""
        x = np.tan(np.radians(np.asarray(xi_deg, dtype=np.float64)))
        y = np.tan(np.radians(np.asarray(eta_deg, dtype=np.float64)))
        ra0, dec0 = math.radians(self.ra_deg), math.radians(self.dec_deg)
        denom = np.cos(dec0) - y * np.sin(dec0)
        ra = ra0 + np.arctan2(x, denom)
        dec = np.arctan2(np.sin(dec0) + y * np.cos(dec0), np.hypot(x, denom))
        return np.degrees(ra) % 360.0, np.degrees(dec)

    def contains(self, ra_deg: Any, dec_deg: Any) -> np.ndarray:
        xi, eta, front = self._tangent(ra_deg, dec_deg)
        return np.asarray(front & (np.abs(xi) <= self.half_width_deg)
                          & (np.abs(eta) <= self.half_height_deg))

    def corners(self, pad_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """RA and Dec of the four corners (counter-clockwise), widened by ``pad_deg``."""
        w, h = self.half_width_deg + pad_deg, self.half_height_deg + pad_deg
        return self._from_tangent(np.array([w, -w, -w, w]), np.array([h, h, -h, -h]))

    def cells(self, order: int) -> np.ndarray:
        order = _check_order(order)
        nside = 2**order
        # Pad by twice the radius of the fine pixels the inclusive test works with, so that
        # every fine pixel holding a point of the box has its centre inside the polygon.
        pad = 2.0 * math.degrees(hp.max_pixrad(nside * _FACT))
        ra, dec = self.corners(pad)
        vertices = hp.ang2vec(ra, dec, lonlat=True)
        cells = hp.query_polygon(nside, vertices, inclusive=True, fact=_FACT, nest=True)
        return np.unique(np.asarray(cells, dtype=np.int64))

    def describe(self) -> str:
        label = f"tile {self.name} " if self.name else ""
        return (f"{label}box ra={self.ra_deg:.6f} dec={self.dec_deg:.6f} "
                f"half-size={self.half_width_deg:.6f}x{self.half_height_deg:.6f} deg")


@dataclass(frozen=True, kw_only=True)
class MocRegion(Region):
    """The area of a MOC (``mocpy.MOC``)."""

    moc: Any = field(compare=False)

    def contains(self, ra_deg: Any, dec_deg: Any) -> np.ndarray:
        from astropy import units as u

        ra = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
        inside = self.moc.contains_lonlat(ra * u.deg, dec * u.deg)
        return np.asarray(inside, dtype=bool).reshape(np.shape(ra_deg))

    def cells(self, order: int) -> np.ndarray:
        order = _check_order(order)
        moc = self.moc.degrade_to_order(order) if self.moc.max_order > order else self.moc
        flat = np.asarray(moc.flatten(), dtype=np.int64)  # cells at moc.max_order
        shift = 2 * (order - moc.max_order)
        if shift == 0:
            return np.unique(flat)
        base = flat << shift
        children = (base[:, None] + np.arange(1 << shift, dtype=np.int64)[None, :]).ravel()
        return np.unique(children)

    def describe(self) -> str:
        return f"moc order={self.moc.max_order} sky_fraction={self.moc.sky_fraction:.3e}"
