"""Masks: DR1's bad-pixel bits for every CCD of every exposure.

One registry of the bits (:class:`MaskBits`), from which the FITS header descriptions are made:

====  ======================  ====================================================================
bit   name                    meaning
====  ======================  ====================================================================
1     COSMIC_RAY_OR_XTALK     cosmic ray (L.A.Cosmic via astroscrappy) or predicted crosstalk ghost
2     BLEED                   saturated pixel or bleed trail along the chip's bleed direction
4     CCD_DEFECT              static CCD defect: bad column found from the data, bad-pixel map
                              pixel, or a non-finite value
8     AMPLIFIER_DEFECT        whole segment of a dead or faulty amplifier (readout port)
16    XTALK_CORRECTED         internal, not DR1's: bit 1 here is only a crosstalk ghost, which the
                              scale stage subtracts, so the co-add uses the pixel
====  ======================  ====================================================================

Crosstalk is corrected as well as masked (``crosstalk_correct``, on by default; DR1 only masked
it): the ghosts are predicted from the bright pixels with a known model (coefficients per
amplifier distance), so they can be subtracted to within the coefficient times the noise. Each
CCD's header records the model (``XTCORR``, ``XTLEVEL``, ``XTCOEF``, ``XTFALL``, ``XTREV``,
with ``DEADAMPS``) and :func:`read_crosstalk_model` gives it to the scale stage, which subtracts
exactly the ghosts this stage predicted. On the demo, the co-adds then have data on the strips
that were masked in every exposure (29 more true R sources of S/N >= 10 have data) and the
single-band R completeness at S/N >= 10 rose from 0.945 (809 of 856) to 0.951 (842 of 885).

How each bit is found (the functions live in :mod:`ks4release.reduction.masks_defects` and
:mod:`ks4release.reduction.masks_saturation`):

1. amplifier segments whose level or noise disagrees with the other segments -> bit 8;
2. pixels at or near ``SATURATE``, grown along the bleed direction -> bit 2;
3. crosstalk victims predicted from the bright pixels of the other amplifiers -> bit 1;
4. bad columns (deviating from their neighbours over many rows, judged away from the pixels of
   steps 2-3: the ghost of a bleed trail looks like a hot column) and the optional static
   bad-pixel map -> bit 4;
5. cosmic rays by astroscrappy, ignoring the pixels of steps 1-3, -> bit 1.

Satellite trails and stray light are not DR1 mask bits and stay unflagged (the median co-add
removes them).

Output (:func:`run_masks`): ``<release>/work/masks/<stem>_mask.fits`` (see
:func:`ks4release.layout.mask_path`): an empty primary HDU with the exposure's ``TILE``,
``FILTER``, ``EXPOSURE`` (file stem) and the bit descriptions, then one uint8 image per CCD
(``EXTNAME`` KK, MM, NN, TT), pixel-aligned with the exposure's CCD, with the bit descriptions,
``BUNIT``, the amplifiers flagged dead (``DEADAMPS``), the bleed direction used (``BLEEDDIR``) and
the number of pixels carrying each bit (``NPIXn``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path

import astroscrappy
import numpy as np
from astropy.io import fits

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.errors import InputError
from ks4release.exposure import CcdInfo, read_ccd, read_exposure_header
from ks4release.reduction.masks_defects import (
    amplifier_defects,
    bad_columns,
    check_bad_pixel_map,
    read_bad_pixel_map,
)
from ks4release.reduction.masks_saturation import (
    CrosstalkModel,
    bleed_mask,
    crosstalk_victims,
    infer_bleed_direction,
    saturated_pixels,
)
from ks4release.settings import MaskSettings

__all__ = [
    "XTALK_CORRECTED",
    "CcdMaskResult",
    "MaskBits",
    "MaskSettings",
    "ccd_mask",
    "cosmic_ray_mask",
    "crosstalk_model",
    "mask_bit_cards",
    "mask_hdulist",
    "read_crosstalk_model",
    "run_masks",
    "unusable_pixels",
]

logger = logging.getLogger(__name__)


class MaskBits(IntFlag):
    """DR1's bad-pixel bits (the module docstring explains how each is found)."""

    COSMIC_RAY_OR_XTALK = 1
    BLEED = 2
    CCD_DEFECT = 4
    AMPLIFIER_DEFECT = 8


