"""Single-epoch source detection with sep, per exposure and CCD.

For each CCD of a raw exposure: estimate the background with :class:`sep.Background` (masked
pixels excluded), extract sources on the background-subtracted image with SExtractor's 3 x 3
convolution kernel (``tools.md``: sep's default "matched" filter finds many more noise peaks),
refine positions with windowed centroids and their errors
(:func:`~ks4release.reduction.sep_objects.windowed_centroids`, SExtractor's ``XWIN_IMAGE`` and
``ERRX2WIN_IMAGE``), and measure a fixed-aperture flux and a Kron (``MAG_AUTO``-style) flux.
The astrometry stage reads the windowed centroids; later stages read the photometry.

Output, one Parquet table per exposure (``ks4release.layout.sources_path``), every column with a
unit and a description (:data:`SOURCE_COLUMNS`). Pixel coordinates are 0-based (pixel centre of
the first pixel = 0.0), as in numpy and astropy ``origin=0``.

``flags`` follows SExtractor's ``FLAGS`` meanings where we can compute them (:data:`FLAG_BITS`):
1 = masked pixels inside the fixed aperture, 2 = deblended, 4 = saturated, 8 = truncated at the
image edge, 16 = aperture truncated by the edge or wholly masked. ``imaflags`` is the bitwise OR
of the bad-pixel mask bits inside the source's segmentation footprint grown by one pixel
(``IMAFLAGS_ISO``; masked pixels themselves never enter a footprint).

``fwhm_px`` is ``2 x`` the half-light radius: exact for a Gaussian profile, about 1.26 x the
true FWHM for a Moffat beta = 3 profile (our documented estimate; sep has no ``FWHM_IMAGE``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import sep
from astropy import units as u
from astropy.io import fits
from astropy.table import Table, vstack
from scipy.ndimage import grey_dilation

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.camera import PIXEL_SCALE_ARCSEC
from ks4release.errors import InputError
from ks4release.exposure import CcdInfo, read_ccd, read_exposure_header
from ks4release.reduction.sep_objects import (
    CONV_KERNEL,
    ellipse,
    footprint_max,
    set_extraction_limits,
    windowed_centroids,
)
from ks4release.settings import DetectSettings

__all__ = [
    "DetectSettings",
    "FLAG_BITS",
    "SOURCE_COLUMNS",
    "read_mask",
    "detect_ccd",
    "run_detect",
]

logger = logging.getLogger(__name__)


#: Bits of the ``flags`` column (SExtractor FLAGS meanings).
FLAG_BITS = {
    1: "masked (bad) pixels inside the fixed aperture",
    2: "object was deblended from a blend",
    4: "at least one pixel of the footprint at or above SATURATE",
    8: "footprint truncated at the image edge",
    16: "fixed aperture truncated by the image edge or all masked",
}

#: (name, unit, description) of every output column, in order.
SOURCE_COLUMNS: tuple[tuple[str, u.UnitBase | None, str], ...] = (
    ("ccd", None, "CCD name (KK, MM, NN, TT)"),
    ("amp", None, "Amplifier index 0-7 (AMPSEC{amp+1}) holding the windowed centroid"),
    ("x", u.pix, "Windowed centroid x, 0-based pixel (XWIN_IMAGE - 1)"),
    ("y", u.pix, "Windowed centroid y, 0-based pixel (YWIN_IMAGE - 1)"),
    ("x_err", u.pix, "1-sigma error of x (ERRX2WIN_IMAGE; barycentre's where no window)"),
    ("y_err", u.pix, "1-sigma error of y (ERRY2WIN_IMAGE; barycentre's where no window)"),
    ("flux", u.adu, "Flux in the fixed circular aperture at (x, y), background subtracted"),
    ("flux_err", u.adu, "1-sigma error of flux (background noise and Poisson)"),
    ("snr", None, "Signal-to-noise ratio flux / flux_err"),
    ("flux_auto", u.adu, "Kron (MAG_AUTO-style) elliptical aperture flux"),
    ("flux_auto_err", u.adu, "1-sigma error of flux_auto"),
    ("kron_radius", None, "Kron radius in units of a and b"),
    ("flux_radius", u.pix, "Half-light radius (FLUX_RADIUS at 0.5)"),
    ("fwhm_px", u.pix, "FWHM estimate, 2 x flux_radius (exact for a Gaussian)"),
    ("a", u.pix, "Semi-major axis, second moments (A_IMAGE)"),
    ("b", u.pix, "Semi-minor axis, second moments (B_IMAGE)"),
    ("theta", u.rad, "Position angle of a, counter-clockwise from +x (THETA_IMAGE)"),
    ("peak", u.adu, "Peak pixel value above background"),
    ("npix", u.pix**2, "Isophotal area above the detection threshold"),
    ("flags", None, "SExtractor-style flags: " + "; ".join(f"{k} {v}" for k, v in
                                                             FLAG_BITS.items())),
    ("imaflags", None, "OR of the bad-pixel mask bits in the footprint grown by 1 pixel"),
)


def read_mask(mask: Path | str, ccd_name: str, shape: tuple[int, int]) -> np.ndarray:
    """The bad-pixel bits of one CCD from a mask file, or zeros when ``mask`` is ``""``.

    The mask file has one integer image per CCD, ``EXTNAME`` = the CCD name (the masks stage
    and the truth masks both write this layout).
    """
    if str(mask) == "":
        return np.zeros(shape, dtype=np.uint8)
    path = Path(mask)
    try:
        with fits.open(path) as hdul:
            data = np.asarray(hdul[ccd_name].data)
    except FileNotFoundError:
        raise InputError(path, "mask file does not exist") from None
    except KeyError:
        raise InputError(path, f"no mask extension {ccd_name!r}", hdu=ccd_name) from None
    except OSError as exc:
        raise InputError(path, f"not a readable mask file ({exc})") from None
    if data.shape != shape:
        raise InputError(path, f"extension {ccd_name!r}: mask shape {data.shape} differs from "
                         f"the image shape {shape}", hdu=ccd_name)
    if data.dtype.kind not in "iu":
        raise InputError(path, f"extension {ccd_name!r}: mask dtype {data.dtype} is not an "
                         "integer type", hdu=ccd_name)
    return data.astype(np.uint8)


def _amplifier(x: np.ndarray, amplifiers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Index of the amplifier whose 0-based column range holds each x."""
    amp = np.full(x.size, -1, dtype=np.int16)
    col = np.floor(x + 0.5)
    for i, (start, stop) in enumerate(amplifiers):
        amp[(col >= start) & (col < stop)] = i
    return np.where(amp < 0, np.where(col < amplifiers[0][0], 0, len(amplifiers) - 1), amp)


