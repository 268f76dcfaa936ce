"""Zero points of all exposures of one tile and band, fitted together (an ubercal).

One exposure of the scaled demo holds 5-20 usable Gaia XP stars for 32 amplifiers: too few to
fit an offset and a gradient per amplifier. But every star detected in several exposures of a
tile and band ties the amplifiers it falls on together, whether Gaia XP measured it or not, and
the dithers (4' in RA, 7' in Dec) put the same star on different amplifiers and rows. So the
zero points of all exposures of a tile and band are fitted at once, with one free magnitude per
star and the Gaia XP stars anchoring the absolute level and the colour terms.

Model
-----
Detection ``i`` of star ``s`` in exposure ``e``, on CCD ``k`` (gain ``g_k``), amplifier ``a``, at
0-based row ``y`` of ``ny``, ``u = y / ny - 1/2``::

    m_inst - 2.5 log10 g_k = M_s - Z_eka(u) - colour_term[site(e)] * (c_s - colour_pivot)
    Z_eka(u) = E_e + eta_ek + delta_eka + (S_ek + epsilon_eka) * u
    m_ref_s  = M_s                                          (Gaia XP stars: the anchor)

``M_s`` is the star's AB magnitude (free), ``c_s`` its (V - I)_AB colour, ``E_e`` the exposure's
zero point in electrons (free) and the other terms the hierarchical offsets and gradients of the
per-exposure model (:mod:`.zeropoint`), with the same Gaussian priors. One colour term per site
(the tile and band are fixed), as DR1 fits one per band and site. For a star without Gaia XP its
colour is unknown; only differences between sites see it, so it is a free parameter with the
prior ``c_s - c_med ~ N(0, prior_star_colour)``, ``c_med`` the median colour of the anchored
stars, and enters with the site colour terms of the previous iteration (the model is bilinear
there). The zero point of amplifier ``a`` written out is ``zp_y0 = Z_eka(-1/2) - 2.5 log10 g_k``,
AB mag giving 1 ADU for a star of the pivot colour (the convention of :mod:`.zeropoint` and
:mod:`.scale`).

Solution: weighted, ridge-regularised least squares (maximum a posteriori) with iterative
clipping beyond ``clip_sigma`` robust sigmas; the star magnitudes are eliminated by their Schur
complement (the normal matrix is block diagonal in them), so the dense system has only the
exposure parameters (73 per exposure) whatever the number of stars. Errors are the marginal
posterior standard deviations, scaled up by the robust reduced chi when it exceeds 1.

Stars
-----
The single-epoch detections (:mod:`.detect`) with ``flags == 0``, no DR1 mask bit in their
footprint, S/N at least ``tie_min_snr`` and a half-light radius at most ``tie_max_size_ratio``
times the CCD's stellar one (point sources: a galaxy's aperture flux changes with the seeing;
letting them in doubled the error on the demo), measured by forced aperture photometry at their
positions (:func:`.zeropoint.measure_stars`) and placed on the sky with the fitted WCS (CCDs
with failed astrometry contribute no star). The aperture correction is one per tile and band
(:func:`apply_aperture_correction`). Detections of different exposures within
``tie_match_arcsec`` are one star (friends of friends; a group holding two detections of one
exposure is dropped); a star is anchored by the Gaia XP source within the same radius.

What the demo allows
--------------------
At 1/16 scale an exposure holds ~1 usable star per amplifier, so fitted alone (``[zeropoint]
site_pattern = false``) the amplifier offsets and gradients stay close to their CCD's, whose
gradient ~8 stars measure to ~0.04 mag: a median 0.02-0.025 mag RMS along Y per amplifier on the
demo. With the site pattern (:mod:`.zeropoint_pattern`: every exposure of a site measures the
same amplifiers) each exposure is fitted as a departure from it (priors ``pattern_offset_mag``,
``pattern_slope_mag`` plus the pattern's own error; colour terms and, per band, the aperture
correction from the pattern fit) and the median falls to 0.007-0.008; what is left is mostly
each exposure's overall zero point, which the ~10 Gaia XP stars of a tile and band set.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.camera import CCD_NAMES
from ks4release.errors import InputError
from ks4release.exposure import CcdInfo, read_ccd, read_exposure_header
from ks4release.projection import gnomonic
from ks4release.reduction.zeropoint import (
    DR1_BAD_BITS,
    MODEL_DESCRIPTION,
    CcdGeometry,
    ZpFlag,
    amplifier_of,
    aperture_correction,
    celestial_wcs,
    dead_amplifiers,
    describe_zeropoints,
    instrumental_mags,
    measure_stars,
    read_mask_ccd,
    read_wcs_ccd,
    reference_mags,
)
from ks4release.refcat.formats import read_refcat
from ks4release.settings import ZeropointSettings
from ks4release.survey import REFERENCE_ZEROPOINT

__all__ = [
    "ExposureStars",
    "apply_aperture_correction",
    "band_aperture_corrections",
    "select_tie_detections",
    "stellar_half_light_radii",
    "measure_exposure_stars",
    "run_exposure_stars",
    "read_exposure_stars",
    "reference_stars",
    "PatternPrior",
    "pattern_prior",
    "PATTERN_COLUMNS",
    "linked_observations",
    "FitLayout",
    "Observations",
    "FitResult",
    "solve_zeropoints",
    "link_stars",
    "fit_tile_zeropoints",
    "run_tile_zeropoints",
]

logger = logging.getLogger(__name__)

#: Detection columns the tie-star selection reads.
_DETECT_COLUMNS = ("ccd", "x", "y", "snr", "flux_radius", "flags", "imaflags")
# Precision (mag^-2) of the flat priors of E_e and M_s: keeps a system with a clipped star or a
# star-less exposure solvable; the huge error then says so.
_TINY_PRECISION = 1e-8
# Smallest error (mag) of a measurement or reference magnitude: an error of 0 is not infinite
# weight.
_MIN_SIGMA_MAG = 1e-4


@dataclass(frozen=True, kw_only=True)
class ExposureStars:
    """The measured tie stars of one exposure and what the fit needs to know about it.

    ``stars`` has one row per measured detection: ``ccd``, ``amp`` (1-based), ``x``, ``y``
    (0-based px), ``ra``, ``dec`` (deg), ``m_inst``, ``m_inst_err`` (total instrumental mag,
    -2.5 log10 ADU, and its error) and ``use`` (passed the photometric cuts).
    """

    stem: str
    band: str
    site: str
    tile: str
    ccds: tuple[CcdGeometry, ...]
    stars: Table
    meta: dict


# --------------------------------------------------------------------------------------------
# Stars of one exposure


def stellar_half_light_radii(detections: Table, settings: ZeropointSettings
                             ) -> dict[str, float]:
    """The stars' half-light radius (px) on each CCD, from the clean S/N >= 50 detections.

    The locus of point sources: starting from the 30th percentile of their ``flux_radius``
    (galaxies and blends only lie above it), the median of those within 10 % of the current
    value, three times. A CCD with at least ``r50_min_stars`` such detections gets its own; the
    others get the whole exposure's (one seeing; at full size the distortion changes the pixel
    scale by 1-2 % across the field). With fewer than three bright detections in the exposure,
    those above ``tie_min_snr`` are used. A median over a demo CCD's 2-6 bright detections
    missed by up to 2.4x (one galaxy or blend among them) and moved that CCD's zero point by up
    to 0.4 mag through the aperture.
    """
    ccd, snr, size, clean = _clean_detections(detections)
    clean &= size > 0
    bright = clean & (snr >= 50.0)
    if bright.sum() < 3:
        bright = clean & (snr >= settings.tie_min_snr)
    if not bright.any():
        return {}
    exposure = _stellar_locus(size[bright])
    out = {}
    for name in np.unique(ccd):
        mine = bright & (ccd == name)
        out[str(name)] = (_stellar_locus(size[mine]) if mine.sum() >= settings.r50_min_stars
                          else exposure)
    return out


def _stellar_locus(sizes: np.ndarray) -> float:
    """Half-light radius of the point sources among ``sizes`` (see stellar_half_light_radii)."""
    value = float(np.percentile(sizes, 30))
    for _ in range(3):
        near = sizes[np.abs(sizes - value) <= 0.1 * value]
        if near.size == 0:
            break
        value = float(np.median(near))
    return value


def _clean_detections(detections: Table) -> tuple[np.ndarray, ...]:
    """(ccd, snr, flux_radius, clean) of the detections: clean = no sep flag, no DR1 mask bit
    in the footprint, finite S/N and size."""
    ccd = np.asarray(detections["ccd"]).astype(str)
    snr = np.asarray(detections["snr"], float)
    size = np.asarray(detections["flux_radius"], float)
    clean = ((np.asarray(detections["flags"]) == 0)
             & ((np.asarray(detections["imaflags"]).astype(np.int64) & DR1_BAD_BITS) == 0)
             & np.isfinite(snr) & np.isfinite(size))
    return ccd, snr, size, clean


def select_tie_detections(detections: Table, settings: ZeropointSettings,
                          stellar: dict[str, float] | None = None) -> np.ndarray:
    """Boolean mask of the detections that may tie exposures together (module docstring).

    Clean detections of S/N at least ``tie_min_snr`` and a half-light radius at most
    ``tie_max_size_ratio`` times their CCD's stellar one (``stellar``, by default
    :func:`stellar_half_light_radii`).
    """
    ccd, snr, size, clean = _clean_detections(detections)
    clean &= snr >= settings.tie_min_snr
    if stellar is None:
        stellar = stellar_half_light_radii(detections, settings)
    limit = np.array([stellar.get(c, np.nan) for c in ccd]) * settings.tie_max_size_ratio
    with np.errstate(invalid="ignore"):
        return clean & (size <= limit)


def _ccd_tie_stars(exposure: Path, bad: np.ndarray, header: fits.Header, wcs_file: Path,
                   ccd: CcdInfo, detections: Table, r50_px: float | None,
                   settings: ZeropointSettings) -> tuple[Table, dict[str, float]]:
    """Forced photometry and sky positions of the chosen detections of one CCD."""
    data, _ = read_ccd(exposure, ccd.name)
    w = celestial_wcs(header, wcs_file, ccd.name)
    x = np.asarray(detections["x"], float)
    y = np.asarray(detections["y"], float)
    table, info = measure_stars(data, bad, x, y, gain=ccd.gain, saturation=ccd.saturation,
                                settings=settings, r50_px=r50_px)
    ra, dec = w.all_pix2world(x, y, 0)
    table["ra"], table["dec"] = ra, dec
    table["ccd"] = ccd.name
    table["amp"] = amplifier_of(x, ccd.amplifiers)
    return table, info


def measure_exposure_stars(exposure: Path, mask: Path | str, sources: Path, wcs: Path,
                           settings: ZeropointSettings) -> ExposureStars:
    """Aperture photometry of the tie stars of one exposure (see :class:`ExposureStars`).

    Reads the raw exposure, its mask (``""`` for none), its detections (``layout.sources_path``)
    and its fitted WCS (``layout.wcs_path``). The stars have the columns of
    :func:`.zeropoint.measure_stars` plus ``ccd``, ``amp``, ``ra``, ``dec``;
    :func:`apply_aperture_correction` adds the instrumental magnitudes.
    """
    exposure = Path(exposure)
    info = read_exposure_header(exposure)
    detections = Table.read(sources)
    missing = [c for c in _DETECT_COLUMNS if c not in detections.colnames]
    if missing:
        raise InputError(sources, f"column {missing[0]!r} is missing (expected the detect "
                         "stage's output)", column=missing[0])
    stellar = stellar_half_light_radii(detections, settings)
    chosen = detections[select_tie_detections(detections, settings, stellar)]
    on_ccd = np.asarray(chosen["ccd"]).astype(str)
    geoms, tables, phot = [], [], {}
    for name in CCD_NAMES:
        ccd = info.ccd(name)
        header, ast_ok = read_wcs_ccd(wcs, name)
        bad = read_mask_ccd(mask, name, ccd.shape)
        geoms.append(CcdGeometry(name=name, ny=ccd.shape[0], amplifiers=ccd.amplifiers,
                                 gain=ccd.gain, dead_amps=dead_amplifiers(bad, ccd.amplifiers),
                                 astrometry_ok=ast_ok))
        if ast_ok and (on_ccd == name).any():
            table, phot[name] = _ccd_tie_stars(exposure, bad, header, wcs, ccd,
                                               chosen[on_ccd == name], stellar.get(name),
                                               settings)
            tables.append(table)
    stars = vstack(tables) if tables else _empty_stars()
    meta = {"exposure": exposure.name, "band": info.band, "site": info.site, "tile": info.tile,
            "photometry": phot}
    return ExposureStars(stem=exposure.stem, band=info.band, site=info.site, tile=info.tile,
                         ccds=tuple(geoms), stars=stars, meta=meta)


def run_exposure_stars(*, exposure: Path, mask: Path | str, sources: Path, wcs: Path,
                       out_path: Path, settings: ZeropointSettings) -> None:
    """Measure the tie stars of one exposure (:func:`measure_exposure_stars`) and write them.

    The ECSV (``layout.zeropoint_stars_path``) holds one row per measured detection and, in
    its ``meta``, the exposure's band, site, tile, CCD geometry and per-CCD photometry: what
    the site pattern (:mod:`.zeropoint_pattern`) and the tile fits read back with
    :func:`read_exposure_stars`.
    """
    stars = measure_exposure_stars(Path(exposure), mask, Path(sources), Path(wcs), settings)
    table = stars.stars.copy(copy_data=False)
    table.meta = {"stem": stars.stem, "band": stars.band, "site": stars.site,
                  "tile": stars.tile, "ccds": [asdict(c) for c in stars.ccds],
                  "exposure_meta": stars.meta, "software": f"ks4release {__version__}"}
    with atomic_path(Path(out_path)) as tmp:
        table.write(tmp, format="ascii.ecsv")


def read_exposure_stars(path: Path) -> ExposureStars:
    """The measured tie stars of one exposure, as :func:`run_exposure_stars` wrote them.

    InputError naming the file when it lacks what the fits need.
    """
    table = Table.read(path, format="ascii.ecsv")
    meta = dict(table.meta)
    missing = [k for k in ("stem", "band", "site", "tile", "ccds", "exposure_meta")
               if k not in meta]
    if missing:
        raise InputError(path, f"meta key {missing[0]!r} is missing (expected the zp-stars "
                         "stage's output)")
    ccds = tuple(CcdGeometry(name=str(c["name"]), ny=int(c["ny"]),
                             amplifiers=tuple((int(a), int(b)) for a, b in c["amplifiers"]),
                             gain=float(c["gain"]),
                             dead_amps=tuple(int(a) for a in c["dead_amps"]),
                             astrometry_ok=bool(c["astrometry_ok"])) for c in meta["ccds"])
    table.meta = {}
    if len(table) == 0:
        table = _empty_stars()
    table["ccd"] = np.asarray(table["ccd"]).astype("U2")
    return ExposureStars(stem=str(meta["stem"]), band=str(meta["band"]), site=str(meta["site"]),
                         tile=str(meta["tile"]), ccds=ccds, stars=table,
                         meta=dict(meta["exposure_meta"]))


def apply_aperture_correction(exposures: Sequence[ExposureStars], settings: ZeropointSettings,
                              pooled: dict[str, tuple[float, int]] | None = None
                              ) -> None:
    """Add ``m_inst``, ``m_inst_err`` and ``use`` to the stars of every exposure (in place).

    The aperture correction (large- over small-aperture flux) is measured over the bright
    clean stars of all the given exposures together (:func:`.zeropoint.aperture_correction`):
    a single exposure of the demo holds 1-5 of them, while the fraction of a star's light
    within a fixed multiple of its half-light radius hardly depends on the seeing (it is exactly
    constant for a Moffat profile of fixed beta). ``pooled`` maps a band to a correction
    measured over more exposures (:func:`band_aperture_corrections`); an exposure of a band it
    holds takes that one. With fewer than three stars, ``fallback_aperture_correction``.
    """
    group: tuple[float, int] | None = None
    for e in exposures:
        if pooled is not None and e.band in pooled:
            apcorr, n_apcorr = pooled[e.band]
        else:
            group = group or _aperture_correction_of(exposures, settings)
            apcorr, n_apcorr = group
        e.stars["m_inst"], e.stars["m_inst_err"] = instrumental_mags(e.stars, apcorr)
        e.stars["use"] = (np.asarray(e.stars["cut"]) == 0) & np.isfinite(e.stars["m_inst"])
        e.meta.update({"apcorr": apcorr, "n_apcorr": n_apcorr})


def band_aperture_corrections(exposures: Sequence[ExposureStars], settings: ZeropointSettings
                              ) -> dict[str, tuple[float, int]]:
    """One aperture correction per band over all the given exposures, and its number of stars.

    The ratio depends on the shape of the PSF's wings, not on its width. On the demo the
    corrections of single tiles and bands scattered by 0.5-1 % about the true one, which went
    straight into their zero points; one per site and band (30-70 stars) still scattered by
    0.3 % and left the per-amplifier zero points worse than one per band.
    """
    groups: dict[str, list[ExposureStars]] = defaultdict(list)
    for e in exposures:
        groups[e.band].append(e)
    return {key: _aperture_correction_of(group, settings) for key, group in groups.items()}


def _aperture_correction_of(exposures: Sequence[ExposureStars], settings: ZeropointSettings
                            ) -> tuple[float, int]:
    """The aperture correction over all stars of ``exposures`` (or the fallback, logged)."""
    apcorr, n_apcorr = aperture_correction(vstack([e.stars for e in exposures]),
                                           min_snr=settings.apcorr_min_snr)
    if not math.isfinite(apcorr):
        logger.warning("%s: %d clean stars measure the aperture correction; using %.4f",
                       exposures[0].tile, n_apcorr, settings.fallback_aperture_correction)
        apcorr = settings.fallback_aperture_correction
    return apcorr, n_apcorr


def _empty_stars() -> Table:
    names = ("x", "y", "flux", "flux_err", "flux_big", "flux_big_err", "cut", "big_ok", "ra",
             "dec", "ccd", "amp")
    return Table(names=names, dtype=(float,) * 6 + (int, bool, float, float, "U2", int))


# --------------------------------------------------------------------------------------------
# Linking (pure)


def link_stars(ra: np.ndarray, dec: np.ndarray, exposure: np.ndarray, radius_arcsec: float
               ) -> np.ndarray:
    """Star index of every detection (-1 = not linked): friends of friends within the radius.

    Groups holding two detections of the same exposure are ambiguous and get -1; so do groups
    of one detection (they tie nothing, unless anchored: see :func:`fit_tile_zeropoints`).
    Star indices are 0..n-1 in order of first appearance.
    """
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    n = ra.size
    if n == 0:
        return np.zeros(0, int)
    xi, eta = gnomonic(float(np.median(ra)), float(np.median(dec)), ra, dec)
    pairs = cKDTree(np.column_stack([xi, eta]) * 3600.0).query_pairs(radius_arcsec,
                                                                     output_type="ndarray")
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    exposure = np.asarray(exposure)
    out = np.full(n, -1)
    next_id = 0
    order, first = np.unique(group, return_index=True)
    for g in order[np.argsort(first)]:
        members = np.flatnonzero(group == g)
        if members.size < 2 or np.unique(exposure[members]).size < members.size:
            continue
        out[members] = next_id
        next_id += 1
    return out


def _anchor(ra: np.ndarray, dec: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
            radius_arcsec: float) -> np.ndarray:
    """Index of the reference source within the radius of each position (-1 = none)."""
    if ra.size == 0 or ref_ra.size == 0:
        return np.full(ra.size, -1)
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    xi, eta = gnomonic(ra0, dec0, ra, dec)
    rxi, reta = gnomonic(ra0, dec0, ref_ra, ref_dec)
    dist, idx = cKDTree(np.column_stack([rxi, reta]) * 3600.0).query(
        np.column_stack([xi, eta]) * 3600.0, distance_upper_bound=radius_arcsec)
    return np.where(np.isfinite(dist), idx, -1)


# --------------------------------------------------------------------------------------------
# Fit (pure)


#: Columns of a site-pattern table (:mod:`.zeropoint_pattern`), one row per site, CCD and
#: amplifier: the offset at mid-height and the gradient along Y (mag, relative to the site's
#: mean) and their errors.
PATTERN_COLUMNS = ("site", "ccd", "amp", "offset", "offset_err", "slope", "slope_err")


@dataclass(frozen=True)
class PatternPrior:
    """A site pattern laid out on the exposures of one fit: arrays [exposure, CCD, amplifier]
    of the offset at mid-height (``u = 0``), the gradient along Y and their errors (mag), and
    the colour term of each (site, band) with its error."""

    offset: np.ndarray
    offset_err: np.ndarray
    slope: np.ndarray
    slope_err: np.ndarray
    colour_term: dict[tuple[str, str], tuple[float, float]]

    def colour_terms(self, keys: Sequence[tuple[str, str]], default_width: float
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Prior means and widths of the colour terms of ``keys``: the pattern fit's, or
        (0, ``default_width``) for a (site, band) it did not see."""
        pairs = [self.colour_term.get(tuple(k), (0.0, default_width)) for k in keys]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def at(self, obs: Observations) -> np.ndarray:
        """The pattern's zero point at every detection (its amplifier and row)."""
        i = (obs.exposure, obs.ccd, obs.amp)
        return self.offset[i] + self.slope[i] * obs.u

    def terms(self, e: int, k: int, a: int) -> tuple[float, float, float, float]:
        """(zero point at y = 0, gradient, and their variances) of one amplifier."""
        return (float(self.offset[e, k, a] - 0.5 * self.slope[e, k, a]),
                float(self.slope[e, k, a]),
                float(self.offset_err[e, k, a] ** 2 + 0.25 * self.slope_err[e, k, a] ** 2),
                float(self.slope_err[e, k, a] ** 2))


