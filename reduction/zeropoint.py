"""Zero points per amplifier: the model, the star photometry and the zero-point table.

DR1 scales every exposure to a common zero point of 30.0 mag, per amplifier, modelling the
variation along Y (up to 0.1 mag within an amplifier, 0.2 mag between sites). This module holds
the pieces shared by the fit (:mod:`.zeropoint_tile`, which fits all exposures of a tile and
band together) and the scaling (:mod:`.scale`, which applies it): the photometry of stars, the
reading of masks and fitted WCS, and the output table.

Photometric model
-----------------
For a star of AB magnitude ``m`` in the exposure's band and colour ``c = (V - I)_AB``, on CCD
``k``, amplifier ``a``, at 0-based row ``y`` of a CCD of ``ny`` rows, the instrumental magnitude
``m_inst = -2.5 log10(flux / ADU)`` obeys::

    m - m_inst = zp_ka(y) + colour_term * (c - colour_pivot)
    zp_ka(y)   = zp_y0[k, a] + zp_slope[k, a] * y / ny

``zp_ka(y)`` is therefore the AB magnitude giving 1 ADU **for a star of the pivot colour**
``colour_pivot`` (a setting, default (V - I)_AB = 0.4, the median colour of Gaia XP stars at high
Galactic latitude). This is the convention of the scaled images: a star of the pivot colour gets
its AB magnitude from ``30 - 2.5 log10(flux)``, any other star ``m_AB - colour_term * (c -
colour_pivot)``. Compared with a zero point defined at colour 0, ours is larger by
``colour_term * colour_pivot`` (the *colour-term convention offset*); choosing the pivot near the
stars' median colour decorrelates the zero point from the fitted colour term. The colour term is
one per band and site.

The parameters are nested, each level but the top one with a Gaussian prior centred on the level
above (a ridge-regularised, i.e. maximum a posteriori, least-squares fit; details and the tie
stars in :mod:`.zeropoint_tile`)::

    zp at mid-height    = E - 2.5 log10(GAIN_k) + eta_k + delta_ka      (at y = ny / 2)
    slope               = S_k + epsilon_ka
    eta_k   ~ N(0, prior_ccd_offset_mag)    CCD offset from the exposure zero point E
    S_k     ~ N(0, prior_ccd_slope_mag)     CCD gradient along Y
    delta   ~ N(0, prior_amp_offset_mag)    amplifier offset from its CCD
    epsilon ~ N(0, prior_amp_slope_mag)     amplifier gradient from its CCD's

``E`` (flat prior) is the exposure zero point in electrons, shared by the four CCDs through their
gains. DR1 states only that the zero point varies by up to 0.1 mag along Y within an amplifier,
which the CCD slope prior covers; the other widths are our defaults. An amplifier with many
stars is fitted almost freely; one with none falls back to its CCD (and a CCD with none, e.g.
with failed astrometry, to the exposure), and its flag (:class:`ZpFlag`) says so. An
amplifier's own offset and slope are measured only as well as its stars allow (about
``sigma_star * sqrt(2 / n)`` RMS along Y for ``n`` stars). Full-size KMTNet amplifiers hold
hundreds of Gaia XP stars; the scaled demo's hold a few.

Photometry
----------
Forced circular-aperture photometry (sep, :func:`measure_stars`) on the background-subtracted
image (``sep.Background`` with bad pixels and the grown footprints of the detected sources
excluded, :func:`~ks4release.reduction.sep_objects.source_masked_background`). The aperture
radius is ``aperture_r50`` times the median half-light radius of the stars on the CCD; the flux
beyond it is corrected by
the median ratio of the fluxes in ``correction_factor`` times that radius and in the aperture,
over bright clean stars (a curve-of-growth correction, :func:`aperture_correction`). Stars are
dropped when a bad pixel lies in the aperture, a pixel near the centre reaches
``saturation_fraction`` of SATURATE, or other detected sources within the aperture (plus two
half-light radii) carry more than ``blend_fraction`` of the star's flux; reference magnitudes
with an error above ``max_ref_err_mag`` anchor nothing.

Vega to AB
----------
The Gaia XP Johnson-Kron-Cousins magnitudes are Vega magnitudes; ``m_AB = m_Vega +``
:data:`VEGA_TO_AB` with the offsets of Blanton & Roweis (2007, AJ 133, 734, table 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path

import numpy as np
import sep
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from ks4release.errors import InputError
from ks4release.reduction.detect import read_mask
from ks4release.reduction.sep_objects import source_masked_background
from ks4release.settings import ZeropointSettings
from ks4release.survey import band as band_info

__all__ = [
    "VEGA_TO_AB",
    "DR1_BAD_BITS",
    "ZpFlag",
    "ZeropointSettings",
    "CcdGeometry",
    "MODEL_DESCRIPTION",
    "reference_mags",
    "measure_stars",
    "aperture_correction",
    "instrumental_mags",
    "describe_zeropoints",
    "read_mask_ccd",
    "read_wcs_ccd",
    "celestial_wcs",
    "amplifier_of",
    "dead_amplifiers",
]

#: m_AB - m_Vega of the Johnson-Kron-Cousins bands (Blanton & Roweis 2007, AJ 133, 734, table 1).
VEGA_TO_AB = {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}
#: DR1 bad-pixel bits (cosmic ray/crosstalk, bleed, CCD defect, amplifier defect).
DR1_BAD_BITS = 1 | 2 | 4 | 8
#: One-line statement of the fitted model (ECSV meta and FITS comments).
MODEL_DESCRIPTION = (
    "m_AB - m_inst = zp_y0 + zp_slope * y / ny + colour_term * ((V-I)_AB - colour_pivot); "
    "y 0-based row; zp for a star of the pivot colour; hierarchical priors pool amplifiers "
    "within their CCD and CCDs within the exposure; all exposures of the tile and band fitted "
    "together, tied by their common stars (ks4release.reduction.zeropoint_tile)"
)
_MAG_PER_REL_FLUX = 2.5 / math.log(10.0)
_MIN_APCORR_STARS = 3
# Clipping threshold (robust sigmas) of the aperture-correction ratios.
_APCORR_CLIP = 3.0
# Why a star was not used (``cut`` column of :func:`measure_stars`).
_CUT_EDGE, _CUT_MASKED, _CUT_SATURATED, _CUT_FAINT, _CUT_BLEND = 1, 2, 4, 8, 16


class ZpFlag(IntFlag):
    """Quality flags of one amplifier's zero point (OR-ed in the ``flag`` column)."""

    NO_STARS = 1  #: no star on the amplifier: zp comes from its CCD (and exposure) alone
    FEW_STARS = 2  #: fewer than ``min_stars_amp`` stars: strongly pulled towards its CCD
    DEAD = 4  #: amplifier entirely masked (DR1 bit 8 or all bad): zp is not meaningful
    NO_ASTROMETRY = 8  #: the CCD's astrometry failed (ASTOK = F): its stars were not used