_DESCRIPTIONS = {
    MaskBits.COSMIC_RAY_OR_XTALK: "cosmic ray or crosstalk ghost",
    MaskBits.BLEED: "saturated pixel or bleed trail",
    MaskBits.CCD_DEFECT: "static CCD defect (bad column, bad-pixel map)",
    MaskBits.AMPLIFIER_DEFECT: "amplifier defect (dead or faulty readout port)",
}


#: Internal bit, not one of DR1's: the pixel's bit 1 is only a predicted crosstalk ghost (no
#: cosmic ray), which the scale stage subtracts, so the co-add may use the pixel. Set when
#: ``crosstalk_correct`` is on; co-add masks carry DR1's bits only.
XTALK_CORRECTED = 16


def unusable_pixels(mask: np.ndarray, ignore_bits: int) -> np.ndarray:
    """Pixels whose values must not be used: any of ``ignore_bits`` is set, bit 1 not counting
    where it marks a crosstalk ghost that the scale stage subtracted (:data:`XTALK_CORRECTED`)."""
    bits = mask & np.uint8(ignore_bits)
    corrected = (mask & np.uint8(XTALK_CORRECTED)) != 0
    bits[corrected] &= np.uint8(~int(MaskBits.COSMIC_RAY_OR_XTALK) & 0xFF)
    return bits != 0


def mask_bit_cards() -> list[tuple[str, str, str]]:
    """Header cards ``(MASKn, NAME, description)`` describing every bit, in bit order."""
    return [(f"MASK{int(bit)}", bit.name, _DESCRIPTIONS[bit]) for bit in MaskBits]



@dataclass(frozen=True, kw_only=True)
class CcdMaskResult:
    """The mask of one CCD and what was decided on the way."""

    mask: np.ndarray
    dead_amplifiers: tuple[int, ...]
    bleed_direction: int
    crosstalk: CrosstalkModel | None = None  # the model whose ghosts the scale subtracts


def cosmic_ray_mask(image: np.ndarray, ignore: np.ndarray, *, gain: float, read_noise: float,
                    saturation_adu: float, settings: MaskSettings) -> np.ndarray:
    """Cosmic-ray pixels by L.A.Cosmic (astroscrappy), never among the ``ignore`` pixels.

    The chip goes to astroscrappy in blocks of ``settings.cr_block_rows`` rows that overlap by
    ``cr_block_overlap`` rows; each block keeps the verdict on its own rows, away from the cut.
    At the chip's edges the block is mirrored outwards by ``cr_edge_pad_px`` pixels: a star cut
    by the edge looks sharp to the Laplacian and would otherwise be taken for a cosmic ray.
    """
    ny = image.shape[0]
    block = settings.cr_block_rows or ny
    overlap = settings.cr_block_overlap if block < ny else 0
    out = np.zeros(image.shape, dtype=bool)
    for y0 in range(0, ny, block):
        y1 = min(ny, y0 + block)
        lo, hi = max(0, y0 - overlap), min(ny, y1 + overlap)
        pad = _edge_padding(image.shape, (lo, hi), settings.cr_edge_pad_px)
        crmask, _ = astroscrappy.detect_cosmics(
            np.pad(image[lo:hi], pad, mode="reflect").astype(np.float32),
            inmask=np.pad(ignore[lo:hi], pad, mode="reflect"),
            sigclip=settings.cr_sigclip, sigfrac=settings.cr_sigfrac, objlim=settings.cr_objlim,
            gain=gain, readnoise=read_noise,
            satlevel=settings.saturation_fraction * saturation_adu * gain,
            niter=settings.cr_niter)
        top, left = pad[0][0], pad[1][0]
        out[y0:y1] = crmask[top + y0 - lo:top + y1 - lo, left:left + image.shape[1]]
    return out & ~ignore