def pattern_prior(exposures: Sequence[ExposureStars], pattern: Table) -> PatternPrior:
    """The pattern of each exposure's site on its CCDs and amplifiers.

    ValueError naming the site, CCD and amplifier when the pattern lacks one.
    """
    missing = [c for c in PATTERN_COLUMNS if c not in pattern.colnames]
    if missing:
        raise ValueError(f"the site pattern has no column {missing[0]!r}")
    rows = {(str(r["site"]), str(r["ccd"]), int(r["amp"])): r for r in pattern}
    n_ccd = len(exposures[0].ccds)
    n_amp = max(len(c.amplifiers) for e in exposures for c in e.ccds)
    arrays = {k: np.zeros((len(exposures), n_ccd, n_amp))
              for k in ("offset", "offset_err", "slope", "slope_err")}
    for e, exp in enumerate(exposures):
        for k, c in enumerate(exp.ccds):
            for a in range(len(c.amplifiers)):
                row = rows.get((exp.site, c.name, a + 1))
                if row is None:
                    raise ValueError(f"the site pattern has no row for site {exp.site}, CCD "
                                     f"{c.name}, amplifier {a + 1} (exposure {exp.stem})")
                for key, values in arrays.items():
                    values[e, k, a] = float(row[key])
    colour_term = {tuple(key.split("/")): (float(v[0]), float(v[1]))
                   for key, v in pattern.meta.get("colour_terms", {}).items()}
    return PatternPrior(**arrays, colour_term=colour_term)


