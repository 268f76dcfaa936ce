"""Astrometry per exposure and CCD against Gaia DR3, with DR1's 64-sub-section quality check.

Steps (per exposure; DR1 used SCAMP with the ``.ahead`` distortion models as priors):

1. Place the detections on the tangent plane with each CCD's approximate header WCS (plain
   TAN; a pointing error of 1-2 arcsec, unmodelled distortion of up to ~10 arcsec) plus the
   prior radial distortion of the ``.ahead`` models (``prior_radial_cubic_deg``, scaled to the
   camera by ``CAMSCALE``; DR1 gave SCAMP the ``.ahead`` models as priors).
2. Find the exposure's offset by voting of detection - Gaia pair offsets pooled over the CCDs
   (:func:`~ks4release.reduction.astrometry_match.offset_search`, +-``max_offset_arcsec``),
   then match nearest neighbours within ``initial_match_radius_arcsec``.
3. Fit one focal-plane model to the matches of all CCDs that share a tangent point in their
   headers (:mod:`~ks4release.reduction.astrometry_fit`): the prior distortion, an affine map
   and polynomial corrections up to degree ``sip_degree`` about the optical axis (as many
   terms as ``min_stars_per_term`` allows), i.e. a TAN-SIP WCS per CCD. A scaled 576 x 576
   demo chip at b = -54 deg holds only ~5-10 usable Gaia stars; the shared model fits ~25 per
   exposure. CCDs whose headers do not share a tangent point are fitted one by one.
4. Iterate ``n_iterations`` times: re-match within ``match_radius_arcsec`` with the current
   model, clip residuals beyond ``clip_sigma`` robust sigmas, each residual in units of its own
   expected error (detection, Gaia, epoch and ``position_floor_arcsec``), refit (the polynomial
   degree drops when there are too few stars for it). Detection errors are those of the
   windowed centroids (ERRX2WIN, :mod:`.detect`).
5. Quality check of every CCD (DR1: 64 sub-sections, at least 62 good). The chip is cut into
   ``subsection_side`` x ``subsection_side`` sub-sections (:func:`subsection_index`). Expected
   stars are Gaia stars with ``qa_mag_range[0] <= G <= qa_mag_range[1]`` that the fitted WCS
   puts on the chip at least ``edge_margin_px`` from its edge, with no brighter Gaia star
   within ``isolation_arcsec`` (its halo or bleed trail swallows them) and, when a bad-pixel
   mask is given, not within ``edge_margin_px`` of a masked pixel (without a mask, a dead
   amplifier makes its sub-sections fail). A sub-section is **good** when

   * it has no expected star (nothing to test: with ~15 Gaia stars per demo chip most
     sub-sections are empty, and an empty one says nothing against the solution), or
   * its match rate (expected stars matched within ``match_radius_arcsec`` / expected stars)
     is not significantly below ``min_match_rate`` (:func:`rate_too_low`: a binomial
     probability of so few matches below ``qa_significance``) **and** the RMS per axis of its
     matched residuals,
     ``sqrt(mean((dra*cos(dec))^2 + ddec^2) / 2)``, is at most ``max_subsection_rms_arcsec``.
     The RMS counts the matches whose residual measures the solution rather than the star:
     detections of S/N at least ``qa_min_snr`` that were not deblended (a faint star's own
     noise, or a blend's pull, would decide a sub-section holding one or two stars).

   A chip passes with at least ``min_good_subsections`` good sub-sections, a match rate over
   the whole chip not significantly below ``min_match_rate`` (the same test; many sub-sections
   of one or two unmatched stars are each insignificant, together not), and at least
   ``min_matches`` matched stars (our guard against a chip without usable data, since empty
   sub-sections count as good). Chips that fail are refitted out of the shared model (so a
   bad chip cannot pull the others), logged with their reason, and flagged for exclusion from
   the co-add.

Gaia positions are at epoch 2016.0. DR1 did not propagate them to the exposure epoch; by default
we do (``propagate_proper_motion``, with :func:`ks4release.refcat.propagate_positions`), because
KS4's exposures are 4-8 years later and the fit otherwise pulls the WCS towards where the stars
were. Either way each Gaia star's weight counts what the epoch difference adds to its position
error (:func:`ks4release.refcat.epoch_position_error`): the proper-motion error times the years
when propagated, the unapplied motion itself when not.

Output (``ks4release.layout.wcs_path``): an empty primary HDU (exposure, MJD, settings summary)
and one header-only image HDU per CCD (``EXTNAME`` = CCD) with the fitted TAN-SIP WCS (CD
matrix, forward A/B and inverse AP/BP) and the QA cards of :data:`QA_CARDS`.
:func:`read_fitted_wcs` reads it back for the later stages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from scipy.ndimage import maximum_filter
from scipy.spatial import cKDTree
from scipy.stats import binom

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.camera import PIXEL_SCALE_ARCSEC
from ks4release.errors import InputError
from ks4release.exposure import read_exposure_header
from ks4release.projection import gnomonic, tan_wcs_header
from ks4release.reduction.astrometry_fit import (
    FocalPlaneModel,
    fit_focal_plane,
    model_wcs,
    poly_terms,
)
from ks4release.reduction.astrometry_match import (
    match_nearest,
    offset_search,
    subsection_index,
)
from ks4release.reduction.detect import read_mask
from ks4release.refcat.formats import read_refcat
from ks4release.refcat.propagate import (
    column_values,
    epoch_position_error,
    propagate_positions,
)
from ks4release.settings import AstrometrySettings

__all__ = [
    "AstrometrySettings",
    "ChipInput",
    "ChipSolution",
    "SubsectionStats",
    "FittedWcs",
    "QA_CARDS",
    "rate_too_low",
    "subsection_stats",
    "prior_coefficient",
    "solve_exposure",
    "write_fitted_wcs",
    "read_fitted_wcs",
    "run_astrometry",
]

logger = logging.getLogger(__name__)

#: Column added to the Gaia table by :func:`_load_gaia`: per-axis error (mas) from the epoch
#: difference (:func:`~ks4release.refcat.propagate.epoch_position_error`).
EPOCH_ERROR_COLUMN = "epoch_error"

#: QA keywords of each CCD extension and their comments.
QA_CARDS = {
    "ASTNMAT": "Gaia stars matched and kept in the fit",
    "ASTRMSRA": "[arcsec] RMS dRA*cos(Dec) vs Gaia; -1 = none",
    "ASTRMSDE": "[arcsec] RMS dDec vs Gaia; -1 = none",
    "ASTNGOOD": "good sub-sections (of ASTNSUB)",
    "ASTNSUB": "sub-sections of the quality check",
    "ASTNEXP": "Gaia stars expected on the chip (QA range)",
    "ASTDEG": "degree of the fitted polynomial",
    "ASTOK": "T = passed the quality check",
    "ASTREASN": "why the chip failed",
}
# Cards of the fitted WCS in an output extension (the rest is structure and QA).
_WCS_KEYS = {"CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
             "CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS"}
_SIP_PREFIXES = {"A", "B", "AP", "BP"}



@dataclass(frozen=True, kw_only=True)
class ChipInput:
    """One CCD to solve: its header WCS, its detections and (optionally) its masked pixels.

    ``sources`` needs the columns x, y (0-based), x_err, y_err, flags and snr of the detect
    stage; ``bad`` is a boolean image (True = masked) or None.
    """

    name: str
    shape: tuple[int, int]
    header_wcs: WCS
    sources: Table
    bad: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class SubsectionStats:
    """Per sub-section counts, RMS (arcsec per axis; NaN when nothing matched) and verdicts."""

    n_expected: np.ndarray
    n_matched: np.ndarray
    rms_arcsec: np.ndarray
    good: np.ndarray

    @property
    def n_good(self) -> int:
        """Number of good sub-sections."""
        return int(self.good.sum())


@dataclass(frozen=True, kw_only=True)
class ChipSolution:
    """The fitted WCS of one CCD and its quality."""

    name: str
    shape: tuple[int, int]
    wcs: WCS
    ok: bool
    reason: str
    n_match: int
    rms_ra_arcsec: float
    rms_dec_arcsec: float
    n_expected: int
    degree: int
    subsections: SubsectionStats
    matches: Table = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class FittedWcs:
    """What later stages read back: the WCS, the verdict, the reason and the QA numbers."""

    wcs: WCS
    ok: bool
    reason: str
    metrics: dict[str, float]


# --------------------------------------------------------------------------------------------
# Quality check (pure)


def subsection_stats(x_exp: np.ndarray, y_exp: np.ndarray, matched: np.ndarray,
                     measured: np.ndarray, dra_arcsec: np.ndarray, ddec_arcsec: np.ndarray,
                     shape: tuple[int, int], settings: AstrometrySettings) -> SubsectionStats:
    """DR1's sub-section check for one chip (rule in the module docstring).

    ``x_exp, y_exp`` are the pixel positions of the expected Gaia stars; ``matched`` says
    which have a detection within the match radius (any detection flags), ``measured`` which
    have a residual ``dra/ddec`` that tests the solution (ignored elsewhere). A sub-section
    without a measured star passes the RMS test for lack of anything to test.
    """
    n = settings.subsection_side
    idx = subsection_index(x_exp, y_exp, shape, n)
    matched = np.asarray(matched, bool)
    measured = np.asarray(measured, bool) & matched
    n_exp = np.bincount(idx, minlength=n * n)
    n_mat = np.bincount(idx[matched], minlength=n * n)
    n_meas = np.bincount(idx[measured], minlength=n * n)
    sq = 0.5 * (np.asarray(dra_arcsec)[measured] ** 2 + np.asarray(ddec_arcsec)[measured] ** 2)
    sum_sq = np.bincount(idx[measured], weights=sq, minlength=n * n)
    rms = np.full(n * n, np.nan)
    rms[n_meas > 0] = np.sqrt(sum_sq[n_meas > 0] / n_meas[n_meas > 0])
    rate_ok = ~rate_too_low(n_mat, n_exp, settings)
    rms_ok = (n_meas == 0) | (rms <= settings.max_subsection_rms_arcsec)
    good = (n_exp == 0) | (rate_ok & rms_ok)
    return SubsectionStats(n_expected=n_exp, n_matched=n_mat, rms_arcsec=rms, good=good)


def rate_too_low(n_matched: np.ndarray, n_expected: np.ndarray, settings: AstrometrySettings
                 ) -> np.ndarray:
    """Whether ``n_matched`` of ``n_expected`` stars is significantly below ``min_match_rate``:
    a binomial probability of so few matches, at that rate, below ``qa_significance``.

    DR1 asks for an adequate match rate in each sub-section. Compared with the rate itself, one
    unmatched star (a blend, a star fainter than the exposure reaches) would fail a sub-section
    that expects one or two, as demo sub-sections do; with the many stars of a full-size
    sub-section the test is the plain threshold within a few per cent.
    """
    n_matched, n_expected = np.asarray(n_matched), np.asarray(n_expected)
    p = binom.cdf(n_matched, n_expected, settings.min_match_rate)
    return (n_expected > 0) & (p < settings.qa_significance)


def _near_masked(bad: np.ndarray | None, x: np.ndarray, y: np.ndarray, margin: float
                 ) -> np.ndarray:
    """True where a masked pixel lies within ``margin`` px (box) of (x, y)."""
    out = np.zeros(len(x), bool)
    if bad is None or not bad.any():
        return out
    ny, nx = bad.shape
    grown = maximum_filter(bad.astype(np.uint8), size=2 * int(math.ceil(margin)) + 1) > 0
    col, row = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
    out[inside] = grown[row[inside], col[inside]]
    return out


def _isolated(x: np.ndarray, y: np.ndarray, g: np.ndarray, radius_px: float) -> np.ndarray:
    """True where no brighter star lies within ``radius_px``."""
    out = np.ones(len(x), bool)
    if len(x) < 2:
        return out
    tree = cKDTree(np.column_stack([x, y]))
    for i, j in tree.query_pairs(radius_px, output_type="ndarray"):
        if g[i] < g[j]:
            out[j] = False
        elif g[j] < g[i]:
            out[i] = False
    return out


# --------------------------------------------------------------------------------------------
# The solver


@dataclass
class _Chip:
    """Working state of one chip during the fit."""

    inp: ChipInput
    crpix: tuple[float, float]
    det: Table
    ref_idx: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    dist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    failed: bool = False
    note: str = ""

    def uv(self) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane coordinates of the usable detections."""
        return (np.asarray(self.det["x"], float) + 1.0 - self.crpix[0],
                np.asarray(self.det["y"], float) + 1.0 - self.crpix[1])


