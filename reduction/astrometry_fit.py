"""The focal-plane astrometric model and its conversion to FITS TAN-SIP.

Model: a pixel ``(x, y)`` (0-based) of a chip lies at focal-plane pixel coordinates
``U = x + 1 - CRPIX1``, ``V = y + 1 - CRPIX2``, where CRPIX is that chip's reference pixel from
its header (the optical axis when the chips of an exposure share a tangent point, as in the
KMTNet ``.ahead`` models and the demo survey). A fixed prior distortion, the radial cubic term
of the ``.ahead`` models ``(fU, fV) = k (U, V) (U^2 + V^2)``, is applied first; then standard
coordinates about the tangent point are::

    xi  = a_00 + a_10 (U + fU) + a_01 (V + fV) + sum_{2<=p+q<=n} a_pq U^p V^q     (degrees)
    eta = b_00 + b_10 (U + fU) + b_01 (V + fV) + sum_{2<=p+q<=n} b_pq U^p V^q

fitted by weighted linear least squares (``n`` = 1: the prior distortion and an affine map).
The tangent point is moved until the constant terms vanish (a few iterations), after which the
model is exactly a TAN-SIP WCS per chip: ``CD = [[a_10, a_01], [b_10, b_01]]`` and the SIP
polynomials are the prior plus ``CD^-1 (a_pq, b_pq)`` for ``p + q >= 2``. One model serves all
the chips of an exposure, so a distortion that spans the focal plane is constrained by every
chip's stars. Inverse SIP polynomials (AP, BP) are fitted per chip for tools that map sky to
pixels without iterating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS, Sip

from ks4release.projection import gnomonic, inverse_gnomonic

__all__ = [
    "FocalPlaneModel",
    "poly_terms",
    "fit_focal_plane",
    "model_wcs",
]

#: Constant terms below this (deg, ~0.4 micro-arcsec) end the tangent-point iteration.
_TANGENT_TOL_DEG = 1e-10
_MAX_TANGENT_ITER = 8


def poly_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(p, q)`` of every monomial ``U^p V^q`` with ``p + q <= degree``."""
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    return [(p, n - p) for n in range(degree + 1) for p in range(n, -1, -1)]


