"""Aggregation of linked detections into one row per source: DR1's rules (section 4.2.1).

For each band of each group of detections:

* magnitudes (MAG_AUTO and the 3, 5, 10 arcsec apertures): weighted median with weights
  ``1/sigma**2`` (interpolated between the inputs whose weight centres bracket half the total
  weight; for two detections that is their weighted mean), error ``1/sqrt(sum(1/sigma**2))``
  by error propagation;
* morphology (CLASS_STAR, ELLIPTICITY, A_IMAGE, B_IMAGE, FLUX_RADIUS, KRON_RADIUS, FLUX_MAX,
  THETA_IMAGE): from the detection with the smallest FWHM_IMAGE in that band (best seeing; ties
  go to the first row), FWHM_IMAGE itself is the mean of the detections;
* MJD: minimum of the minima, maximum of the maxima, mean of the means;
* FLAGS and IMAFLAGS_ISO: bitwise OR; SSFLAG: maximum (an OR of 0/1); EDGE: logical OR;
  NDITH and SSCOUNT_30: maximum (NDITH stays unknown, NaN, rather than 0 when a detection's
  NDITH is unknown and the others say 0);

and for the group: N_DET (number of detections), the unweighted mean position and, when the
detections carry position errors, those errors combined in quadrature for the mean
(``sqrt(sum(err**2)) / n``). Missing values (NaN) are left out of every rule; a band with no
value in any detection stays NaN (null).

Columns are float64 arrays with NaN for null (integers and booleans included: every flag,
count and bit pattern of the catalogs is exact in float64); rows must be sorted by group.
"""

from __future__ import annotations

import numpy as np

from ks4release.publish.link import mean_positions

__all__ = [
    "MAGNITUDES",
    "MORPHOLOGY",
    "aggregate_groups",
    "group_starts",
    "weighted_median",
]

#: Magnitude column stems aggregated by weighted median (error column: ``magerr`` + rest).
MAGNITUDES = ("mag_auto", "mag_aper3", "mag_aper5", "mag_aper10")
#: Column stems taken from the best-seeing detection.
MORPHOLOGY = ("class_star", "ellipticity", "a_image", "b_image", "flux_radius", "kron_radius",
              "flux_max", "theta_image")
_OR_BITS = ("flags", "imaflags_iso")
_MAXIMUM = ("sscount_30", "ssflag", "max_mjd")


def group_starts(group: np.ndarray, n_groups: int) -> np.ndarray:
    """Row index where each group starts, checking that rows are sorted by group 0..n-1."""
    group = np.asarray(group, dtype=np.int64)
    counts = np.bincount(group, minlength=n_groups)
    if len(group) and (np.any(np.diff(group) < 0) or np.any(counts == 0)
                       or counts.size != n_groups):
        raise ValueError("rows must be sorted by group and every group 0..n_groups-1 present")
    return _starts(counts)