@dataclass(frozen=True)
class _Context:
    """What every step of one group's fit needs."""

    gaia: dict[str, np.ndarray]
    settings: AstrometrySettings
    pixel_scale: float
    scale: float
    prior_k: float


def _tangent_key(w: WCS) -> tuple:
    """Chips whose headers share CRVAL and the linear matrix share a focal-plane model."""
    return tuple(np.round(np.concatenate([w.wcs.crval, w.pixel_scale_matrix.ravel()]), 10))


def _usable_detections(sources: Table, settings: AstrometrySettings) -> Table:
    keep = ((np.asarray(sources["flags"]).astype(np.int64) & settings.bad_flags) == 0) & (
        np.asarray(sources["snr"], float) >= settings.min_snr) & np.isfinite(
        np.asarray(sources["x"], float))
    return sources[keep]


def _header_model(w: WCS, prior_k: float) -> FocalPlaneModel:
    """The header WCS (CRVAL, CD) with the prior distortion, as a degree-1 model."""
    cd = w.pixel_scale_matrix
    return FocalPlaneModel(crval=(float(w.wcs.crval[0]), float(w.wcs.crval[1])), degree=1,
                           scale=1.0, prior_k=prior_k, coeff_xi=np.array([0.0, *cd[0]]),
                           coeff_eta=np.array([0.0, *cd[1]]))