@dataclass(frozen=True, kw_only=True)
class CcdGeometry:
    """What the fit needs to know about one CCD: rows, amplifier columns, gain, usability."""

    name: str
    ny: int
    amplifiers: tuple[tuple[int, int], ...]
    gain: float
    dead_amps: tuple[int, ...] = ()
    astrometry_ok: bool = True


# --------------------------------------------------------------------------------------------
# Photometry (pure)


def reference_mags(refcat: Table, band: str) -> dict[str, np.ndarray]:
    """AB magnitude in ``band``, its error, and (V - I)_AB of every reference star."""
    col = band_info(band).gaia_xp_column
    mag = np.asarray(refcat[col], dtype=float) + VEGA_TO_AB[band]
    flux_err = f"{band.lower()}_jkc_flux_error"
    flux = f"{band.lower()}_jkc_flux"
    if flux_err in refcat.colnames and flux in refcat.colnames:
        err = _MAG_PER_REL_FLUX * np.asarray(refcat[flux_err], dtype=float) / np.asarray(
            refcat[flux], dtype=float)
    else:
        err = np.full(mag.shape, 0.01)
    colour = (np.asarray(refcat["v_jkc_mag"], dtype=float) + VEGA_TO_AB["V"]) - (
        np.asarray(refcat["i_jkc_mag"], dtype=float) + VEGA_TO_AB["I"])
    return {"mag": mag, "err": err, "colour": colour}


