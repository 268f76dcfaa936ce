"""The detected sources' light taken out of their neighbours' apertures and of the mesh (ours).

Aperture photometry on a background mesh has two faint-end biases of opposite sign, both from
the sources' own light (``reduction/blending.py``): a brighter source 4-24" away puts its wings
into a faint source's apertures (too bright), and the mesh, which cannot tell the sources'
wings from the sky, sits above the bare sky that a source with no such neighbour lies on (too
faint). With ``[photometry] neighbour_model`` every band measured on its own detections or on
the detection band's (dual mode) is corrected for both, from a model of what it detected:

1. every detection is a circular Moffat of the co-add's PSFBETA holding its Kron flux, of the
   co-add's SEEING when point-like (CLASS_STAR >= 0.5) and of its FWHM_IMAGE otherwise, within
   1 and 2 SEEING (:func:`model_widths`), rendered out to :data:`MODEL_HALF_PX`
   (:func:`model_image`);
2. the mesh is measured again on the background-subtracted co-add less the model, on the
   first one's pixels (same box and filter, the same sources masked): the level ``delta``
   (negative where the sources' light lifted the first mesh) is taken off every aperture;
3. each source's apertures lose the model's light in them, summed as its fluxes are (other
   objects' pixels mirrored, MASK_TYPE CORRECT), less its own model's share (:func:`own_sums`,
   the same rendering summed in the same apertures).

On the 1/4-scale survey (``benchmarks/demo_truth.py``; point sources of S/N > 20, MAG_AUTO
and MAG_APER5, both modes, every band) the 0.5-mag bins whose median lies beyond 0.005 mag of
the truth by more than twice its standard error went from 5 of 236 to 1 (all stars), from
8 of 228 to none (those that take no light from their true neighbours) and from 4 of 232 to 1
(``blend_aper5 <= 0.003``); B 22-22.5 MAG_APER5 read -0.010 (single) and -0.008 (dual)
instead of -0.018 and -0.015 (standard errors 0.006). CLASS_STAR, completeness and the
spurious cleaning did not change beyond 0.002; the photometry stage took about 20% longer (353
against 296 s). Measuring the second mesh with sources detected again on the co-add less the
model, instead of on the first mesh's pixels, gave 0, 1 and 0 bins beyond (the 626 bins of 50
stars or more moved by -0.0002 mag on average, 0.0004 in absolute value) for 10% more time
and 11 bytes a pixel more memory; on a field of injected stars on white noise
(``tests/test_faint_auto_photometry.py``, true sky 0) that mesh sat 0.011 sigma above the
sky, the first mesh 0.0075 and this one 0.0036.
Extended
neighbours drawn as wide as their FWHM_IMAGE (up to 19 px on the demo) put more light into
their neighbours' apertures than galaxies do, and drawn with the seeing less (1, 4 and 1
bins beyond then); within 1-2 seeings is what was measured. The model's fluxes are the first
pass's; undetected sources stay in the mesh.
"""

from __future__ import annotations

import numpy as np
import sep

from ks4release.reduction.moffat import moffat_alpha_fwhm, moffat_profile

__all__ = ["EXTENDED_MAX_SEEING", "MODEL_HALF_PX", "POINT_LIKE_CLASS_STAR", "model_image",
           "model_widths", "own_sums"]

#: Half size of each rendered source, px: 24" at 0.4"/px, where a Moffat of index 2.5-3 and
#: 1.5" seeing is below 1e-4 of its peak, as far as ``reduction/blending.py`` looks.
MODEL_HALF_PX = 60
#: CLASS_STAR at and above which a detection is drawn with the co-add's seeing.
POINT_LIKE_CLASS_STAR = 0.5
#: Widest model of an extended detection, in units of the seeing: a Moffat of a large galaxy's
#: FWHM_IMAGE has far heavier wings than the galaxy (one of 19 px put 470 ADU into a neighbour's
#: 5" aperture on the demo, more than the neighbour's own light).
EXTENDED_MAX_SEEING = 2.0


