"""The bit layout of the injected-artifact masks written to ``truth/masks/<stem>_mask.fits``.

One registry (style: legacypipe ``bits.py``, photutils ``utils/_flags.py``) from which the
module docstring, the FITS header description and the tests are driven. The low four bits are
DR1's bad-pixel bits; the high four record what DR1 does not mask but a pipeline should know:

====  ==================  ===========================================================
bit   name                meaning
====  ==================  ===========================================================
1     COSMIC_OR_XTALK     DR1 bit 1: a cosmic-ray hit or a crosstalk ghost
2     BLEED               DR1 bit 2: bleed trail (charge spilled along the column)
4     BAD_COLUMN          DR1 bit 4: static CCD defect (hot or dead column)
8     DEAD_AMP            DR1 bit 8: faulty readout port (dead amplifier)
16    SATELLITE           satellite trail (not a DR1 mask bit)
32    STRAY_LIGHT         stray-light ghost ring (not a DR1 mask bit)
64    SATURATED           saturated star core (pixel clipped at SATURATE)
128   CROSSTALK           crosstalk ghost, so it can be told apart from cosmic rays
====  ==================  ===========================================================

A cosmic ray is therefore ``bit 1 and not bit 128``; a crosstalk ghost sets ``1 | 128``.
"""

from __future__ import annotations

from enum import IntFlag

__all__ = ["MaskBit", "DR1_BITS", "mask_bit_descriptions"]


class MaskBit(IntFlag):
    """Bits of the truth masks (see the module docstring for the layout)."""

    COSMIC_OR_XTALK = 1
    BLEED = 2
    BAD_COLUMN = 4
    DEAD_AMP = 8
    SATELLITE = 16
    STRAY_LIGHT = 32
    SATURATED = 64
    CROSSTALK = 128


#: The bits that DR1's own bad-pixel masks carry.
DR1_BITS = MaskBit.COSMIC_OR_XTALK | MaskBit.BLEED | MaskBit.BAD_COLUMN | MaskBit.DEAD_AMP

_DESCRIPTIONS = {
    MaskBit.COSMIC_OR_XTALK: "cosmic ray or crosstalk ghost (DR1 bit 1)",
    MaskBit.BLEED: "bleed trail (DR1 bit 2)",
    MaskBit.BAD_COLUMN: "static CCD defect, bad column (DR1 bit 4)",
    MaskBit.DEAD_AMP: "amplifier defect, dead readout port (DR1 bit 8)",
    MaskBit.SATELLITE: "satellite trail (truth only)",
    MaskBit.STRAY_LIGHT: "stray-light ghost (truth only)",
    MaskBit.SATURATED: "saturated core, clipped (truth only)",
    MaskBit.CROSSTALK: "crosstalk ghost alone (truth only)",
}


def mask_bit_descriptions() -> dict[int, str]:
    """Value -> description of every mask bit, in bit order (for headers and docs)."""
    return {int(bit): _DESCRIPTIONS[bit] for bit in MaskBit}
