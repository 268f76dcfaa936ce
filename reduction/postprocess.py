"""Post-processing of tile catalogs (DR1 section 3.2): spurious sources, coverage, MAG_AUTO bias.

Three pure functions on the measurement table of one tile (astropy ``Table``, columns of the
issue-5 contract: ``ra``, ``dec``, ``x_image``, ``y_image`` and per-band ``{name}_{b}``):

* :func:`flag_spurious` (DR1 3.2.1): detections with no reference counterpart within 1.1" are
  the candidates; DBSCAN (eps = 0.03 deg, min_samples = 2) on them finds the clustered ones
  (satellite trails, stray light, ghosts), which get ``ssflag_{b} = 1`` and are removed.
  ``sscount_30_{b}`` counts the removed ones within 30" of every source. The false detection
  rate (removed / initial) is returned for the log and the report.
* :func:`coverage_columns` (DR1 3.2.2): ``ndith_{b}`` = number of exposures with a CCD footprint
  polygon containing the source, ``edge_{b}`` near the co-add border or the end of the coverage
  (DR1: those get ``ndith_{b} = 1``), ``min/max/mean_mjd_{b}`` of the covering exposures.
* :func:`auto_bias_correction` (DR1 3.2.3): MAG_AUTO - MAG_APER of isolated, clean reference
  point sources (DR1: Gaia XP; by default ours are the deeper Gaia DR3 ones) against magnitude
  in adaptive bins, median per bin, count-weighted smoothing, linear interpolation; subtracted
  from MAG_AUTO of Gaia-matched objects and of point sources (CLASS_STAR >=
  ``bias_apply_class_star_min``, 0.5 by default; DR1: "high-confidence point sources").

Which MAG_APER
--------------
DR1 says only that the offsets are "negligible in fixed aperture measurements". On the demo
release (4 tiles x BVRI, sep photometry, every aperture calibrated to the true magnitudes of
16-19 mag stars, curves from all true stars to 21 mag) the mean over 0.5-mag bins of
|median(MAG_AUTO - true)| for S/N > 20 stars went from 0.020/0.023/0.024/0.0105 (B/V/R/I) to
0.017/0.021/0.020/0.008 with APER10, 0.015/0.022/0.020/0.016 with APER5 and
0.019/0.027/0.023/0.026 with APER3; APER10 is the only one that never made a band worse, so it
is the default (``bias_aperture``). In crowded fields a 10" aperture collects neighbours that
the 5" isolation cut lets in: there APER5 may be the better choice. Either way only stars whose
aperture magnitude error is at most ``bias_max_aperture_err`` (0.02) make nodes: fainter, the
aperture carries the background's error, and the curve would pass it on to MAG_AUTO (on the
demo survey with 5 times the stars, one tile's R curve fell to -0.08 mag at R 20.5).

The unit of DBSCAN's eps
------------------------
DR1 gives ``eps = 0.03`` without a unit. We read it as degrees (108 arcsec) and cluster exact
great-circle separations (DBSCAN on unit vectors with the matching chord). Evidence:

* in arcsec (0.03") or arcmin (1.8") it would link only detections closer than ~4.5 co-add
  pixels, less than the separation sep/SExtractor deblending leaves between two detections, so
  DBSCAN would remove next to nothing and could not find the "linear patterns associated with
  satellite trails and widespread stray light" DR1 shows; in radians (1.7 deg) it would merge
  every unmatched source of a 2.4-deg tile into one cluster;
* measured on the tiny test survey's co-adds (sep at 1.5 sigma; Gaia DR3 + DELVE DR2
  references; 400 detections with no true source within 1", mostly on the raised background of
  the chip-gap strips, a satellite trail and a stray-light ring), eps in degrees removes 130 of
  131 (V) and 260 of 269 (I) of them and no real source; in arcmin 6 and 14; in arcsec none;
  on the demo release's tile 0000.000-62, 10 of 12 (V) and 26 of 27 (I), against 0 and 2;
* astronomers' DBSCAN runs on (RA, Dec) are normally in degrees, the unit of the catalog.
DR1 probably clustered raw (RA, Dec), where an RA degree is cos(Dec) shorter on the sky; we use
true angles. The price of 0.03 deg: a real source with no reference counterpart that has another
such source within 108" is removed too, so the reference catalogs must reach deeper than the
co-adds (DR1 used eight, down to LS DR10). With Gaia DR3 alone the tiny survey loses 153 of 207
(V) and 134 of 187 (I) real sources: DELVE DR2 (or deeper) is required, not optional. On the
9-arcmin demo tile 108" is a fifth of the field, so every unmatched detection ends up in one
cluster; on a 2.4-deg KS4 tile it is 1/80 of the side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS
from matplotlib.path import Path as PolygonPath
from scipy.spatial import cKDTree
from sklearn.cluster import DBSCAN

from ks4release.projection import chord, gnomonic, unit_vectors
from ks4release.reduction.coadd_maps import exposure_footprints
from ks4release.reduction.moffat import (
    integrated_moffat,
    moffat_alpha_fwhm,
    moffat_enclosed_fraction,
)
from ks4release.settings import PostprocessSettings

__all__ = [
    "BiasCurve",
    "PostprocessSettings",
    "SpuriousStats",
    "auto_bias_correction",
    "bias_curve",
    "catalog_boundary_mask",
    "coverage_columns",
    "covering_exposures",
    "flag_spurious",
    "float_column",
    "kron_loss_correction",
    "moffat_index",
    "moffat_kron_fraction",
    "point_source_targets",
]

logger = logging.getLogger(__name__)

_BANDS = ("b", "v", "r", "i")
# Points on the circle of radius edge_px tested for coverage around every source.
_EDGE_PROBES = 16


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def _matched(vectors: np.ndarray, reference: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """True where a row of ``vectors`` has a ``reference`` vector within ``radius_arcsec``."""
    if len(vectors) == 0 or len(reference) == 0:
        return np.zeros(len(vectors), dtype=bool)
    distance, _ = cKDTree(reference).query(vectors, distance_upper_bound=chord(radius_arcsec))
    return np.isfinite(distance)


def _band(band: str) -> str:
    """Lower-case catalog suffix of ``band`` (B/V/R/I or b/v/r/i)."""
    b = band.lower()
    if b not in _BANDS:
        raise ValueError(f"unknown band {band!r}; expected one of B, V, R, I")
    return b


def _require(table: Table, columns: Sequence[str], what: str) -> None:
    """Raise ValueError naming the missing columns of ``table``."""
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise ValueError(f"{what}: the table lacks column(s) {', '.join(missing)}")


def float_column(table: Table, name: str) -> np.ndarray:
    """Column ``name`` as float64 with masked entries as NaN."""
    column = table[name]
    values = np.asarray(column, dtype=float).copy()
    if hasattr(column, "mask"):
        values[np.asarray(column.mask, dtype=bool)] = np.nan
    return values


# ---------------------------------------------------------------------------------------------
# 3.2.1 spurious sources


@dataclass(frozen=True, kw_only=True)
class SpuriousStats:
    """What the spurious-source cleaning did to one catalog and band (for the log and report).

    ``fdr`` is DR1's false detection rate: removed (flagged) / initial detections.
    """

    band: str
    initial: int
    unmatched: int
    flagged: int
    clusters: int
    fdr: float

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return {"band": self.band, "initial": self.initial, "unmatched": self.unmatched,
                "flagged": self.flagged, "clusters": self.clusters, "fdr": self.fdr}


def catalog_boundary_mask(table: Table, ra_deg: np.ndarray, dec_deg: np.ndarray, *,
                          pad_arcsec: float) -> np.ndarray:
    """True for the positions inside the tile boundary: the extent of the catalog plus a margin.

    DR1 compiles its reference catalog within "the initial source catalog positions, extended
    by 3 pixels". The extent is the bounding box of the detections in the tangent plane about
    their mean position, which follows the tile whether or not it straddles RA = 0.
    """
    inside = np.zeros(len(ra_deg), dtype=bool)
    if len(table) == 0 or len(ra_deg) == 0:
        return inside
    mean = unit_vectors(table["ra"], table["dec"]).mean(axis=0)
    ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360.0
    dec0 = math.degrees(math.atan2(mean[2], math.hypot(mean[0], mean[1])))
    xi, eta = gnomonic(ra0, dec0, table["ra"], table["dec"])
    rxi, reta = gnomonic(ra0, dec0, ra_deg, dec_deg)
    pad = pad_arcsec / 3600.0
    front = unit_vectors(ra_deg, dec_deg) @ mean > 0  # the gnomonic projection's hemisphere
    return (front & (rxi >= xi.min() - pad) & (rxi <= xi.max() + pad)
            & (reta >= eta.min() - pad) & (reta <= eta.max() + pad))


def _clustered(vectors: np.ndarray, eps_deg: float, min_samples: int) -> tuple[np.ndarray, int]:
    """DBSCAN on unit vectors with the chord of ``eps_deg``: (in-cluster mask, cluster count)."""
    if len(vectors) == 0:
        return np.zeros(0, dtype=bool), 0
    labels = DBSCAN(eps=chord(eps_deg * 3600.0), min_samples=min_samples).fit(vectors).labels_
    return labels >= 0, len(set(labels[labels >= 0].tolist()))


def flag_spurious(table: Table, references: Sequence[tuple[np.ndarray, np.ndarray]], band: str,
                  settings: PostprocessSettings, *, copy_to: Sequence[str] = ()
                  ) -> tuple[Table, SpuriousStats]:
    """Flag, count and (by default) remove clustered detections without a reference counterpart.

    Parameters
    ----------
    table : Table
        Detections of one tile (``ra``, ``dec`` in deg).
    references : sequence of (ra, dec) arrays
        Positions (deg) of every available reference catalog (Gaia DR3, DELVE DR2, ...);
        only those inside the tile boundary (:func:`catalog_boundary_mask`) are used.
    band : str
        Band whose ``ssflag_{b}`` and ``sscount_30_{b}`` are written. In dual mode pass the
        detection band: the detections, hence the decision, are the same in every band.
    settings : PostprocessSettings
    copy_to : sequence of str
        Further bands that receive the same two columns (the forced bands of a dual catalog).

    Returns
    -------
    (Table, SpuriousStats)
        A copy of the table with ``ssflag_{b}`` (int16, 1 = spurious) and ``sscount_30_{b}``
        (int32: removed spurious sources within ``sscount_radius_arcsec``, the source itself
        excluded), without the spurious rows when ``settings.remove_spurious``; and the counts
        with DR1's false detection rate.
    """
    _require(table, ("ra", "dec"), f"flag_spurious band {band}")
    if not references:
        logger.warning("flag_spurious band %s: no reference catalog; every detection is a "
                       "spurious candidate", band)
    bands = [_band(band)] + [_band(b) for b in copy_to]
    vectors = unit_vectors(table["ra"], table["dec"])
    pad = settings.boundary_pad_px * settings.pixel_scale_arcsec
    matched = np.zeros(len(table), dtype=bool)
    for ra, dec in references:
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        keep = catalog_boundary_mask(table, ra, dec, pad_arcsec=pad) & np.isfinite(ra + dec)
        matched |= _matched(vectors, unit_vectors(ra[keep], dec[keep]),
                            settings.match_radius_arcsec)
    unmatched = np.flatnonzero(~matched)
    in_cluster, n_clusters = _clustered(vectors[unmatched], settings.dbscan_eps_deg,
                                        settings.dbscan_min_samples)
    spurious = np.zeros(len(table), dtype=bool)
    spurious[unmatched[in_cluster]] = True
    count = _neighbour_counts(vectors, vectors[spurious], settings.sscount_radius_arcsec)
    count -= spurious  # a removed source does not count itself
    out = table.copy()
    for b in bands:
        out[f"ssflag_{b}"] = spurious.astype(np.int16)
        out[f"sscount_30_{b}"] = count.astype(np.int32)
    n = len(table)
    stats = SpuriousStats(band=bands[0], initial=n, unmatched=int(unmatched.size),
                          flagged=int(spurious.sum()), clusters=n_clusters,
                          fdr=float(spurious.sum() / n) if n else 0.0)
    logger.info("spurious sources %s: %d of %d unmatched, %d in %d clusters, FDR %.4f",
                stats.band, stats.unmatched, n, stats.flagged, n_clusters, stats.fdr)
    if settings.remove_spurious:
        out = out[~spurious]
    return out, stats


def _neighbour_counts(vectors: np.ndarray, others: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Number of ``others`` within ``radius_arcsec`` of every row of ``vectors``."""
    if len(vectors) == 0 or len(others) == 0:
        return np.zeros(len(vectors), dtype=np.int64)
    tree = cKDTree(others)
    return np.asarray(tree.query_ball_point(vectors, chord(radius_arcsec), return_length=True),
                      dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# 3.2.2 exposure contributions


def covering_exposures(points: np.ndarray, exposures_json: dict, wcs: WCS
                       ) -> tuple[list[dict], list[list[PolygonPath]], np.ndarray]:
    """Which usable exposure of a co-add covers each point.

    ``points`` (n, 2) are 1-based co-add pixels. Returns the exposures-JSON entries of the
    usable exposures (``ok`` true, at least one CCD), their CCD polygons in 1-based co-add
    pixels and a boolean matrix (exposures, points), true where a CCD footprint of the exposure
    contains the point. Excluded CCDs are not in ``ccds``. The vertices are joined by straight
    lines on the co-add grid: a TAN projection maps great circles to straight lines, so four
    corners would be exact for undistorted CCD edges, but the field distortion bows a CCD's
    edges (by up to 1.6 co-add px between the corners of a demo chip, 25 px on the full-size
    camera); the co-add stage writes ``coadd_maps.FOOTPRINT_VERTICES_PER_SIDE`` vertices per
    side, which follow the bow to 0.1 px or better. Any polygon of >= 3 vertices is accepted.
    """
    usable = [(exposure, paths) for exposure, paths
              in exposure_footprints(exposures_json, wcs, origin=1) if paths]
    covering = np.zeros((len(usable), len(points)), dtype=bool)
    for k, (_, paths) in enumerate(usable):
        covering[k] = _covered_by(paths, points)
    return [e for e, _ in usable], [p for _, p in usable], covering


def _covered_by(paths: list[PolygonPath], points: np.ndarray) -> np.ndarray:
    """True where a point (n, 2) is inside any of ``paths``.

    Only points inside a path's bounding box and not yet known to be covered are tested against
    it (a CCD covers a quarter of a tile or less; a footprint has 64 vertices).
    """
    inside = np.zeros(len(points), dtype=bool)
    x, y = points[:, 0], points[:, 1]
    for path in paths:
        (x0, y0), (x1, y1) = path.get_extents().get_points()
        test = np.flatnonzero(~inside & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        if test.size:
            inside[test] = path.contains_points(points[test])
    return inside


def coverage_columns(table: Table, exposures_json: dict, band: str, *, edge_px: float,
                     shape: tuple[int, int], wcs: WCS) -> Table:
    """NDITH, EDGE and MJD columns of one band from the exposures' CCD footprints.

    Parameters
    ----------
    table : Table
        Detections with ``x_image``, ``y_image`` (1-based co-add pixels).
    exposures_json : dict
        The co-add's exposures JSON (``coadd_exposures_path``): every exposure with ``ok``
        true contributes the polygons of its ``ccds`` (excluded CCDs are not there).
    band : str
        Band of the columns written.
    edge_px : float
        EDGE distance, co-add px.
    shape : (ny, nx)
        Co-add shape.
    wcs : WCS
        The co-add's celestial WCS (maps the sky corners onto the co-add pixels).

    Returns
    -------
    Table
        A copy with ``ndith_{b}`` (int16: exposures with a CCD footprint containing the
        source), ``edge_{b}`` (bool: within ``edge_px`` of the co-add border, or a point at
        that distance is outside every footprint; such sources get ``ndith_{b} = 1`` as in
        DR1) and ``min_mjd_{b}``, ``max_mjd_{b}``, ``mean_mjd_{b}`` (float64 [d] over the
        exposures containing the source, whether EDGE or not; masked where none does).

    Notes
    -----
    As in DR1, EDGE marks where the coverage ends (tile edges, holes), not the edges of single
    CCDs inside the covered area: a source whose centroid error straddles one exposure's CCD
    edge keeps its NDITH, which may be off by one there. On the demo that is 0.2-0.8% of the
    non-EDGE sources (all within 0.8 px of a true CCD edge), while EDGE on every source within
    2 px of a CCD edge would flag another 5-7% of them; the demo's 1/16-size chips have 16
    times the CCD edge per unit area of the real camera.
    """
    b = _band(band)
    _require(table, ("x_image", "y_image"), f"coverage_columns band {band}")
    if edge_px < 0:
        raise ValueError(f"edge_px must be >= 0, got {edge_px}")
    x, y = float_column(table, "x_image"), float_column(table, "y_image")
    points = np.column_stack([x, y])
    exposures, polygons, covering = covering_exposures(points, exposures_json, wcs)
    mjd = np.array([float(e["mjd"]) for e in exposures], dtype=float)
    ndith = covering.sum(axis=0)
    edge = _near_edge(points, [p for paths in polygons for p in paths], edge_px, shape)
    out = table.copy()
    out[f"ndith_{b}"] = np.where(edge, 1, ndith).astype(np.int16)
    out[f"edge_{b}"] = edge
    none = ndith == 0
    weights = covering.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (mjd @ weights) / ndith
    low = np.where(covering, mjd[:, None], np.inf).min(axis=0, initial=np.inf)
    high = np.where(covering, mjd[:, None], -np.inf).max(axis=0, initial=-np.inf)
    for name, values in (("min_mjd", low), ("max_mjd", high), ("mean_mjd", mean)):
        out[f"{name}_{b}"] = MaskedColumn(np.where(none, np.nan, values), mask=none, unit="d")
    return out


def _near_edge(points: np.ndarray, paths: list[PolygonPath], edge_px: float,
               shape: tuple[int, int]) -> np.ndarray:
    """EDGE: within ``edge_px`` of the co-add border, or of the end of the union of footprints.

    The second test probes ``_EDGE_PROBES`` points on the circle of radius ``edge_px`` (and the
    source itself): if any lies outside every footprint, the coverage ends within ``edge_px``.
    """
    ny, nx = shape
    x, y = points[:, 0], points[:, 1]
    edge = ~np.isfinite(x) | ~np.isfinite(y)
    edge |= (x - 0.5 < edge_px) | (nx + 0.5 - x < edge_px)
    edge |= (y - 0.5 < edge_px) | (ny + 0.5 - y < edge_px)
    angles = np.linspace(0.0, 2.0 * math.pi, _EDGE_PROBES, endpoint=False)
    offsets = [(0.0, 0.0)] + [(edge_px * math.cos(a), edge_px * math.sin(a)) for a in angles]
    for dx, dy in offsets:
        edge |= ~_covered_by(paths, points + np.array([dx, dy]))
    return edge


# ---------------------------------------------------------------------------------------------
# 3.2.3 MAG_AUTO bias correction


@dataclass(frozen=True, kw_only=True)
class BiasCurve:
    """MAG_AUTO - MAG_APER against MAG_AUTO for one tile and band.

    ``mag`` and ``offset`` are the nodes (median magnitude and smoothed median difference of
    each bin with at least ``bias_bin_min_stars`` stars), ``count`` the stars per node;
    ``applied`` is False (and ``reason`` says why) when there were too few stars or nodes.
    Beyond the end nodes the correction is the end value (:func:`numpy.interp`).
    """

    band: str
    aperture: str
    n_stars: int
    mag: np.ndarray
    offset: np.ndarray
    count: np.ndarray
    applied: bool
    reason: str

    def __call__(self, mag: np.ndarray) -> np.ndarray:
        """Correction (mag) to subtract from MAG_AUTO at ``mag``; 0 when not applied."""
        mag = np.asarray(mag, dtype=float)
        if not self.applied:
            return np.zeros_like(mag)
        return np.interp(mag, self.mag, self.offset)


def _adaptive_bins(mag: np.ndarray, settings: PostprocessSettings) -> list[np.ndarray]:
    """Indices (into sorted ``mag``) of each adaptive bin, bright to faint.

    A bin starts at the brightest star not yet binned and closes at the first star beyond
    ``bias_bin_max_mag`` from its start, or earlier once it is ``bias_bin_min_mag`` wide and
    holds ``bias_bin_stars`` stars. Dense magnitude ranges get narrow bins, sparse ones wide.
    """
    bins, start, n = [], 0, len(mag)
    while start < n:
        stop = start + 1
        while stop < n and mag[stop] - mag[start] < settings.bias_bin_max_mag:
            if (mag[stop] - mag[start] >= settings.bias_bin_min_mag
                    and stop - start >= settings.bias_bin_stars):
                break
            stop += 1
        bins.append(np.arange(start, stop))
        start = stop
    return bins


def _smooth(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Count-weighted mean of every node with its two neighbours (DR1's density weighting)."""
    out = np.empty_like(values)
    for i in range(len(values)):
        lo, hi = max(0, i - 1), min(len(values), i + 2)
        out[i] = np.average(values[lo:hi], weights=counts[lo:hi])
    return out


def bias_curve(mag_auto: np.ndarray, mag_aper: np.ndarray, band: str,
               settings: PostprocessSettings) -> BiasCurve:
    """The correction curve from the calibration stars' MAG_AUTO and MAG_APER (see BiasCurve)."""
    good = np.isfinite(mag_auto) & np.isfinite(mag_aper)
    mag, diff = mag_auto[good], (mag_auto - mag_aper)[good]
    order = np.argsort(mag, kind="stable")
    mag, diff = mag[order], diff[order]
    empty = np.zeros(0)

    def refused(reason: str) -> BiasCurve:
        return BiasCurve(band=band, aperture=settings.bias_aperture, n_stars=int(mag.size),
                         mag=empty, offset=empty, count=empty.astype(int), applied=False,
                         reason=reason)

    if mag.size < settings.bias_min_stars:
        return refused(f"{mag.size} calibration stars < bias_min_stars = "
                       f"{settings.bias_min_stars}")
    nodes = [(np.median(mag[i]), np.median(diff[i]), i.size) for i in _adaptive_bins(mag, settings)
             if i.size >= settings.bias_bin_min_stars]
    if len(nodes) < settings.bias_min_nodes:
        return refused(f"{len(nodes)} bins with >= {settings.bias_bin_min_stars} stars < "
                       f"bias_min_nodes = {settings.bias_min_nodes}")
    node_mag, node_diff, node_count = (np.array(v) for v in zip(*nodes))
    return BiasCurve(band=band, aperture=settings.bias_aperture, n_stars=int(mag.size),
                     mag=node_mag.astype(float), offset=_smooth(node_diff.astype(float),
                                                                node_count.astype(float)),
                     count=node_count.astype(int), applied=True, reason="")


def moffat_kron_fraction(a: np.ndarray, b: np.ndarray, theta_deg: np.ndarray,
                         kron: np.ndarray, fwhm_px: float, beta: float) -> np.ndarray:
    """Fraction of a Moffat PSF's light inside each Kron ellipse (semi-axes kron * a, kron * b).

    The PSF (FWHM ``fwhm_px``, index ``beta``) is rendered once on a stamp large enough for its
    wings and summed by sep inside every ellipse as the photometry sums MAG_AUTO (subpix 5).
    """
    alpha = moffat_alpha_fwhm(fwhm_px, beta)
    a, b = np.asarray(a, float), np.asarray(b, float)
    kron = np.asarray(kron, float)
    half = int(math.ceil(max(float(np.nanmax(kron * a, initial=0.0)) + 2.0, 20.0 * alpha)))
    psf = integrated_moffat(half, fwhm_px, beta)
    # normalised to the total light: the stamp misses (1 + (half/alpha)^2)^(1 - beta) of it
    psf *= moffat_enclosed_fraction(fwhm_px, beta, 2.0 * half) / psf.sum()
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(kron) & (a > 0) & (b > 0) & (kron > 0)
    out = np.full(a.size, np.nan)
    if ok.any():
        theta = np.clip(np.radians(np.asarray(theta_deg, float)[ok]), -math.pi / 2, math.pi / 2)
        centre = np.full(int(ok.sum()), float(half))
        out[ok], _, _ = sep.sum_ellipse(np.ascontiguousarray(psf, dtype=np.float64), centre,
                                        centre, a[ok], np.minimum(b[ok], a[ok]), theta,
                                        kron[ok], subpix=5)
    return out


def moffat_index(psf_beta: float | None, settings: PostprocessSettings) -> float:
    """The Moffat index of a co-add's point sources: its measured PSFBETA, or where that is
    None or NaN ``[postprocess] kron_psf_beta``."""
    return settings.kron_psf_beta if psf_beta is None or math.isnan(psf_beta) \
        else float(psf_beta)


def kron_loss_correction(table: Table, band: str, fwhm_arcsec: float, pixel_scale_arcsec: float,
                         settings: PostprocessSettings, *, targets: np.ndarray,
                         psf_beta: float | None = None,
                         noise_term: np.ndarray | None = None) -> tuple[Table, dict]:
    """Correct point sources' MAG_AUTO for the PSF light outside their own Kron ellipse.

    At low S/N the isophotal moments shrink and with them the Kron ellipse, which then misses
    more of the PSF's wings than the ellipses of the bright stars the AUTO zero point was set
    on (the zero point absorbs their loss). For each target the correction is
    ``2.5 log10(f_source / f_reference)``, with ``f`` the light fraction of a Moffat PSF (the
    co-add's seeing; index ``psf_beta``, the co-add's measured one, or where it is None or NaN
    ``[postprocess] kron_psf_beta``) inside the source's ellipse and
    ``f_reference`` the median over bright clean point sources (S/N >= kron_reference_snr,
    CLASS_STAR >= bias_class_star_min, FLAGS <= bias_flags_max). With ``[postprocess]
    kron_loss_compact`` the sources outside ``targets`` whose ellipse holds less than
    ``f_reference`` are corrected too (faint stars the classifier calls extended; a compact
    galaxy loses at least that much). ``noise_term`` (magnitudes per source) is added to
    the corrected sources too: the calibrated noise bias of :mod:`.artificial_stars`.
    """
    b = _band(band)
    cols = (f"mag_auto_{b}", f"a_image_{b}", f"b_image_{b}", f"theta_image_{b}",
            f"kron_radius_{b}", f"snr_{b}", f"class_star_{b}", f"flags_{b}")
    _require(table, cols, f"kron_loss_correction band {band}")
    beta = moffat_index(psf_beta, settings)
    if not beta > 1.0:
        raise ValueError(f"kron_loss_correction band {band}: PSF beta must be > 1, got {beta}")
    fraction = moffat_kron_fraction(float_column(table, f"a_image_{b}"),
                                    float_column(table, f"b_image_{b}"),
                                    float_column(table, f"theta_image_{b}"),
                                    float_column(table, f"kron_radius_{b}"),
                                    fwhm_arcsec / pixel_scale_arcsec, beta)
    reference = ((float_column(table, f"snr_{b}") >= settings.kron_reference_snr)
                 & (float_column(table, f"class_star_{b}") >= settings.bias_class_star_min)
                 & (float_column(table, f"flags_{b}") <= settings.bias_flags_max)
                 & np.isfinite(fraction))
    out = table.copy()
    if reference.sum() < settings.bias_min_stars:
        reason = (f"{int(reference.sum())} reference stars < bias_min_stars = "
                  f"{settings.bias_min_stars}")
        logger.info("Kron loss correction %s: not applied (%s)", b, reason)
        return out, {"applied": False, "reason": reason, "psf_beta": beta}
    f_ref = float(np.median(fraction[reference]))
    mag_auto = float_column(table, f"mag_auto_{b}")
    shrunk = np.isfinite(fraction) & (fraction < f_ref)
    apply = (targets | (shrunk & settings.kron_loss_compact)) & np.isfinite(fraction) \
        & np.isfinite(mag_auto)
    delta = np.where(apply, 2.5 * np.log10(np.where(apply, fraction, 1.0) / f_ref), 0.0)
    if noise_term is not None:
        delta += np.where(apply, noise_term, 0.0)
    column = out[f"mag_auto_{b}"]
    mask = ~np.isfinite(mag_auto)
    out[f"mag_auto_{b}"] = MaskedColumn(np.where(mask, np.nan, mag_auto + delta), mask=mask,
                                        unit=column.unit,
                                        description=getattr(column, "description", None))
    logger.info("Kron loss correction %s: reference fraction %.4f from %d stars, %d sources "
                "corrected (median %+.4f mag)", b, f_ref, int(reference.sum()),
                int(apply.sum()), float(np.median(delta[apply])) if apply.any() else 0.0)
    return out, {"applied": True, "psf_beta": beta, "reference_fraction": f_ref,
                 "reference_stars": int(reference.sum()), "corrected": int(apply.sum()),
                 "corrected_compact": int((apply & ~targets).sum())}


def point_source_targets(table: Table, band: str, settings: PostprocessSettings,
                         gaia: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The sources whose MAG_AUTO the point-source corrections apply to: Gaia-matched objects
    and sources with CLASS_STAR >= ``bias_apply_class_star_min`` (DR1: "high-confidence point
    sources"; the setting documents our choice); extended sources keep their MAG_AUTO."""
    b = _band(band)
    confident = float_column(table, f"class_star_{b}") >= settings.bias_apply_class_star_min
    if gaia is None:
        return confident
    on_gaia = _matched(unit_vectors(table["ra"], table["dec"]), unit_vectors(*gaia),
                       settings.bias_match_radius_arcsec)
    return confident | on_gaia


def auto_bias_correction(table: Table, calibration: tuple[np.ndarray, np.ndarray], band: str,
                         settings: PostprocessSettings, *,
                         gaia: tuple[np.ndarray, np.ndarray] | None = None
                         ) -> tuple[Table, BiasCurve]:
    """Correct MAG_AUTO for its magnitude-dependent bias against fixed-aperture photometry.

    Calibration sample: detections within ``bias_match_radius_arcsec`` of a reference point
    source (``calibration``: DR1 used Gaia XP; ``[postprocess] bias_reference``),
    ``class_star_{b} >= bias_class_star_min``, ``flags_{b} <= bias_flags_max``, no other
    detection within ``bias_isolation_arcsec``, ``magerr_{aperture}_{b} <=
    bias_max_aperture_err`` (when > 0), and finite ``mag_auto_{b}`` and ``mag_{aperture}_{b}``.
    The curve is :func:`bias_curve`.

    The correction (``mag_auto_{b} -= curve(mag_auto_{b})``) is applied to objects matched to
    Gaia (DR3 positions ``gaia`` when given, else the calibration positions) and to sources
    with ``class_star_{b} >= bias_apply_class_star_min``; extended and uncertain sources keep
    their MAG_AUTO. With too few stars nothing changes and the curve's ``reason`` is logged.

    Parameters
    ----------
    table : Table
        Calibrated measurements (after ``apply_zp_maps``): ``ra``, ``dec``, ``mag_auto_{b}``,
        ``mag_{aperture}_{b}``, ``class_star_{b}``, ``flags_{b}``.
    calibration : (ra, dec) arrays
        Positions (deg) of the reference point sources of the tile that have a measurement in
        the band.
    band : str
    settings : PostprocessSettings
    gaia : (ra, dec) arrays, optional
        Gaia DR3 positions (deg) deciding which objects are "Gaia-matched".

    Returns
    -------
    (Table, BiasCurve)
        A copy with corrected ``mag_auto_{b}``, and the curve.
    """
    b = _band(band)
    auto, aper = f"mag_auto_{b}", f"mag_{settings.bias_aperture}_{b}"
    aper_err, star, flags = f"magerr_{settings.bias_aperture}_{b}", f"class_star_{b}", f"flags_{b}"
    _require(table, ("ra", "dec", auto, aper, aper_err, star, flags),
             f"auto_bias_correction band {band}")
    vectors = unit_vectors(table["ra"], table["dec"])
    reference = unit_vectors(*calibration)
    on_reference = _matched(vectors, reference, settings.bias_match_radius_arcsec)
    isolated = _neighbour_counts(vectors, vectors, settings.bias_isolation_arcsec) <= 1
    class_star, mag_auto = float_column(table, star), float_column(table, auto)
    flag_values = float_column(table, flags)  # masked -> NaN, never <= bias_flags_max
    sample = (on_reference & isolated & (class_star >= settings.bias_class_star_min)
              & (flag_values <= settings.bias_flags_max))
    if settings.bias_max_aperture_err > 0:
        sample &= float_column(table, aper_err) <= settings.bias_max_aperture_err
    curve = bias_curve(mag_auto[sample], float_column(table, aper)[sample], b, settings)
    out = table.copy()
    if not curve.applied:
        logger.info("MAG_AUTO bias correction %s: not applied (%s)", b, curve.reason)
        return out, curve
    target = point_source_targets(table, b, settings, calibration if gaia is None else gaia) \
        & np.isfinite(mag_auto)
    corrected = mag_auto - np.where(target, curve(mag_auto), 0.0)
    column = out[auto]
    mask = np.asarray(column.mask, dtype=bool) if hasattr(column, "mask") else ~np.isfinite(
        mag_auto)
    out[auto] = MaskedColumn(np.where(mask, np.nan, corrected), mask=mask, unit=column.unit,
                             description=getattr(column, "description", None))
    logger.info("MAG_AUTO bias correction %s: %d stars, %d nodes, %d sources corrected",
                b, curve.n_stars, curve.mag.size, int(target.sum()))
    return out, curve
