"""Zero points per amplifier, with their variation along Y, fitted against Gaia XP photometry.

DR1 scales every exposure to a common zero point of 30.0 mag, per amplifier, modelling the
variation along Y (up to 0.1 mag within an amplifier, 0.2 mag between sites). This module
measures the reference stars of one exposure and fits that model; :mod:`.scale` applies it.

Photometric model
-----------------
For a Gaia XP star of AB magnitude ``m`` in the exposure's band and colour
``c = (V - I)_AB``, on CCD ``k``, amplifier ``a``, at 0-based row ``y`` of a CCD of ``ny`` rows,
the instrumental magnitude ``m_inst = -2.5 log10(flux / ADU)`` obeys::

    m - m_inst = zp_ka(y) + colour_term * (c - colour_pivot)
    zp_ka(y)   = zp_y0[k, a] + zp_slope[k, a] * y / ny

``zp_ka(y)`` is therefore the AB magnitude giving 1 ADU **for a star of the pivot colour**
``colour_pivot`` (a setting, default (V - I)_AB = 0.4, the median colour of Gaia XP stars at high
Galactic latitude). This is the convention of the scaled images: a star of the pivot colour gets
its AB magnitude from ``30 - 2.5 log10(flux)``, any other star ``m_AB - colour_term * (c -
colour_pivot)``. Compared with a zero point defined at colour 0, ours is larger by
``colour_term * colour_pivot`` (the *colour-term convention offset*); choosing the pivot near the
stars' median colour decorrelates the zero point from the fitted colour term.

Pooling (a hierarchical linear model). At 1/16 scale an amplifier strip holds 0-5 reference
stars, far too few for two free parameters each, so the parameters are nested and every level
but the top one has a Gaussian prior centred on the level above (a ridge-regularised, i.e.
maximum a posteriori, least-squares fit)::

    zp at mid-height    = E - 2.5 log10(GAIN_k) + eta_k + delta_ka      (at y = ny / 2)
    slope               = S_k + epsilon_ka
    eta_k   ~ N(0, prior_ccd_offset_mag)    CCD offset from the exposure zero point E
    S_k     ~ N(0, prior_ccd_slope_mag)     CCD gradient along Y
    delta   ~ N(0, prior_amp_offset_mag)    amplifier offset from its CCD
    epsilon ~ N(0, prior_amp_slope_mag)     amplifier gradient from its CCD's
    colour_term ~ N(0, prior_colour_term)   one per exposure (its band and site)

``E`` (flat prior) is the exposure zero point in electrons, shared by the four CCDs through their
gains. The prior widths are documented settings: DR1 states only that the zero point varies by
up to 0.1 mag along Y within an amplifier, which the CCD slope prior covers; the amplifier-level
widths are our defaults. (Estimating them per exposure by empirical Bayes gained little on the
demo and over-shrank amplifiers whose scatter happened to be small, understating their errors.)
An amplifier with many stars is fitted almost freely; one with none falls back to its CCD (and a
CCD with none, e.g. with failed astrometry, to the exposure), and its flag says so. The colour
term is fitted per exposure, i.e. per band and site, shared by all amplifiers. Stars are
weighted by their measurement and reference errors plus ``error_floor_mag``; the fit is
repeated with outliers beyond ``clip_sigma`` (robust scale) removed. Errors are the posterior
standard deviations, scaled up by the robust reduced chi when it exceeds 1.

What is identifiable: an amplifier's own offset and slope are measured only as well as its
stars allow (about ``sigma_star * sqrt(2 / n)`` RMS along Y for ``n`` stars); with few stars the
reported zero point is the CCD's, and its error says so. Full-size KMTNet amplifiers hold
hundreds of Gaia XP stars; the scaled demo's hold a few.

Photometry
----------
Forced circular-aperture photometry (sep) at the XP stars' positions through the fitted WCS, on
the background-subtracted image (``sep.Background`` with bad pixels excluded). The aperture
radius is ``aperture_r50`` times the median half-light radius of the stars on the CCD; the flux
beyond it is corrected by the median ratio of the fluxes in ``correction_factor`` times that
radius and in the aperture, over the bright clean stars of the whole exposure (a curve-of-growth
correction; with fewer than three such stars, the large-aperture flux is used directly). Stars
are dropped when a bad pixel lies in the aperture, a pixel near the centre reaches
``saturation_fraction`` of SATURATE, other detected sources within the aperture (plus two
half-light radii) carry more than ``blend_fraction`` of the star's flux, or the reference
magnitude error exceeds ``max_ref_err_mag``.

Vega to AB
----------
The Gaia XP Johnson-Kron-Cousins magnitudes are Vega magnitudes; ``m_AB = m_Vega +``
:data:`VEGA_TO_AB` with the offsets of Blanton & Roweis (2007, AJ 133, 734, table 1).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import IntFlag
from pathlib import Path

import numpy as np
import sep
from astropy import units as u
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS, FITSFixedWarning

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.camera import CCD_NAMES
from ks4release.errors import InputError
from ks4release.exposure import read_ccd, read_exposure_header
from ks4release.refcat.formats import read_refcat
from ks4release.settings import ZeropointSettings
from ks4release.survey import REFERENCE_ZEROPOINT
from ks4release.survey import band as band_info

__all__ = [
    "VEGA_TO_AB",
    "DR1_BAD_BITS",
    "ZpFlag",
    "ZeropointSettings",
    "CcdGeometry",
    "MODEL_DESCRIPTION",
    "measure_stars",
    "aperture_correction",
    "instrumental_mags",
    "measure_exposure",
    "fit_zeropoints",
    "read_mask_ccd",
    "read_wcs_ccd",
    "celestial_wcs",
    "run_zeropoint",
]

logger = logging.getLogger(__name__)

#: m_AB - m_Vega of the Johnson-Kron-Cousins bands (Blanton & Roweis 2007, AJ 133, 734, table 1).
VEGA_TO_AB = {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}
#: DR1 bad-pixel bits (cosmic ray/crosstalk, bleed, CCD defect, amplifier defect).
DR1_BAD_BITS = 1 | 2 | 4 | 8
#: One-line statement of the fitted model (ECSV meta and FITS comments).
MODEL_DESCRIPTION = (
    "m_AB - m_inst = zp_y0 + zp_slope * y / ny + colour_term * ((V-I)_AB - colour_pivot); "
    "y 0-based row; zp for a star of the pivot colour; hierarchical priors pool amplifiers "
    "within their CCD and CCDs within the exposure (ks4release.reduction.zeropoint)"
)
_MAG_PER_REL_FLUX = 2.5 / math.log(10.0)
_MIN_APCORR_STARS = 3
# Reference stars within this fraction of the CCD size outside it go through the full SIP WCS.
_SIP_MARGIN_FRACTION = 0.1
# Why a star was not used (``cut`` column of :func:`measure_stars`).
_CUT_EDGE, _CUT_MASKED, _CUT_SATURATED, _CUT_FAINT, _CUT_BLEND = 1, 2, 4, 8, 16
_STAR_COLUMNS = ("x", "y", "flux", "flux_err", "flux_big", "flux_big_err", "cut", "big_ok",
                 "ccd", "amp", "m_ref", "m_ref_err", "colour")


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


def _reference_mags(refcat: Table, band: str) -> dict[str, np.ndarray]:
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
                reach: float) -> np.ndarray:
    """Flux of detected sources other than the star itself within ``reach`` px of each star."""
    out = np.zeros(x.size)
    if objects.size == 0:
        return out
    ox, oy, of = objects["x"], objects["y"], objects["flux"]
    for i in range(x.size):
        d = np.hypot(ox - x[i], oy - y[i])
        out[i] = of[(d > self_radius) & (d < reach)].sum()
    return out


def measure_stars(image: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
                  *, gain: float, saturation: float, settings: ZeropointSettings
                  ) -> tuple[Table, dict[str, float]]:
    """Forced aperture photometry of reference stars at pixel positions (0-based) on one CCD.

    Returns a table with one row per position: ``x``, ``y``; ``flux``, ``flux_err`` in the
    photometric aperture and ``flux_big``, ``flux_big_err`` in the curve-of-growth aperture
    (ADU, background subtracted); ``cut``, the cuts failed (1 near the edge, 2 bad pixel in
    the aperture, 4 saturated, 8 no flux, 16 blended; 0 = usable); ``big_ok``, whether the
    large aperture is free of bad pixels and inside the CCD. Also a dict with the CCD's
    ``r50_px``, ``aperture_px`` and ``sky_adu``.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    ny, nx = data.shape
    bad = np.zeros(data.shape, bool) if bad is None else np.ascontiguousarray(bad, dtype=bool)
    box = settings.background_box_px
    bkg = sep.Background(data, mask=bad, bw=box, bh=box, fw=3, fh=3)
    sub = data - bkg.back()
    rms = bkg.rms()
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    inside = (x > 2) & (x < nx - 3) & (y > 2) & (y < ny - 3)
    xs, ys = np.where(inside, x, nx / 2.0), np.where(inside, y, ny / 2.0)
    r50, r50_flag = sep.flux_radius(sub, xs, ys, np.full(x.size, 20.0), 0.5, mask=bad, subpix=5)
    peak = _peak(data, xs, ys, np.nan_to_num(r50, nan=2.0))
    unsaturated = peak < settings.saturation_fraction * saturation
    good_r50 = (inside & ((r50_flag & sep.APER_TRUNC) == 0) & unsaturated & np.isfinite(r50)
                & (r50 > 0.3))
    r50_px = float(np.median(r50[good_r50])) if good_r50.any() else 2.0
    radius = settings.aperture_r50 * r50_px
    big = settings.correction_factor * radius
    flux, ferr, flag = sep.sum_circle(sub, xs, ys, radius, err=rms, gain=gain, mask=bad,
                                      subpix=5)
    flux_big, ferr_big, flag_big = sep.sum_circle(sub, xs, ys, big, err=rms, gain=gain,
                                                  mask=bad, subpix=5)
    objects = sep.extract(sub, settings.detect_sigma, err=rms, mask=bad, minarea=5,
                          filter_type="conv")
    blend = _blend_flux(objects, xs, ys, max(2.0, r50_px), radius + 2.0 * r50_px)

    def within(r: float) -> np.ndarray:
        return (x > r) & (x < nx - 1 - r) & (y > r) & (y < ny - 1 - r)

    cut = (np.where(within(radius), 0, _CUT_EDGE)
           | np.where((flag & sep.APER_HASMASKED) == 0, 0, _CUT_MASKED)
           | np.where(unsaturated, 0, _CUT_SATURATED) | np.where(flux > 0, 0, _CUT_FAINT)
           | np.where(blend <= settings.blend_fraction * np.maximum(flux, 0), 0, _CUT_BLEND))
    big_ok = within(big) & ((flag_big & sep.APER_HASMASKED) == 0) & (flux_big > 0)
    table = Table({"x": x, "y": y, "flux": flux, "flux_err": ferr, "flux_big": flux_big,
                   "flux_big_err": ferr_big, "cut": cut, "big_ok": big_ok})
    info = {"r50_px": r50_px, "aperture_px": radius, "sky_adu": float(bkg.globalback)}
    return table, info