def _chip_refs(inp: ChipInput, crpix: tuple[float, float], model: FocalPlaneModel,
               ref_xi: np.ndarray, ref_eta: np.ndarray, ctx: _Context) -> np.ndarray:
    """Indices of the Gaia stars within ``max_offset`` of the chip (header model, arcsec)."""
    ny, nx = inp.shape
    t = np.linspace(-0.5, 1.0, 16)
    ex = np.concatenate([t * nx, t * nx, np.full(16, -0.5), np.full(16, nx - 0.5)])
    ey = np.concatenate([np.full(16, -0.5), np.full(16, ny - 0.5), t * ny, t * ny])
    xi, eta = model.standard(ex + 1.0 - crpix[0], ey + 1.0 - crpix[1])
    m = ctx.settings.max_offset_arcsec + ctx.settings.initial_match_radius_arcsec
    inside = ((ref_xi >= xi.min() * 3600.0 - m) & (ref_xi <= xi.max() * 3600.0 + m)
              & (ref_eta >= eta.min() * 3600.0 - m) & (ref_eta <= eta.max() * 3600.0 + m)
              & (ctx.gaia["g"] <= ctx.settings.ref_mag_limit))
    return np.flatnonzero(inside)


def _initial_pairs(chips: list[_Chip], model: FocalPlaneModel, ctx: _Context) -> None:
    """Pooled offset search over the group's chips, then a first nearest-neighbour match."""
    s = ctx.settings
    ref_xi, ref_eta = gnomonic(model.crval[0], model.crval[1], ctx.gaia["ra"], ctx.gaia["dec"])
    ref_xi, ref_eta = ref_xi * 3600.0, ref_eta * 3600.0
    det_tp = []
    for chip in chips:
        chip.ref_idx = _chip_refs(chip.inp, chip.crpix, model, ref_xi, ref_eta, ctx)
        xi, eta = model.standard(*chip.uv())
        det_tp.append((xi * 3600.0, eta * 3600.0))
    union = np.unique(np.concatenate([c.ref_idx for c in chips]))
    off = offset_search(np.concatenate([d[0] for d in det_tp]),
                        np.concatenate([d[1] for d in det_tp]), ref_xi[union], ref_eta[union],
                        max_offset=s.max_offset_arcsec, bin_size=s.offset_bin_arcsec)
    if off.votes < 3:
        for chip in chips:
            chip.note = f"no offset found ({off.votes} votes)"
        return
    for chip, (xi, eta) in zip(chips, det_tp, strict=True):
        ref = chip.ref_idx
        i_det, i_ref, dist = match_nearest(xi, eta, ref_xi[ref] + off.dx, ref_eta[ref] + off.dy,
                                           s.initial_match_radius_arcsec)
        chip.pairs, chip.dist, chip.kept = (i_det, i_ref), dist, np.ones(i_det.size, bool)


