"""The amplifier zero-point pattern of each site's camera, fitted once from the whole release.

DR1 finds the zero point varying by up to 0.1 mag along Y within an amplifier and notes that
"their consistency across filters suggests a common instrumental origin". An exposure of the
scaled demo holds about one usable star per amplifier, far too few to measure an amplifier's
offset and gradient to 0.01 mag, but every exposure a site takes shows the same pattern. So the
pattern is fitted once per site from all its exposures, every tile and band together, and the
tile fits (:mod:`.zeropoint_tile`) then fit each exposure as a small departure from it.

Model
-----
That of the tile fit, with the CCD and amplifier terms shared::

    m_inst - 2.5 log10 g_k = M_s - Z_eka(u) - colour_term[site(e), band(e)] * (c_s - pivot)
    Z_eka(u) = E_e + eta_k + delta_ka + (S_k + epsilon_ka) * u          (site of e)

``E_e`` is each exposure's zero point; ``eta``, ``S``, ``delta``, ``epsilon`` are one set per
site with the hierarchical priors of the tile fit, the widths of ``delta`` and ``epsilon``
estimated by the fit itself (``estimate_amp_widths``); one colour term per site and band. Stars
are linked within each band across all exposures (tiles overlap) and anchored by the Gaia XP
stars of every tile (duplicates removed by ``source_id``).

The pattern written is, per site, CCD and amplifier, ``offset = eta_k + delta_ka`` minus its
mean over the site's amplifiers that hold stars (a constant is the exposures' business), and
``slope = S_k + epsilon_ka``, with their marginal errors.

Scale: the dense system has one parameter per exposure plus 72 per site, about 1 s for the
demo's 71 exposures; the stage fits each site from at most ``pattern_max_exposures`` (400)
exposures spread over its dates, so a DR1-size release (17,600 exposures) stays at ~1,200
parameters. A pattern that drifts with time (a new flat, a camera intervention) would need
one per site and period, which DR1 does not describe and this stage does not do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from astropy.table import Table, unique, vstack

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.errors import InputError
from ks4release.reduction.zeropoint import ZpFlag
from ks4release.reduction.zeropoint_tile import (
    ExposureStars,
    FitLayout,
    FitResult,
    Observations,
    apply_aperture_correction,
    band_aperture_corrections,
    linked_observations,
    read_exposure_stars,
    reference_stars,
    solve_zeropoints,
)
from ks4release.settings import ZeropointSettings

__all__ = ["PATTERN_MODEL", "fit_site_patterns", "run_site_pattern"]

logger = logging.getLogger(__name__)

#: Most refits of :func:`_fit_with_estimated_widths`.
_WIDTH_ROUNDS = 6
#: Smallest estimated width, mag (a width of 0 would freeze every amplifier to its CCD).
_MIN_WIDTH_MAG = 0.002

#: One-line statement of the pattern model (ECSV meta).
PATTERN_MODEL = (
    "zp(y) = E_exposure + offset + slope * (y / ny - 1/2) per site, CCD and amplifier, shared by "
    "all exposures and bands of the site; offset relative to the site's mean; fitted with the "
    "tile fit's stars and priors (ks4release.reduction.zeropoint_pattern)"
)


def fit_site_patterns(exposures: Sequence[ExposureStars], references: dict[str, Table],
                      settings: ZeropointSettings) -> Table:
    """Fit the amplifier pattern of every site from all ``exposures`` (module docstring).

    ``references`` maps each band to its Gaia XP stars (columns of
    :func:`.zeropoint_tile.reference_stars`). Returns one row per site, CCD and amplifier with
    :data:`.zeropoint_tile.PATTERN_COLUMNS` plus ``n_stars``, ``n_exposures`` and ``flag``
    (:class:`.zeropoint.ZpFlag`); ``meta`` holds the colour terms and fit numbers. ValueError
    when no Gaia XP star is detected.
    """
    if not exposures:
        raise ValueError("fit_site_patterns needs at least one exposure")
    layout = FitLayout(colour_keys=tuple(sorted({(e.site, e.band) for e in exposures})),
                       exposures=tuple(exposures),
                       pattern_sites=tuple(sorted({e.site for e in exposures})))
    obs, anchors = linked_observations(exposures, references, settings)
    settings, result = _fit_with_estimated_widths(obs, anchors, layout, settings)
    site_of_obs = np.array([e.site for e in exposures])[obs.exposure]
    rows = []
    for site in layout.pattern_sites:
        rows.extend(_site_rows(layout, result, obs, site_of_obs, site, settings))
    table = Table(rows=rows)
    for col in ("offset", "offset_err", "slope", "slope_err"):
        table[col].unit = "mag"
    table.meta.update({
        "model": PATTERN_MODEL,
        "colour": "V-I", "colour_pivot": settings.colour_pivot,
        "colour_terms": {f"{s}/{b}": [float(result.theta[i]),
                                      float(math.sqrt(result.cov[i, i]))]
                         for i, (s, b) in enumerate(layout.colour_keys)},
        "exposures": {site: sum(e.site == site for e in exposures)
                      for site in layout.pattern_sites},
        "n_stars_used": int(result.kept.sum()), "n_stars_clipped": int((~result.kept).sum()),
        "n_anchors_used": result.n_anchor, "error_scale": result.scale,
        "prior_amp_offset_mag": settings.prior_amp_offset_mag,
        "prior_amp_slope_mag": settings.prior_amp_slope_mag,
    })
    return table


def _fit_with_estimated_widths(obs: Observations, anchors: dict, layout: FitLayout,
                               settings: ZeropointSettings
                               ) -> tuple[ZeropointSettings, FitResult]:
    """The pattern fit with the widths of the amplifiers' offsets and gradients about their
    CCD's estimated from the fit itself (``estimate_amp_widths``; empirical Bayes).

    Expectation-maximisation for a Gaussian prior of unknown variance: the width becomes the
    root mean of (posterior mean^2 + posterior variance) over the amplifiers that hold stars,
    and the fit is repeated, at most ``_WIDTH_ROUNDS`` times or until the widths change by
    less than 5 %. With few stars per amplifier the configured widths decide how far an
    amplifier's own stars pull it from its CCD; on the demo they were twice the simulated
    scatter and left the poorly covered amplifiers noisier than their neighbours' help allows.
    Returns the settings with the widths used and the result.
    """
    result = solve_zeropoints(obs, anchors, layout, settings)
    if not settings.estimate_amp_widths:
        return settings, result
    offsets, slopes = _amp_indices(layout, obs)
    for _ in range(_WIDTH_ROUNDS):
        widths = [max(_MIN_WIDTH_MAG, float(np.sqrt(np.mean(result.theta[i] ** 2
                                                               + np.diag(result.cov)[i]))))
                  for i in (offsets, slopes)]
        previous = (settings.prior_amp_offset_mag, settings.prior_amp_slope_mag)
        settings = dataclasses.replace(settings, prior_amp_offset_mag=widths[0],
                                       prior_amp_slope_mag=widths[1])
        result = solve_zeropoints(obs, anchors, layout, settings)
        if all(abs(w / p - 1.0) < 0.05 for w, p in zip(widths, previous, strict=True)):
            break
    return settings, result


def _amp_indices(layout: FitLayout, obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Parameter indices of the (delta, epsilon) of every site's amplifiers that hold stars."""
    site_of = np.array([e.site for e in layout.exposures])
    offsets, slopes = [], []
    for site in layout.pattern_sites:
        e0 = int(np.flatnonzero(site_of == site)[0])
        mine = site_of[obs.exposure] == site
        for k, c in enumerate(layout.exposures[e0].ccds):
            for a in range(len(c.amplifiers)):
                if np.any(mine & (obs.ccd == k) & (obs.amp == a)):
                    _, _, _, i_d, i_eps = layout.indices(e0, k, a)
                    offsets.append(i_d)
                    slopes.append(i_eps)
    return np.array(offsets, int), np.array(slopes, int)