def _edge_padding(shape: tuple[int, int], rows: tuple[int, int], pad_px: int
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """np.pad widths mirroring a block of ``rows`` outwards where it touches the chip's edge."""
    ny, nx = shape
    lo, hi = rows
    px = min(pad_px, nx - 1)
    return ((min(pad_px, hi - lo - 1) if lo == 0 else 0,
             min(pad_px, hi - lo - 1) if hi == ny else 0), (px, px))


def _bleed_direction(image: np.ndarray, saturated: np.ndarray, configured: int) -> int:
    """The configured direction, or the one read from the data when configured as 0."""
    if configured:
        return configured
    return infer_bleed_direction(image, saturated)


def _defects_beside(defects: np.ndarray, saturated: np.ndarray) -> np.ndarray:
    """Defect pixels next to a saturated pixel of their row: a bleed trail runs through a dead
    column unseen, so they carry the bleed bit too."""
    beside = np.zeros_like(saturated)
    beside[:, 1:] |= saturated[:, :-1]
    beside[:, :-1] |= saturated[:, 1:]
    return defects & beside


def ccd_mask(image: np.ndarray, ccd: CcdInfo, settings: MaskSettings,
             bad_pixel_map: np.ndarray | None = None) -> CcdMaskResult:
    """DR1 bad-pixel bits of one CCD (ADU image, its header summary ``ccd``).

    ``bad_pixel_map`` (boolean, the image's shape) adds static defects to bit 4.
    """
    if len(settings.amp_reversed_readout) != len(ccd.amplifiers):
        raise ValueError(f"amp_reversed_readout has {len(settings.amp_reversed_readout)} "
                         f"entries, CCD {ccd.name} has {len(ccd.amplifiers)} amplifiers")
    finite = np.isfinite(image)
    work = image.astype(np.float32, copy=False)
    if not finite.all():  # non-finite pixels are defects; the algorithms see the median there
        work = np.where(finite, work, np.nanmedian(work) if finite.any() else 0.0
                        ).astype(np.float32)
    mask = np.zeros(image.shape, dtype=np.uint8)
    dead = amplifier_defects(work, ccd.amplifiers, level_nsigma=settings.amp_level_nsigma,
                             noise_ratio=settings.amp_noise_ratio)
    dead_pixels = np.zeros(image.shape, dtype=bool)
    for index in dead:
        dead_pixels[:, slice(*ccd.amplifiers[index])] = True
    saturated = saturated_pixels(work, ccd.saturation, settings.saturation_fraction) & ~dead_pixels
    direction = _bleed_direction(work, saturated, settings.bleed_direction(ccd.name))
    bleed = bleed_mask(saturated, direction, settings.bleed_margin_px)
    crosstalk = crosstalk_model(settings, ccd, dead)
    xtalk = crosstalk_victims(crosstalk.ghosts(work, ccd.amplifiers), gain=ccd.gain,
                              min_ghost_e=settings.crosstalk_min_e,
                              grow_px=settings.crosstalk_grow_px)
    defects = ~finite | bad_columns(
        work, ccd.amplifiers, ignore=bleed | xtalk, skip_amplifiers=dead,
        block_rows=settings.bad_column_block_rows, half_width=settings.bad_column_half_width,
        nsigma=settings.bad_column_nsigma, min_blocks=settings.bad_column_min_blocks,
        margin_px=settings.bad_column_margin_px)
    if bad_pixel_map is not None:
        defects |= bad_pixel_map
    cosmic = cosmic_ray_mask(work, dead_pixels | bleed | defects, gain=ccd.gain,
                             read_noise=ccd.read_noise, saturation_adu=ccd.saturation,
                             settings=settings)
    bleed |= _defects_beside(defects, saturated)
    mask[dead_pixels] |= np.uint8(MaskBits.AMPLIFIER_DEFECT)
    mask[defects] |= np.uint8(MaskBits.CCD_DEFECT)
    mask[bleed] |= np.uint8(MaskBits.BLEED)
    mask[(xtalk & ~dead_pixels) | cosmic] |= np.uint8(MaskBits.COSMIC_RAY_OR_XTALK)
    if settings.crosstalk_correct:
        mask[xtalk & ~dead_pixels & ~cosmic] |= np.uint8(XTALK_CORRECTED)
    return CcdMaskResult(mask=mask, dead_amplifiers=dead, bleed_direction=direction,
                         crosstalk=crosstalk if settings.crosstalk_correct else None)


def crosstalk_model(settings: MaskSettings, ccd: CcdInfo, dead: tuple[int, ...]
                    ) -> CrosstalkModel:
    """The crosstalk model of one CCD from the settings, its SATURATE and its dead amplifiers
    (no sources)."""
    return CrosstalkModel(
        reversed_amplifiers=tuple(settings.amp_reversed_readout),
        source_level_adu=settings.crosstalk_source_fraction * ccd.saturation,
        coefficient=settings.crosstalk_coefficient, falloff=settings.crosstalk_falloff,
        skip_amplifiers=dead)


def _crosstalk_cards(model: CrosstalkModel | None) -> list[tuple[str, object, str]]:
    """Header cards of a CCD's mask recording the crosstalk model the scale stage subtracts
    (``XTCORR`` F alone when it subtracts none)."""
    if model is None:
        return [("XTCORR", False, "crosstalk ghosts are only masked (bit 1)")]
    return [("XTCORR", True, "the scale stage subtracts the crosstalk ghosts"),
            ("XTLEVEL", model.source_level_adu, "[adu] crosstalk source level"),
            ("XTCOEF", model.coefficient, "crosstalk ghost / source, neighbour amplifiers"),
            ("XTFALL", model.falloff, "crosstalk factor per further amplifier"),
            ("XTREV", "".join("T" if r else "F" for r in model.reversed_amplifiers),
             "per amplifier: readout from its highest column"),
            (f"MASK{XTALK_CORRECTED}", "XTALK_CORRECTED",
             "bit 1 only a crosstalk ghost, subtracted")]


def read_crosstalk_model(path: Path | str, ccd: str) -> CrosstalkModel | None:
    """The crosstalk model recorded in one CCD's mask header (:func:`mask_hdulist`); None when
    the mask says the ghosts are only masked. Dead amplifiers (``DEADAMPS``) are no sources.

    Raises
    ------
    InputError
        Naming the file, the CCD and the keyword when the record cannot be read.
    """
    try:
        header = fits.getheader(path, ccd)
    except (OSError, KeyError) as exc:
        raise InputError(path, f"extension {ccd!r} cannot be read ({exc})", hdu=ccd) from None
    if header.get("XTCORR") is not True:
        return None
    try:
        reversed_amplifiers = tuple({"T": True, "F": False}[c] for c in str(header["XTREV"]))
        dead = str(header.get("DEADAMPS", "")).strip()
        return CrosstalkModel(
            reversed_amplifiers=reversed_amplifiers,
            source_level_adu=float(header["XTLEVEL"]), coefficient=float(header["XTCOEF"]),
            falloff=float(header["XTFALL"]),
            skip_amplifiers=tuple(int(i) - 1 for i in dead.split(",")) if dead else ())
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"extension {ccd!r}: crosstalk record (XTLEVEL, XTCOEF, XTFALL, "
                         f"XTREV, DEADAMPS) is incomplete or malformed ({exc})", hdu=ccd
                         ) from None