def _weights(chip: _Chip, i_det: np.ndarray, ref_err_arcsec: np.ndarray, ctx: _Context
             ) -> np.ndarray:
    det = chip.det
    sx = np.hypot(np.asarray(det["x_err"], float)[i_det], np.asarray(det["y_err"], float)[i_det])
    var = (sx * ctx.pixel_scale / math.sqrt(2.0)) ** 2 + ref_err_arcsec**2 \
        + ctx.settings.position_floor_arcsec**2
    return 1.0 / var


def _degree_for(n_pairs: int, settings: AstrometrySettings) -> int:
    """Highest degree <= sip_degree with at least ``min_stars_per_term`` stars per term."""
    degree = settings.sip_degree
    while degree > 1 and n_pairs < settings.min_stars_per_term * len(poly_terms(degree)):
        degree -= 1
    return degree


def _fit(chips: list[_Chip], crval: tuple[float, float], ctx: _Context
         ) -> FocalPlaneModel | None:
    """Fit the shared model to the kept pairs of the chips that have not failed."""
    gaia = ctx.gaia
    u, v, ra, dec, w = [], [], [], [], []
    for chip in chips:
        if chip.failed or chip.kept.sum() == 0:
            continue
        i_det, i_ref = chip.pairs[0][chip.kept], chip.pairs[1][chip.kept]
        ref = chip.ref_idx[i_ref]
        cu, cv = chip.uv()
        u.append(cu[i_det])
        v.append(cv[i_det])
        ra.append(gaia["ra"][ref])
        dec.append(gaia["dec"][ref])
        w.append(_weights(chip, i_det, gaia["err"][ref], ctx))
    n = sum(x.size for x in u)
    if n < len(poly_terms(1)) + 1:
        return None
    return fit_focal_plane(np.concatenate(u), np.concatenate(v), np.concatenate(ra),
                           np.concatenate(dec), np.concatenate(w),
                           degree=_degree_for(n, ctx.settings), crval=crval, scale=ctx.scale,
                           prior_k=ctx.prior_k)


def _rematch(chip: _Chip, model: FocalPlaneModel, ctx: _Context) -> None:
    """Match one chip's detections to its Gaia stars with the model (tangent plane, arcsec)."""
    xi_d, eta_d = model.standard(*chip.uv())
    ref = chip.ref_idx
    xi_r, eta_r = gnomonic(model.crval[0], model.crval[1], ctx.gaia["ra"][ref],
                           ctx.gaia["dec"][ref])
    i_det, i_ref, dist = match_nearest(xi_d * 3600.0, eta_d * 3600.0, xi_r * 3600.0,
                                       eta_r * 3600.0, ctx.settings.match_radius_arcsec)
    chip.pairs, chip.dist, chip.kept = (i_det, i_ref), dist, np.ones(i_det.size, bool)