def _starts(counts: np.ndarray) -> np.ndarray:
    """Row where each group starts in rows sorted by group, from the groups' row counts."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _cumulative_in_group(weights: np.ndarray, group: np.ndarray, starts: np.ndarray
                         ) -> np.ndarray:
    """Running sum of ``weights`` within each group (rows sorted by group), inclusive."""
    running = np.cumsum(weights)
    before = np.concatenate([[0.0], running])[starts]
    return running - before[group]


def weighted_median(values: np.ndarray, sigmas: np.ndarray, group: np.ndarray,
                    n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group weighted median of ``values`` (weights ``1/sigma**2``) and its error.

    Rows with a non-finite value or a non-positive or non-finite sigma are left out; a group with
    none left gets NaN for both. Each sorted input stands at the centre of its weight on the
    cumulative-weight axis, and the median is interpolated linearly between the two inputs
    whose centres bracket half the group's total weight (the midpoint rule of weighted
    percentiles). It lies within the inputs, equals the middle input for an odd number of equal
    weights and the mean of the middle two for an even number, and for two detections, the
    usual case in a tile overlap, is their weighted mean. Picking one input instead (the lower
    weighted median) would take the brighter of two detections of similar S/N nearly every
    time, because the brighter measurement has the smaller error: a bias of about half the
    error towards bright.

    Returns
    -------
    median, error : ndarray
        float64 arrays of length ``n_groups``; ``error = 1 / sqrt(sum(1/sigma**2))``.
    """
    values = np.asarray(values, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    ok = np.isfinite(values) & np.isfinite(sigmas) & (sigmas > 0)
    v, g = values[ok], np.asarray(group, dtype=np.int64)[ok]
    w = 1.0 / sigmas[ok] ** 2
    order = np.lexsort((v, g))
    v, w, g = v[order], w[order], g[order]
    median = np.full(n_groups, np.nan)
    error = np.full(n_groups, np.nan)
    if v.size == 0:
        return median, error
    counts = np.bincount(g, minlength=n_groups)
    starts = _starts(counts)
    total = np.bincount(g, weights=w, minlength=n_groups)
    centre = _cumulative_in_group(w, g, starts) - 0.5 * w
    half = 0.5 * total[g]
    # The last input whose centre is at or below half the weight: the first input always is.
    below = np.bincount(g, weights=(centre <= half).astype(np.float64), minlength=n_groups)
    has = counts > 0
    lo = starts[has] + np.maximum(below[has].astype(np.int64), 1) - 1
    hi = np.minimum(lo + 1, starts[has] + counts[has] - 1)
    span = centre[hi] - centre[lo]
    t = np.divide(half[lo] - centre[lo], span, out=np.zeros_like(span), where=span > 0)
    median[has] = v[lo] + np.clip(t, 0.0, 1.0) * (v[hi] - v[lo])
    error[has] = 1.0 / np.sqrt(total[has])
    return median, error


def _reduce_mean(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = np.add.reduceat(ok.astype(np.int64), starts)
    s = np.add.reduceat(np.where(ok, x, 0.0), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _reduce_or(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = np.add.reduceat(ok.astype(np.int64), starts)
    bits = np.bitwise_or.reduceat(np.where(ok, x, 0.0).astype(np.int64), starts)
    return np.where(n > 0, bits.astype(np.float64), np.nan)


def _reduce_ndith(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Maximum NDITH; unknown (NaN) rather than 0 when a member's NDITH is unknown."""
    best = np.fmax.reduceat(x, starts)
    unknown = np.add.reduceat(np.isnan(x).astype(np.int64), starts) > 0
    return np.where(unknown & (best == 0), np.nan, best)


def _best_rows(fwhm: np.ndarray, group: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row of each group with the smallest finite FWHM (first row when none is finite)."""
    key = np.where(np.isfinite(fwhm), fwhm, np.inf)
    order = np.lexsort((np.arange(len(group)), key, group))
    return order[starts]


def aggregate_groups(columns: dict[str, np.ndarray], group: np.ndarray, n_groups: int,
                     bands: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One row per group from detection rows sorted by group (see the module docstring).

    Parameters
    ----------
    columns : dict of str to ndarray
        ``ra``, ``dec`` and the per-band Table 3 columns of ``bands`` as float64 with NaN for
        null; optional ``raerr``/``decerr`` (combined in quadrature for the mean position).
    group : ndarray of int
        Group of each row, sorted, covering 0..n_groups-1.
    n_groups : int
        Number of groups.
    bands : tuple of str
        Band letters whose columns are aggregated.

    Returns
    -------
    dict of str to ndarray
        float64 columns of length ``n_groups``: ``ra``, ``dec``, ``n_det``, the per-band columns
        and, when given, ``raerr``/``decerr``.
    """
    group = np.asarray(group, dtype=np.int64)
    starts = group_starts(group, n_groups)
    counts = np.bincount(group, minlength=n_groups)
    out: dict[str, np.ndarray] = {}
    out["ra"], out["dec"] = mean_positions(columns["ra"], columns["dec"], group, n_groups)
    out["n_det"] = counts.astype(np.float64)
    for name in ("raerr", "decerr"):
        if name in columns:
            err = np.asarray(columns[name], dtype=np.float64)
            out[name] = np.sqrt(np.add.reduceat(np.where(np.isfinite(err), err**2, 0.0),
                                                starts)) / counts
    for band in bands:
        out.update(_aggregate_band(columns, group, starts, n_groups, band))
    return out


def _aggregate_band(columns: dict[str, np.ndarray], group: np.ndarray, starts: np.ndarray,
                    n_groups: int, band: str) -> dict[str, np.ndarray]:
    def col(stem: str) -> np.ndarray:
        return np.asarray(columns[f"{stem}_{band}"], dtype=np.float64)

    out: dict[str, np.ndarray] = {}
    for stem in MAGNITUDES:
        err_stem = "magerr" + stem[3:]  # mag_auto -> magerr_auto
        out[f"{stem}_{band}"], out[f"{err_stem}_{band}"] = weighted_median(
            col(stem), col(err_stem), group, n_groups)
    fwhm = col("fwhm_image")
    best = _best_rows(fwhm, group, starts)
    for stem in MORPHOLOGY:
        out[f"{stem}_{band}"] = col(stem)[best]
    out[f"fwhm_image_{band}"] = _reduce_mean(fwhm, starts)
    out[f"mean_mjd_{band}"] = _reduce_mean(col("mean_mjd"), starts)
    out[f"min_mjd_{band}"] = np.fmin.reduceat(col("min_mjd"), starts)
    for stem in _MAXIMUM:
        out[f"{stem}_{band}"] = np.fmax.reduceat(col(stem), starts)
    out[f"ndith_{band}"] = _reduce_ndith(col("ndith"), starts)
    for stem in _OR_BITS:
        out[f"{stem}_{band}"] = _reduce_or(col(stem), starts)
    out[f"edge_{band}"] = _reduce_or(col("edge"), starts)
    return out
