"""SExtractor's ``BACKPHOTO_TYPE LOCAL``: each object's background measured around it.

``kmtnet.sex``, the KS4 team's SExtractor configuration, measures with ``BACKPHOTO_TYPE LOCAL``
and ``BACKPHOTO_THICK 24``: on top of the background mesh, every object gets a level ``dbkg``
measured close to it, and its fluxes lose ``dbkg`` times their aperture's area. The mesh (256
px in DR1) cannot follow what changes on smaller scales: the wings of a bright star or a large
galaxy under a faint neighbour, scattered light. SExtractor (``src/back.c`` ``localback``,
``src/photom.c``) does it so, and :func:`local_levels` the same:

* The pixels: a rectangular annulus around the object's isophotal box (``xmin..xmax``,
  ``ymin..ymax``), the box first grown by a quarter of its width and height on each side (half
  the image's size less the box when the box is larger than half the image), the annulus
  ``BACKPHOTO_THICK`` pixels wide beyond that. Their background-subtracted values; bad pixels
  are left out, other objects' pixels are kept (the estimator resists them).
* The level: the mesh's estimator (:func:`clipped_mode`): ``backstat``'s mean and sigma after
  one 2-sigma clip, the values within 5 sigma of that mean (the histogram's range), then
  clipped at 3 sigma about their median until sigma settles; the mode ``2.5 median - 1.5 mean``
  when ``|mean - median| < 0.3 sigma``, else the median (SExtractor 2.25).

Where SExtractor cannot read the whole annulus (it runs over the image's edge, or the scanline
buffer) it falls back to the global background (``dbkg = 0``); here the annulus is clipped to
the image and measured on what is left when it still holds ``min_pixels`` good pixels. Which
fluxes take the level, and FLUX_RADIUS, which keeps the mesh, are the photometry's business
(:mod:`.photometry`, ``[photometry] backphoto_type``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MIN_ANNULUS_PIXELS", "annulus_values", "clipped_mode", "local_levels"]

#: backstat's clip of the mean and sigma, the histogram's half range, and backguess's clip,
#: in sigma (SExtractor's back.c and back.h: QUANTIF_NSIGMA 5).
_STAT_CLIP, _HISTO_SIGMA, _GUESS_CLIP = 2.0, 5.0, 3.0
#: backguess stops after this many clips or once sigma changes by less than this fraction.
_MAX_CLIPS, _SIGMA_EPS = 100, 1e-4
#: The mode formula holds while the mean and the median differ by less than this many sigma.
_MODE_SKEW = 0.3
#: Fewest good annulus pixels for a local level (a 24-px annulus around a 9-px object holds
#: about 2,800).
MIN_ANNULUS_PIXELS = 64


def _window(values: np.ndarray, cumsum: np.ndarray, cumsq: np.ndarray, lo: float, hi: float
            ) -> tuple[int, int, float, float]:
    """Index range [i, j) of the sorted ``values`` within [lo, hi], their mean and sigma."""
    i = int(np.searchsorted(values, lo, side="left"))
    j = int(np.searchsorted(values, hi, side="right"))
    n = j - i
    if n <= 0:
        return i, j, math.nan, math.nan
    total = cumsum[j] - cumsum[i]
    mean = total / n
    variance = (cumsq[j] - cumsq[i]) / n - mean * mean
    return i, j, mean, math.sqrt(max(variance, 0.0))


def clipped_mode(values: np.ndarray) -> float:
    """SExtractor's background estimate of a set of pixel values (module docstring); NaN for
    no values. The values are sorted once and every clip is a window of them."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if not v.size:
        return math.nan
    centre = float(v[v.size // 2])
    v = v - centre  # sums of squares about the bulk of the values keep their precision
    cumsum = np.concatenate([[0.0], np.cumsum(v)])
    cumsq = np.concatenate([[0.0], np.cumsum(v * v)])
    _, _, mean, sigma = _window(v, cumsum, cumsq, -math.inf, math.inf)
    _, _, mean, sigma = _window(v, cumsum, cumsq, mean - _STAT_CLIP * sigma,
                                mean + _STAT_CLIP * sigma)
    lo, hi = mean - _HISTO_SIGMA * sigma, mean + _HISTO_SIGMA * sigma
    median = mean
    previous = math.inf
    for _ in range(_MAX_CLIPS):
        i, j, mean, sigma = _window(v, cumsum, cumsq, lo, hi)
        if j <= i:
            break
        median = float(0.5 * (v[i + (j - i - 1) // 2] + v[i + (j - i) // 2]))
        if sigma <= 0 or abs(sigma / previous - 1.0) <= _SIGMA_EPS:
            break
        previous = sigma
        lo, hi = median - _GUESS_CLIP * sigma, median + _GUESS_CLIP * sigma
    if not np.isfinite(mean):
        return centre
    if sigma > 0 and abs(mean - median) / sigma < _MODE_SKEW:
        return centre + 2.5 * median - 1.5 * mean
    return centre + (median if sigma > 0 else mean)


def annulus_values(image: np.ndarray, bad: np.ndarray, box: tuple[int, int, int, int],
                   thick: int) -> np.ndarray:
    """The good pixel values of the rectangular annulus around one object's isophotal box
    (``xmin, xmax, ymin, ymax``, inclusive, 0-based), clipped to the image."""
    ny, nx = image.shape
    xmin, xmax, ymin, ymax = box
    width, height = xmax - xmin + 1, ymax - ymin + 1
    grow_x = width // 4 if width < nx / 2 else (nx - width) // 4
    grow_y = height // 4 if height < ny / 2 else (ny - height) // 4
    ix0, ix1 = xmin - grow_x, xmax + 1 + grow_x  # the inner rectangle, end-exclusive
    iy0, iy1 = ymin - grow_y, ymax + 1 + grow_y
    ox0, ox1 = max(ix0 - thick, 0), min(ix1 + thick, nx)
    oy0, oy1 = max(iy0 - thick, 0), min(iy1 + thick, ny)
    cx0, cx1 = min(max(ix0, ox0), ox1), max(min(ix1, ox1), ox0)  # inner, clipped to the outer
    cy0, cy1 = min(max(iy0, oy0), oy1), max(min(iy1, oy1), oy0)
    pieces = [(slice(oy0, cy0), slice(ox0, ox1)), (slice(cy1, oy1), slice(ox0, ox1)),
              (slice(cy0, cy1), slice(ox0, cx0)), (slice(cy0, cy1), slice(cx1, ox1))]
    return np.concatenate([image[rows, cols][~bad[rows, cols]] for rows, cols in pieces])


def local_levels(image: np.ndarray, bad: np.ndarray, boxes: np.ndarray, thick: int, *,
                 min_pixels: int = MIN_ANNULUS_PIXELS) -> np.ndarray:
    """``dbkg`` of every object: the clipped mode of its annulus (:func:`annulus_values`) in
    the background-subtracted ``image``, 0 where fewer than ``min_pixels`` good pixels are
    left (the mesh stands).

    ``boxes``: (n, 4) integer rows of ``xmin, xmax, ymin, ymax``, sep's isophotal limits.
    """
    levels = np.zeros(len(boxes), dtype=np.float64)
    for k, box in enumerate(np.asarray(boxes, dtype=np.int64)):
        values = annulus_values(image, bad, tuple(int(v) for v in box), thick)
        if values.size >= min_pixels:
            levels[k] = clipped_mode(values)
    return levels