def _add_bit_cards(header: fits.Header) -> None:
    for key, name, text in mask_bit_cards():
        header[key] = (name, text)


def mask_hdulist(primary: dict[str, str], results: dict[str, CcdMaskResult],
                 settings: MaskSettings) -> fits.HDUList:
    """The mask file of one exposure: empty primary HDU with ``primary`` cards (TILE, FILTER,
    EXPOSURE) and the bit descriptions, then one uint8 image per CCD in ``results``."""
    head = fits.Header()
    for key, value in primary.items():
        head[key] = value
    _add_bit_cards(head)
    head["MASKSOFT"] = (f"ks4release {__version__}", "software that made the mask")
    head["CRSOFT"] = (f"astroscrappy {astroscrappy.__version__}", "cosmic-ray detection")
    head["CRSIGCLP"] = (settings.cr_sigclip, "astroscrappy sigclip")
    head["CRSIGFRC"] = (settings.cr_sigfrac, "astroscrappy sigfrac")
    head["CROBJLIM"] = (settings.cr_objlim, "astroscrappy objlim")
    hdus = [fits.PrimaryHDU(header=head)]
    for name, result in results.items():
        hdr = fits.Header()
        hdr["EXTNAME"] = (name, "CCD name")
        hdr["BUNIT"] = ("bitmask", "OR of the MASKn bits")
        _add_bit_cards(hdr)
        hdr["DEADAMPS"] = (",".join(str(i + 1) for i in result.dead_amplifiers),
                           "defective amplifiers (AMPSEC index)")
        hdr["BLEEDDIR"] = (result.bleed_direction, "bleed direction used (+1 = +Y, 0 = both)")
        for key, value, comment in _crosstalk_cards(result.crosstalk):
            hdr[key] = (value, comment)
        for bit in MaskBits:
            hdr[f"NPIX{int(bit)}"] = (int(np.count_nonzero(result.mask & np.uint8(bit))),
                                      f"pixels with bit {int(bit)}")
        hdus.append(fits.ImageHDU(data=result.mask, header=hdr))
    return fits.HDUList(hdus)


