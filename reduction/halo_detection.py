"""A second detection pass in the halos of saturated stars.

SExtractor's deblending, which DR1 ran and :mod:`.photometry` reproduces with sep, splits a
faint source off a brighter one only when its branch of the isophote tree holds DEBLEND_MINCONT
(0.00005) of the *whole* blend's flux above the level where the branches part. A saturated
star's footprint holds millions of ADU, and the faint galaxies and stars sitting on its wings
hold less than that above the wing's level: they stay pixels of the star. On the demo's R
co-adds 12 of the 47 true sources of S/N >= 10 that had no detection lay within 17" of an
R < 15 star.

Here each saturated star's fitted Moffat wings (:func:`.sep_objects.wing_fits`, the fits that
centre saturated stars) are subtracted inside its footprint's box, its saturated pixels masked,
and the box extracted again with the same detection settings. A new object is kept when its
centre lies in the star's footprint, on no earlier detection, beyond the flat core and the
inner wings where the fitted profile departs from the star's true one: more than
``halo_min_radius_fwhm`` times the co-add's SEEING from the star's centre, where the subtracted
profile is below ``halo_max_profile_sigma`` times the background RMS, and with a residual peak
above ``halo_min_peak_ratio`` times that profile (the profile's error grows with the profile).
On the demo's four R co-adds the residuals of the bright stars' cores made 42 detections 1.2-3.1
SEEING from their stars, under profiles of 69-13,000 ADU (6-1,200 times the RMS), which this
rule rejects. On the demo's 16 co-adds it adds 22 detections: 14 true sources within 2 pixels
(7 in R, which lifts R's completeness at true S/N >= 10 from 94.7% to 95.4%) and 8 pieces of a
large galaxy or of a 10-12 mag star's residual, which the spurious-source cleaning then judges
like any other detection. Kept objects take their pixels out of the star's footprint and
are flagged, with the star, as deblended (sep's OBJ_MERGED: FLAGS bit 2). Ours, not DR1's
(``[photometry] halo_detection``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sep

from ks4release.reduction.sep_objects import WingFit

__all__ = ["HaloSettings", "halo_detections"]

#: Detect function: (image, rms, mask) of a box -> (sep objects, segmentation map).
Detect = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

#: Detections closer than this (pixels) to an earlier detection are that detection.
_SAME_PX = 2.0
#: Pixels added around a star's footprint box, in SEEING, so that the halo objects at the
#: footprint's edge are extracted whole.
_MARGIN_FWHM = 2.0


@dataclass(frozen=True)
class HaloSettings:
    """The acceptance rule of a halo detection (module docstring)."""

    fwhm_px: float
    min_radius_fwhm: float
    max_profile_sigma: float
    min_peak_ratio: float


def halo_detections(image: np.ndarray, rms: np.ndarray, masked: np.ndarray,
                    saturated: np.ndarray, objects: np.ndarray, segmap: np.ndarray,
                    fits: list[tuple[int, WingFit]], detect: Detect, rule: HaloSettings
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``objects`` and ``segmap`` with the sources found in the halos of the saturated
    detections ``fits`` (row, wing fit) appended (segment numbers ``n + 1``, ...).

    ``detect`` extracts a box as the co-add was extracted; ``image``, ``rms`` and ``masked``
    are the prepared detection image, ``saturated`` its saturated pixels. ``segmap`` is
    relabelled in place and returned."""
    found = []
    for row, fit in fits:
        found.extend(_halo_of(image, rms, masked, saturated, objects, segmap, row, fit, detect,
                              rule))
    if not found:
        return objects, segmap
    flags = np.asarray(objects["flag"]).copy()
    added = []
    for number, (star, new, pixels) in enumerate(found, start=objects.size + 1):
        rows, cols = pixels
        segmap[rows, cols] = number
        flags[star] |= sep.OBJ_MERGED
        new["flag"] |= sep.OBJ_MERGED
        added.append(new)
    out = objects.copy()
    out["flag"] = flags
    return np.concatenate([out, np.array(added, dtype=objects.dtype)]), segmap


def _box(objects: np.ndarray, row: int, margin: int, shape: tuple[int, int]
         ) -> tuple[slice, slice]:
    """The footprint box of detection ``row`` grown by ``margin`` pixels, inside the image."""
    o = objects[row]
    return (slice(max(0, int(o["ymin"]) - margin), min(shape[0], int(o["ymax"]) + margin + 1)),
            slice(max(0, int(o["xmin"]) - margin), min(shape[1], int(o["xmax"]) + margin + 1)))


def _halo_of(image: np.ndarray, rms: np.ndarray, masked: np.ndarray, saturated: np.ndarray,
             objects: np.ndarray, segmap: np.ndarray, row: int, fit: WingFit, detect: Detect,
             rule: HaloSettings) -> list[tuple[int, np.void, tuple[np.ndarray, np.ndarray]]]:
    """(star row, new object in image coordinates, its pixels) of one star's halo."""
    box = _box(objects, row, math.ceil(_MARGIN_FWHM * rule.fwhm_px), image.shape)
    y0, x0 = box[0].start, box[1].start
    py, px = np.mgrid[box]
    model = fit.profile(px, py)
    cut = saturated[box]
    residual = np.where(cut, 0.0, image[box] - model).astype(np.float32)
    new, seg = detect(np.ascontiguousarray(residual), np.ascontiguousarray(rms[box]),
                      np.ascontiguousarray(masked[box] | cut))
    if new.size == 0:
        return []
    star = segmap[box] == row + 1
    noise = rms[box]
    earlier = np.c_[objects["x"], objects["y"]]
    out = []
    for k, o in enumerate(new):
        ix, iy = round(float(o["x"])), round(float(o["y"]))
        if not (0 <= iy < star.shape[0] and 0 <= ix < star.shape[1]) or not star[iy, ix]:
            continue
        x, y = float(o["x"]) + x0, float(o["y"]) + y0
        profile = float(model[iy, ix])
        if (math.hypot(x - fit.x, y - fit.y) <= rule.min_radius_fwhm * rule.fwhm_px
                or profile >= rule.max_profile_sigma * float(noise[iy, ix])
                or float(o["peak"]) <= rule.min_peak_ratio * profile):
            continue
        if np.min(np.hypot(earlier[:, 0] - x, earlier[:, 1] - y)) < _SAME_PX:
            continue
        rows, cols = np.nonzero((seg == k + 1) & star)
        placed = o.copy()
        for name in ("x", "xmin", "xmax", "xpeak", "xcpeak"):
            placed[name] += x0
        for name in ("y", "ymin", "ymax", "ypeak", "ycpeak"):
            placed[name] += y0
        out.append((row, placed, (rows + y0, cols + x0)))
    return out