def aperture_correction(stars: Table, min_snr: float = 100.0) -> tuple[float, int]:
    """Median ratio of large- to small-aperture flux of bright clean stars, and their number.

    Uses usable stars (``cut == 0``) with a clean large aperture and a photometric S/N above
    ``min_snr``; returns (nan, n) with fewer than three such stars.
    """
    ok = ((np.asarray(stars["cut"]) == 0) & np.asarray(stars["big_ok"], bool)
          & (np.asarray(stars["flux"]) > min_snr * np.asarray(stars["flux_err"])))
    n = int(ok.sum())
    if n < _MIN_APCORR_STARS:
        return float("nan"), n
    ratio = np.asarray(stars["flux_big"])[ok] / np.asarray(stars["flux"])[ok]
    return float(np.median(ratio)), n


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
# Fit (pure)


@dataclass(frozen=True)
class _Index:
    """Column indices of the parameters in the design matrix."""

    n_ccd: int
    n_amp_total: int
    amp_offset: dict[tuple[str, int], int]

    @property
    def size(self) -> int:
        return 2 + 2 * self.n_ccd + 2 * self.n_amp_total

    def ccd_offset(self, k: int) -> int:
        return 2 + k

    def ccd_slope(self, k: int) -> int:
        return 2 + self.n_ccd + k

    def amp_off(self, key: tuple[str, int]) -> int:
        return 2 + 2 * self.n_ccd + self.amp_offset[key]

    def amp_slope(self, key: tuple[str, int]) -> int:
        return 2 + 2 * self.n_ccd + self.n_amp_total + self.amp_offset[key]


