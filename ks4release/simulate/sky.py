"""The true sky of the mini-survey: stars on the stellar locus and Sersic galaxies.

Stars
    V-band counts per magnitude per deg2 at the demo anchor (b ~ -54 deg) follow
    ``2 * 32.5 * 10**(0.21 (V - 14))`` to V = 17.5, measured on the real Gaia XP stars of tile
    0000 (``gaiaxp_0000.fits``: 32.5 per 0.5 mag per deg2 at V = 14, slope 0.21 dex/mag), and
    flatten to 0.08 dex/mag fainter (halo-dominated counts), times ``star_density_factor`` for
    fields closer to the Galactic plane. Colours follow the locus table
    ``_LOCUS`` (AB; median B-V and V-R in bins of V-I, same file; R-I = V-I - V-R), V-I is
    drawn from that file's V-I histogram plus an M-dwarf tail that grows towards faint mags.
    Proper motions (mas/yr) and parallaxes are drawn so that true positions move between the
    Gaia epoch (J2016.0) and the exposures.
Galaxies
    R-band counts ``N(<R) = galaxy_density_deg2 * 10**(0.33 (R - 24))``; a red (Sersic n 2.5-4)
    and a blue (n 0.8-1.5) population with typical AB colours; half-light radius
    ``0.9 * 10**(-0.1 (R - 22))`` arcsec with 0.2 dex scatter; axis ratios and position angles
    random.
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy.table import Table

from ks4release.projection import inverse_gnomonic
from ks4release.simulate.arguments import SimulationConfig
from ks4release.simulate.plan import SurveyPlan, demo_tiles, rng_for

__all__ = ["make_sources", "positions_at", "stellar_locus", "GAIA_EPOCH_MJD", "SOURCE_COLUMNS"]

#: MJD of J2016.0, the Gaia DR3 reference epoch of the truth positions.
GAIA_EPOCH_MJD = 57388.5

# Stellar locus (AB): V-I node, median B-V, median V-R. Nodes 0.3-2.1 measured on the real
# Gaia XP stars of tile 0000 (bins of 0.2 mag in V-I); the ends are extrapolated.
_LOCUS = np.array([
    [0.10, 0.35, 0.08], [0.30, 0.484, 0.180], [0.50, 0.676, 0.282], [0.70, 0.848, 0.402],
    [0.90, 1.005, 0.527], [1.10, 1.140, 0.620], [1.30, 1.242, 0.696], [1.50, 1.316, 0.761],
    [1.70, 1.349, 0.814], [1.90, 1.380, 0.868], [2.10, 1.400, 0.920], [3.00, 1.450, 1.150],
])
# V-I (AB) histogram of the same stars (V < 17), bins of 0.2 mag starting at 0.0.
_VI_HIST = np.array([267, 2959, 1577, 604, 282, 182, 126, 97, 43, 34, 20], dtype=float)

#: Columns of the truth source table, in order.
SOURCE_COLUMNS = ("id", "ra", "dec", "pmra", "pmdec", "parallax", "type", "mag_B", "mag_V",
                  "mag_R", "mag_I", "r_eff_arcsec", "axis_ratio", "pa_deg", "sersic_n")


def stellar_locus(v_minus_i: np.ndarray) -> dict[str, np.ndarray]:
    """AB colours B-V, V-R, R-I of stars on the locus at V-I (AB)."""
    vi = np.asarray(v_minus_i, dtype=float)
    bv = np.interp(vi, _LOCUS[:, 0], _LOCUS[:, 1])
    vr = np.interp(vi, _LOCUS[:, 0], _LOCUS[:, 2])
    return {"B-V": bv, "V-R": vr, "R-I": vi - vr}


def _star_counts_per_mag(v: np.ndarray) -> np.ndarray:
    """Stars per magnitude per deg2 at V (AB), see the module docstring."""
    bright = 2 * 32.5 * 10 ** (0.21 * (v - 14.0))
    faint = 2 * 32.5 * 10 ** (0.21 * 3.5) * 10 ** (0.08 * (v - 17.5))
    return np.where(v <= 17.5, bright, faint)


def _draw_from_pdf(rng: np.random.Generator, grid: np.ndarray, pdf: np.ndarray, n: int
                   ) -> np.ndarray:
    """Inverse-CDF samples from a tabulated (unnormalised) pdf."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    return np.interp(rng.random(n) * cdf[-1], cdf, grid)