def _site_rows(layout: FitLayout, result: FitResult, obs: Observations,
               site_of_obs: np.ndarray, site: str, settings: ZeropointSettings) -> list[dict]:
    """The pattern rows of one site: offsets relative to the mean of its amplifiers with stars."""
    e0 = next(i for i, e in enumerate(layout.exposures) if e.site == site)
    ccds = layout.exposures[e0].ccds
    dead_everywhere = set.intersection(*({(c.name, a) for c in x.ccds for a in c.dead_amps}
                                         for x in layout.exposures if x.site == site))
    mine = (site_of_obs == site) & result.kept
    amps, g_mid, g_slope, counts = [], [], [], []
    for k, c in enumerate(ccds):
        for a in range(len(c.amplifiers)):
            _, i_eta, i_s, i_d, i_eps = layout.indices(e0, k, a)
            mid, slope = np.zeros(layout.size), np.zeros(layout.size)
            mid[[i_eta, i_d]] = 1.0
            slope[[i_s, i_eps]] = 1.0
            on = mine & (obs.ccd == k) & (obs.amp == a)
            amps.append((c.name, a + 1))
            g_mid.append(mid)
            g_slope.append(slope)
            counts.append((int(on.sum()), int(np.unique(obs.exposure[on]).size)))
    g_mid_arr = np.array(g_mid)
    with_stars = np.array([n > 0 for n, _ in counts])
    if with_stars.any():
        g_mid_arr = g_mid_arr - g_mid_arr[with_stars].mean(axis=0)
    rows = []
    for (ccd, amp), gm, gs, (n, n_exp) in zip(amps, g_mid_arr, g_slope, counts, strict=True):
        flag = ZpFlag(0)
        if n == 0:
            flag |= ZpFlag.NO_STARS
        if n < settings.min_stars_amp:
            flag |= ZpFlag.FEW_STARS
        if (ccd, amp) in dead_everywhere:
            flag |= ZpFlag.DEAD
        rows.append({
            "site": site, "ccd": ccd, "amp": amp,
            "offset": float(gm @ result.theta),
            "offset_err": float(math.sqrt(gm @ result.cov @ gm)),
            "slope": float(gs @ result.theta),
            "slope_err": float(math.sqrt(gs @ result.cov @ gs)),
            "n_stars": n, "n_exposures": n_exp, "flag": int(flag),
        })
    return rows