def _clip(chips: list[_Chip], ctx: _Context) -> None:
    """Reject pairs beyond ``clip_sigma`` robust sigmas of the group's normalised separations.

    Each separation is divided by its pair's expected error per axis (detection, Gaia and the
    floor: :func:`_weights`), so a faint star is judged by its own noise, not by the bright
    stars' (one sigma in arcsec clipped ~20% of the matches, nearly all faint, on a demo
    exposure). The scale of the normalised separations, ``sqrt(median(z^2) / (2 ln 2))`` for a
    2-D Gaussian, is one for the group, because a demo chip holds too few stars for its own;
    it absorbs errors that are right in shape but too small, and is never below 1: the bright
    stars, whose errors the floor dominates, would otherwise pull it down and clip the faint.
    """
    live = [c for c in chips if not c.failed and c.dist.size]
    if not live:
        return
    z = [c.dist * np.sqrt(_weights(c, c.pairs[0], ctx.gaia["err"][c.ref_idx[c.pairs[1]]], ctx))
         for c in live]
    scale = max(math.sqrt(np.median(np.concatenate(z) ** 2) / (2.0 * math.log(2.0))), 1.0)
    for chip, zc in zip(live, z, strict=True):
        chip.kept = zc <= ctx.settings.clip_sigma * scale


def _iterate(chips: list[_Chip], crval: tuple[float, float], ctx: _Context, n_iterations: int
             ) -> FocalPlaneModel | None:
    """Fit, re-match and clip ``n_iterations`` times; return the last model."""
    model = _fit(chips, crval, ctx)
    for _ in range(n_iterations):
        if model is None:
            return None
        for chip in chips:
            _rematch(chip, model, ctx)
        _clip(chips, ctx)
        model = _fit(chips, model.crval, ctx)
    return model


