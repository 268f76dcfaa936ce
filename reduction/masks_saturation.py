"""Saturated stars and what they cause: bleed trails (DR1 bit 2) and crosstalk ghosts (bit 1).

Bleed trails
    Charge above full well spills along the columns of a CCD, one way (the chip's bleed
    direction): the saturated core continues into a trail of pixels at saturation that ends in
    one partly filled pixel. :func:`bleed_mask` flags every pixel at or near ``SATURATE`` and
    grows each run along the bleed direction by a margin that covers the partly filled end.
    :func:`infer_bleed_direction` reads the direction from the data: beyond the trail's end the
    image drops to faint sky, beyond the other end of the run lies the bright wing of the star.
Crosstalk
    Each amplifier's signal leaks into the others while they read out in step, so a bright
    source read as the k-th pixel of a row by amplifier i leaves a faint ghost at the k-th
    readout position of the same row in amplifier j. Amplifiers read in mirrored directions
    (``reversed_amplifiers``: the ones whose readout starts at their highest column), so ghosts
    appear mirrored between neighbouring segments. The leak falls off with the distance between
    the amplifiers: ``coefficient * falloff ** (|i - j| - 1)`` of the source charge.
    :func:`crosstalk_mask` predicts the ghost of every pixel above a fraction of ``SATURATE``
    from this model and flags where the predicted ghost exceeds a level, grown by a margin.

Pure functions on in-memory arrays in ADU; gains in e-/ADU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["bleed_mask", "crosstalk_mask", "infer_bleed_direction", "saturated_pixels"]


def saturated_pixels(image: np.ndarray, saturation_adu: float, fraction: float) -> np.ndarray:
    """Pixels at or above ``fraction * saturation_adu`` (read noise scatters a clipped trail a
    little below ``SATURATE``)."""
    with np.errstate(invalid="ignore"):
        return image >= fraction * saturation_adu


def infer_bleed_direction(image: np.ndarray, saturated: np.ndarray, *, min_run: int = 5,
                          offset_px: int = 3) -> int:
    """Bleed direction along Y from the data: +1 (towards +Y), -1, or 0 (undecided).

    A column run of saturated pixels ends differently on its two sides: on the star's side the
    next pixels are the bright wing of the star, on the trail's side they drop to the faint
    level far from it. Each run of at least ``min_run`` saturated pixels compares the image
    ``offset_px`` pixels beyond each end and votes, weighted by its length, for the fainter side;
    the sign of the sum is the direction (0 without such runs or when the votes cancel).
    """
    ny = image.shape[0]
    vote = 0.0
    for x in np.flatnonzero(saturated.any(axis=0)):
        flags = saturated[:, x].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flags, [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            below, above = start - offset_px, stop - 1 + offset_px
            if stop - start < min_run or below < 0 or above >= ny:
                continue
            vote += (stop - start) * float(np.sign(image[below, x] - image[above, x]))
    return int(np.sign(vote))


def bleed_mask(saturated: np.ndarray, direction: int, margin_px: int) -> np.ndarray:
    """Saturated pixels and ``margin_px`` pixels beyond each saturated run along ``direction``
    (+1: towards +Y, -1: towards -Y, 0: both ways) in the same column.

    A pixel between two saturated pixels of its row is part of the trail too: a dead column
    crossing a trail keeps only a fraction of the charge that bled into it.
    """
    if direction not in (-1, 0, 1):
        raise ValueError(f"direction must be -1, 0 or +1, got {direction}")
    out = saturated.copy()
    out[:, 1:-1] |= saturated[:, :-2] & saturated[:, 2:]
    saturated = out.copy()
    ny = saturated.shape[0]
    for step in range(1, min(margin_px, ny - 1) + 1):
        if direction >= 0:
            out[step:] |= saturated[:-step]
        if direction <= 0:
            out[:-step] |= saturated[step:]
    return out


def _readout_view(array: np.ndarray, x_range: tuple[int, int], reversed_readout: bool,
                  width: int) -> np.ndarray:
    """The first ``width`` readout positions of an amplifier's strip (a view)."""
    x_start, x_stop = x_range
    strip = array[:, x_start:x_stop]
    if reversed_readout:
        strip = strip[:, ::-1]
    return strip[:, :width]


def crosstalk_mask(image: np.ndarray, amplifiers: Sequence[tuple[int, int]], *,
                   reversed_amplifiers: Sequence[bool], gain: float, source_level_adu: float,
                   coefficient: float, falloff: float, min_ghost_e: float, grow_px: int,
                   skip_amplifiers: Sequence[int] = ()) -> np.ndarray:
    """Predicted crosstalk victim pixels of one CCD (see the module docstring for the model).

    Parameters
    ----------
    image : ndarray
        The CCD in ADU.
    amplifiers : sequence of (x_start, x_stop)
        Column range of each amplifier (0-based, half-open).
    reversed_amplifiers : sequence of bool
        Per amplifier, True when its readout runs from its highest column down.
    gain : float
        e-/ADU.
    source_level_adu : float
        Pixels at or above this level are crosstalk sources.
    coefficient, falloff : float
        Ghost / source charge between neighbouring amplifiers, and the factor per further
        amplifier.
    min_ghost_e : float
        Predicted ghosts of at least this many electrons are flagged.
    grow_px : int
        Flagged footprints are dilated by this many pixels (source positions are uncertain by
        a pixel where they pass the level only through noise).
    skip_amplifiers : sequence of int
        Amplifiers that cannot be sources (dead ones, whose data carry no signal).
    """
    if len(reversed_amplifiers) != len(amplifiers):
        raise ValueError(f"reversed_amplifiers has {len(reversed_amplifiers)} entries for "
                         f"{len(amplifiers)} amplifiers")
    width = min(x_stop - x_start for x_start, x_stop in amplifiers)
    with np.errstate(invalid="ignore"):
        source = image >= source_level_adu
    victims = np.zeros(image.shape, dtype=bool)
    if not source.any():
        return victims
    predicted = [np.zeros((image.shape[0], width), dtype=np.float32) for _ in amplifiers]
    for i, (x_range, rev) in enumerate(zip(amplifiers, reversed_amplifiers)):
        if i in skip_amplifiers:
            continue
        hit = _readout_view(source, x_range, rev, width)
        rows = np.flatnonzero(hit.any(axis=1))
        if rows.size == 0:
            continue
        charge = np.where(hit[rows], _readout_view(image, x_range, rev, width)[rows] * gain, 0.0)
        for j, target in enumerate(predicted):
            if j != i:
                target[rows] += coefficient * falloff ** (abs(i - j) - 1) * charge
    for x_range, rev, ghost in zip(amplifiers, reversed_amplifiers, predicted):
        _readout_view(victims, x_range, rev, width)[:] = ghost >= min_ghost_e
    if grow_px > 0 and victims.any():
        victims = ndimage.binary_dilation(victims, np.ones((3, 3), dtype=bool),
                                          iterations=grow_px)
    return victims