def _area_deg2(plan: SurveyPlan) -> float:
    """Area of the tangent-plane footprint in deg2."""
    x0, x1, y0, y1 = plan.footprint_deg
    return (x1 - x0) * (y1 - y0)


def _uniform_positions(rng: np.random.Generator, plan: SurveyPlan, n: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Positions uniform over the footprint."""
    x0, x1, y0, y1 = plan.footprint_deg
    xi, eta = rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)
    return inverse_gnomonic(plan.centre_deg[0], plan.centre_deg[1], xi, eta)


def _star_vi(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """V - I (AB) of stars: the real histogram plus a faint-end M-dwarf tail."""
    edges = np.arange(_VI_HIST.size + 1) * 0.2
    k = rng.choice(_VI_HIST.size, size=v.size, p=_VI_HIST / _VI_HIST.sum())
    vi = edges[k] + rng.random(v.size) * 0.2
    red = rng.random(v.size) < 0.05 + 0.15 * np.clip((v - 17.0) / 5.0, 0.0, 1.0)
    return np.where(red, rng.uniform(1.4, 3.0, v.size), vi)


def _star_kinematics(rng: np.random.Generator, v: np.ndarray, vi: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """Proper motions (mas/yr) and parallaxes (mas) from a crude main-sequence distance."""
    abs_v = 4.5 + 3.5 * (vi - 0.5)
    dist_pc = 10 ** ((v - abs_v + 5.0) / 5.0)
    parallax = 1000.0 / dist_pc
    vt = 4.74 * np.maximum(parallax, 0.02)  # mas/yr per km/s
    return {"pmra": rng.normal(0.0, 60.0, v.size) * vt / 4.74 / 10.0 + rng.normal(0, 2, v.size),
            "pmdec": rng.normal(-3.0, 60.0, v.size) * vt / 4.74 / 10.0 + rng.normal(0, 2, v.size),
            "parallax": parallax}


def _bright_star_positions(cfg: SimulationConfig, plan: SurveyPlan, rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray]:
    """One position inside every CCD of every tile (chip interior, nominal tile centre)."""
    p = cfg.camera.pixel_scale_arcsec / 3600.0
    ras, decs = [], []
    for tile in demo_tiles(cfg):
        for ccd in cfg.camera.ccds:
            for _ in range(cfg.bright_stars_per_ccd):
                fx = ccd.x0_px + rng.uniform(0.2, 0.8) * ccd.nx
                fy = ccd.y0_px + rng.uniform(0.2, 0.8) * ccd.ny
                r, d = inverse_gnomonic(tile.ra_deg, tile.dec_deg, np.array([-fx * p]),
                                     np.array([fy * p]))
                ras.append(r[0])
                decs.append(d[0])
    return np.array(ras), np.array(decs)


def _stars(cfg: SimulationConfig, plan: SurveyPlan) -> dict[str, np.ndarray]:
    """Field stars from the count model plus the bright stars placed on every CCD."""
    rng = rng_for(cfg.seed, "stars")
    grid = np.linspace(10.0, cfg.star_mag_limit, 2000)
    mean = (np.trapezoid(_star_counts_per_mag(grid), grid) * _area_deg2(plan)
            * cfg.star_density_factor)
    n = int(rng.poisson(mean))
    v = _draw_from_pdf(rng, grid, _star_counts_per_mag(grid), n)
    ra, dec = _uniform_positions(rng, plan, n)
    bra, bdec = _bright_star_positions(cfg, plan, rng)
    v = np.concatenate([v, rng.uniform(11.5, 13.0, bra.size)])
    ra, dec = np.concatenate([ra, bra]), np.concatenate([dec, bdec])
    vi = _star_vi(rng, v)
    locus = stellar_locus(vi)
    bv = locus["B-V"] + rng.normal(0.0, 0.03, v.size)
    out = {"ra": ra, "dec": dec, "mag_V": v, "mag_B": v + bv, "mag_R": v - locus["V-R"],
           "mag_I": v - vi}
    out.update(_star_kinematics(rng, v, vi))
    return out


def _galaxies(cfg: SimulationConfig, plan: SurveyPlan) -> dict[str, np.ndarray]:
    """Galaxies from the count model with red and blue populations."""
    rng = rng_for(cfg.seed, "galaxies")
    mean = cfg.galaxy_density_deg2 * 10 ** (0.33 * (cfg.galaxy_mag_limit - 24.0)) * _area_deg2(plan)
    n = int(rng.poisson(mean))
    grid = np.linspace(15.0, cfg.galaxy_mag_limit, 1000)
    r = _draw_from_pdf(rng, grid, 10 ** (0.33 * grid), n)
    ra, dec = _uniform_positions(rng, plan, n)
    red = rng.random(n) < 0.4 - 0.2 * np.clip((r - 18.0) / 6.0, 0.0, 1.0)
    vr = np.where(red, 0.55, 0.30) + rng.normal(0, 0.08, n)
    bv = np.where(red, 0.95, 0.45) + rng.normal(0, 0.10, n)
    ri = np.where(red, 0.55, 0.30) + rng.normal(0, 0.08, n)
    r_eff = 0.9 * 10 ** (-0.1 * (r - 22.0) + rng.normal(0, 0.2, n)) * np.where(red, 0.8, 1.0)
    return {"ra": ra, "dec": dec, "mag_R": r, "mag_V": r + vr, "mag_B": r + vr + bv,
            "mag_I": r - ri, "r_eff_arcsec": r_eff,
            "axis_ratio": np.where(red, rng.uniform(0.5, 1.0, n), rng.uniform(0.2, 1.0, n)),
            "pa_deg": rng.uniform(0.0, 180.0, n),
            "sersic_n": np.where(red, rng.uniform(2.5, 4.0, n), rng.uniform(0.8, 1.5, n))}


def _as_table(stars: dict[str, np.ndarray], gals: dict[str, np.ndarray]) -> Table:
    """Stars and galaxies in one table with the columns of SOURCE_COLUMNS."""
    ns, ng = stars["ra"].size, gals["ra"].size
    zeros = {"pmra": 0.0, "pmdec": 0.0, "parallax": 0.0, "r_eff_arcsec": 0.0,
             "axis_ratio": 1.0, "pa_deg": 0.0, "sersic_n": 0.0}
    cols: dict[str, np.ndarray] = {"id": np.arange(1, ns + ng + 1, dtype=np.int64)}
    for name in SOURCE_COLUMNS[1:]:
        if name == "type":
            cols[name] = np.array(["star"] * ns + ["galaxy"] * ng)
            continue
        a = stars.get(name, np.full(ns, zeros.get(name, 0.0)))
        b = gals.get(name, np.full(ng, zeros.get(name, 0.0)))
        cols[name] = np.concatenate([a, b]).astype(np.float64)
    return Table(cols)


_UNITS = {"ra": (u.deg, "Right ascension at J2016.0 (ICRS)"),
          "dec": (u.deg, "Declination at J2016.0 (ICRS)"),
          "pmra": (u.mas / u.yr, "Proper motion in RA * cos(Dec)"),
          "pmdec": (u.mas / u.yr, "Proper motion in Dec"),
          "parallax": (u.mas, "Parallax"),
          "r_eff_arcsec": (u.arcsec, "Sersic half-light radius along the major axis (galaxies)"),
          "axis_ratio": (None, "Minor/major axis ratio (galaxies; 1 for stars)"),
          "pa_deg": (u.deg, "Major-axis position angle, east of north (galaxies)"),
          "sersic_n": (None, "Sersic index (galaxies; 0 for point sources)"),
          "id": (None, "Truth source identifier"),
          "type": (None, "'star' or 'galaxy'")}


def _describe(table: Table) -> Table:
    """Units and descriptions of the truth columns."""
    for name, (unit, text) in _UNITS.items():
        table[name].unit = unit
        table[name].description = text
    for b in "BVRI":
        table[f"mag_{b}"].unit = u.mag
        table[f"mag_{b}"].description = f"True total {b} magnitude (AB)"
    return table


def make_sources(cfg: SimulationConfig, plan: SurveyPlan) -> Table:
    """The truth catalog: every star and galaxy of the footprint (ra/dec at J2016.0)."""
    return _describe(_as_table(_stars(cfg, plan), _galaxies(cfg, plan)))


def positions_at(sources: Table, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """True (ra, dec) in degrees at ``mjd``, moving each source by its proper motion."""
    dt_yr = (mjd - GAIA_EPOCH_MJD) / 365.25
    dec = np.asarray(sources["dec"], dtype=float)
    cosd = np.cos(np.radians(dec))
    ra = np.asarray(sources["ra"], dtype=float) + np.asarray(sources["pmra"]) * dt_yr / 3.6e6 / cosd
    dec = dec + np.asarray(sources["pmdec"]) * dt_yr / 3.6e6
    return ra % 360.0, dec