def _residuals(chip: _Chip, model: FocalPlaneModel, gaia: dict[str, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(dRA cos Dec, dDec) in arcsec, detection minus Gaia, of every pair of the chip."""
    i_det, i_ref = chip.pairs
    u, v = chip.uv()
    ra_d, dec_d = model.sky(u[i_det], v[i_det])
    ref = chip.ref_idx[i_ref]
    dra = ((ra_d - gaia["ra"][ref] + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec_d))
    return dra * 3600.0, (dec_d - gaia["dec"][ref]) * 3600.0


def _matches_table(chip: _Chip, dra: np.ndarray, ddec: np.ndarray,
                   gaia: dict[str, np.ndarray]) -> Table:
    """Every match of the chip: pixel position, Gaia row and G, residuals, kept in the fit."""
    i_det, i_ref = chip.pairs
    return Table({"x": np.asarray(chip.det["x"], float)[i_det],
                  "y": np.asarray(chip.det["y"], float)[i_det],
                  "gaia_index": chip.ref_idx[i_ref], "g_mag": gaia["g"][chip.ref_idx[i_ref]],
                  "dra_arcsec": dra, "ddec_arcsec": ddec, "kept": chip.kept.copy()})


def _matched_by_any(chip: _Chip, model: FocalPlaneModel, ctx: _Context) -> np.ndarray:
    """Which of the chip's Gaia stars have a detection, flagged or not, within the radius."""
    src = chip.inp.sources
    u = np.asarray(src["x"], float) + 1.0 - chip.crpix[0]
    v = np.asarray(src["y"], float) + 1.0 - chip.crpix[1]
    ok = np.isfinite(u) & np.isfinite(v)
    xi_d, eta_d = model.standard(u[ok], v[ok])
    ref = chip.ref_idx
    xi_r, eta_r = gnomonic(model.crval[0], model.crval[1], ctx.gaia["ra"][ref],
                           ctx.gaia["dec"][ref])
    i_ref, _, _ = match_nearest(xi_r * 3600.0, eta_r * 3600.0, xi_d * 3600.0, eta_d * 3600.0,
                                ctx.settings.match_radius_arcsec)
    out = np.zeros(ref.size, bool)
    out[i_ref] = True
    return out


def _tests_solution(detections: Table, settings: AstrometrySettings) -> np.ndarray:
    """Which matched detections have residuals that measure the solution, not themselves:
    S/N at least ``qa_min_snr`` and not deblended (FLAGS bit 2; a blend's centroid is pulled
    by its neighbour, by ~0.1-0.3 arcsec on the 8x-density demo survey)."""
    return ((np.asarray(detections["snr"], float) >= settings.qa_min_snr)
            & ((np.asarray(detections["flags"]).astype(np.int64) & 2) == 0))


def _assess(chip: _Chip, model: FocalPlaneModel, ctx: _Context) -> ChipSolution:
    """The chip's WCS from the model, and DR1's quality check on it."""
    inp, gaia, settings = chip.inp, ctx.gaia, ctx.settings
    wcs = model_wcs(model, chip.crpix, inp.shape)
    dra, ddec = _residuals(chip, model, gaia)
    ref = chip.ref_idx
    g = gaia["g"][ref]
    x, y = wcs.all_world2pix(gaia["ra"][ref], gaia["dec"][ref], 0, tolerance=1e-6, maxiter=50,
                             quiet=True)
    ny, nx = inp.shape
    m = settings.edge_margin_px
    expected = ((g >= settings.qa_mag_range[0]) & (g <= settings.qa_mag_range[1])
                & (x >= m - 0.5) & (x <= nx - 0.5 - m) & (y >= m - 0.5) & (y <= ny - 0.5 - m))
    expected &= ~_near_masked(inp.bad, x, y, m)
    expected &= _isolated(x, y, g, settings.isolation_arcsec / ctx.pixel_scale)
    i_det, i_ref = chip.pairs
    paired, measured = np.zeros(ref.size, bool), np.zeros(ref.size, bool)
    res_ra, res_dec = np.zeros(ref.size), np.zeros(ref.size)
    paired[i_ref] = True
    measured[i_ref[_tests_solution(chip.det[i_det], settings)]] = True
    res_ra[i_ref], res_dec[i_ref] = dra, ddec
    matched = paired | _matched_by_any(chip, model, ctx)
    exp = np.flatnonzero(expected)
    sub = subsection_stats(x[exp], y[exp], matched[exp], measured[exp], res_ra[exp],
                           res_dec[exp], inp.shape, settings)
    kept = chip.kept
    n_match = int(kept.sum())
    rms_ra = float(np.sqrt(np.mean(dra[kept] ** 2))) if n_match else float("nan")
    rms_dec = float(np.sqrt(np.mean(ddec[kept] ** 2))) if n_match else float("nan")
    reason = _verdict(chip, sub, n_match, settings)
    return ChipSolution(name=inp.name, shape=inp.shape, wcs=wcs, ok=not reason, reason=reason,
                        n_match=n_match, rms_ra_arcsec=rms_ra, rms_dec_arcsec=rms_dec,
                        n_expected=int(exp.size), degree=model.degree, subsections=sub,
                        matches=_matches_table(chip, dra, ddec, gaia))


def _verdict(chip: _Chip, sub: SubsectionStats, n_match: int,
             settings: AstrometrySettings) -> str:
    """'' when the chip passes, else a short reason (the sub-section check first)."""
    n_sub = settings.subsection_side**2
    if sub.n_good < settings.min_good_subsections:
        tested = sub.n_expected > 0
        low_rate = int(rate_too_low(sub.n_matched, sub.n_expected, settings).sum())
        high_rms = int((tested & (sub.n_matched > 0)
                        & (sub.rms_arcsec > settings.max_subsection_rms_arcsec)).sum())
        return (f"{sub.n_good}/{n_sub} good sub-sections (need {settings.min_good_subsections})"
                f"; {low_rate} low rate, {high_rms} high RMS")
    n_exp, n_mat = int(sub.n_expected.sum()), int(sub.n_matched.sum())
    if rate_too_low(n_mat, n_exp, settings):
        return (f"{n_mat} of {n_exp} expected Gaia stars matched, significantly below the rate "
                f"{settings.min_match_rate:g}")
    if n_match < settings.min_matches:
        extra = f"; {chip.note}" if chip.note else ""
        return f"only {n_match} Gaia matches (need >= {settings.min_matches}){extra}"
    return ""


def _failed_solution(chip: _Chip, reason: str, settings: AstrometrySettings) -> ChipSolution:
    """A chip without a fit: its header WCS, no matches, and the reason."""
    n = settings.subsection_side**2
    empty = SubsectionStats(n_expected=np.zeros(n, int), n_matched=np.zeros(n, int),
                            rms_arcsec=np.full(n, np.nan), good=np.zeros(n, bool))
    chip.pairs, chip.kept = (np.zeros(0, np.int64), np.zeros(0, np.int64)), np.zeros(0, bool)
    return ChipSolution(name=chip.inp.name, shape=chip.inp.shape, wcs=chip.inp.header_wcs,
                        ok=False, reason=reason, n_match=0, rms_ra_arcsec=float("nan"),
                        rms_dec_arcsec=float("nan"), n_expected=0, degree=0, subsections=empty,
                        matches=_matches_table(chip, np.zeros(0), np.zeros(0),
                                               {"g": np.zeros(0)}))


def _solve_group(inputs: list[ChipInput], gaia: dict[str, np.ndarray],
                 settings: AstrometrySettings, pixel_scale: float, prior_k: float
                 ) -> list[ChipSolution]:
    """Solve chips that share a tangent point with one focal-plane model."""
    chips, scale = [], 1.0
    for inp in inputs:
        crpix = (float(inp.header_wcs.wcs.crpix[0]), float(inp.header_wcs.wcs.crpix[1]))
        ny, nx = inp.shape
        scale = max(scale, abs(0.5 - crpix[0]), abs(nx + 0.5 - crpix[0]),
                    abs(0.5 - crpix[1]), abs(ny + 0.5 - crpix[1]))
        chips.append(_Chip(inp=inp, crpix=crpix, det=_usable_detections(inp.sources, settings),
                           ref_idx=np.zeros(0, np.int64)))
    ctx = _Context(gaia=gaia, settings=settings, pixel_scale=pixel_scale, scale=scale,
                   prior_k=prior_k)
    start = _header_model(inputs[0].header_wcs, prior_k)
    _initial_pairs(chips, start, ctx)
    model = _iterate(chips, start.crval, ctx, settings.n_iterations)
    if model is None:
        return [_failed_solution(c, c.note or "too few Gaia matches to fit a model", settings)
                for c in chips]
    solutions = [_assess(c, model, ctx) for c in chips]
    bad = [c for c, s in zip(chips, solutions, strict=True) if not s.ok]
    if bad and len(bad) < len(chips):
        for chip in bad:
            chip.failed = True
        refit = _iterate(chips, model.crval, ctx, 2)
        if refit is not None:
            for chip in bad:
                chip.failed = False
                _rematch(chip, refit, ctx)
            _clip(chips, ctx)
            solutions = [_assess(c, refit, ctx) for c in chips]
    return solutions


def _gaia_arrays(gaia: Table) -> dict[str, np.ndarray]:
    """Plain arrays of the Gaia columns the solver uses (position error per axis in arcsec,
    including :data:`EPOCH_ERROR_COLUMN` when present)."""
    def values(name: str, fill: float) -> np.ndarray:
        return np.nan_to_num(column_values(gaia, name, fill), nan=fill)

    err_mas = np.hypot(np.hypot(values("ra_error", 0.0), values("dec_error", 0.0)) / math.sqrt(2.0),
                       values(EPOCH_ERROR_COLUMN, 0.0))
    return {"ra": values("ra", np.nan), "dec": values("dec", np.nan),
            "g": values("phot_g_mean_mag", 99.0), "err": err_mas / 1000.0}


def prior_coefficient(settings: AstrometrySettings, camera_scale: float,
                      pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> float:
    """SIP coefficient ``k`` (pixel^-2) of the prior radial distortion for a camera scale.

    ``d(xi) = c xi r^2`` (degrees) becomes ``du = c p^2 u r^2`` in pixels of ``p`` degrees; a
    camera shrunk by ``s`` keeps the displacement at the same fractional field position
    ``s`` times smaller, hence ``k = c p^2 / s^2``.
    """
    p = pixel_scale_arcsec / 3600.0
    return settings.prior_radial_cubic_deg * p**2 / camera_scale**2


def solve_exposure(chips: list[ChipInput], gaia: Table, settings: AstrometrySettings, *,
                   camera_scale: float = 1.0,
                   pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> dict[str, ChipSolution]:
    """Fit the WCS of every chip of one exposure and run the quality check (pure).

    ``gaia`` holds Gaia DR3 columns (ra, dec, phot_g_mean_mag, optional ra_error/dec_error in
    mas) at the epoch to compare with. Chips whose header WCSs share CRVAL and CD are fitted
    with one focal-plane model; the others each with their own. ``camera_scale`` (CAMSCALE)
    scales the prior distortion (:func:`prior_coefficient`). Every failing chip is logged with
    its reason.
    """
    arrays = _gaia_arrays(gaia)
    prior_k = prior_coefficient(settings, camera_scale, pixel_scale_arcsec)
    groups: dict[tuple, list[ChipInput]] = {}
    for chip in chips:
        groups.setdefault(_tangent_key(chip.header_wcs), []).append(chip)
    out: dict[str, ChipSolution] = {}
    for members in groups.values():
        for solution in _solve_group(members, arrays, settings, pixel_scale_arcsec, prior_k):
            out[solution.name] = solution
            if not solution.ok:
                logger.warning("astrometry: CCD %s rejected: %s", solution.name, solution.reason)
    return {c.name: out[c.name] for c in chips}


# --------------------------------------------------------------------------------------------
# Output


def _card(header: fits.Header, key: str, value: object, comment: str) -> None:
    """Set a card, shortening the comment so that it fits on the 80-character card."""
    if isinstance(value, str):
        width = max(20, len(value.replace("'", "''")) + 2)
    else:
        width = 20
    room = 80 - 10 - width - 3
    header[key] = (value, comment[:room] if room > 0 else "")


def _qa_header(sol: ChipSolution, settings: AstrometrySettings) -> fits.Header:
    h = fits.Header()
    h["EXTNAME"] = (sol.name, "CCD name")
    h["IMAGEW"] = (sol.shape[1], "[pix] width of the CCD image (NAXIS1)")
    h["IMAGEH"] = (sol.shape[0], "[pix] height of the CCD image (NAXIS2)")
    h.extend(tan_wcs_header(sol.wcs).cards)

    def number(value: float) -> float:
        return round(float(value), 5) if math.isfinite(value) else -1.0

    values = {"ASTNMAT": sol.n_match, "ASTRMSRA": number(sol.rms_ra_arcsec),
              "ASTRMSDE": number(sol.rms_dec_arcsec), "ASTNGOOD": sol.subsections.n_good,
              "ASTNSUB": settings.subsection_side**2, "ASTNEXP": sol.n_expected,
              "ASTDEG": sol.degree, "ASTOK": bool(sol.ok), "ASTREASN": sol.reason}
    for key, value in values.items():
        _card(h, key, value, QA_CARDS[key])
    return h


def write_fitted_wcs(solutions: dict[str, ChipSolution], out_path: Path, *, exposure: str,
                     mjd: float, settings: AstrometrySettings) -> None:
    """Write the per-CCD solutions as header-only extensions (atomically)."""
    primary = fits.PrimaryHDU()
    primary.header["EXPOSURE"] = (exposure, "raw exposure file")
    primary.header["MJD-OBS"] = (mjd, "[d] MJD of the exposure start")
    primary.header["ASTREF"] = ("gaia_dr3", "astrometric reference catalog")
    primary.header["ASTPM"] = (bool(settings.propagate_proper_motion),
                               "T = Gaia moved to the exposure epoch")
    primary.header["ASTMINGD"] = (settings.min_good_subsections,
                                  "good sub-sections a CCD needs")
    primary.header["ASTMAXRM"] = (settings.max_subsection_rms_arcsec,
                                  "[arcsec] sub-section RMS threshold")
    primary.header["ASTMINMR"] = (settings.min_match_rate, "sub-section match-rate threshold")
    primary.header["ASTSIGMR"] = (settings.qa_significance,
                                  "binomial p below which a match rate is too low")
    primary.header["ASTMINSN"] = (settings.qa_min_snr, "least S/N of the matches in the RMS")
    primary.header["KS4VERS"] = (__version__, "ks4release version")
    hdus = [primary] + [fits.ImageHDU(header=_qa_header(s, settings))
                        for s in solutions.values()]
    with atomic_path(Path(out_path)) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def read_fitted_wcs(path: Path) -> dict[str, FittedWcs]:
    """The fitted WCS, verdict, reason and QA numbers of every CCD in a ``_wcs.fits`` file."""
    path = Path(path)
    out = {}
    try:
        with fits.open(path) as hdul:
            for hdu in hdul[1:]:
                h = hdu.header
                metrics = {k.lower(): float(h[k]) for k in ("ASTNMAT", "ASTRMSRA", "ASTRMSDE",
                                                            "ASTNGOOD", "ASTNSUB", "ASTNEXP",
                                                            "ASTDEG")}
                wcs = WCS(fits.Header([c for c in h.cards if c.keyword in _WCS_KEYS
                                       or c.keyword.split("_")[0] in _SIP_PREFIXES]))
                wcs.pixel_shape = (int(h["IMAGEW"]), int(h["IMAGEH"]))
                out[h["EXTNAME"]] = FittedWcs(wcs=wcs, ok=bool(h["ASTOK"]),
                                              reason=str(h["ASTREASN"]), metrics=metrics)
    except (OSError, KeyError) as exc:
        raise InputError(path, f"not a readable fitted-WCS file ({exc})") from None
    return out


def _load_gaia(gaia: Path, mjd: float, settings: AstrometrySettings) -> Table:
    """Gaia DR3 stars for an exposure taken at ``mjd``: moved to its epoch when configured,
    with the error the epoch difference adds (:data:`EPOCH_ERROR_COLUMN`)."""
    table = read_refcat(gaia, "gaia_dr3")
    epoch = float(Time(mjd, format="mjd").jyear)
    if settings.propagate_proper_motion:
        table = propagate_positions(table, epoch)
    table[EPOCH_ERROR_COLUMN] = epoch_position_error(
        table, epoch, propagated=settings.propagate_proper_motion)
    return table


def run_astrometry(exposure: Path, sources: Path, gaia: Path, out_path: Path,
                   settings: AstrometrySettings, mask: Path | str = "") -> None:
    """Solve the astrometry of one exposure and write ``out_path`` (see the module docstring).

    Reads the exposure headers (approximate WCS, chip shapes), the detections of the detect
    stage (``sources``), the Gaia DR3 reference file (``gaia``, archive column names) and,
    unless ``mask`` is ``""``, the bad-pixel mask file (one extension per CCD), which keeps
    masked areas out of the expected Gaia stars of the quality check.
    """
    exposure = Path(exposure)
    info = read_exposure_header(exposure)
    detections = Table.read(Path(sources))
    missing = [c for c in ("ccd", "x", "y", "x_err", "y_err", "flags", "snr")
               if c not in detections.colnames]
    if missing:
        raise InputError(sources, f"column {missing[0]!r} is missing (expected the detect "
                         "stage's output)", column=missing[0])
    reference = _load_gaia(Path(gaia), info.mjd, settings)
    chips = []
    ccd_col = np.asarray(detections["ccd"], dtype=str)
    with fits.open(exposure) as hdul:
        headers = {ccd.name: hdul[ccd.name].header.copy() for ccd in info.ccds}
    for ccd in info.ccds:
        bad = None
        if str(mask) != "":
            bad = (read_mask(mask, ccd.name, ccd.shape) & settings.mask_bits) != 0
        chips.append(ChipInput(name=ccd.name, shape=ccd.shape,
                               header_wcs=WCS(headers[ccd.name], naxis=2),
                               sources=detections[ccd_col == ccd.name], bad=bad))
    solutions = solve_exposure(chips, reference, settings, camera_scale=info.camera_scale)
    write_fitted_wcs(solutions, out_path, exposure=exposure.name, mjd=info.mjd,
                     settings=settings)