@dataclass(frozen=True)
class FitLayout:
    """Parameter indices: the colour terms (one per site and band), then the zero points.

    Per exposure (the tile fit, ``pattern_sites`` empty) an exposure's block holds E, eta_k,
    S_k (per CCD k), delta_ka and epsilon_ka (per CCD and amplifier): 73 parameters for 4 CCDs
    of 8 amplifiers. Shared (the site pattern fit, :mod:`.zeropoint_pattern`): each exposure
    has only E, and the 72 amplifier terms are one block per site of ``pattern_sites``.
    """

    colour_keys: tuple[tuple[str, str], ...]
    exposures: tuple[ExposureStars, ...]
    pattern_sites: tuple[str, ...] = ()

    @property
    def n_ccd(self) -> int:
        return len(self.exposures[0].ccds)

    @property
    def n_amp(self) -> int:
        return sum(len(c.amplifiers) for c in self.exposures[0].ccds)

    def amp_block(self) -> int:
        """Number of CCD and amplifier terms (eta, S, delta, epsilon) of one block."""
        return 2 * self.n_ccd + 2 * self.n_amp

    def block(self) -> int:
        """Number of parameters of one exposure."""
        return 1 if self.pattern_sites else 1 + self.amp_block()

    @property
    def size(self) -> int:
        return (len(self.colour_keys) + len(self.exposures) * self.block()
                + len(self.pattern_sites) * self.amp_block())

    def colour_term(self, exposure: ExposureStars) -> int:
        return self.colour_keys.index((exposure.site, exposure.band))

    def indices(self, e: int, k: int, a: int) -> tuple[int, ...]:
        """(E, eta_k, S_k, delta_ka, epsilon_ka) of exposure e, CCD k, amplifier a (0-based)."""
        exp = self.exposures[e]
        n_ct, nk, na = len(self.colour_keys), self.n_ccd, self.n_amp
        i_e = n_ct + e * self.block()
        if self.pattern_sites:
            b = (n_ct + len(self.exposures) + self.pattern_sites.index(exp.site)
                 * self.amp_block() - 1)
        else:
            b = i_e
        j = sum(len(c.amplifiers) for c in exp.ccds[:k]) + a
        return i_e, b + 1 + k, b + 1 + nk + k, b + 1 + 2 * nk + j, b + 1 + 2 * nk + na + j


