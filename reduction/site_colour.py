"""The sites' colour terms taken out of each source of a co-add.

DR1 names its own "primary limitation" (section 5, "Site-Dependent Color Terms"): the three
KMTNet sites' filters differ (V's passband by more than 5 nm between CTIO and SAAO), the
co-adds combine exposures of several sites without a site-specific correction, and "these
uncorrected differences can introduce systematic biases in the final catalog photometry,
particularly for objects with very red or blue spectral energy distributions". This module is
that correction.

Model. The zero-point stage fits each exposure's colour term ``k_e`` in (V-I)_AB and scales the
exposure to ZP 30 for a star of the pivot colour ``p_e`` (``ZPCOLT``, ``ZPCOLPIV``; the co-add
passes them on in its exposures JSON as ``colour_term`` and ``colour_pivot``). In exposure ``e``
a source of colour ``c`` therefore has ``10**(0.4 o_e)`` times its flux in the reference
catalog's system (Gaia XP), ``o_e = k_e (c - p_e)``, and in the co-add the mean of those factors
over the exposures whose CCD footprints cover it. The mean, although the co-add is a median:
which exposure is the middle one at a pixel is decided by the exposures' seeing and noise,
which change a star's pixel values by far more than a few per cent of colour, so every
exposure enters the median somewhere and a faint source's median of noisy pixels is close to
their mean anyway. Measured on the demo's 16 co-adds (the slope of MAG_APER5 - true against
the true V-I of isolated S/N > 50 stars, per co-add, against its error): uncorrected, slopes
up to 0.038 mag/mag and a chi-square of 189 for 16 slopes; the median of the offsets left 59
(co-add 0001 R, three exposures at -0.035 and one at +0.030: -0.0225 +- 0.0036), the mean
24.5 (largest slope 0.017, of a single-site co-add whose fitted colour term is 0.011 off).
The AUTO and aperture fluxes of the band and their errors are divided by that mean factor,
``delta = 2.5 log10(mean_e 10**(0.4 o_e))`` mag (FLUX_MAX, a pixel value, stays as measured).

Colour. ``c`` is the source's (V-I)_AB in the tile's dual-mode measurement table (V measured at
the I detection's position in the same aperture): the 5" aperture fluxes at ZP 30, each divided
by its Moffat enclosed fraction at the source's PSF FWHM (``psf_fwhm_{v,i}``, ``psf_beta_{v,i}``
meta), so that the two co-adds' different seeing does not enter the colour. A single-mode source
takes the colour of the nearest dual-mode detection within ``colour_match_arcsec``. Colours
with a V or I aperture S/N below ``colour_min_snr`` are not used, the others are clipped to
``[colour_min, colour_max]`` (-0.5 to 4 by default: stars from B to late M, and galaxies). A
source without a colour is not corrected (it keeps the pivot colour's zero point). The colour
is measured on fluxes that still carry the V and I co-adds' own colour terms, so it is off by
their difference, ``o_V - o_I``; the correction changes with colour by at most ``max |k_e|``
per magnitude of colour, so this costs at most ``max |k_e| |o_V - o_I|``. On the demo the mean
colour terms of a tile's V and I co-adds differ by up to 0.01, so ``|o_V - o_I| <= 0.01 (c -
p)``: below 0.0005 mag for typical stars, about 0.001 for the reddest (V-I = 3).

Where. The maps stage corrects the fluxes before it measures the ZP maps against Gaia XP, so
that the maps hold for the reference system and not for the median colour of the few stars in
each bin; the catalog stage applies the same correction before the maps when the maps' JSON
says they were made so (``site_colour_correction``). ``[maps] site_colour_correction = false``
gives DR1's catalogs. Not included in the magnitude errors: the colour terms' own errors
(``ZPCOLTE``, 0.002-0.01 mag/mag) and the colour's noise times the colour term, at most about
0.05 x 0.3 = 0.015 mag at S/N 5 in V and I, where the source's own error is 0.2 mag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from ks4release.errors import InputError
from ks4release.projection import chord, unit_vectors
from ks4release.reduction.coadd_maps import read_exposures_json
from ks4release.reduction.moffat import moffat_enclosed_fraction
from ks4release.reduction.photometry import APERTURE_DIAMETERS_ARCSEC
from ks4release.reduction.postprocess import covering_exposures, float_column
from ks4release.settings import MapSettings

__all__ = [
    "COLOUR_APERTURE",
    "ColourCorrection",
    "colour_offsets",
    "correct_fluxes",
    "dual_colours",
    "site_colour_correction",
    "source_colours",
]

#: Diameter of the aperture whose fluxes give the colour (DR1's MAG_APER5), and its name.
_COLOUR_DIAMETER_ARCSEC = 5.0
COLOUR_APERTURE = f"APER{_COLOUR_DIAMETER_ARCSEC:g}"
#: Flux columns of a measurement table, per band letter, that the correction scales (as the
#: photometry names them).
_FLUX_KINDS = ("auto", *(f"aper{d:g}" for d in APERTURE_DIAMETERS_ARCSEC))


@dataclass(frozen=True)
class ColourCorrection:
    """What the correction did to one band of a table, for the maps' JSON and the summaries.

    ``applied`` false with ``reason`` when nothing was changed; otherwise ``n_sources``,
    ``n_corrected`` (sources with a colour), ``median_abs_mag`` (median |delta| over them) and
    ``colour_terms`` (stem -> colour term of every usable exposure of the co-add).
    """

    applied: bool
    reason: str = ""
    n_sources: int = 0
    n_corrected: int = 0
    median_abs_mag: float = 0.0
    colour_terms: dict[str, float] | None = None

    def as_dict(self) -> dict:
        """JSON-ready values (the reason only when not applied)."""
        if not self.applied:
            return {"applied": False, "reason": self.reason}
        return {"applied": True, "colour": "V-I", "aperture": COLOUR_APERTURE,
                "n_sources": self.n_sources, "n_corrected": self.n_corrected,
                "median_abs_mag": round(self.median_abs_mag, 5),
                "colour_terms": self.colour_terms}


def _total_flux(dual: Table, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Aperture flux of band ``b`` divided by its Moffat enclosed fraction, and its S/N."""
    name = COLOUR_APERTURE.lower()
    flux = float_column(dual, f"flux_{name}_{b}")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / float_column(dual, f"fluxerr_{name}_{b}")
    beta = dual.meta.get(f"psf_beta_{b}")
    if f"psf_fwhm_{b}" in dual.colnames and isinstance(beta, (int, float)) and beta > 1:
        fwhm = float_column(dual, f"psf_fwhm_{b}")
        fraction = np.ones(len(dual))
        known = np.isfinite(fwhm) & (fwhm > 0)
        fraction[known] = moffat_enclosed_fraction(
            fwhm[known], float(beta), _COLOUR_DIAMETER_ARCSEC)
        flux = flux / fraction
    return flux, snr


