"""Static and electronic defects of one CCD, found from its pixels: DR1 mask bits 4 and 8.

* :func:`amplifier_defects` (bit 8): an amplifier segment whose level or noise disagrees with
  the other segments of the same CCD, such as a dead readout port (level ~ 0, noise ~ read noise,
  while the others show sky) or a noisy one.
* :func:`bad_columns` (bit 4): columns whose level deviates from their neighbours in the same
  amplifier over many rows (hot or dead columns, whole or starting part-way up the chip).
* :func:`read_bad_pixel_map`: an optional static bad-pixel map (one uint8 image per CCD) that is
  OR'd into bit 4.

Pure functions on in-memory arrays (ADU); the amplifier layout is a sequence of 0-based
half-open column ranges ``(x_start, x_stop)``, as in :class:`ks4release.exposure.CcdInfo`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from ks4release.errors import InputError

__all__ = [
    "AmplifierStats",
    "amplifier_defects",
    "amplifier_stats",
    "bad_columns",
    "check_bad_pixel_map",
    "read_bad_pixel_map",
]

_MAD_TO_SIGMA = 1.4826
#: Pixels sampled per amplifier for its level and noise (a regular grid).
_AMP_SAMPLE = 200_000

AmplifierStats = tuple[float, float]


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x MAD of the finite values (NaN, NaN when there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    median = float(np.median(values))
    return median, _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))


def amplifier_stats(image: np.ndarray, amplifiers: Sequence[tuple[int, int]]
                    ) -> list[AmplifierStats]:
    """Level (median) and pixel noise of each amplifier segment, in ADU.

    The noise is the robust sigma of differences between vertically adjacent pixels divided by
    sqrt(2): smooth light (stray light, gradients) does not count as noise. A regular subsample
    of about 200,000 pixel pairs per segment keeps this fast at full size.
    """
    out = []
    for x_start, x_stop in amplifiers:
        strip = image[:, x_start:x_stop]
        step = max(1, int(np.sqrt(strip.size / _AMP_SAMPLE)))
        lower = strip[0:-1:step, ::step]
        upper = strip[1::step, ::step][:lower.shape[0]]
        level, _ = _robust(lower.ravel())
        _, noise = _robust((upper - lower).ravel() / np.sqrt(2.0))
        out.append((level, noise))
    return out


def amplifier_defects(image: np.ndarray, amplifiers: Sequence[tuple[int, int]], *,
                      level_nsigma: float, noise_ratio: float) -> tuple[int, ...]:
    """Indices of amplifier segments inconsistent with the others of the CCD.

    The reference level and noise are the medians over all segments. A segment is defective
    when its level departs from the reference level by more than ``level_nsigma`` reference
    noises, or its noise is more than ``noise_ratio`` times larger or smaller than the reference
    noise (a dead port shows the read noise alone while the others carry sky noise), or it holds
    no finite pixel. Needs at least three segments to outvote one bad one.
    """
    if len(amplifiers) < 3:
        raise ValueError(f"amplifier_defects needs at least 3 amplifiers, got {len(amplifiers)}")
    stats = np.array(amplifier_stats(image, amplifiers))
    levels, noises = stats[:, 0], stats[:, 1]
    good = np.isfinite(levels)
    if not good.any():
        return tuple(range(len(amplifiers)))
    ref_level = float(np.median(levels[good]))
    ref_noise = max(float(np.median(noises[good])), np.finfo(np.float32).tiny)
    bad = []
    for i, (level, noise) in enumerate(stats):
        if not np.isfinite(level):
            bad.append(i)
            continue
        off_level = abs(level - ref_level) > level_nsigma * ref_noise
        off_noise = not (ref_noise / noise_ratio <= noise <= ref_noise * noise_ratio)
        if off_level or off_noise:
            bad.append(i)
    return tuple(bad)


def _block_medians(strip: np.ndarray, ignore: np.ndarray, block_rows: int, half_width: int
                   ) -> np.ndarray:
    """Median of each block of ``block_rows`` rows of every column; NaN where the block, or the
    same block of a column up to ``half_width`` away, holds an ignored pixel (the wings of a
    saturated star make neighbouring columns disagree). The rows left over at the top join the
    last block's verdict later on."""
    n_blocks = strip.shape[0] // block_rows
    rows = n_blocks * block_rows
    shape = (n_blocks, block_rows, strip.shape[1])
    medians = np.median(strip[:rows].reshape(shape), axis=1)
    touched = ignore[:rows].reshape(shape).any(axis=1)
    touched = ndimage.maximum_filter1d(touched, 2 * half_width + 1, axis=1, mode="nearest")
    medians[touched] = np.nan
    return medians