def _prior(layout: FitLayout, s: ZeropointSettings, pattern: PatternPrior | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Prior precision and mean of every parameter (module docstring; with a site pattern,
    the widths of an exposure's departures from it and the pattern fit's colour terms)."""
    prec = np.zeros(layout.size)
    mean = np.zeros(layout.size)
    n_ct = len(layout.colour_keys)
    if pattern is None:
        prec[:n_ct] = s.prior_colour_term ** -2
    else:
        mean[:n_ct], width = pattern.colour_terms(layout.colour_keys, s.prior_colour_term)
        prec[:n_ct] = width ** -2
    for e, exp in enumerate(layout.exposures):
        for k, c in enumerate(exp.ccds):
            for a in range(len(c.amplifiers)):
                if pattern is None:
                    widths = (s.prior_ccd_offset_mag, s.prior_ccd_slope_mag,
                              s.prior_amp_offset_mag, s.prior_amp_slope_mag)
                else:
                    widths = (s.pattern_offset_mag, s.pattern_slope_mag,
                              math.hypot(s.pattern_offset_mag, pattern.offset_err[e, k, a]),
                              math.hypot(s.pattern_slope_mag, pattern.slope_err[e, k, a]))
                prec[list(layout.indices(e, k, a))] = (_TINY_PRECISION,
                                                       *(w ** -2 for w in widths))
    return prec, mean


@dataclass
class Observations:
    """Flat arrays of the linked detections (one row each)."""

    star: np.ndarray
    exposure: np.ndarray
    ccd: np.ndarray
    amp: np.ndarray
    u: np.ndarray
    value: np.ndarray
    sigma: np.ndarray


def _observations(exposures: Sequence[ExposureStars], floor: float
                  ) -> tuple[Observations, np.ndarray, np.ndarray]:
    """The usable detections of every exposure, plus their (ra, dec)."""
    cols: dict[str, list] = {k: [] for k in ("exposure", "ccd", "amp", "u", "value", "sigma",
                                             "ra", "dec")}
    for e, exp in enumerate(exposures):
        t = exp.stars[np.asarray(exp.stars["use"], bool)]
        k_of = {c.name: k for k, c in enumerate(exp.ccds)}
        usable = {c.name for c in exp.ccds if c.astrometry_ok}
        t = t[np.isin(np.asarray(t["ccd"]).astype(str), list(usable))]
        _check_amplifiers(t, exp)
        k = np.array([k_of[str(c)] for c in t["ccd"]], int)
        ny = np.array([exp.ccds[i].ny for i in k], float)
        gain = np.array([exp.ccds[i].gain for i in k], float)
        cols["exposure"].append(np.full(len(t), e))
        cols["ccd"].append(k)
        cols["amp"].append(np.asarray(t["amp"], int) - 1)
        cols["u"].append(np.asarray(t["y"], float) / np.maximum(ny, 1) - 0.5)
        cols["value"].append(np.asarray(t["m_inst"], float) - 2.5 * np.log10(gain))
        cols["sigma"].append(np.hypot(np.asarray(t["m_inst_err"], float), floor))
        cols["ra"].append(np.asarray(t["ra"], float))
        cols["dec"].append(np.asarray(t["dec"], float))
    flat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    obs = Observations(star=np.zeros(flat["value"].size, int),
                        exposure=flat["exposure"].astype(int), ccd=flat["ccd"].astype(int),
                        amp=flat["amp"].astype(int), u=flat["u"], value=flat["value"],
                        sigma=flat["sigma"])
    return obs, flat["ra"], flat["dec"]


def _check_amplifiers(stars: Table, exposure: ExposureStars) -> None:
    """ValueError naming the exposure when a star is on an unknown CCD or amplifier."""
    n_amps = {c.name: len(c.amplifiers) for c in exposure.ccds}
    for ccd, amp in zip(np.asarray(stars["ccd"]).astype(str), np.asarray(stars["amp"], int),
                        strict=True):
        if not 1 <= amp <= n_amps.get(ccd, 0):
            raise ValueError(f"{exposure.stem}: star on unknown CCD/amplifier ({ccd}, {amp}) "
                             "(amplifiers are 1-based)")


def fit_tile_zeropoints(exposures: Sequence[ExposureStars], reference: Table,
                        settings: ZeropointSettings, pattern: Table | None = None
                        ) -> dict[str, Table]:
    """Fit the zero points of every exposure of one tile and band together (module docstring).

    Parameters
    ----------
    exposures : sequence of ExposureStars
        The measured stars of each exposure (same band; any sites).
    reference : Table
        Gaia XP stars with ``ra``, ``dec`` (deg), ``mag`` and ``mag_err`` (AB in the band) and
        ``colour`` ((V - I)_AB).
    settings : ZeropointSettings
        Priors, error floor, clipping, colour pivot, linking radius, colour prior.
    pattern : Table, optional
        The amplifier pattern of every site (:mod:`.zeropoint_pattern`): the fit is then of
        each exposure's departures from its site's pattern, with the priors
        ``pattern_offset_mag`` and ``pattern_slope_mag``.

    Returns
    -------
    dict
        Exposure stem -> one row per CCD and amplifier with the columns of the per-exposure
        zero-point table (``zp_y0``, ``zp_slope`` and errors, the site's ``colour_term`` and
        error, ``n_stars``, ``rms``, ``flag``) and exposure-level ``meta``.
    """
    if not exposures:
        raise ValueError("fit_tile_zeropoints needs at least one exposure")
    layout = FitLayout(colour_keys=tuple(sorted({(e.site, e.band) for e in exposures})),
                     exposures=tuple(exposures))
    prior = None if pattern is None else pattern_prior(exposures, pattern)
    obs, anchors = linked_observations(exposures, {e.band: reference for e in exposures},
                                       settings)
    result = solve_zeropoints(obs, anchors, layout, settings, prior)
    return _tables(layout, obs, result, anchors, settings, prior)


def linked_observations(exposures: Sequence[ExposureStars], references: dict[str, Table],
                        settings: ZeropointSettings) -> tuple[Observations, dict]:
    """The usable detections tied into stars, and each star's Gaia XP anchor.

    Detections of one band within ``tie_match_arcsec`` of each other are one star
    (:func:`link_stars`); a detection alone in its group still counts when a Gaia XP star of
    ``references[band]`` anchors it. ValueError when no Gaia XP star is detected at all.
    """
    obs, ra, dec = _observations(exposures, settings.error_floor_mag)
    band_of_obs = np.array([e.band for e in exposures])[obs.exposure]
    star = np.full(obs.value.size, -1)
    parts: list[dict[str, np.ndarray]] = []
    n_star = 0
    for band in sorted(set(band_of_obs.tolist())):
        on = np.flatnonzero(band_of_obs == band)
        ref = _usable_reference(references[band], settings)
        ref_of_obs = _anchor(ra[on], dec[on], np.asarray(ref["ra"], float),
                             np.asarray(ref["dec"], float), settings.tie_match_arcsec)
        local = link_stars(ra[on], dec[on], obs.exposure[on], settings.tie_match_arcsec)
        lone = (local < 0) & (ref_of_obs >= 0)
        local[lone] = local.max(initial=-1) + 1 + np.arange(lone.sum())
        linked = local >= 0
        parts.append(_star_anchors(local[linked], ref_of_obs[linked], ref))
        star[on[linked]] = local[linked] + n_star
        n_star += int(local.max(initial=-1)) + 1
    keep = star >= 0
    obs = Observations(**{k: getattr(obs, k)[keep] for k in obs.__dataclass_fields__})
    obs.star = star[keep]
    anchors = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
               for k in ("mag", "err", "colour")}
    if not np.isfinite(anchors["mag"]).any():
        raise ValueError("no Gaia XP star is detected in these exposures: the zero points "
                         "are undetermined")
    return obs, anchors


def _usable_reference(reference: Table, settings: ZeropointSettings) -> Table:
    """The Gaia XP stars with a finite magnitude, error and colour, and an error small enough."""
    mag = np.asarray(reference["mag"], float)
    err = np.asarray(reference["mag_err"], float)
    ok = (np.isfinite(mag) & np.isfinite(err) & np.isfinite(np.asarray(reference["colour"], float))
          & (err <= settings.max_ref_err_mag))
    return reference[ok]


def _star_anchors(star: np.ndarray, ref_of_obs: np.ndarray, ref: Table) -> dict[str, np.ndarray]:
    """Per star: Gaia XP magnitude, error and colour (nan when not anchored).

    A star whose detections match different Gaia XP sources, or only some of them match one
    (a blend), is not anchored.
    """
    n = int(star.max(initial=-1)) + 1
    low = np.full(n, np.iinfo(np.int64).max)
    high = np.full(n, -1)
    np.minimum.at(low, star, ref_of_obs)
    np.maximum.at(high, star, ref_of_obs)
    anchored = (low == high) & (high >= 0)
    out = {}
    for key, col in (("mag", "mag"), ("err", "mag_err"), ("colour", "colour")):
        values = np.asarray(ref[col], float)
        out[key] = np.where(anchored, values[np.where(anchored, high, 0)] if values.size
                            else np.nan, np.nan)
    return out


@dataclass
class FitResult:
    """Fitted parameters, their covariance, which detections were kept and their residuals,
    the error scale (robust reduced chi, at least 1) and the number of anchors kept."""

    theta: np.ndarray
    cov: np.ndarray
    kept: np.ndarray
    resid: np.ndarray
    scale: float
    n_anchor: int


def _design(obs: Observations, anchors: dict, layout: FitLayout, ct_site: np.ndarray,
            pivot: float) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Design matrix over (theta, M_s, c_s) and target, detections first, then anchors."""
    n_obs, n_star, n_theta = obs.value.size, anchors["mag"].size, layout.size
    site_of = np.array([layout.colour_term(e) for e in layout.exposures])
    idx = np.array([layout.indices(e, k, a) for e, k, a in
                    zip(obs.exposure, obs.ccd, obs.amp, strict=True)], int).reshape(-1, 5)
    # A star without Gaia XP has the anchored stars' median colour plus an unknown c_s.
    colour = anchors["colour"][obs.star]
    known = np.isfinite(colour)
    colour = np.where(known, colour, np.nanmedian(anchors["colour"]))
    site = site_of[obs.exposure]
    rows = np.arange(n_obs)
    r, c, v = [], [], []

    def add(rr, cc, vv):
        r.append(np.asarray(rr))
        c.append(np.asarray(cc))
        v.append(np.asarray(vv, float))

    for j, sign_u in ((0, False), (1, False), (2, True), (3, False), (4, True)):
        add(rows, idx[:, j], -(obs.u if sign_u else np.ones(n_obs)))
    add(rows, site, -(colour - pivot))
    add(rows, n_theta + obs.star, np.ones(n_obs))
    add(rows[~known], n_theta + n_star + obs.star[~known], -ct_site[site[~known]])
    anchored = np.flatnonzero(np.isfinite(anchors["mag"]))
    add(n_obs + np.arange(anchored.size), n_theta + anchored, np.ones(anchored.size))
    shape = (n_obs + anchored.size, n_theta + 2 * n_star)
    a = sparse.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))),
                          shape=shape)
    target = np.concatenate([obs.value, anchors["mag"][anchored]])
    return a, target