def _blend_flux(objects: np.ndarray, x: np.ndarray, y: np.ndarray, self_radius: float,
                reaches: tuple[float, ...]) -> list[np.ndarray]:
    """Per reach: flux of detected sources other than the star itself within that many px of
    each star (one distance computation for all reaches)."""
    out = [np.zeros(x.size) for _ in reaches]
    if objects.size == 0:
        return out
    ox, oy, of = objects["x"], objects["y"], objects["flux"]
    for i in range(x.size):
        d = np.hypot(ox - x[i], oy - y[i])
        for flux, reach in zip(out, reaches, strict=True):
            flux[i] = of[(d > self_radius) & (d < reach)].sum()
    return out


def measure_stars(image: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                  *, gain: float, saturation: float, settings: ZeropointSettings,
                  r50_px: float | None = None) -> tuple[Table, dict[str, float]]:
    """Forced aperture photometry of reference stars at pixel positions (0-based) on one CCD.

    Returns a table with one row per position: ``x``, ``y``; ``flux``, ``flux_err`` in the
    photometric aperture and ``flux_big``, ``flux_big_err`` in the curve-of-growth aperture
    (ADU, background subtracted); ``cut``, the cuts failed (1 near the edge, 2 bad pixel in
    the aperture, 4 saturated, 8 no flux, 16 blended; 0 = usable); ``big_ok``, whether the
    large aperture is inside the CCD and free of bad pixels and of neighbours (the blend rule
    at the large radius: in a crowded field, neighbours in the curve-of-growth aperture
    inflated the aperture correction by 0.15 mag at 24 times the demo's star density). Also a
    dict with the CCD's ``r50_px``, ``aperture_px`` and ``sky_adu``. ``r50_px``: the stars'
    half-light radius (the aperture is ``aperture_r50`` times it); by default the median over
    the given positions.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    ny, nx = data.shape
    bad = np.zeros(data.shape, bool) if bad is None else np.ascontiguousarray(bad, dtype=bool)
    objects, background = source_masked_background(
        data, bad, box=settings.background_box_px, filter_size=3,
        detect_sigma=settings.detect_sigma, grow_px=settings.background_grow_px)
    sub = data - background.back()
    rms = background.rms()
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    inside = (x > 2) & (x < nx - 3) & (y > 2) & (y < ny - 3)
    xs, ys = np.where(inside, x, nx / 2.0), np.where(inside, y, ny / 2.0)
    r50, r50_flag = sep.flux_radius(sub, xs, ys, np.full(x.size, 20.0), 0.5, mask=bad, subpix=5)
    peak = _peak(data, xs, ys, np.nan_to_num(r50, nan=2.0))
    unsaturated = peak < settings.saturation_fraction * saturation
    good_r50 = (inside & ((r50_flag & sep.APER_TRUNC) == 0) & unsaturated & np.isfinite(r50)
                & (r50 > 0.3))
    if r50_px is None:
        r50_px = float(np.median(r50[good_r50])) if good_r50.any() else 2.0
    radius = settings.aperture_r50 * r50_px
    big = settings.correction_factor * radius
    flux, ferr, flag = sep.sum_circle(sub, xs, ys, radius, err=rms, gain=gain, mask=bad,
                                      subpix=5)
    flux_big, ferr_big, flag_big = sep.sum_circle(sub, xs, ys, big, err=rms, gain=gain,
                                                  mask=bad, subpix=5)
    blend, blend_big = _blend_flux(objects, xs, ys, max(2.0, r50_px),
                                   (radius + 2.0 * r50_px, big + 2.0 * r50_px))

    def within(r: float) -> np.ndarray:
        return (x > r) & (x < nx - 1 - r) & (y > r) & (y < ny - 1 - r)

    cut = (np.where(within(radius), 0, _CUT_EDGE)
           | np.where((flag & sep.APER_HASMASKED) == 0, 0, _CUT_MASKED)
           | np.where(unsaturated, 0, _CUT_SATURATED) | np.where(flux > 0, 0, _CUT_FAINT)
           | np.where(blend <= settings.blend_fraction * np.maximum(flux, 0), 0, _CUT_BLEND))
    big_ok = (within(big) & ((flag_big & sep.APER_HASMASKED) == 0) & (flux_big > 0)
              & (blend_big <= settings.blend_fraction * np.maximum(flux_big, 0)))
    table = Table({"x": x, "y": y, "flux": flux, "flux_err": ferr, "flux_big": flux_big,
                   "flux_big_err": ferr_big, "cut": cut, "big_ok": big_ok})
    info = {"r50_px": r50_px, "aperture_px": radius, "sky_adu": float(background.globalback)}
    return table, info


def aperture_correction(stars: Table, min_snr: float = 100.0) -> tuple[float, int]:
    """Large- to small-aperture flux ratio of bright clean stars, and how many were kept.

    Uses usable stars (``cut == 0``) with a clean large aperture and a photometric S/N above
    ``min_snr``; returns (nan, n) with fewer than three such stars. The estimate is the
    inverse-variance weighted mean of the ratios with iterative clipping beyond
    ``_APCORR_CLIP`` robust sigmas (a neighbour in the large aperture): the large aperture
    holds nine times the sky of the small one, so a ratio's error grows fast towards the
    faint stars, and the plain median of the demo's 20-60 stars scattered by 0.5-1 % between
    tiles, which went straight into the zero points.
    """
    f = np.asarray(stars["flux"], float)
    fe = np.asarray(stars["flux_err"], float)
    fb = np.asarray(stars["flux_big"], float)
    fbe = np.asarray(stars["flux_big_err"], float)
    ok = ((np.asarray(stars["cut"]) == 0) & np.asarray(stars["big_ok"], bool)
          & (f > min_snr * fe) & (fb > 0) & np.isfinite(fbe))
    n = int(ok.sum())
    if n < _MIN_APCORR_STARS:
        return float("nan"), n
    ratio = fb[ok] / f[ok]
    sigma = np.maximum(ratio * np.hypot(fbe[ok] / fb[ok], fe[ok] / f[ok]), 1e-6)
    keep = np.ones(n, bool)
    for _ in range(10):
        w = sigma[keep] ** -2
        mean = float(np.sum(w * ratio[keep]) / np.sum(w))
        z = (ratio - mean) / sigma
        spread = max(1.0, 1.4826 * float(np.median(np.abs(z[keep]))))
        new_keep = np.abs(z) <= _APCORR_CLIP * spread
        if np.array_equal(new_keep, keep) or new_keep.sum() < _MIN_APCORR_STARS:
            break
        keep = new_keep
    return mean, int(keep.sum())


def instrumental_mags(stars: Table, apcorr: float) -> tuple[np.ndarray, np.ndarray]:
    """Total instrumental magnitude (-2.5 log10 ADU) and its error of every star.

    The aperture flux times ``apcorr``; when ``apcorr`` is nan, the large-aperture flux
    (nan where that aperture is not clean).
    """
    if math.isfinite(apcorr):
        f = np.asarray(stars["flux"], float) * apcorr
        fe = np.asarray(stars["flux_err"], float) * apcorr
    else:
        ok = np.asarray(stars["big_ok"], bool)
        f = np.where(ok, np.asarray(stars["flux_big"], float), np.nan)
        fe = np.asarray(stars["flux_big_err"], float)
    positive = f > 0
    safe = np.where(positive, f, 1.0)
    m = np.where(positive, -2.5 * np.log10(safe), np.nan)
    err = np.where(positive, _MAG_PER_REL_FLUX * fe / safe, np.nan)
    return m, err


def _peak(data: np.ndarray, x: np.ndarray, y: np.ndarray, r50: np.ndarray) -> np.ndarray:
    """Largest pixel value within ``2 * r50`` (at least 2 px) of each position."""
    ny, nx = data.shape
    out = np.empty(x.size)
    for i in range(x.size):
        h = math.ceil(max(2.0, 2.0 * r50[i]))
        ix, iy = round(x[i]), round(y[i])
        cut = data[max(0, iy - h):min(ny, iy + h + 1), max(0, ix - h):min(nx, ix + h + 1)]
        out[i] = float(cut.max()) if cut.size else np.inf
    return out


# --------------------------------------------------------------------------------------------
# Output table


def describe_zeropoints(t: Table) -> None:
    """Units and descriptions of the columns of a zero-point table (in place)."""
    text = {
        "ccd": (None, "CCD name"), "amp": (None, "amplifier number (AMPSEC index, 1-based)"),
        "ny": (u.pix, "rows of the CCD"),
        "x_start": (u.pix, "first column of the amplifier (0-based)"),
        "x_stop": (u.pix, "one past its last column (0-based)"),
        "zp_y0": (u.mag, "zero point at row y = 0 (AB mag giving 1 ADU, pivot colour)"),
        "zp_y0_err": (u.mag, "standard error of zp_y0"),
        "zp_slope": (u.mag, "zp(y) = zp_y0 + zp_slope * y / ny"),
        "zp_slope_err": (u.mag, "standard error of zp_slope"),
        "colour_term": (u.mag / u.mag, "colour term per (V-I)_AB mag, about the pivot"),
        "colour_term_err": (u.mag / u.mag, "standard error of colour_term"),
        "n_stars": (None, "reference stars used on this amplifier"),
        "rms": (u.mag, "RMS residual of those stars"),
        "flag": (None, "ZpFlag bits: 1 no stars, 2 few stars, 4 dead, 8 no astrometry"),
    }
    for name, (unit, desc) in text.items():
        t[name].unit = unit
        t[name].description = desc


# --------------------------------------------------------------------------------------------
# File I/O and the task


def read_mask_ccd(path: Path | str, ccd: str, shape: tuple[int, int]) -> np.ndarray:
    """Boolean bad-pixel image (DR1 bits) of one CCD; all good when ``path`` is empty."""
    return (read_mask(path, ccd, shape) & DR1_BAD_BITS) != 0


def read_wcs_ccd(path: Path | str, ccd: str) -> tuple[fits.Header, bool]:
    """Fitted WCS header of one CCD and its ASTOK quality flag."""
    try:
        with fits.open(path) as hdul:
            header = hdul[ccd].header.copy()
    except FileNotFoundError:
        raise InputError(path, "WCS file does not exist") from None
    except OSError as exc:
        raise InputError(path, f"not a readable FITS WCS file ({exc})") from None
    except KeyError:
        raise InputError(path, f"extension {ccd!r} is missing (expected one header per CCD)",
                         hdu=ccd) from None
    if "ASTOK" not in header or not isinstance(header["ASTOK"], bool):
        raise InputError(path, f"extension {ccd!r}: ASTOK is missing or not a boolean",
                         hdu=ccd, key="ASTOK")
    return header, bool(header["ASTOK"])


def celestial_wcs(header: fits.Header, path: Path | str, ccd: str) -> WCS:
    """The celestial WCS of a fitted header; InputError when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header, naxis=2)
    except Exception as exc:  # astropy.wcs raises many types; all mean "unusable"
        raise InputError(path, f"extension {ccd!r}: WCS cannot be used ({exc})", hdu=ccd,
                         key="WCS") from None
    if not w.has_celestial:
        raise InputError(path, f"extension {ccd!r}: no celestial WCS", hdu=ccd, key="CTYPE1")
    return w


def amplifier_of(x: np.ndarray, amplifiers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """1-based amplifier number of each column position."""
    out = np.zeros(x.size, int)
    for i, (start, stop) in enumerate(amplifiers):
        out[(x >= start - 0.5) & (x < stop - 0.5)] = i + 1
    return out


def dead_amplifiers(bad: np.ndarray, amplifiers) -> tuple[int, ...]:
    """Amplifiers whose every pixel is bad."""
    return tuple(i + 1 for i, (s, e) in enumerate(amplifiers) if bad[:, s:e].all())