def _own_tile(exposure: Path) -> tuple[str, ...] | None:
    """The exposure's own TILE, accepted as known: ingest has checked it against the release
    (custom tiles are not grid names)."""
    try:
        tile = fits.getheader(exposure, 0).get("TILE")
    except (OSError, ValueError, TypeError, IndexError):
        return None  # read_exposure_header reports what is wrong with the file
    return (tile.strip(),) if isinstance(tile, str) else None


def run_masks(exposure: Path, out_path: Path, settings: MaskSettings) -> None:
    """Mask every CCD of one exposure and write ``out_path`` atomically.

    Reads ``exposure`` (and ``settings.bad_pixel_map`` when set); writes ``out_path``
    (``ks4release.layout.mask_path(release_dir, stem)``).
    """
    exposure = Path(exposure)
    info = read_exposure_header(exposure, known_tiles=_own_tile(exposure))
    bpm_path = Path(settings.bad_pixel_map) if settings.bad_pixel_map else None
    if bpm_path is not None:
        check_bad_pixel_map(bpm_path, {ccd.name: ccd.shape for ccd in info.ccds})
    results = {}
    for ccd in info.ccds:
        image, _ = read_ccd(exposure, ccd.name)
        bpm = None if bpm_path is None else read_bad_pixel_map(bpm_path, ccd.name, ccd.shape)
        results[ccd.name] = ccd_mask(image, ccd, settings, bpm)
        logger.debug("%s %s: dead amplifiers %s, bleed direction %+d", exposure.name, ccd.name,
                     results[ccd.name].dead_amplifiers, results[ccd.name].bleed_direction)
    primary = {"TILE": info.tile, "FILTER": info.band, "EXPOSURE": exposure.stem}
    hdul = mask_hdulist(primary, results, settings)
    with atomic_path(out_path) as tmp:
        hdul.writeto(tmp)