def _solve(a: sparse.csr_matrix, target: np.ndarray, weight: np.ndarray, prior: np.ndarray,
           prior_mean: np.ndarray, n_theta: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAP solution: theta, its marginal covariance, and the star parameters (Schur complement).

    The star block of the normal matrix couples each star's magnitude only with its own colour,
    so it is inverted star by star in closed form.
    """
    normal = (a.T @ sparse.diags(weight) @ a).tocsr() + sparse.diags(prior)
    rhs = a.T @ (weight * target) + prior * prior_mean
    n_star = (a.shape[1] - n_theta) // 2
    n_aa = normal[:n_theta, :n_theta].toarray()
    n_ab = normal[:n_theta, n_theta:]
    n_bb = normal[n_theta:, n_theta:]
    d = n_bb.diagonal()
    mm, cc = d[:n_star], d[n_star:]
    mc = np.asarray(n_bb[:n_star, n_star:].diagonal()).ravel()
    det = mm * cc - mc ** 2
    inv_bb = sparse.bmat([[sparse.diags(cc / det), sparse.diags(-mc / det)],
                          [sparse.diags(-mc / det), sparse.diags(mm / det)]]).tocsr()
    reduced = n_aa - (n_ab @ inv_bb @ n_ab.T).toarray()
    r_b = rhs[n_theta:]
    cov = np.linalg.inv(reduced)
    theta = cov @ (rhs[:n_theta] - n_ab @ (inv_bb @ r_b))
    stars = inv_bb @ (r_b - n_ab.T @ theta)
    return theta, cov, stars


def solve_zeropoints(obs: Observations, anchors: dict, layout: FitLayout,
                     s: ZeropointSettings, pattern: PatternPrior | None = None) -> FitResult:
    """Fit with robust clipping; the colour terms of stars without XP follow the site terms.

    With ``pattern`` the parameters are an exposure's departures from it: the pattern is
    added to the detections (:meth:`PatternPrior.at`) and the priors are the departures'.
    """
    if pattern is not None:
        obs = replace(obs, value=obs.value + pattern.at(obs))
    n_star = anchors["mag"].size
    anchored = np.isfinite(anchors["mag"])
    sigma = np.maximum(np.concatenate([obs.sigma, np.hypot(anchors["err"][anchored],
                                                           s.error_floor_mag)]), _MIN_SIGMA_MAG)
    theta_precision, theta_mean = _prior(layout, s, pattern)
    prior_mean = np.concatenate([theta_mean, np.zeros(2 * n_star)])
    prior = np.concatenate([theta_precision, np.full(n_star, _TINY_PRECISION),
                            np.where(anchored, 1.0, s.prior_star_colour ** -2)])
    ct_site = np.zeros(len(layout.colour_keys))
    keep = np.ones(sigma.size, bool)
    scale = 1.0
    for _ in range(12):
        a, target = _design(obs, anchors, layout, ct_site, s.colour_pivot)
        theta, cov, stars = _solve(a, target, np.where(keep, sigma ** -2, 0.0), prior, prior_mean,
                                   layout.size)
        resid = target - a @ np.concatenate([theta, stars])
        z = resid / sigma
        scale = max(1.0, 1.4826 * float(np.median(np.abs(z[keep])))) if keep.sum() > 4 else 1.0
        new_keep = np.abs(z) <= s.clip_sigma * scale
        new_ct = theta[:len(layout.colour_keys)]
        if np.array_equal(new_keep, keep) and np.allclose(new_ct, ct_site, atol=1e-4):
            break
        keep, ct_site = new_keep, new_ct
    return FitResult(theta=theta, cov=cov * scale ** 2,
                   kept=keep[:obs.value.size], resid=resid[:obs.value.size], scale=scale,
                   n_anchor=int((keep[obs.value.size:]).sum()))


def _tables(layout: FitLayout, obs: Observations, res: FitResult, anchors: dict,
            s: ZeropointSettings, pattern: PatternPrior | None) -> dict[str, Table]:
    """One zero-point table per exposure from the fitted parameters (plus the site pattern,
    whose errors add in quadrature)."""
    out = {}
    for e, exp in enumerate(layout.exposures):
        i_ct = layout.colour_term(exp)
        rows = []
        for k, c in enumerate(exp.ccds):
            for a in range(len(c.amplifiers)):
                i_e, i_eta, i_s, i_d, i_eps = layout.indices(e, k, a)
                g_mid = np.zeros(layout.size)
                g_mid[[i_e, i_eta, i_d]] = 1.0
                g_slope = np.zeros(layout.size)
                g_slope[[i_s, i_eps]] = 1.0
                g_y0 = g_mid - 0.5 * g_slope
                on = (obs.exposure == e) & (obs.ccd == k) & (obs.amp == a)
                used = on & res.kept
                n = int(used.sum())
                flag = ZpFlag(0)
                if n == 0:
                    flag |= ZpFlag.NO_STARS
                if n < s.min_stars_amp:
                    flag |= ZpFlag.FEW_STARS
                if a + 1 in c.dead_amps:
                    flag |= ZpFlag.DEAD
                if not c.astrometry_ok:
                    flag |= ZpFlag.NO_ASTROMETRY
                p_y0, p_slope, p_y0_var, p_slope_var = (
                    (0.0, 0.0, 0.0, 0.0) if pattern is None else pattern.terms(e, k, a))
                rows.append({
                    "ccd": c.name, "amp": a + 1, "ny": c.ny,
                    "x_start": c.amplifiers[a][0], "x_stop": c.amplifiers[a][1],
                    "zp_y0": float(g_y0 @ res.theta + p_y0 - 2.5 * math.log10(c.gain)),
                    "zp_y0_err": float(math.sqrt(g_y0 @ res.cov @ g_y0 + p_y0_var)),
                    "zp_slope": float(g_slope @ res.theta + p_slope),
                    "zp_slope_err": float(math.sqrt(g_slope @ res.cov @ g_slope
                                                    + p_slope_var)),
                    "colour_term": float(res.theta[i_ct]),
                    "colour_term_err": float(math.sqrt(res.cov[i_ct, i_ct])),
                    "n_stars": n,
                    "rms": float(np.sqrt(np.mean(res.resid[used] ** 2))) if n else float("nan"),
                    "flag": int(flag),
                })
        table = Table(rows=rows)
        describe_zeropoints(table)
        mine = obs.exposure == e
        table.meta.update({
            "colour": "V-I", "colour_pivot": s.colour_pivot,
            "n_stars_used": int((mine & res.kept).sum()),
            "n_stars_clipped": int((mine & ~res.kept).sum()),
            "n_anchored_used": int((mine & res.kept
                                    & np.isfinite(anchors["mag"][obs.star])).sum()),
            "error_scale": res.scale, "model": MODEL_DESCRIPTION,
            "tile_exposures": [x.stem for x in layout.exposures],
            "tile_stars": int(anchors["mag"].size), "tile_anchors_used": res.n_anchor,
            "site_pattern": pattern is not None,
        })
        table.meta.update(exp.meta)
        out[exp.stem] = table
    return out


# --------------------------------------------------------------------------------------------
# The task


def _pooled_corrections(pattern: Table | None, settings: ZeropointSettings
                        ) -> dict[str, tuple[float, int]] | None:
    """The site pattern's aperture corrections per band, when they are to be used."""
    if pattern is None or not settings.pooled_aperture_correction:
        return None
    return {str(band): (float(v[0]), int(v[1]))
            for band, v in pattern.meta.get("aperture_corrections", {}).items()}


def reference_stars(gaia_xp: Path, band: str) -> Table:
    """Gaia XP stars of a tile: ``source_id``, position, AB magnitude in the band, its error
    and (V - I)_AB. InputError naming the file when a needed column is missing."""
    refcat = read_refcat(gaia_xp, "gaia_xp")
    for col in ("source_id", "ra", "dec", "v_jkc_mag", "i_jkc_mag"):
        if col not in refcat.colnames:
            raise InputError(gaia_xp, f"column {col!r} is missing (needed for positions and "
                             "the V-I colour term)", column=col)
    mags = reference_mags(refcat, band)
    return Table({"source_id": np.asarray(refcat["source_id"]),
                  "ra": np.asarray(refcat["ra"], float), "dec": np.asarray(refcat["dec"], float),
                  "mag": mags["mag"], "mag_err": mags["err"], "colour": mags["colour"]})


def run_tile_zeropoints(*, stars: Sequence[Path], gaia_xp: Path, out_paths: Sequence[Path],
                        settings: ZeropointSettings, pattern: Path | None = None) -> None:
    """Fit the zero points of all exposures of one tile and band; one ECSV per exposure.

    Reads the measured tie stars of each exposure (``layout.zeropoint_stars_path``, written by
    :func:`run_exposure_stars`), the tile's Gaia XP catalog (``layout.tile_refcat_path``) and,
    when given, the site pattern (``layout.site_pattern_path``). Writes ``out_paths[i]``
    (``layout.zeropoint_path``) atomically for each exposure: one row per CCD and amplifier
    (columns of :func:`fit_tile_zeropoints`), ``meta`` with band, site, tile, model, colour
    pivot, aperture correction, per-CCD photometry and the tile fit's numbers.
    """
    if len(stars) != len(out_paths):
        raise ValueError("stars and out_paths must have one entry per exposure (lengths "
                         f"{len(stars)} and {len(out_paths)})")
    measured = [read_exposure_stars(Path(p)) for p in stars]
    bands = {m.band for m in measured}
    if len(bands) != 1:
        raise InputError(stars[0], f"exposures of one fit have bands {sorted(bands)}; "
                         "a tile/band fit needs one band")
    site_pattern = None
    if pattern is not None:
        site_pattern = Table.read(pattern, format="ascii.ecsv")
    apply_aperture_correction(measured, settings, _pooled_corrections(site_pattern, settings))
    try:
        tables = fit_tile_zeropoints(measured, reference_stars(Path(gaia_xp), bands.pop()),
                                     settings, site_pattern)
    except ValueError as exc:
        raise InputError(gaia_xp, f"zero-point fit of {measured[0].tile} failed: {exc}") from None
    for m, out in zip(measured, out_paths, strict=True):
        table = tables[m.stem]
        table.meta.update({"zp_target": REFERENCE_ZEROPOINT, "settings": asdict(settings),
                           "software": f"ks4release {__version__}"})
        with atomic_path(Path(out)) as tmp:
            table.write(tmp, format="ascii.ecsv")