def dual_colours(dual: Table, settings: MapSettings) -> np.ndarray:
    """(V-I)_AB of every row of a dual-mode measurement table (module docstring), NaN where a
    band's flux is missing, not positive or below ``colour_min_snr``."""
    v, snr_v = _total_flux(dual, "v")
    i, snr_i = _total_flux(dual, "i")
    usable = (v > 0) & (i > 0) & (snr_v >= settings.colour_min_snr) \
        & (snr_i >= settings.colour_min_snr)
    colour = np.full(len(dual), np.nan)
    colour[usable] = np.clip(-2.5 * np.log10(v[usable] / i[usable]), settings.colour_min,
                             settings.colour_max)
    return colour


def source_colours(table: Table, dual: Table, settings: MapSettings) -> np.ndarray:
    """The colour of each row of ``table``: that of the nearest row of the dual-mode table
    ``dual`` within ``colour_match_arcsec`` (each row's own for the dual table itself), NaN
    where there is none or where that row has no colour (it does not borrow a neighbour's).
    Rows without a finite position match nothing."""
    colours = dual_colours(dual, settings)
    if table is dual:
        return colours
    out = np.full(len(table), np.nan)
    ra, dec = float_column(dual, "ra"), float_column(dual, "dec")
    placed = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    ra_t, dec_t = float_column(table, "ra"), float_column(table, "dec")
    asked = np.flatnonzero(np.isfinite(ra_t) & np.isfinite(dec_t))
    if placed.size == 0 or asked.size == 0:
        return out
    tree = cKDTree(unit_vectors(ra[placed], dec[placed]))
    distance, index = tree.query(unit_vectors(ra_t[asked], dec_t[asked]),
                                 distance_upper_bound=chord(settings.colour_match_arcsec))
    found = np.isfinite(distance)
    out[asked[found]] = colours[placed[index[found]]]
    return out