def _flags(objects: np.ndarray, sat_hit: np.ndarray, aper_flags: np.ndarray,
           shape: tuple[int, int]) -> np.ndarray:
    """SExtractor-style flags (see :data:`FLAG_BITS`)."""
    ny, nx = shape
    flags = np.zeros(objects.size, dtype=np.int16)
    flags |= np.where(aper_flags & sep.APER_HASMASKED, 1, 0).astype(np.int16)
    flags |= np.where(objects["flag"] & sep.OBJ_MERGED, 2, 0).astype(np.int16)
    flags |= np.where(sat_hit, 4, 0).astype(np.int16)
    edge = ((objects["xmin"] <= 0) | (objects["ymin"] <= 0) | (objects["xmax"] >= nx - 1)
            | (objects["ymax"] >= ny - 1))
    flags |= np.where(edge, 8, 0).astype(np.int16)
    bad_aper = aper_flags & (sep.APER_TRUNC | sep.APER_ALLMASKED)
    flags |= np.where(bad_aper, 16, 0).astype(np.int16)
    return flags


def _kron(sub: np.ndarray, objects: np.ndarray, x: np.ndarray, y: np.ndarray, err: np.ndarray,
          gain: float, bad: np.ndarray, segmap: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kron radius and MAG_AUTO-style flux as SExtractor does it (``tools.md``)."""
    seg_id = np.arange(1, objects.size + 1, dtype=np.int32)
    a, b, theta = ellipse(objects)
    kronrad, _ = sep.kron_radius(sub, x, y, a, b, theta, 6.0, mask=bad, segmap=segmap,
                                 seg_id=seg_id)
    kronrad = np.where(np.isfinite(kronrad) & (kronrad > 0), kronrad, 3.5)
    r = np.maximum(2.5 * kronrad, 3.5)
    flux, ferr, _ = sep.sum_ellipse(sub, x, y, a, b, theta, r, err=err, gain=gain, mask=bad,
                                    subpix=5, segmap=segmap, seg_id=seg_id)
    return kronrad, flux, ferr


def detect_ccd(data: np.ndarray, mask_bits: np.ndarray, info: CcdInfo, settings: DetectSettings,
               *, pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> Table:
    """Detect and measure the sources of one CCD (pure; see the module docstring).

    Parameters
    ----------
    data : ndarray
        The CCD image in ADU (sky included).
    mask_bits : ndarray
        Bad-pixel bits of the same shape (zeros = no mask).
    info : CcdInfo
        Header summary of the CCD (name, gain, saturation, amplifier columns).
    settings : DetectSettings
        Extraction parameters.
    pixel_scale_arcsec : float
        Pixel scale that converts the aperture diameter to pixels.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    bits = np.asarray(mask_bits, dtype=np.uint8)
    bad = ((bits & settings.mask_bits) != 0) | ~np.isfinite(data)
    filled = np.where(bad, 0.0, data).astype(np.float32)
    bkg = sep.Background(filled, mask=bad, bw=settings.back_size_px, bh=settings.back_size_px,
                         fw=settings.back_filter_size, fh=settings.back_filter_size)
    sub = filled - bkg.back()
    rms = bkg.rms().astype(np.float32)
    sub[bad] = 0.0
    set_extraction_limits(sub.size)
    objects, segmap = sep.extract(
        sub, settings.thresh_sigma, err=rms, mask=bad, minarea=settings.min_area_px,
        filter_kernel=CONV_KERNEL, filter_type="conv", deblend_nthresh=settings.deblend_nthresh,
        deblend_cont=settings.deblend_cont, segmentation_map=True)
    n = objects.size
    table = _empty_table() if n == 0 else _measure(sub, data, bits, bad, rms, segmap, objects,
                                                   info, settings, pixel_scale_arcsec)
    table.meta.update({"ccd": info.name, "background_rms_adu": float(bkg.globalrms),
                       "background_adu": float(bkg.globalback)})
    return table


def _measure(sub, data, bits, bad, rms, segmap, objects, info: CcdInfo,
             settings: DetectSettings, pixel_scale_arcsec: float) -> Table:
    """Centroids, photometry, shape and flags of the extracted objects."""
    n = objects.size
    ny, nx = sub.shape
    seg_id = np.arange(1, n + 1, dtype=np.int32)
    cen = windowed_centroids(sub, objects, rms, bad, segmap, seg_id, info.gain)
    x, y, r_half = cen.x, cen.y, cen.r_half
    radius = 0.5 * settings.aperture_diameter_arcsec / pixel_scale_arcsec
    flux, ferr, aflag = sep.sum_circle(sub, x, y, radius, err=rms, gain=info.gain, mask=bad,
                                       subpix=5)
    kronrad, fauto, fauto_err = _kron(sub, objects, x, y, rms, info.gain, bad, segmap)
    sat_hit = footprint_max(segmap, np.where(np.isfinite(data), data, 0.0), n, bitwise=False) \
        >= settings.saturation_fraction * info.saturation
    # Masked pixels are kept out of the footprints, so look one pixel beyond them.
    imaflags = footprint_max(grey_dilation(segmap, size=3), bits, n, bitwise=True)
    snr = np.where(ferr > 0, flux / np.where(ferr > 0, ferr, 1.0), 0.0)
    cols = {
        "ccd": np.full(n, info.name), "amp": _amplifier(x, info.amplifiers),
        "x": x, "y": y,
        "x_err": cen.x_err, "y_err": cen.y_err,
        "flux": flux, "flux_err": ferr, "snr": snr, "flux_auto": fauto,
        "flux_auto_err": fauto_err, "kron_radius": kronrad, "flux_radius": r_half,
        "fwhm_px": 2.0 * r_half, "a": objects["a"], "b": objects["b"],
        "theta": objects["theta"], "peak": objects["peak"], "npix": objects["npix"],
        "flags": _flags(objects, sat_hit, aflag, (ny, nx)), "imaflags": imaflags,
    }
    return _describe(Table(cols))


def _empty_table() -> Table:
    """A table with the output columns and no rows."""
    ints = {"amp": np.int16, "npix": np.int64, "flags": np.int16, "imaflags": np.uint8}
    cols = {}
    for name, _, _ in SOURCE_COLUMNS:
        cols[name] = np.zeros(0, dtype="<U2" if name == "ccd" else ints.get(name, np.float64))
    return _describe(Table(cols))


def _describe(table: Table) -> Table:
    """Output dtypes, units and descriptions (:data:`SOURCE_COLUMNS`)."""
    dtypes = {"amp": np.int16, "npix": np.int64, "flags": np.int16, "imaflags": np.uint8}
    out = Table()
    for name, unit, text in SOURCE_COLUMNS:
        col = table[name]
        values = np.asarray(col, dtype=str) if name == "ccd" else np.asarray(
            col, dtype=dtypes.get(name, np.float64))
        out[name] = values
        out[name].unit = unit
        out[name].description = text
    out.meta.update(table.meta)
    return out


def run_detect(exposure: Path, mask: Path | str, out_path: Path, settings: DetectSettings
               ) -> None:
    """Detect the sources of every CCD of ``exposure`` and write them to ``out_path``.

    Reads ``exposure`` (raw multi-extension FITS) and, unless ``mask`` is ``""``, the bad-pixel
    mask file (one extension per CCD). Writes one Parquet table (atomically) with the columns of
    :data:`SOURCE_COLUMNS` for all CCDs; ``meta`` records the exposure, its band and MJD, the
    settings and the background level and RMS of each CCD.
    """
    exposure = Path(exposure)
    info = read_exposure_header(exposure)
    tables = []
    meta: dict[str, object] = {
        "exposure": exposure.name, "band": info.band, "mjd": info.mjd, "tile": info.tile,
        "ks4release_version": __version__, "pixel_origin": 0,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
    }
    for ccd in info.ccds:
        data, _ = read_ccd(exposure, ccd.name)
        bits = read_mask(mask, ccd.name, data.shape)
        table = detect_ccd(data, bits, ccd, settings)
        meta[f"background_rms_{ccd.name}"] = table.meta.pop("background_rms_adu")
        meta[f"background_{ccd.name}"] = table.meta.pop("background_adu")
        table.meta.pop("ccd")
        tables.append(table)
        logger.debug("%s %s: %d sources", exposure.name, ccd.name, len(table))
    out = vstack(tables, metadata_conflicts="silent")
    out = _describe(out)
    out.meta.clear()
    out.meta.update(meta)
    with atomic_path(Path(out_path)) as tmp:
        out.write(tmp, format="parquet", overwrite=True)