def _neighbour_median(values: np.ndarray, half_width: int) -> np.ndarray:
    """Per element of a (rows, columns) array, the median of the ``half_width`` columns on each
    side (the column itself excluded; NaN-padded beyond the strip edges)."""
    n_rows, n_cols = values.shape
    padded = np.full((n_rows, n_cols + 2 * half_width), np.nan, dtype=np.float64)
    padded[:, half_width:half_width + n_cols] = values
    shifts = [padded[:, half_width + d:half_width + d + n_cols]
              for d in range(-half_width, half_width + 1) if d != 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods stay NaN
        return np.nanmedian(np.stack(shifts), axis=0)


def _fill_unknown(bad: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``bad``, with each block without a verdict (``known`` False) set when the nearest blocks
    with a verdict on both sides are bad (joins a run across a saturated star)."""
    out = bad & known
    idx = np.flatnonzero(known)
    for i in np.flatnonzero(~known):
        below = idx[idx < i]
        above = idx[idx > i]
        out[i] = bool(below.size and above.size and bad[below[-1]] and bad[above[0]])
    return out


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _unknown_reach(known: np.ndarray, b0: int, b1: int) -> tuple[int, int]:
    """Blocks ``lo <= b0`` and ``hi >= b1`` such that the blocks from ``lo`` up to ``b0`` and
    from ``b1`` up to ``hi`` have no verdict: a defect may start or end anywhere in them."""
    lo, hi = b0, b1
    while lo > 0 and not known[lo - 1]:
        lo -= 1
    while hi < known.size and not known[hi]:
        hi += 1
    return lo, hi


def _change_point(resid: np.ndarray, weight: np.ndarray, level: float, rising: bool) -> int:
    """Index where ``resid`` steps between 0 and ``level`` (weighted least absolute deviations).

    ``rising``: the step goes from 0 to ``level`` along the array (start of a defect); else from
    ``level`` to 0 (its end). Returns the first index of the second part. Pixels of weight 0
    (saturated, ghosts) carry no information; among equally good steps, the one giving the
    longer defect wins.
    """
    before, after = (0.0, level) if rising else (level, 0.0)
    cost_before = np.concatenate([[0.0], np.cumsum(weight * np.abs(resid - before))])
    cost_after = np.concatenate([np.cumsum((weight * np.abs(resid - after))[::-1])[::-1], [0.0]])
    cost = cost_before + cost_after
    best = np.flatnonzero(cost <= cost.min())
    return int(best[0] if rising else best[-1])


def _column_segment(strip: np.ndarray, ignore: np.ndarray, x: int, half_width: int,
                    rows: tuple[int, int], level: float, rising: bool) -> int:
    """Refine one end of a bad-column run to the pixel row (within ``rows``)."""
    y0, y1 = rows
    lo, hi = max(0, x - half_width), min(strip.shape[1], x + half_width + 1)
    neighbours = np.delete(strip[y0:y1, lo:hi], x - lo, axis=1)
    resid = strip[y0:y1, x] - np.median(neighbours, axis=1)
    weight = (~ignore[y0:y1, lo:hi].any(axis=1)).astype(np.float64)
    return y0 + _change_point(resid, weight, level, rising)


def _defect_rows(strip: np.ndarray, ignore: np.ndarray, x: int, known: np.ndarray,
                 blocks: tuple[int, int], *, level: float, block_rows: int, half_width: int
                 ) -> tuple[int, int]:
    """Pixel rows ``(start, stop)`` of a defect confirmed in ``blocks`` of column ``x``: each
    end is fitted within the block before the first confirmed one, the first confirmed one,
    and any blocks without a verdict between them (likewise at the other end; the rows left
    over above the last block belong to it)."""
    b0, b1 = blocks
    n_blocks = known.size
    lo, hi = _unknown_reach(known, b0, b1)
    start = _column_segment(strip, ignore, x, half_width,
                            (max(0, (lo - 1) * block_rows), (b0 + 1) * block_rows), level,
                            rising=True)
    window_stop = strip.shape[0] if hi >= n_blocks - 1 else (hi + 1) * block_rows
    stop = _column_segment(strip, ignore, x, half_width, ((b1 - 1) * block_rows, window_stop),
                           level, rising=False)
    return start, stop


def bad_columns(image: np.ndarray, amplifiers: Sequence[tuple[int, int]], *,
                ignore: np.ndarray, skip_amplifiers: Sequence[int] = (), block_rows: int,
                half_width: int, nsigma: float, min_blocks: int, margin_px: int) -> np.ndarray:
    """Pixels of columns that deviate from their neighbours over many rows (hot or dead).

    Within each amplifier (never across the boundary of two), every column is cut into blocks
    of ``block_rows`` rows; a block is bad when its median departs from the median of the
    ``half_width`` neighbouring columns on each side by more than ``nsigma`` times the robust
    scatter of these departures over the amplifier. Blocks with ``ignore`` pixels (saturated
    stars, bleed trails) within ``half_width`` columns have no verdict of their own and join a
    run of bad blocks that surrounds them. A run of one sign holding at least ``min_blocks``
    bad blocks with a verdict of their own is a defect (a bright star spoils one or two blocks,
    not a run); its ends are refined to the pixel row by a step fit to the per-pixel
    departures, then grown by ``margin_px`` rows.

    Returns a boolean mask of the image's shape.
    """
    ny = image.shape[0]
    mask = np.zeros(image.shape, dtype=bool)
    if ny < block_rows * min_blocks:
        return mask
    for index, (x_start, x_stop) in enumerate(amplifiers):
        if index in skip_amplifiers or x_stop - x_start < 3:
            continue
        strip = image[:, x_start:x_stop]
        strip_ignore = ignore[:, x_start:x_stop]
        medians = _block_medians(strip, strip_ignore, block_rows, half_width)
        resid = medians - _neighbour_median(medians, half_width)
        known = np.isfinite(resid)
        if not known.any():
            continue
        _, scatter = _robust(resid[known])
        if not scatter > 0:
            continue
        for x in range(strip.shape[1]):
            for sign in (1.0, -1.0):
                bad = (sign * np.nan_to_num(resid[:, x]) > nsigma * scatter) & known[:, x]
                for b0, b1 in _runs(_fill_unknown(bad, known[:, x])):
                    confirmed = np.flatnonzero(bad[b0:b1]) + b0
                    if confirmed.size < min_blocks:
                        continue
                    rows = _defect_rows(strip, strip_ignore, x, known[:, x],
                                        (confirmed[0], confirmed[-1] + 1),
                                        level=float(np.median(resid[confirmed, x])),
                                        block_rows=block_rows, half_width=half_width)
                    mask[max(0, rows[0] - margin_px):min(ny, rows[1] + margin_px),
                         x_start + x] = True
    return mask


def _bad_pixel_hdu(hdul: fits.HDUList, path: Path, ccd_name: str,
                   shape: tuple[int, int]) -> fits.ImageHDU:
    """The ``ccd_name`` image of an open bad-pixel map, checked from its header."""
    if ccd_name not in hdul:
        raise InputError(path, f"extension {ccd_name!r} is missing (expected one uint8 image "
                         "per CCD)", hdu=ccd_name)
    hdu = hdul[ccd_name]
    got = tuple(hdu.header.get(f"NAXIS{i}", 0) for i in (2, 1)) if hdu.header.get("NAXIS") == 2 \
        else None
    if got != tuple(shape):
        what = "no 2-D image" if got is None else f"shape {got}"
        raise InputError(path, f"extension {ccd_name!r}: {what} (expected an image of shape "
                         f"{tuple(shape)})", hdu=ccd_name)
    return hdu


def _open_map(path: Path) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False, lazy_load_hdus=True)
    except FileNotFoundError:
        raise InputError(path, "bad-pixel map does not exist") from None
    except OSError as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from None


def check_bad_pixel_map(path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """Check from the headers that ``path`` holds an image of the given shape per CCD name.

    Raises
    ------
    ks4release.errors.InputError
        Naming the file and the extension at fault.
    """
    with _open_map(path) as hdul:
        for name, shape in shapes.items():
            _bad_pixel_hdu(hdul, path, name, shape)


def read_bad_pixel_map(path: Path, ccd_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Static bad-pixel map of one CCD: the ``ccd_name`` extension of ``path``, non-zero = bad.

    Raises
    ------
    ks4release.errors.InputError
        When the file cannot be read, lacks the extension, or its shape is not ``shape``.
    """
    with _open_map(path) as hdul:
        return np.asarray(_bad_pixel_hdu(hdul, path, ccd_name, shape).data) != 0