def _colour_terms(exposures: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(colour term, pivot) of each exposure entry; ValueError naming one without them."""
    terms, pivots = [], []
    for exposure in exposures:
        term, pivot = exposure.get("colour_term"), exposure.get("colour_pivot")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (term, pivot)):
            raise ValueError(f"exposure {exposure.get('stem')!r}: no colour_term and "
                             f"colour_pivot in the co-add's exposures JSON (got {term!r}, "
                             f"{pivot!r}); rebuild the co-add")
        terms.append(float(term))
        pivots.append(float(pivot))
    return np.array(terms), np.array(pivots)


def colour_offsets(points: np.ndarray, colours: np.ndarray, exposures_json: dict,
                   wcs: WCS) -> tuple[np.ndarray, dict[str, float]]:
    """Magnitude offset ``delta`` to take out of each source (module docstring): how much
    brighter the co-add shows it than the reference system does.

    ``points`` (n, 2) are 1-based co-add pixels, ``colours`` (n,) the sources' (V-I)_AB (NaN:
    no correction, delta 0). A source that no footprint covers (the co-add's very edge) takes
    the mean over all the usable exposures. Returns delta (mag) and stem -> colour term.
    """
    exposures, _, covering = covering_exposures(points, exposures_json, wcs)
    terms, pivots = _colour_terms(exposures)
    delta = np.zeros(len(points))
    known = np.flatnonzero(np.isfinite(colours))
    if terms.size and known.size:
        per_exposure = terms[:, None] * (colours[known][None, :] - pivots[:, None])
        cover = covering[:, known]
        cover[:, ~cover.any(axis=0)] = True
        factors = np.where(cover, 10.0 ** (0.4 * per_exposure), 0.0)
        delta[known] = 2.5 * np.log10(factors.sum(axis=0) / cover.sum(axis=0))
    return delta, {str(e["stem"]): float(t) for e, t in zip(exposures, terms, strict=True)}


def correct_fluxes(table: Table, b: str, delta: np.ndarray) -> Table:
    """A copy of ``table`` whose ``flux_*_{b}`` and ``fluxerr_*_{b}`` (AUTO and the apertures)
    are multiplied by ``10**(-0.4 * delta)``, i.e. brightened by ``delta`` mag."""
    out = table.copy(copy_data=True)
    factor = 10.0 ** (-0.4 * np.asarray(delta, dtype=np.float64))
    for kind in _FLUX_KINDS:
        for name in (f"flux_{kind}_{b}", f"fluxerr_{kind}_{b}"):
            if name in out.colnames:
                out[name] = out[name] * factor
    return out


def site_colour_correction(table: Table, band: str, *, dual: Table | None,
                           exposures_path: Path, wcs: WCS, settings: MapSettings
                           ) -> tuple[Table, ColourCorrection]:
    """``table`` (a measurement table with ``x_image``, ``y_image``, ``ra``, ``dec`` and the flux
    columns of ``band``) with the sites' colour terms taken out of ``band``'s fluxes, and what
    was done. Unchanged (``applied`` false) without a dual-mode table or without V and I in it;
    otherwise the co-add's exposures JSON ``exposures_path`` gives the exposures' footprints
    and colour terms (``wcs``: the co-add's).

    Raises
    ------
    InputError
        Naming the exposures JSON, when it is unreadable or lacks an exposure's colour term (a
        co-add from before the terms were recorded).
    """
    if dual is None:
        return table, ColourCorrection(False, "no dual-mode measurement table (the tile has no "
                                              "co-add in the detection band)")
    missing = [f"flux_{COLOUR_APERTURE.lower()}_{b}" for b in ("v", "i")
               if f"flux_{COLOUR_APERTURE.lower()}_{b}" not in dual.colnames]
    if missing:
        return table, ColourCorrection(False, f"the dual-mode table has no {missing}")
    colours = source_colours(table, dual, settings)
    points = np.column_stack([float_column(table, "x_image"), float_column(table, "y_image")])
    try:
        delta, terms = colour_offsets(points, colours, read_exposures_json(exposures_path), wcs)
    except ValueError as exc:
        raise InputError(exposures_path, str(exc)) from exc
    corrected = np.isfinite(colours)
    summary = ColourCorrection(
        True, n_sources=len(table), n_corrected=int(corrected.sum()),
        median_abs_mag=float(np.median(np.abs(delta[corrected]))) if corrected.any() else 0.0,
        colour_terms=terms)
    return correct_fluxes(table, band.lower(), delta), summary
