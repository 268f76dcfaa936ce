"""Reference catalogs in the archives' own column names, drawn from the truth with errors.

Photometric systems (what each catalog's magnitudes are in, and how they relate to the survey's
AB scale, which is what ``truth/sources.parquet`` and the zero points use):

* ``gaia_dr3.parquet``: Gaia G, BP, RP in the Gaia (Vega-like) system, from the truth via the
  Riello et al. (2021) G - V polynomial in Johnson V - I (Vega). Positions at J2016.0.
* ``gaia_xp.parquet``: Johnson-Kron-Cousins B, V, R, I synthetic photometry, **Vega**, like the
  Gaia archive's ``*_jkc_mag``. Convert with :data:`VEGA_TO_AB`: ``m_AB = m_Vega + VEGA_TO_AB``
  (Blanton & Roweis 2007). Fluxes (``*_jkc_flux``) and their errors are W m-2 nm-1, with the
  Vega zero points :data:`VEGA_FLUX_W_M2_NM` (Bessell 1998). Flag 1 = reliable, 0 = not
  (relative flux error above 3%).
* ``delve_dr2.parquet``: DECam g, r, i, z **AB** MAG_AUTO, from the true BVRI AB magnitudes
  interpolated in log wavelength; 99 marks a non-detection, as in the DELVE archive.
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy.table import Table

from ks4release.simulate.plan import rng_for

__all__ = ["VEGA_TO_AB", "VEGA_FLUX_W_M2_NM", "gaia_dr3_catalog", "gaia_xp_catalog",
           "delve_catalog", "gaia_source_id", "GAIA_XP_G_LIMIT", "GAIA_G_LIMIT"]

#: m_AB - m_Vega for the Johnson-Cousins bands (Blanton & Roweis 2007).
VEGA_TO_AB = {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}
#: Flux density of a 0-mag (Vega) source, W m-2 nm-1 (Bessell 1998).
VEGA_FLUX_W_M2_NM = {"B": 6.32e-11, "V": 3.63e-11, "R": 2.18e-11, "I": 1.13e-11}
#: Gaia DR3 completeness limit (G) and the Gaia XP synthetic-photometry limit (G < 17.65).
GAIA_G_LIMIT = 21.0
GAIA_XP_G_LIMIT = 17.65
# DELVE DR2 median 5-sigma depths (AB) and effective wavelengths (nm); ours for the bands.
_DELVE_DEPTH = {"g": 24.3, "r": 23.9, "i": 23.5, "z": 22.8}
_DELVE_WAVE = {"g": 475.0, "r": 635.0, "i": 775.0, "z": 925.0}
_KS4_WAVE = {"B": 440.0, "V": 550.0, "R": 650.0, "I": 800.0}


def _vega_vi(sources: Table) -> np.ndarray:
    """Johnson V - I in the Vega system from the true AB magnitudes."""
    return (np.asarray(sources["mag_V"]) - VEGA_TO_AB["V"]) - (
        np.asarray(sources["mag_I"]) - VEGA_TO_AB["I"])


def gaia_source_id(ra: np.ndarray, dec: np.ndarray, truth_id: np.ndarray) -> np.ndarray:
    """Gaia-style ids: level-12 nested HEALPix index * 2**35 + the truth id (< 2**35)."""
    import healpy as hp

    pix = hp.ang2pix(4096, ra, dec, nest=True, lonlat=True).astype(np.int64)
    return pix * np.int64(2**35) + truth_id.astype(np.int64)


def gaia_g(sources: Table) -> dict[str, np.ndarray]:
    """True G, BP, RP from V and V - I (Vega), Riello et al. (2021)-like relations."""
    x = _vega_vi(sources)
    v = np.asarray(sources["mag_V"]) - VEGA_TO_AB["V"]
    g = v - 0.01760 - 0.006860 * x - 0.1732 * x**2
    bp_rp = -0.066 + 1.2061 * x - 0.0614 * x**2
    bp = g - 0.15 + 0.45 * bp_rp
    return {"G": g, "BP": bp, "RP": bp - bp_rp}


def _gaia_completeness(rng: np.random.Generator, g: np.ndarray) -> np.ndarray:
    """Which sources Gaia detected: 99% to G ~ 20.5, falling to 0 past G ~ 21."""
    p = 0.99 / (1.0 + np.exp((g - (GAIA_G_LIMIT - 0.2)) / 0.15))
    return rng.random(g.size) < p


def _sigma_pos_mas(g: np.ndarray) -> np.ndarray:
    """Gaia DR3-like positional error (mas) versus G."""
    return np.maximum(0.02, 0.5 * 10 ** (0.37 * (g - 20.0)))


def gaia_dr3_catalog(sources: Table, seed: int) -> Table:
    """Gaia DR3 ``gaia_source``-like table: stars to G ~ 21 at J2016.0, with errors."""
    rng = rng_for(seed, "gaia_dr3")
    phot = gaia_g(sources)
    star = np.asarray(sources["type"]) == "star"
    keep = star & _gaia_completeness(rng, phot["G"])
    s = sources[keep]
    g = phot["G"][keep]
    sig = _sigma_pos_mas(g)
    n = len(s)
    dec = np.asarray(s["dec"]) + rng.normal(0, 1, n) * sig / 3.6e6
    ra = np.asarray(s["ra"]) + rng.normal(0, 1, n) * sig / 3.6e6 / np.cos(np.radians(dec))
    mag_err = 0.0003 + 0.01 * 10 ** (0.4 * (g - 20.0))
    t = Table()
    t["source_id"] = gaia_source_id(np.asarray(s["ra"]), np.asarray(s["dec"]), np.asarray(s["id"]))
    t["ra"], t["dec"] = ra % 360.0, dec
    t["ra_error"], t["dec_error"] = sig, sig
    t["pmra"] = np.asarray(s["pmra"]) + rng.normal(0, 1, n) * sig * 1.1
    t["pmdec"] = np.asarray(s["pmdec"]) + rng.normal(0, 1, n) * sig * 1.1
    t["parallax"] = np.asarray(s["parallax"]) + rng.normal(0, 1, n) * sig * 1.2
    t["phot_g_mean_mag"] = g + rng.normal(0, 1, n) * mag_err
    t["phot_bp_mean_mag"] = phot["BP"][keep] + rng.normal(0, 1, n) * mag_err * 5
    t["phot_rp_mean_mag"] = phot["RP"][keep] + rng.normal(0, 1, n) * mag_err * 5
    t["ref_epoch"] = np.full(n, 2016.0)
    return _describe_gaia(t)


def _describe_gaia(t: Table) -> Table:
    """Units and descriptions of the Gaia DR3 columns."""
    meta = {"source_id": (None, "Gaia DR3-like source identifier"),
            "ra": (u.deg, "Right ascension at ref_epoch (ICRS)"),
            "dec": (u.deg, "Declination at ref_epoch (ICRS)"),
            "ra_error": (u.mas, "Standard error of ra * cos(dec)"),
            "dec_error": (u.mas, "Standard error of dec"),
            "pmra": (u.mas / u.yr, "Proper motion in RA * cos(dec)"),
            "pmdec": (u.mas / u.yr, "Proper motion in Dec"),
            "parallax": (u.mas, "Parallax"),
            "phot_g_mean_mag": (u.mag, "G mean magnitude (Gaia Vega system)"),
            "phot_bp_mean_mag": (u.mag, "BP mean magnitude (Gaia Vega system)"),
            "phot_rp_mean_mag": (u.mag, "RP mean magnitude (Gaia Vega system)"),
            "ref_epoch": (u.yr, "Reference epoch (Julian year)")}
    for name, (unit, text) in meta.items():
        t[name].unit = unit
        t[name].description = text
    return t


def gaia_xp_catalog(sources: Table, gaia: Table, seed: int) -> Table:
    """Gaia XP JKC synthetic photometry (Vega) of the Gaia stars with G < 17.65."""
    rng = rng_for(seed, "gaia_xp")
    g = np.asarray(gaia["phot_g_mean_mag"])
    sel = g < GAIA_XP_G_LIMIT
    gx = gaia[sel]
    truth_idx = np.searchsorted(np.asarray(sources["id"]),
                                np.asarray(gx["source_id"]) % 2**35)
    t = Table()
    t["source_id"] = np.asarray(gx["source_id"])
    t["ra"], t["dec"] = np.asarray(gx["ra"]), np.asarray(gx["dec"])
    for b, factor in (("B", 2.5), ("V", 1.0), ("R", 1.0), ("I", 1.2)):
        rel = factor * (0.002 + 0.01 * 10 ** (0.4 * (g[sel] - GAIA_XP_G_LIMIT)))
        m_vega = np.asarray(sources[f"mag_{b}"])[truth_idx] - VEGA_TO_AB[b]
        flux = VEGA_FLUX_W_M2_NM[b] * 10 ** (-0.4 * m_vega) * (1 + rng.normal(0, 1, len(gx)) * rel)
        col = b.lower()
        t[f"{col}_jkc_mag"] = -2.5 * np.log10(flux / VEGA_FLUX_W_M2_NM[b])
        t[f"{col}_jkc_flux"] = flux
        t[f"{col}_jkc_flux_error"] = rel * flux
        t[f"{col}_jkc_flag"] = (rel < 0.03).astype(np.uint8)
        t[f"{col}_jkc_mag"].unit = u.mag
        t[f"{col}_jkc_mag"].description = f"Johnson-Cousins {b}, Vega (m_AB = m + {VEGA_TO_AB[b]})"
        for suffix in ("flux", "flux_error"):
            t[f"{col}_jkc_{suffix}"].unit = u.W / u.m**2 / u.nm
            t[f"{col}_jkc_{suffix}"].description = f"Johnson-Cousins {b} {suffix.replace('_', ' ')}"
        t[f"{col}_jkc_flag"].description = f"{b}: 1 = reliable (flux error < 3%), 0 = not"
    t["ra"].unit = t["dec"].unit = u.deg
    t["source_id"].description = "Gaia DR3-like source identifier"
    return t


def _griz(sources: Table) -> dict[str, np.ndarray]:
    """True DECam griz (AB) interpolated in log wavelength from the true BVRI (AB)."""
    lw = np.log([_KS4_WAVE[b] for b in "BVRI"])
    mags = np.stack([np.asarray(sources[f"mag_{b}"]) for b in "BVRI"], axis=1)
    out = {}
    for band_name, wave in _DELVE_WAVE.items():
        x = np.log(wave)
        k = int(np.clip(np.searchsorted(lw, x) - 1, 0, 2))
        f = (x - lw[k]) / (lw[k + 1] - lw[k])
        out[band_name] = mags[:, k] + f * (mags[:, k + 1] - mags[:, k])
    return out


def _extended_class(rng: np.random.Generator, sources: Table, mag_r: np.ndarray) -> np.ndarray:
    """0 (star) to 3 (galaxy); confusion grows towards the faint end."""
    galaxy = np.asarray(sources["type"]) == "galaxy"
    p_wrong = np.clip(0.02 + 0.4 * (mag_r - 21.0) / 3.0, 0.02, 0.45)
    wrong = rng.random(len(sources)) < p_wrong
    truth_class = np.where(galaxy, 3, 0)
    return np.where(wrong, np.where(galaxy, 1, 2), truth_class).astype(np.int16)


def delve_catalog(sources: Table, seed: int) -> Table:
    """DELVE DR2-like objects: stars and galaxies, griz MAG_AUTO (AB) to ~23.5-24."""
    rng = rng_for(seed, "delve_dr2")
    griz = _griz(sources)
    detected = {b: rng.random(len(sources)) < 1.0 / (1.0 + np.exp((griz[b] - _DELVE_DEPTH[b]
                                                                    - 0.3) / 0.2))
                for b in griz}
    keep = np.any(np.stack(list(detected.values())), axis=0)
    s = sources[keep]
    n = len(s)
    t = Table()
    t["quick_object_id"] = (10_000_000_000 + np.asarray(s["id"])).astype(np.int64)
    sig_pos = 0.03 + 0.1 * 10 ** (0.4 * (griz["r"][keep] - 23.0))
    t["ra"] = (np.asarray(s["ra"]) + rng.normal(0, 1, n) * sig_pos / 3600.0
               / np.cos(np.radians(np.asarray(s["dec"])))) % 360.0
    t["dec"] = np.asarray(s["dec"]) + rng.normal(0, 1, n) * sig_pos / 3600.0
    t["ra"].unit = t["dec"].unit = u.deg
    ext = _extended_class(rng, s, griz["r"][keep])
    for b in "griz":
        m = griz[b][keep]
        err = 1.0857 / (5.0 * 10 ** (0.4 * (_DELVE_DEPTH[b] - m)))
        det = detected[b][keep]
        t[f"mag_auto_{b}"] = np.where(det, m + rng.normal(0, 1, n) * err, 99.0)
        t[f"magerr_auto_{b}"] = np.where(det, err, 99.0)
        t[f"extended_class_{b}"] = np.where(det, ext, -9).astype(np.int16)
        t[f"nepochs_{b}"] = np.where(det, 1 + rng.poisson(2.0, n), 0).astype(np.int16)
        t[f"mag_auto_{b}"].unit = t[f"magerr_auto_{b}"].unit = u.mag
        t[f"mag_auto_{b}"].description = f"DECam {b} MAG_AUTO (AB); 99 = not detected"
        t[f"magerr_auto_{b}"].description = f"Error of mag_auto_{b}; 99 = not detected"
        t[f"extended_class_{b}"].description = "0 star .. 3 galaxy; -9 = not detected"
        t[f"nepochs_{b}"].description = f"Number of {b} epochs"
    t["quick_object_id"].description = "DELVE DR2-like object identifier"
    return t
