"""Helpers on sep's object arrays shared by the single-epoch and the co-add detection.

sep returns detections as a structured array (``x``, ``y``, ``a``, ``b``, ``theta``, ``peak``,
``flag``, ...) and, on request, a segmentation map; these small functions turn them into what
sep's aperture sums accept and into per-object values over the footprints.
"""

from __future__ import annotations

import math

import numpy as np
import sep

__all__ = ["CONV_KERNEL", "KMTNET_PIXEL_STACK", "ellipse", "footprint_max",
           "psf_half_light_radius", "set_extraction_limits"]

#: SExtractor's default.conv: 3 x 3 pyramidal kernel ("all-ground").
CONV_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)

#: MEMORY_PIXSTACK of the KS4 team's kmtnet.sex.
KMTNET_PIXEL_STACK = 3_000_000


def set_extraction_limits(n_pixels: int, pixel_stack: int = KMTNET_PIXEL_STACK) -> None:
    """sep's extraction limits before ``sep.extract`` on an image of ``n_pixels``: the pixel stack
    of kmtnet.sex (never more than the image; sep allocates it up front) and 4096 sub-objects.

    sep's default stack, 300,000 pixels, stops the extraction ("internal pixel buffer full")
    when one object covers more: a halo of 250 px sigma on a 1200^2 image does, which a bright
    star or galaxy on a full-size 9232^2 CCD can.
    """
    sep.set_extract_pixstack(max(1, min(int(pixel_stack), int(n_pixels))))
    sep.set_sub_object_limit(4096)


def footprint_max(segmap: np.ndarray, values: np.ndarray, n: int, *, bitwise: bool
                  ) -> np.ndarray:
    """Per-object maximum (or bitwise OR) of ``values`` over each segmentation footprint."""
    seg = segmap.ravel()
    inside = seg > 0
    ids = seg[inside] - 1
    out = np.zeros(n, dtype=values.dtype)
    if bitwise:
        np.bitwise_or.at(out, ids, values.ravel()[inside])
    else:
        out[:] = -np.inf
        np.maximum.at(out, ids, values.ravel()[inside])
    return out


def ellipse(objects: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape parameters sep's elliptical apertures accept: finite, 0.1 <= b <= a, |theta| <=
    pi/2 (a degenerate single-pixel-wide object has a = 0 or NaN moments)."""
    a = np.asarray(objects["a"], float)
    b = np.asarray(objects["b"], float)
    a = np.where(np.isfinite(a), np.maximum(a, 0.1), 0.1)
    b = np.where(np.isfinite(b), np.clip(b, 0.1, a), 0.1)
    theta = np.asarray(objects["theta"], float)
    theta = np.where(np.isfinite(theta), np.clip(theta, -math.pi / 2, math.pi / 2), 0.0)
    return a, b, theta


def psf_half_light_radius(objects: np.ndarray, r_half: np.ndarray, rms: np.ndarray) -> float:
    """Median half-light radius of bright, single, compact sources: the PSF's.

    Stars outnumber galaxies among bright compact sources; the median of those with a peak
    above 20 sigma and no deblending is robust to the galaxies and blends among them.
    """
    iy = np.clip(np.rint(objects["y"]).astype(int), 0, rms.shape[0] - 1)
    ix = np.clip(np.rint(objects["x"]).astype(int), 0, rms.shape[1] - 1)
    bright = (objects["peak"] > 20.0 * rms[iy, ix]) & ((objects["flag"] & sep.OBJ_MERGED) == 0)
    if bright.sum() < 3:
        return float("inf")
    return float(np.median(r_half[bright]))