def model_widths(class_star: np.ndarray, fwhm_px: np.ndarray, seeing_px: float) -> np.ndarray:
    """FWHM (px) of each detection's model: the seeing for point-like ones, else their
    FWHM_IMAGE within 1 and :data:`EXTENDED_MAX_SEEING` seeings (the seeing where FWHM_IMAGE
    is not finite)."""
    fwhm = np.asarray(fwhm_px, float)
    point = np.asarray(class_star, float) >= POINT_LIKE_CLASS_STAR
    extended = np.clip(fwhm, seeing_px, EXTENDED_MAX_SEEING * seeing_px)
    return np.where(point | ~np.isfinite(fwhm), seeing_px, extended)


def _moffat_stamp(x: float, y: float, x0: int, x1: int, y0: int, y1: int, alpha: float,
                  beta: float) -> np.ndarray:
    """Unit-flux Moffat centred (x, y), sampled at the centres of pixels [y0:y1, x0:x1]."""
    dy = (np.arange(y0, y1) - y)[:, None]
    dx = (np.arange(x0, x1) - x)[None, :]
    radius = np.hypot(dx, dy)
    return moffat_profile(radius.ravel(), np.array([alpha]), beta).reshape(radius.shape)


def _modelled(x: np.ndarray, y: np.ndarray, flux: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Indices of the sources the model draws: finite position, positive flux and width."""
    return np.flatnonzero(np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
                          & (alpha > 0))


def model_image(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                fwhm_px: np.ndarray, beta: float, half_px: int = MODEL_HALF_PX) -> np.ndarray:
    """Image (float32) of circular Moffat sources (0-based centres ``x``, ``y``, total ``flux``,
    ``fwhm_px``, index ``beta``), each sampled at the pixel centres within ``half_px`` of its
    centre pixel; sources without a positive finite flux or position are left out."""
    image = np.zeros(shape, dtype=np.float32)
    ny, nx = shape
    alpha = moffat_alpha_fwhm(np.asarray(fwhm_px, float), beta)
    for k in _modelled(x, y, flux, alpha):
        ix, iy = int(round(x[k])), int(round(y[k]))
        x0, x1 = max(ix - half_px, 0), min(ix + half_px + 1, nx)
        y0, y1 = max(iy - half_px, 0), min(iy + half_px + 1, ny)
        if x0 < x1 and y0 < y1:
            image[y0:y1, x0:x1] += flux[k] * _moffat_stamp(x[k], y[k], x0, x1, y0, y1,
                                                          alpha[k], beta)
    return image


def own_sums(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm_px: np.ndarray, beta: float,
             a: np.ndarray, b: np.ndarray, theta: np.ndarray, kron: np.ndarray,
             radii: list[float], half_px: int = MODEL_HALF_PX) -> list[np.ndarray]:
    """Each source's own model light (as :func:`model_image` renders it) inside its Kron
    ellipse (``a``, ``b``, ``theta``, factor ``kron``) and its circles of ``radii``, in that
    order, summed by sep with ``subpix=5`` like the fluxes; 0 for a source the model leaves
    out. The image edge is not applied (a cut aperture's own light is the edge flag's)."""
    n = len(x)
    out = [np.zeros(n) for _ in range(1 + len(radii))]
    alpha = moffat_alpha_fwhm(np.asarray(fwhm_px, float), beta)
    for k in _modelled(x, y, flux, alpha):
        ix, iy = int(round(x[k])), int(round(y[k]))
        stamp = flux[k] * _moffat_stamp(x[k], y[k], ix - half_px, ix + half_px + 1,
                                        iy - half_px, iy + half_px + 1, alpha[k], beta)
        cx, cy = np.array([x[k] - ix + half_px]), np.array([y[k] - iy + half_px])
        out[0][k] = sep.sum_ellipse(stamp, cx, cy, a[k:k + 1], b[k:k + 1], theta[k:k + 1],
                                    kron[k:k + 1], subpix=5)[0][0]
        for j, radius in enumerate(radii):
            out[j + 1][k] = sep.sum_circle(stamp, cx, cy, radius, subpix=5)[0][0]
    return out