def _design(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]], scale: float,
            prior_k: float = 0.0) -> np.ndarray:
    """Design matrix in scaled coordinates (keeps the fit well conditioned); the linear
    columns carry the prior radial cubic distortion ``prior_k`` (pixel^-2)."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    r2 = u**2 + v**2
    cols = []
    for p, q in terms:
        if (p, q) == (1, 0):
            cols.append((u + prior_k * u * r2) / scale)
        elif (p, q) == (0, 1):
            cols.append((v + prior_k * v * r2) / scale)
        else:
            cols.append((u / scale) ** p * (v / scale) ** q)
    return np.column_stack(cols)


@dataclass(frozen=True)
class FocalPlaneModel:
    """Polynomial map from focal-plane pixels (U, V) to standard coordinates about ``crval``.

    ``coeff_xi``/``coeff_eta`` (degrees) multiply the columns of the design matrix: the
    monomials of :func:`poly_terms` in the scaled coordinates ``U / scale``, ``V / scale``,
    whose linear terms include the prior distortion ``prior_k`` (pixel^-2).
    """

    crval: tuple[float, float]
    degree: int
    scale: float
    prior_k: float
    coeff_xi: np.ndarray
    coeff_eta: np.ndarray

    def standard(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xi, eta) in degrees about ``crval``."""
        a = _design(u, v, poly_terms(self.degree), self.scale, self.prior_k)
        return a @ self.coeff_xi, a @ self.coeff_eta

    def sky(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees."""
        xi, eta = self.standard(u, v)
        return inverse_gnomonic(self.crval[0], self.crval[1], xi, eta)

    def unscaled(self) -> dict[tuple[int, int], tuple[float, float]]:
        """``{(p, q): (a_pq, b_pq)}`` for the unscaled monomials ``U^p V^q`` (degrees)."""
        out = {}
        for k, (p, q) in enumerate(poly_terms(self.degree)):
            f = self.scale ** -(p + q)
            out[(p, q)] = (float(self.coeff_xi[k] * f), float(self.coeff_eta[k] * f))
        return out


def fit_focal_plane(u: np.ndarray, v: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                    weights: np.ndarray, *, degree: int, crval: tuple[float, float],
                    scale: float, prior_k: float = 0.0) -> FocalPlaneModel:
    """Weighted least-squares fit of the model to matched pairs, moving the tangent point.

    Parameters
    ----------
    u, v : ndarray
        Focal-plane pixel coordinates of the detections (see the module docstring).
    ra, dec : ndarray
        Reference positions of the matched stars, degrees.
    weights : ndarray
        Inverse variances (any common unit).
    degree : int
        Total polynomial degree (1 = affine, 3 = cubic distortion).
    crval : (float, float)
        Starting tangent point, degrees.
    scale : float
        Coordinate scale (pixels) for conditioning; the focal-plane radius is a good choice.
    prior_k : float
        Fixed radial cubic distortion ``k`` (pixel^-2) of the prior (0 = none).
    """
    terms = poly_terms(degree)
    if len(u) < len(terms):
        raise ValueError(f"{len(u)} matched stars cannot fix a degree-{degree} model "
                         f"({len(terms)} terms per axis)")
    a = _design(u, v, terms, scale, prior_k)
    sw = np.sqrt(np.asarray(weights, float))
    aw = a * sw[:, None]
    ra0, dec0 = float(crval[0]), float(crval[1])
    for _ in range(_MAX_TANGENT_ITER):
        xi, eta = gnomonic(ra0, dec0, ra, dec)
        cx = np.linalg.lstsq(aw, xi * sw, rcond=None)[0]
        ce = np.linalg.lstsq(aw, eta * sw, rcond=None)[0]
        if max(abs(cx[0]), abs(ce[0])) < _TANGENT_TOL_DEG:
            break
        new_ra, new_dec = inverse_gnomonic(ra0, dec0, np.array([cx[0]]), np.array([ce[0]]))
        ra0, dec0 = float(new_ra[0]), float(new_dec[0])
    return FocalPlaneModel(crval=(ra0, dec0), degree=degree, scale=float(scale),
                           prior_k=float(prior_k), coeff_xi=cx, coeff_eta=ce)


def _sip_eval(coeffs: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Value of the SIP polynomial ``sum coeffs[p, q] u^p v^q``."""
    return sum(coeffs[p, q] * u**p * v**q for p in range(coeffs.shape[0])
               for q in range(coeffs.shape[1]) if coeffs[p, q] != 0.0) + np.zeros_like(u)


def _inverse_sip(a: np.ndarray, b: np.ndarray, crpix: tuple[float, float],
                 shape: tuple[int, int], order: int) -> tuple[np.ndarray, np.ndarray]:
    """AP, BP so that ``u = U' + AP(U', V')`` with ``U' = u + A(u, v)``, over the chip."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 24), np.linspace(-0.5, ny - 0.5, 24))
    u, v = gx.ravel() + 1.0 - crpix[0], gy.ravel() + 1.0 - crpix[1]
    fu = u + _sip_eval(a, u, v)
    fv = v + _sip_eval(b, u, v)
    terms = poly_terms(order)
    scale = max(np.abs(fu).max(), np.abs(fv).max(), 1.0)
    design = _design(fu, fv, terms, scale)
    cu = np.linalg.lstsq(design, u - fu, rcond=None)[0]
    cv = np.linalg.lstsq(design, v - fv, rcond=None)[0]
    ap, bp = np.zeros((order + 1, order + 1)), np.zeros((order + 1, order + 1))
    for k, (p, q) in enumerate(terms):
        ap[p, q] = cu[k] * scale ** -(p + q)
        bp[p, q] = cv[k] * scale ** -(p + q)
    return ap, bp


def model_wcs(model: FocalPlaneModel, crpix: tuple[float, float], shape: tuple[int, int]
              ) -> WCS:
    """The TAN-SIP WCS of one chip whose header reference pixel is ``crpix`` (1-based).

    Degree 1 without prior gives a plain TAN WCS. The SIP forward polynomials reproduce the
    model exactly; the inverse ones (AP, BP, two orders higher) are a least-squares fit over
    the chip.
    """
    coeffs = model.unscaled()
    cd = np.array([[coeffs[(1, 0)][0], coeffs[(0, 1)][0]],
                   [coeffs[(1, 0)][1], coeffs[(0, 1)][1]]])
    w = WCS(naxis=2)
    w.wcs.crval = list(model.crval)
    w.wcs.crpix = list(crpix)
    w.wcs.cd = cd
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (shape[1], shape[0])
    if model.degree < 2 and model.prior_k == 0.0:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.set()
        return w
    n = max(model.degree, 3 if model.prior_k != 0.0 else 2)
    a, b = np.zeros((n + 1, n + 1)), np.zeros((n + 1, n + 1))
    a[3, 0] = a[1, 2] = b[0, 3] = b[2, 1] = model.prior_k
    cd_inv = np.linalg.inv(cd)
    for (p, q), (cx, ce) in coeffs.items():
        if p + q >= 2:
            da, db = cd_inv @ np.array([cx, ce])
            a[p, q] += da
            b[p, q] += db
    ap, bp = _inverse_sip(a, b, crpix, shape, n + 2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    return w