def _references(gaia_xp: Sequence[Path], bands: set[str]) -> dict[str, Table]:
    """Gaia XP stars of all tiles per band, each star once (tiles overlap)."""
    out = {}
    for band in sorted(bands):
        tables = [reference_stars(Path(p), band) for p in gaia_xp]
        out[band] = unique(vstack(tables), keys="source_id") if tables else Table()
    return out


def run_site_pattern(*, stars: Sequence[Path], gaia_xp: Sequence[Path], out_path: Path,
                     settings: ZeropointSettings) -> None:
    """Fit the pattern of every site from the tie stars of all exposures; write one ECSV.

    Reads the measured tie stars of every exposure (``layout.zeropoint_stars_path``) and the
    Gaia XP catalog of every tile (``layout.tile_refcat_path``); the aperture correction is
    one per band over all the exposures (``pooled_aperture_correction``, written to the
    table's meta for the tile fits; otherwise one per tile and band). Writes ``out_path``
    (``layout.site_pattern_path``) atomically.
    """
    measured = [read_exposure_stars(Path(p)) for p in stars]
    pooled = (band_aperture_corrections(measured, settings)
              if settings.pooled_aperture_correction else None)
    groups: dict[tuple[str, str], list[ExposureStars]] = defaultdict(list)
    for m in measured:
        groups[(m.tile, m.band)].append(m)
    for group in groups.values():
        apply_aperture_correction(group, settings, pooled)
    references = _references(gaia_xp, {m.band for m in measured})
    try:
        table = fit_site_patterns(measured, references, settings)
    except ValueError as exc:
        raise InputError(out_path, f"the site pattern fit failed: {exc}") from None
    if pooled is not None:
        table.meta["aperture_corrections"] = {band: [value, n]
                                              for band, (value, n) in sorted(pooled.items())}
    table.meta.update({"settings": asdict(settings), "software": f"ks4release {__version__}"})
    for site, n in table.meta["exposures"].items():
        rows = table[table["site"] == site]
        logger.info("site pattern %s: %d exposures, %d stars, median offset error %.4f mag",
                    site, n, int(np.sum(rows["n_stars"])), float(np.median(rows["offset_err"])))
    with atomic_path(Path(out_path)) as tmp:
        table.write(tmp, format="ascii.ecsv")
