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
    :meth:`CrosstalkModel.ghosts` predicts the ghost of every pixel above a fraction of
    ``SATURATE`` from this model (the scale stage subtracts it); :func:`crosstalk_victims`
    flags where the predicted ghost exceeds a level, grown by a margin.

Pure functions on in-memory arrays in ADU; gains in e-/ADU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "CrosstalkModel",
    "bleed_mask",
    "crosstalk_victims",
    "infer_bleed_direction",
    "saturated_pixels",
]


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


@dataclass(frozen=True, kw_only=True)
class CrosstalkModel:
    """The crosstalk of one CCD (see the module docstring).

    Every pixel at or above ``source_level_adu`` in amplifier i leaves ``coefficient *
    falloff ** (|i - j| - 1)`` of its value at the same readout position of the same row in
    every other amplifier j; ``reversed_amplifiers`` says, per amplifier, whether its readout
    runs from its highest column down; ``skip_amplifiers`` cannot be sources (dead ones, whose
    data carry no signal).
    """

    reversed_amplifiers: tuple[bool, ...]
    source_level_adu: float
    coefficient: float
    falloff: float
    skip_amplifiers: tuple[int, ...] = ()

    def ghosts(self, image: np.ndarray, amplifiers: Sequence[tuple[int, int]]) -> np.ndarray:
        """Predicted ghost image of a CCD (``amplifiers``: column range of each, 0-based,
        half-open), in the image's units (float32).

        The ghost of a clipped pixel is that of the clipped value: charge beyond full well bled
        along the column, where it is a source of its own. Subtracting the result corrects the
        ghosts to within the model's accuracy (the noise of the sources, times the
        coefficient).
        """
        if len(self.reversed_amplifiers) != len(amplifiers):
            raise ValueError(f"reversed_amplifiers has {len(self.reversed_amplifiers)} entries "
                             f"for {len(amplifiers)} amplifiers")
        width = min(x_stop - x_start for x_start, x_stop in amplifiers)
        ghosts = np.zeros(image.shape, dtype=np.float32)
        with np.errstate(invalid="ignore"):
            source = image >= self.source_level_adu
        if not source.any():
            return ghosts
        readouts = list(zip(amplifiers, self.reversed_amplifiers))
        for i, (x_range, rev) in enumerate(readouts):
            if i in self.skip_amplifiers:
                continue
            hit = _readout_view(source, x_range, rev, width)
            rows = np.flatnonzero(hit.any(axis=1))
            if rows.size == 0:
                continue
            signal = np.where(hit[rows], _readout_view(image, x_range, rev, width)[rows], 0.0)
            for j, (target_range, target_rev) in enumerate(readouts):
                if j != i:
                    target = _readout_view(ghosts, target_range, target_rev, width)
                    target[rows] += self.coefficient * self.falloff ** (abs(i - j) - 1) * signal
        return ghosts


def crosstalk_victims(ghosts: np.ndarray, *, gain: float, min_ghost_e: float,
                      grow_px: int) -> np.ndarray:
    """Crosstalk victim pixels: where the predicted ``ghosts`` (ADU, from
    :meth:`CrosstalkModel.ghosts`) reach ``min_ghost_e`` electrons (``gain`` in e-/ADU),
    dilated by ``grow_px`` pixels (source positions are uncertain by a pixel where they pass
    the level only through noise)."""
    victims = ghosts * np.float32(gain) >= min_ghost_e
    if grow_px > 0 and victims.any():
        victims = ndimage.binary_dilation(victims, np.ones((3, 3), dtype=bool),
                                          iterations=grow_px)
    return victims
