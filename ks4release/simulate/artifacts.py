"""The defects a KMTNet pipeline must handle, each a pure function on one CCD's arrays.

Every function returns what it adds (or changes) and the mask pixels it touched, using the bits
of :mod:`ks4release.simulate.masks`. Images here are in electrons unless a name says ADU.
Focal-plane coordinates (``fx = x0_px + x``, ``fy = y0_px + y``) let trails and ghosts cross
CCD boundaries consistently.
"""

from __future__ import annotations

import math

import numpy as np

from ks4release.camera import CCD, Camera
from ks4release.simulate.masks import MaskBit

__all__ = [
    "CROSSTALK_MASK_E",
    "cosmic_rays",
    "bleed_trails",
    "crosstalk",
    "bad_columns",
    "apply_bad_columns",
    "dead_amplifier",
    "satellite_trail",
    "stray_light",
    "SatelliteTrail",
    "StrayLightRing",
]


#: Crosstalk ghosts brighter than this (e-) are recorded in the truth mask.
CROSSTALK_MASK_E = 10.0


def cosmic_rays(shape: tuple[int, int], rng: np.random.Generator, n_mean: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sharp hits: ``Poisson(n_mean)`` short tracks (1-8 px) of 400-5000 e- per pixel.

    Returns (flat pixel indices, deposits in e-). A quarter of the pixels of a
    track spill 10% of their charge into a neighbour, so hits are not all single pixels.
    """
    ny, nx = shape
    n = int(rng.poisson(n_mean))
    idx, dep = [], []
    for _ in range(n):
        length = int(min(8, 1 + rng.geometric(0.45)))
        x, y = rng.uniform(2, nx - 2), rng.uniform(2, ny - 2)
        ang = rng.uniform(0, math.pi)
        t = np.arange(length)
        xs = np.clip(np.round(x + t * math.cos(ang)).astype(int), 0, nx - 1)
        ys = np.clip(np.round(y + t * math.sin(ang)).astype(int), 0, ny - 1)
        e = rng.uniform(400.0, 5000.0, length)
        idx.append(ys * nx + xs)
        dep.append(e)
        spill = rng.random(length) < 0.25
        if spill.any():
            sx = np.clip(xs[spill] + 1, 0, nx - 1)
            idx.append(ys[spill] * nx + sx)
            dep.append(0.1 * e[spill])
    if not idx:
        return np.zeros(0, dtype=int), np.zeros(0)
    return np.concatenate(idx), np.concatenate(dep)


def _bleed_column(col: np.ndarray, full: float, direction: int) -> tuple[np.ndarray, np.ndarray]:
    """Spill each run of over-full pixels along ``direction``; returns (core, trail) flags."""
    v = col if direction > 0 else col[::-1]
    over = v > full
    core = over.copy()
    trail = np.zeros_like(over)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], over.astype(np.int8), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        excess = float(np.sum(v[start:stop] - full))
        v[start:stop] = full
        room = np.maximum(full - v[stop:], 0.0)
        filled = np.cumsum(room)
        k = int(np.searchsorted(filled, excess))
        v[stop:stop + k] = full
        trail[stop:stop + k] = True
        if stop + k < v.size:
            v[stop + k] += excess - (filled[k - 1] if k > 0 else 0.0)
            trail[stop + k] = True
    if direction < 0:
        return core[::-1], trail[::-1]
    return core, trail


def bleed_trails(image_e: np.ndarray, full_well_e: float, direction: int, mask: np.ndarray
                 ) -> None:
    """Move charge above full well along each column (``+1`` = towards +Y), in place.

    Sets ``SATURATED`` on the over-full core and ``BLEED`` on the trail it feeds.
    """
    cols = np.flatnonzero((image_e > full_well_e).any(axis=0))
    for x in cols:
        col = image_e[:, x]
        core, trail = _bleed_column(col, full_well_e, direction)
        mask[core, x] |= np.uint8(MaskBit.SATURATED)
        mask[trail & ~core, x] |= np.uint8(MaskBit.BLEED)


def _readout_order(ccd: CCD, image: np.ndarray) -> list[np.ndarray]:
    """Each amplifier's strip in readout order (odd amplifiers read from their right edge)."""
    out = []
    for amp in ccd.amplifiers:
        strip = image[:, amp.x_start:amp.x_stop]
        out.append(strip[:, ::-1] if amp.index % 2 else strip)
    return out


def crosstalk(ccd: CCD, image_e: np.ndarray, full_well_e: float, coefficient: float,
              mask: np.ndarray) -> np.ndarray:
    """Ghosts of bright pixels (> half full well) in the other amplifiers of the same CCD.

    A pixel read as the k-th of its row by amplifier i appears in amplifier j at the k-th
    readout position with ``coefficient * 0.5**(|i - j| - 1)`` of its charge: mirrored images
    between neighbouring amplifiers, as KMTNet's crosstalk. Returns the ghost image (e-) and sets
    ``COSMIC_OR_XTALK | CROSSTALK`` where a ghost exceeds ``CROSSTALK_MASK_E``.
    """
    ghost = np.zeros_like(image_e)
    ghost_strips = _readout_order(ccd, ghost)  # views into ``ghost``
    mask_strips = _readout_order(ccd, mask)
    for i, strip in enumerate(_readout_order(ccd, image_e)):
        bright = strip > 0.5 * full_well_e
        if not bright.any():
            continue
        rows = np.flatnonzero(bright.any(axis=1))
        source = np.where(bright[rows], strip[rows], 0.0)
        for j, target in enumerate(ghost_strips):
            if i != j:
                target[rows] += coefficient * 0.5 ** (abs(i - j) - 1) * source
    for target, mstrip in zip(ghost_strips, mask_strips):
        mstrip[target > CROSSTALK_MASK_E] |= np.uint8(MaskBit.COSMIC_OR_XTALK | MaskBit.CROSSTALK)
    return ghost


def bad_columns(ccd: CCD, rng: np.random.Generator, n: int) -> list[tuple[int, int, str, float]]:
    """Static defects of one CCD: (column, first bad row, 'hot' or 'dead', hot level in e-)."""
    out = []
    for _ in range(n):
        x = int(rng.integers(2, ccd.nx - 2))
        y0 = int(rng.integers(0, ccd.ny // 2)) if rng.random() < 0.5 else 0
        kind = "hot" if rng.random() < 0.5 else "dead"
        out.append((x, y0, kind, float(rng.uniform(800.0, 3000.0))))
    return out


def apply_bad_columns(image_e: np.ndarray, defects: list[tuple[int, int, str, float]],
                      mask: np.ndarray) -> None:
    """Hot columns gain a constant level, dead ones keep 5% of their signal; sets BAD_COLUMN."""
    for x, y0, kind, level in defects:
        if kind == "hot":
            image_e[y0:, x] += level
        else:
            image_e[y0:, x] *= 0.05
        mask[y0:, x] |= np.uint8(MaskBit.BAD_COLUMN)


def dead_amplifier(ccd: CCD, amp_index: int, mask: np.ndarray) -> slice:
    """Columns of the dead amplifier (its data become read noise only).

    Its mask becomes ``DEAD_AMP`` alone: nothing else injected there can be seen.
    """
    amp = ccd.amplifiers[amp_index]
    cols = slice(amp.x_start, amp.x_stop)
    mask[:, cols] = np.uint8(MaskBit.DEAD_AMP)
    return cols


class SatelliteTrail:
    """A straight trail across the focal plane: angle, a point on it, peak (e-), sigma (px)."""

    def __init__(self, camera: Camera, rng: np.random.Generator, sigma_px: float) -> None:
        """Draw the trail geometry and brightness from ``rng``."""
        w, h = camera.field_size_px
        self.angle = float(rng.uniform(0.0, math.pi))
        self.fx, self.fy = float(rng.uniform(-0.3, 0.3) * w), float(rng.uniform(-0.3, 0.3) * h)
        self.peak_e = float(rng.uniform(300.0, 2000.0))
        self.sigma_px = sigma_px


def satellite_trail(ccd: CCD, trail: SatelliteTrail, mask: np.ndarray) -> np.ndarray:
    """Image (e-) of the trail on this CCD; sets SATELLITE within 3 sigma of its axis."""
    y, x = np.ogrid[0:ccd.ny, 0:ccd.nx]
    d = (ccd.x0_px + x - trail.fx) * math.sin(trail.angle) - (ccd.y0_px + y - trail.fy) * math.cos(
        trail.angle)
    near = np.abs(d) < 3.0 * trail.sigma_px
    mask[near] |= np.uint8(MaskBit.SATELLITE)
    return trail.peak_e * np.exp(-0.5 * (d / trail.sigma_px) ** 2)


class StrayLightRing:
    """A large diffuse ghost ring: centre and radius in focal-plane px, amplitude in e-."""

    def __init__(self, camera: Camera, rng: np.random.Generator, sky_e: float) -> None:
        """Draw the ring geometry and brightness from ``rng``."""
        w, h = camera.field_size_px
        self.fx, self.fy = float(rng.uniform(-0.3, 0.3) * w), float(rng.uniform(-0.3, 0.3) * h)
        self.radius = float(rng.uniform(0.2, 0.35) * w)
        self.width = 0.03 * w
        self.amplitude_e = float(rng.uniform(0.04, 0.1) * sky_e)


def stray_light(ccd: CCD, ring: StrayLightRing, mask: np.ndarray) -> np.ndarray:
    """Image (e-) of the ring plus a faint halo; sets STRAY_LIGHT where above 50% of its peak."""
    y, x = np.ogrid[0:ccd.ny, 0:ccd.nx]
    r = np.hypot(ccd.x0_px + x - ring.fx, ccd.y0_px + y - ring.fy)
    img = ring.amplitude_e * (np.exp(-0.5 * ((r - ring.radius) / ring.width) ** 2)
                              + 0.2 * np.exp(-0.5 * (r / ring.radius) ** 2))
    mask[img > 0.5 * ring.amplitude_e] |= np.uint8(MaskBit.STRAY_LIGHT)
    return img
