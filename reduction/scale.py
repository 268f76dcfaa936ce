"""Scale one exposure to the common zero point ZP = 30 with its per-amplifier model.

Each CCD becomes ``(raw - ghosts - background) * 10**(0.4 * (30 - zp_a(y)))`` per amplifier ``a``
and row ``y`` (0-based), where ``ghosts`` are the crosstalk ghosts predicted by the model that
the exposure's mask records (:func:`.masks.read_crosstalk_model`; none when the mask says they
are only masked; pixels at SATURATE kept as they are), with ``zp_a(y) = zp_y0 + zp_slope * y /
ny`` from :mod:`.zeropoint` (the zero point of a star of the pivot colour, see there). The
background is ``sep.Background`` with the bad pixels and the grown footprints of the detected
sources excluded (the sky the zero-point photometry measured on; ``[scale]
background_mask_sigma``). Bad pixels keep their scaled values: the co-add reads the mask
separately.

Output (``layout.scaled_path``): the exposure's primary header plus ``ZPTARGET`` and provenance;
per CCD an image extension (``EXTNAME`` = CCD, float32) with the fitted WCS header (TAN-SIP and
its quality cards, ``ASTOK`` among them: the co-add skips ``ASTOK = F``), ``GAIN`` and
``SATURATE`` in scaled units (``SATURATE`` the lowest over amplifiers and rows, so that no
saturated pixel is above it), ``SKYLEVEL`` (the subtracted sky, scaled), ``ZPA{i}``/``ZPB{i}``
(zp_y0 and zp_slope of amplifier i) with ``ZPAERR{i}``/``ZPBERR{i}`` and ``ZPFLAG{i}``, the
colour term (``ZPCOLT``, ``ZPCOLTE``, ``ZPCOLPIV``) and ``PSFR50``, the stars' half-light radius
that the zero-point photometry measured on the CCD (its ``photometry`` meta; the co-add passes it
on as each exposure's PSF size for CLASS_STAR's seeing map), and ``XTCORR`` (crosstalk ghosts
subtracted or not).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.camera import CCD_NAMES
from ks4release.errors import InputError
from ks4release.exposure import read_ccd, read_exposure_header
from ks4release.reduction.masks import read_crosstalk_model
from ks4release.reduction.masks_saturation import CrosstalkModel
from ks4release.reduction.sep_objects import sky_background
from ks4release.reduction.zeropoint import read_mask_ccd, read_wcs_ccd
from ks4release.settings import ScaleSettings
from ks4release.survey import REFERENCE_ZEROPOINT

__all__ = ["ScaleSettings", "amp_row_factors", "run_scale", "scale_ccd", "scale_factors",
           "subtract_crosstalk"]

# Cards of the WCS file's extensions that describe the HDU itself, not the WCS or its quality.
_STRUCTURAL = {"XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT", "EXTNAME",
               "EXTEND", "SIMPLE"}
# Row and column step of the subsample that estimates the scaled sky level.
_SKY_STEP = 4
_ZP_COLUMNS = ("ccd", "amp", "zp_y0", "zp_y0_err", "zp_slope", "zp_slope_err", "colour_term",
               "colour_term_err", "flag")



def amp_row_factors(ny: int, zp_y0: np.ndarray, zp_slope: np.ndarray,
                    zp_target: float) -> np.ndarray:
    """Scale factor ``10**(0.4 * (zp_target - zp_a(y)))`` per row and amplifier, (ny, n_amp)."""
    zp_y0, zp_slope = np.asarray(zp_y0, float), np.asarray(zp_slope, float)
    if zp_y0.shape != zp_slope.shape:
        raise ValueError(f"{zp_y0.size} zp_y0 but {zp_slope.size} zp_slope values")
    y = np.arange(ny, dtype=float)[:, None] / ny
    return 10 ** (0.4 * (zp_target - (zp_y0[None, :] + zp_slope[None, :] * y)))


def scale_factors(shape: tuple[int, int], amplifiers: tuple[tuple[int, int], ...],
                  zp_y0: np.ndarray, zp_slope: np.ndarray, zp_target: float) -> np.ndarray:
    """Multiplicative factor per pixel (float64, full image; see :func:`amp_row_factors`).

    ``amplifiers[i]`` is the 0-based half-open column range of amplifier i, whose model is
    ``zp_y0[i] + zp_slope[i] * y / ny``.
    """
    if len(amplifiers) != len(zp_y0) or len(amplifiers) != len(zp_slope):
        raise ValueError(f"{len(amplifiers)} amplifiers but {len(zp_y0)} zp_y0 and "
                         f"{len(zp_slope)} zp_slope values")
    rows = amp_row_factors(shape[0], zp_y0, zp_slope, zp_target)
    factor = np.empty(shape)
    for i, (start, stop) in enumerate(amplifiers):
        factor[:, start:stop] = rows[:, i:i + 1]
    return factor


def scale_ccd(data: np.ndarray, bad: np.ndarray, amplifiers: tuple[tuple[int, int], ...],
              row_factors: np.ndarray, *, saturation: float, settings: ScaleSettings
              ) -> tuple[np.ndarray, dict[str, float]]:
    """Background-subtracted, scaled image (float32) and its scaled SATURATE and SKYLEVEL.

    ``row_factors`` is the (ny, n_amp) output of :func:`amp_row_factors`. Works amplifier by
    amplifier so that a full-size CCD needs no full-frame float64 temporaries.
    """
    img = np.array(data, dtype=np.float32, order="C")
    # the sky the zero points were fitted on: a one-pass mesh, lifted by the sources' wings,
    # would take a constant from every aperture, in magnitudes most from the faintest
    back = sky_background(img, np.ascontiguousarray(bad, dtype=bool),
                          box=settings.background_box_px, filter_size=settings.background_filter,
                          mask_sigma=settings.background_mask_sigma,
                          grow_px=settings.background_grow_px).back()
    img -= back
    saturate, sky = np.inf, []
    for i, (start, stop) in enumerate(amplifiers):
        f = row_factors[:, i:i + 1].astype(np.float32)
        img[:, start:stop] *= f
        strip = back[:, start:stop]
        saturate = min(saturate, float(np.min((saturation - strip.max(axis=1)) * f[:, 0])))
        sky.append(np.median(strip[::_SKY_STEP, ::_SKY_STEP] * f[::_SKY_STEP]))
    cards = {"saturate": saturate, "skylevel": float(np.median(sky)),
             "factor": float(np.median(row_factors))}
    return img, cards


def subtract_crosstalk(data: np.ndarray, model: CrosstalkModel,
                       amplifiers: tuple[tuple[int, int], ...], saturation: float) -> np.ndarray:
    """``data`` minus the crosstalk ghosts of ``model`` (float32; in place when ``data`` is
    float32 already, so a full-size CCD needs one more frame, the ghosts), except at pixels at
    or above ``saturation``: a clipped pixel does not hold its ghost, and must stay at SATURATE
    so that later stages still see it saturated."""
    ghosts = model.ghosts(data, amplifiers)
    with np.errstate(invalid="ignore"):
        ghosts[data >= saturation] = 0.0
    out = np.asarray(data, dtype=np.float32)
    out -= ghosts
    return out


def _zeropoints(path: Path) -> Table:
    """The zero-point table of :mod:`.zeropoint`, checked for the columns scaling needs."""
    try:
        table = Table.read(path, format="ascii.ecsv")
    except FileNotFoundError:
        raise InputError(path, "zero-point file does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable ECSV zero-point table ({exc})") from None
    missing = [c for c in _ZP_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError(path, f"column {missing[0]!r} is missing", column=missing[0])
    return table


def _ccd_zeropoints(table: Table, path: Path, ccd: str, n_amps: int) -> Table:
    rows = table[np.asarray(table["ccd"]).astype(str) == ccd]
    rows.sort("amp")
    if list(rows["amp"]) != list(range(1, n_amps + 1)):
        raise InputError(path, f"CCD {ccd}: amplifiers {list(rows['amp'])} (expected 1.."
                         f"{n_amps})", column="amp")
    return rows


def _ccd_header(wcs_header: fits.Header, raw_header: fits.Header, zps: Table, cards: dict,
                gain: float, r50_px: float | None) -> fits.Header:
    h = fits.Header()
    for card in wcs_header.cards:
        if card.keyword not in _STRUCTURAL and card.keyword not in ("", "COMMENT", "HISTORY"):
            h.append(card)
    h["GAIN"] = (gain / cards["factor"], "[e-/count] raw GAIN / median scale factor")
    h["RDNOISE"] = (raw_header["RDNOISE"], "[e-] read noise (unscaled)")
    h["SATURATE"] = (cards["saturate"], "[count] lowest scaled saturation (amps, rows)")
    h["SKYLEVEL"] = (cards["skylevel"], "[count] median subtracted sky, scaled")
    h["BUNIT"] = ("count", f"scaled to ZP {REFERENCE_ZEROPOINT:g}, sky subtracted")
    h["NAMPS"] = raw_header["NAMPS"], "number of readout amplifiers"
    for row in zps:
        i = int(row["amp"])
        h[f"AMPSEC{i}"] = (raw_header[f"AMPSEC{i}"], "[pix] amplifier section (1-based)")
        h[f"ZPA{i}"] = (float(row["zp_y0"]), f"[mag] amp {i} zp at row 0; zp = A + B*y/ny")
        h[f"ZPB{i}"] = (float(row["zp_slope"]), f"[mag] amp {i} zp change over the CCD height")
        h[f"ZPAERR{i}"] = (float(row["zp_y0_err"]), f"[mag] amp {i}: error of ZPA{i}")
        h[f"ZPBERR{i}"] = (float(row["zp_slope_err"]), f"[mag] amp {i}: error of ZPB{i}")
        h[f"ZPFLAG{i}"] = (int(row["flag"]), f"amp {i} flags: 1 no star 2 few 4 dead 8 no WCS")
    h["ZPCOLT"] = (float(zps["colour_term"][0]), "[mag/mag] colour term in (V-I)_AB")
    h["ZPCOLTE"] = (float(zps["colour_term_err"][0]), "[mag/mag] error of ZPCOLT")
    if r50_px is not None and np.isfinite(r50_px) and r50_px > 0:
        h["PSFR50"] = (float(r50_px), "[pix] stars' half-light radius (zp photometry)")
    return h


def _psf_r50(zp_table: Table, ccd: str) -> float | None:
    """The stars' half-light radius (px) that the zero-point photometry used on ``ccd``, from
    the table's ``photometry`` meta; None when it has none."""
    photometry = zp_table.meta.get("photometry")
    value = photometry.get(ccd, {}).get("r50_px") if isinstance(photometry, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def run_scale(exposure: Path, mask: Path | str, wcs: Path, zeropoints: Path, out_path: Path,
              settings: ScaleSettings) -> None:
    """Write the exposure scaled to ``settings.zp_target`` with its fitted WCS.

    Reads the raw exposure, its bad-pixel mask (``""`` for none; bad pixels are left out of
    the background), the fitted WCS file (``layout.wcs_path``) and the zero-point table
    (``layout.zeropoint_path``); writes ``out_path`` (``layout.scaled_path``) atomically, in
    the format of the module docstring.
    """
    info = read_exposure_header(exposure)
    zp_table = _zeropoints(Path(zeropoints))
    with fits.open(exposure) as hdul:
        primary = hdul[0].header.copy()
    primary["ZPTARGET"] = (settings.zp_target, "[mag] zero point of the scaled CCDs")
    primary["ZPCOLPIV"] = (float(zp_table.meta.get("colour_pivot", 0.0)),
                           "[mag] (V-I)_AB at which the zps hold")
    primary["ZPMODEL"] = ("zp(y) = ZPAi + ZPBi*y/ny", "per amp i; ks4release.reduction.zeropoint")
    primary["ZPFILE"] = (os.path.basename(zeropoints), "zero-point table")
    primary["WCSFILE"] = (os.path.basename(wcs), "fitted WCS")
    primary["MASKFILE"] = (os.path.basename(str(mask)), "bad-pixel mask ('' = none)")
    primary["SCALEVER"] = (f"ks4release {__version__}", "software of the scaling")
    with atomic_path(out_path) as tmp:
        fits.PrimaryHDU(header=primary).writeto(tmp)
        for name in CCD_NAMES:  # one CCD in memory at a time
            ccd = info.ccd(name)
            data, raw_header = read_ccd(exposure, name)
            bad = read_mask_ccd(mask, name, data.shape)
            crosstalk = read_crosstalk_model(mask, name) if str(mask) else None
            if crosstalk is not None:
                data = subtract_crosstalk(data, crosstalk, ccd.amplifiers, ccd.saturation)
            wcs_header, _ = read_wcs_ccd(wcs, name)
            zps = _ccd_zeropoints(zp_table, Path(zeropoints), name, len(ccd.amplifiers))
            rows = amp_row_factors(data.shape[0], zps["zp_y0"], zps["zp_slope"],
                                   settings.zp_target)
            scaled, cards = scale_ccd(data, bad, ccd.amplifiers, rows,
                                      saturation=ccd.saturation, settings=settings)
            del data
            header = _ccd_header(wcs_header, raw_header, zps, cards, ccd.gain,
                                 _psf_r50(zp_table, name))
            header["EXTNAME"] = (name, "CCD name")
            header["XTCORR"] = (crosstalk is not None, "crosstalk ghosts subtracted (mask model)")
            fits.append(tmp, scaled, header)