def _index(ccds: list[CcdGeometry]) -> _Index:
    keys = [(c.name, a + 1) for c in ccds for a in range(len(c.amplifiers))]
    return _Index(n_ccd=len(ccds), n_amp_total=len(keys),
                  amp_offset={k: i for i, k in enumerate(keys)})


def _prior_precision(ccds: list[CcdGeometry], idx: _Index, s: ZeropointSettings) -> np.ndarray:
    """Diagonal of the prior precision; parameter 0 is the colour term, 1 the exposure zp."""
    prec = np.zeros(idx.size)
    prec[0] = s.prior_colour_term ** -2
    for k, c in enumerate(ccds):
        prec[idx.ccd_offset(k)] = s.prior_ccd_offset_mag ** -2
        prec[idx.ccd_slope(k)] = s.prior_ccd_slope_mag ** -2
        for a in range(len(c.amplifiers)):
            prec[idx.amp_off((c.name, a + 1))] = s.prior_amp_offset_mag ** -2
            prec[idx.amp_slope((c.name, a + 1))] = s.prior_amp_slope_mag ** -2
    return prec


def _design(stars: Table, ccds: list[CcdGeometry], idx: _Index, pivot: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix and target (m_ref - m_inst + 2.5 log10 gain) of the usable stars."""
    k_of = {c.name: k for k, c in enumerate(ccds)}
    n = len(stars)
    a = np.zeros((n, idx.size))
    target = np.empty(n)
    for i, row in enumerate(stars):
        k = k_of[str(row["ccd"])]
        key = (str(row["ccd"]), int(row["amp"]))
        u_ = float(row["y"]) / ccds[k].ny - 0.5
        a[i, 0] = float(row["colour"]) - pivot
        a[i, 1] = 1.0
        a[i, idx.ccd_offset(k)] = 1.0
        a[i, idx.amp_off(key)] = 1.0
        a[i, idx.ccd_slope(k)] = u_
        a[i, idx.amp_slope(key)] = u_
        target[i] = (float(row["m_ref"]) - float(row["m_inst"])
                     + 2.5 * math.log10(ccds[k].gain))
    return a, target


def _solve(a: np.ndarray, target: np.ndarray, sigma: np.ndarray, prior: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """MAP estimate and posterior covariance of the ridge-regularised weighted fit."""
    w = sigma ** -2
    normal = (a.T * w) @ a + np.diag(prior)
    rhs = (a.T * w) @ target
    cov = np.linalg.inv(normal)
    return cov @ rhs, cov


def _iterate(a, target, sigma, prior, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                             float]:
    """Fit with iterative robust clipping; returns params, cov, kept mask, error scale."""
    keep = np.ones(target.size, bool)
    for _ in range(10):
        if not keep.any():
            params, cov = _solve(a[:0], target[:0], sigma[:0], prior)
            return params, cov, keep, 1.0
        params, cov = _solve(a[keep], target[keep], sigma[keep], prior)
        z = (target - a @ params) / sigma
        scale = max(1.0, 1.4826 * float(np.median(np.abs(z[keep])))) if keep.sum() > 4 else 1.0
        new_keep = np.abs(z) <= clip * scale
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return params, cov * scale ** 2, keep, scale


def _amp_rows(ccds, idx, params, cov, stars, kept, resid, settings) -> list[dict]:
    """One output row per amplifier from the fitted parameters."""
    rows = []
    for k, c in enumerate(ccds):
        for a in range(len(c.amplifiers)):
            key = (c.name, a + 1)
            g_mid = np.zeros(idx.size)
            g_mid[[1, idx.ccd_offset(k), idx.amp_off(key)]] = 1.0
            g_slope = np.zeros(idx.size)
            g_slope[[idx.ccd_slope(k), idx.amp_slope(key)]] = 1.0
            g_y0 = g_mid - 0.5 * g_slope
            on_amp = (np.asarray(stars["ccd"]) == c.name) & (np.asarray(stars["amp"]) == a + 1)
            used = on_amp & kept
            n = int(used.sum())
            flag = ZpFlag(0)
            if n == 0:
                flag |= ZpFlag.NO_STARS
            if n < settings.min_stars_amp:
                flag |= ZpFlag.FEW_STARS
            if a + 1 in c.dead_amps:
                flag |= ZpFlag.DEAD
            if not c.astrometry_ok:
                flag |= ZpFlag.NO_ASTROMETRY
            rows.append({
                "ccd": c.name, "amp": a + 1, "ny": c.ny,
                "x_start": c.amplifiers[a][0], "x_stop": c.amplifiers[a][1],
                "zp_y0": float(g_y0 @ params - 2.5 * math.log10(c.gain)),
                "zp_y0_err": float(math.sqrt(g_y0 @ cov @ g_y0)),
                "zp_slope": float(g_slope @ params),
                "zp_slope_err": float(math.sqrt(g_slope @ cov @ g_slope)),
                "colour_term": float(params[0]),
                "colour_term_err": float(math.sqrt(cov[0, 0])),
                "n_stars": n,
                "rms": float(np.sqrt(np.mean(resid[used] ** 2))) if n else float("nan"),
                "flag": int(flag),
            })
    return rows


def fit_zeropoints(stars: Table, ccds: Mapping[str, CcdGeometry] | list[CcdGeometry],
                   settings: ZeropointSettings) -> Table:
    """Fit the per-amplifier zero-point model (module docstring) to measured reference stars.

    Parameters
    ----------
    stars : Table
        One row per usable star: ``ccd``, ``amp`` (1-based), ``y`` (0-based row), ``m_inst``
        and ``m_inst_err`` (instrumental mag, -2.5 log10 ADU), ``m_ref`` and ``m_ref_err``
        (AB mag in the band), ``colour`` ((V - I)_AB). Stars on CCDs whose
        ``astrometry_ok`` is false are ignored.
    ccds : mapping or list of CcdGeometry
        The CCDs to report, with their rows, amplifiers and gains.
    settings : ZeropointSettings
        Priors, error floor, clipping and colour pivot.

    Returns
    -------
    Table
        One row per CCD and amplifier: ``zp_y0`` and ``zp_slope`` (mag; zp(y) = zp_y0 +
        zp_slope * y / ny, AB mag giving 1 ADU for a star of the pivot colour), their errors,
        the exposure's ``colour_term`` and its error, ``n_stars`` used, ``rms`` of their
        residuals (mag) and ``flag`` (:class:`ZpFlag`). ``meta`` holds the exposure-level
        numbers (colour pivot, stars used and rejected, error scale).
    """
    geoms = list(ccds.values()) if isinstance(ccds, Mapping) else list(ccds)
    if not geoms:
        raise ValueError("fit_zeropoints needs at least one CCD")
    required = ("ccd", "amp", "y", "m_inst", "m_inst_err", "m_ref", "m_ref_err", "colour")
    missing = [c for c in required if c not in stars.colnames]
    if missing:
        raise ValueError(f"stars table lacks column {missing[0]!r} (required: {required})")
    usable_ccds = {c.name for c in geoms if c.astrometry_ok}
    sel = np.isin(np.asarray(stars["ccd"]).astype(str), list(usable_ccds))
    for col in ("y", "m_inst", "m_inst_err", "m_ref", "m_ref_err", "colour"):
        sel &= np.isfinite(np.asarray(stars[col], dtype=float))
    used = stars[sel]
    idx = _index(geoms)
    unknown = [(str(c), int(a)) for c, a in zip(used["ccd"], used["amp"])
               if (str(c), int(a)) not in idx.amp_offset]
    if unknown:
        raise ValueError(f"star on unknown CCD/amplifier {unknown[0]} (amplifiers are 1-based)")
    if len(used) == 0:
        raise ValueError("no usable reference star on any CCD: the exposure zero point is "
                         "undetermined")
    a, target = _design(used, geoms, idx, settings.colour_pivot)
    sigma = np.sqrt(np.asarray(used["m_inst_err"], float) ** 2
                    + np.asarray(used["m_ref_err"], float) ** 2 + settings.error_floor_mag ** 2)
    prior = _prior_precision(geoms, idx, settings)
    params, cov, kept, scale = _iterate(a, target, sigma, prior, settings.clip_sigma)
    resid = target - a @ params
    out = Table(rows=_amp_rows(geoms, idx, params, cov, used, kept, resid, settings))
    _describe(out)
    out.meta.update({"colour": "V-I", "colour_pivot": settings.colour_pivot,
                     "n_stars_used": int(kept.sum()), "n_stars_clipped": int((~kept).sum()),
                     "error_scale": scale, "model": MODEL_DESCRIPTION})
    return out


def _describe(t: Table) -> None:
    """Units and descriptions of the zero-point table columns."""
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
    if str(path) == "":
        return np.zeros(shape, bool)
    try:
        with fits.open(path) as hdul:
            data = np.asarray(hdul[ccd].data)
    except FileNotFoundError:
        raise InputError(path, "mask file does not exist") from None
    except OSError as exc:
        raise InputError(path, f"not a readable FITS mask ({exc})") from None
    except KeyError:
        raise InputError(path, f"extension {ccd!r} is missing (expected a mask per CCD)",
                         hdu=ccd) from None
    if data.shape != shape:
        raise InputError(path, f"extension {ccd!r}: mask shape {data.shape} does not match the "
                         f"exposure ({shape})", hdu=ccd)
    return (data.astype(np.int64) & DR1_BAD_BITS) != 0


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


def _ccd_stars(data, bad, w, ref, mags, ccd, settings) -> tuple[Table, dict[str, float]]:
    """Forced photometry of the reference stars that fall on one CCD, with their catalog data."""
    ny, nx = data.shape
    ra, dec = np.asarray(ref["ra"], float), np.asarray(ref["dec"], float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # The linear WCS first, so that the iterative SIP inversion only sees nearby stars.
        lx, ly = w.wcs_world2pix(ra, dec, 0)
        margin = _SIP_MARGIN_FRACTION * max(nx, ny)
        cand = np.flatnonzero(np.isfinite(lx) & np.isfinite(ly) & (lx > -margin)
                              & (lx < nx + margin) & (ly > -margin) & (ly < ny + margin))
        x, y = w.all_world2pix(ra[cand], dec[cand], 0, quiet=True)
    on = np.isfinite(x) & np.isfinite(y) & (x > -5) & (x < nx + 5) & (y > -5) & (y < ny + 5)
    near = cand[on]
    table, info = measure_stars(data, bad, x[on], y[on], gain=ccd.gain,
                                saturation=ccd.saturation, settings=settings)
    table["ccd"] = ccd.name
    table["amp"] = _amp_of(x[on], ccd.amplifiers)
    table["m_ref"] = mags["mag"][near]
    table["m_ref_err"] = mags["err"][near]
    table["colour"] = mags["colour"][near]
    return table, info


def _amp_of(x: np.ndarray, amplifiers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """1-based amplifier number of each column position."""
    out = np.zeros(x.size, int)
    for i, (start, stop) in enumerate(amplifiers):
        out[(x >= start - 0.5) & (x < stop - 0.5)] = i + 1
    return out


def _dead_amps(bad: np.ndarray, amplifiers) -> tuple[int, ...]:
    """Amplifiers whose every pixel is bad."""
    return tuple(i + 1 for i, (s, e) in enumerate(amplifiers) if bad[:, s:e].all())


def measure_exposure(exposure: Path, mask: Path | str, wcs: Path, gaia_xp: Path,
                     settings: ZeropointSettings) -> tuple[Table, list[CcdGeometry], dict]:
    """Reference-star photometry of one exposure, ready for :func:`fit_zeropoints`.

    Returns every reference star that falls on a CCD with working astrometry (columns of
    :func:`measure_stars` plus ``ccd``, ``amp``, ``m_ref``, ``m_ref_err``, ``colour``, and
    ``m_inst``, ``m_inst_err`` after the exposure's aperture correction, ``use``), the CCD
    geometries and a dict of exposure-level numbers (band, site, tile, photometry per CCD,
    aperture correction).
    """
    info = read_exposure_header(exposure)
    refcat = read_refcat(gaia_xp, "gaia_xp")
    for col in ("ra", "dec", "v_jkc_mag", "i_jkc_mag"):
        if col not in refcat.colnames:
            raise InputError(gaia_xp, f"column {col!r} is missing (needed for positions and "
                             "the V-I colour term)", column=col)
    mags = _reference_mags(refcat, info.band)
    geoms, tables, phot = [], [], {}
    for name in CCD_NAMES:
        ccd = info.ccd(name)
        data, _ = read_ccd(exposure, name)
        bad = read_mask_ccd(mask, name, data.shape)
        header, ast_ok = read_wcs_ccd(wcs, name)
        geoms.append(CcdGeometry(name=name, ny=data.shape[0], amplifiers=ccd.amplifiers,
                                 gain=ccd.gain, dead_amps=_dead_amps(bad, ccd.amplifiers),
                                 astrometry_ok=ast_ok))
        if ast_ok:
            table, phot[name] = _ccd_stars(data, bad, celestial_wcs(header, wcs, name),
                                           refcat, mags, ccd, settings)
            tables.append(table)
    stars = vstack(tables) if tables else Table(
        names=_STAR_COLUMNS, dtype=(float,) * 6 + (int, bool, "U2", int) + (float,) * 3)
    apcorr, n_apcorr = aperture_correction(stars)
    usable_big = (np.asarray(stars["cut"]) == 0) & np.asarray(stars["big_ok"], bool)
    if not math.isfinite(apcorr) and not usable_big.any():
        # Too crowded or too sparse for a curve of growth: take the configured correction
        # rather than lose the exposure; the zero point then carries its (small) error.
        apcorr = settings.fallback_aperture_correction
        logger.warning("%s: no clean star measures the aperture correction; using %.4f",
                       Path(exposure).name, apcorr)
    stars["m_inst"], stars["m_inst_err"] = instrumental_mags(stars, apcorr)
    stars["use"] = ((np.asarray(stars["cut"]) == 0) & np.isfinite(stars["m_inst"])
                    & np.isfinite(stars["m_ref"]) & np.isfinite(stars["colour"])
                    & (np.asarray(stars["m_ref_err"]) <= settings.max_ref_err_mag))
    meta = {"exposure": Path(exposure).name, "band": info.band, "site": info.site,
            "tile": info.tile, "photometry": phot, "apcorr": apcorr, "n_apcorr": n_apcorr}
    return stars, geoms, meta


def run_zeropoint(exposure: Path, mask: Path | str, wcs: Path, gaia_xp: Path, out_path: Path,
                  settings: ZeropointSettings) -> None:
    """Measure the Gaia XP stars of one exposure, fit the zero points, write them as ECSV.

    Reads the raw exposure, its bad-pixel mask (``""`` for none), its fitted WCS file
    (``layout.wcs_path``) and the Gaia XP catalog; writes ``out_path``
    (``layout.zeropoint_path``) atomically: one row per CCD and amplifier (see
    :func:`fit_zeropoints`), ``meta`` with band, site, model, colour pivot, aperture
    correction and per-CCD photometry numbers.
    """
    stars, geoms, meta = measure_exposure(exposure, mask, wcs, gaia_xp, settings)
    try:
        result = fit_zeropoints(stars[np.asarray(stars["use"], bool)], geoms, settings)
    except ValueError as exc:
        raise InputError(exposure, f"zero-point fit failed: {exc}") from None
    result.meta.update(meta)
    result.meta.update({"zp_target": REFERENCE_ZEROPOINT, "settings": asdict(settings),
                        "software": f"ks4release {__version__}"})
    with atomic_path(out_path) as tmp:
        result.write(tmp, format="ascii.ecsv")
