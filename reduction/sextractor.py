"""Debian's SExtractor (``source-extractor`` 2.25) run on a co-add: the yardstick for sep.

DR1 measured its co-adds with SExtractor; ks4release measures them with sep. The parity tests
and the detection benchmark run the real binary on the same image with DR1's settings and read
its catalog. Only what parity needs is here: one subprocess call (an argument list, no shell)
and a FITS_1.0 catalog read back into an astropy Table with SExtractor's column names.

How SExtractor is configured (:class:`SExtractorSettings`, :func:`sextractor_command`):

* DR1's detection settings: ``DETECT_MINAREA 9``, ``DEBLEND_MINCONT 0.00005``, ``MASK_TYPE
  CORRECT``, ``PHOT_APERTURES`` 3/5/10 arcsec = 7.5, 12.5, 25 px at 0.4"/px,
  ``PHOT_AUTOPARAMS 2.5, 3.5``, ``SEEING_FWHM`` from the co-add's ``SEEING``; the threshold DR1
  does not state is a setting (1.5 sigma, SExtractor's default).
* ``MASK_TYPE`` in SExtractor acts on the pixels it considers bad while measuring an object:
  the detected pixels of neighbouring objects (blanked whenever ``MASK_TYPE`` is not ``NONE``,
  ``src/prefs.c``: ``blank_flag = mask_type != NONE``) and pixels whose
  weight is below ``WEIGHT_THRESH`` (``src/photom.c``: with ``CORRECT`` such a pixel is replaced
  by its mirror image through the object centre, with ``BLANK`` by zero). A ``FLAG_IMAGE`` does
  not make pixels bad: it only feeds ``IMAFLAGS_ISO``. So bad pixels (no data, or mask bits
  chosen as bad) go to SExtractor as a ``MAP_WEIGHT`` weight map (0 bad, 1 good; bad pixels are
  then interpolated for detection over at most ``INTERP_MAXXLAG``/``MAXYLAG`` pixels,
  ``INTERP_TYPE ALL``, and mirrored in the photometry), and the DR1 mask bits as the
  ``FLAG_IMAGE`` (``FLAG_TYPE OR``). With weights of 0 and 1 only, the noise of the good pixels
  stays the global background RMS.
* Background: ``BACK_SIZE`` and ``BACK_FILTERSIZE`` settings, ``BACKPHOTO_TYPE`` and
  ``BACKPHOTO_THICK`` as the photometry's ``backphoto_type`` and ``backphoto_thick_px``.
* Traps (``../shared/docs/tools.md``): Debian's binary finds ``default.conv`` and
  ``default.nnw`` only by absolute path (``/usr/share/source-extractor``); a ``SATURATE`` or
  ``GAIN`` header keyword silently overrides ``SATUR_LEVEL``/``GAIN`` from the command line
  while ``SATUR_KEY``/``GAIN_KEY`` point at it. Here the header is read in Python (``SATURATE``
  when present, else the setting; gain 0 = no Poisson term, the co-add's noise is in its
  background RMS) and both keys are pointed at a keyword no header carries, so the command line
  is what SExtractor uses.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ks4release.errors import InputError
from ks4release.reduction.photometry import APERTURE_DIAMETERS_ARCSEC, clean_beta
from ks4release.settings import BACKPHOTO_TYPES, PhotometrySettings, documented

__all__ = [
    "OUTPUT_PARAMETERS",
    "SEXTRACTOR_SHARE",
    "SExtractorFailed",
    "SExtractorNotFound",
    "SExtractorSettings",
    "find_sextractor",
    "prepare_sextractor",
    "read_catalog",
    "run_sextractor",
    "sextractor_command",
]

#: Where Debian's ``source-extractor`` package keeps its filters, networks and configuration.
SEXTRACTOR_SHARE = Path("/usr/share/source-extractor")

#: Names Debian and upstream give the binary, tried in this order.
_BINARIES = ("source-extractor", "sex")

#: A header keyword no image carries: SATUR_KEY and GAIN_KEY point here (module docstring).
_ABSENT_KEY = "KS4NOKEY"

#: Catalog columns asked of SExtractor (``(n)`` = one per aperture).
OUTPUT_PARAMETERS = (
    "NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE", "ALPHA_J2000", "DELTA_J2000",
    "FLUX_APER({n})", "FLUXERR_APER({n})", "MAG_APER({n})", "MAGERR_APER({n})",
    "FLUX_AUTO", "FLUXERR_AUTO", "MAG_AUTO", "MAGERR_AUTO", "KRON_RADIUS", "FLUX_RADIUS",
    "FLUX_MAX", "THRESHOLD", "BACKGROUND", "ISOAREA_IMAGE", "ISOAREAF_IMAGE",
    "ISO0", "ISO1", "ISO2", "ISO3", "ISO4", "ISO5", "ISO6", "ISO7",
    "A_IMAGE", "B_IMAGE", "THETA_IMAGE", "ELLIPTICITY", "FWHM_IMAGE", "CLASS_STAR",
    "FLAGS", "IMAFLAGS_ISO",
)

_MASK_TYPES = ("NONE", "BLANK", "CORRECT")


class SExtractorNotFound(FileNotFoundError):
    """No SExtractor binary on the PATH."""


class SExtractorFailed(RuntimeError):
    """SExtractor exited with an error; the message ends with its standard error."""


@dataclass(frozen=True, kw_only=True)
class SExtractorSettings:
    """How SExtractor is run for parity with sep (DR1's detection settings where DR1 says)."""

    detect_thresh_sigma: float = documented(
        "DETECT_THRESH in units of the background RMS (DR1: not stated).", default=1.5)
    analysis_thresh_sigma: float = documented(
        "ANALYSIS_THRESH in units of the background RMS.", default=1.5)
    min_area_px: int = documented("DETECT_MINAREA, pixels (DR1: 9).", default=9)
    deblend_nthresh: int = documented("DEBLEND_NTHRESH.", default=32)
    deblend_cont: float = documented("DEBLEND_MINCONT (DR1: 0.00005).", default=5e-5)
    clean: bool = documented("CLEAN spurious detections near bright objects.", default=True)
    clean_param: float = documented("CLEAN_PARAM.", default=1.0)
    mask_type: str = documented(
        "MASK_TYPE: NONE, BLANK or CORRECT (DR1: CORRECT).", default="CORRECT")
    aperture_diameters_px: tuple[float, ...] = documented(
        "PHOT_APERTURES, diameters in pixels (DR1: 3, 5, 10 arcsec at 0.4 arcsec/px).",
        default=(7.5, 12.5, 25.0))
    kron_factor: float = documented("PHOT_AUTOPARAMS Kron factor (DR1: 2.5).", default=2.5)
    kron_min_radius: float = documented(
        "PHOT_AUTOPARAMS minimum radius, in units of A/B (DR1: 3.5).", default=3.5)
    back_size_px: int = documented("BACK_SIZE, pixels.", default=64)
    back_filter_size: int = documented("BACK_FILTERSIZE, meshes.", default=3)
    backphoto_type: str = documented(
        "BACKPHOTO_TYPE: GLOBAL or LOCAL (kmtnet.sex).", default="GLOBAL")
    backphoto_thick_px: int = documented(
        "BACKPHOTO_THICK: width of the LOCAL annulus, pixels (kmtnet.sex: 24).", default=24)
    saturation_adu: float = documented(
        "SATUR_LEVEL, ADU, used when the image header has no SATURATE (default: none).",
        default=1e20)
    pixel_scale_arcsec: float = documented(
        "PIXEL_SCALE, arcsec (0 = from the image WCS).", default=0.0)
    filter_path: str = documented(
        "FILTER_NAME, absolute path (Debian's 3x3 'all-ground' kernel).",
        default=str(SEXTRACTOR_SHARE / "default.conv"))
    nnw_path: str = documented(
        "STARNNW_NAME, absolute path (the same network as kmtnet.nnw).",
        default=str(SEXTRACTOR_SHARE / "default.nnw"))
    interp_max_lag_px: int = documented(
        "INTERP_MAXXLAG and INTERP_MAXYLAG: longest gap of bad pixels interpolated, pixels.",
        default=16)
    memory_pixstack: int = documented("MEMORY_PIXSTACK, pixels.", default=3_000_000)
    memory_objstack: int = documented("MEMORY_OBJSTACK, objects.", default=3000)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        for name in ("detect_thresh_sigma", "analysis_thresh_sigma", "kron_factor",
                     "kron_min_radius", "clean_param", "saturation_adu"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_area_px", "deblend_nthresh", "back_size_px", "back_filter_size",
                     "interp_max_lag_px", "memory_pixstack", "memory_objstack",
                     "backphoto_thick_px"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.deblend_cont <= 1.0:
            raise ValueError(f"deblend_cont must be in [0, 1], got {self.deblend_cont}")
        if self.pixel_scale_arcsec < 0:
            raise ValueError(f"pixel_scale_arcsec must be >= 0, got {self.pixel_scale_arcsec}")
        if not self.aperture_diameters_px or min(self.aperture_diameters_px) <= 0:
            raise ValueError("aperture_diameters_px must hold positive diameters, got "
                             f"{self.aperture_diameters_px}")
        if self.mask_type not in _MASK_TYPES:
            raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {self.mask_type!r}")
        if self.backphoto_type not in BACKPHOTO_TYPES:
            raise ValueError(f"backphoto_type must be one of {BACKPHOTO_TYPES}, got "
                             f"{self.backphoto_type!r}")
        for name in ("filter_path", "nnw_path"):
            if not Path(getattr(self, name)).is_absolute():
                raise ValueError(f"{name} must be an absolute path (Debian's SExtractor does not "
                                 f"search for it), got {getattr(self, name)!r}")


    @classmethod
    def from_photometry(cls, photometry: PhotometrySettings, pixel_scale_arcsec: float,
                        psf_beta: float = math.nan) -> SExtractorSettings:
        """The settings that configure SExtractor like a ``PhotometrySettings`` configures sep
        (:mod:`ks4release.reduction.photometry`): thresholds, deblending, cleaning (CLEAN_PARAM
        from the co-add's ``psf_beta``, its PSFBETA, as :func:`.photometry.clean_beta`),
        background mesh and apertures (arcsec diameters turned into pixels at
        ``pixel_scale_arcsec``)."""
        return cls(detect_thresh_sigma=photometry.detect_thresh_sigma,
                   analysis_thresh_sigma=photometry.detect_thresh_sigma,
                   min_area_px=photometry.min_area_px,
                   deblend_nthresh=photometry.deblend_nthresh,
                   deblend_cont=photometry.deblend_cont, clean=photometry.clean,
                   clean_param=clean_beta(photometry, psf_beta),
                   aperture_diameters_px=tuple(d / pixel_scale_arcsec
                                               for d in APERTURE_DIAMETERS_ARCSEC),
                   kron_factor=photometry.kron_factor,
                   kron_min_radius=photometry.kron_min_radius,
                   back_size_px=photometry.back_size_px,
                   back_filter_size=photometry.back_filter_size,
                   backphoto_type=photometry.backphoto_type,
                   backphoto_thick_px=photometry.backphoto_thick_px,
                   interp_max_lag_px=photometry.interp_max_gap_px,
                   pixel_scale_arcsec=pixel_scale_arcsec)


def find_sextractor() -> Path:
    """The SExtractor binary on the PATH (``source-extractor``, else ``sex``).

    Raises
    ------
    SExtractorNotFound
        Neither name is on the PATH.
    """
    for name in _BINARIES:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise SExtractorNotFound(
        f"SExtractor not found on the PATH (tried {', '.join(_BINARIES)}); install the Debian "
        "package 'source-extractor'")


def _number(value: float) -> str:
    """A number as SExtractor's command line takes it."""
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def sextractor_command(binary: Path, image: Path, catalog: Path, parameters: Path,
                       settings: SExtractorSettings, *, seeing_arcsec: float,
                       saturation_adu: float, weight: Path | None = None,
                       flags: Path | None = None,
                       check_images: Mapping[str, Path] | None = None) -> list[str]:
    """The argument list that runs SExtractor on ``image`` with ``settings`` (no shell)."""
    s = settings
    options = {
        "CATALOG_NAME": str(catalog), "CATALOG_TYPE": "FITS_1.0",
        "PARAMETERS_NAME": str(parameters), "DETECT_TYPE": "CCD",
        "DETECT_MINAREA": str(s.min_area_px), "THRESH_TYPE": "RELATIVE",
        "DETECT_THRESH": _number(s.detect_thresh_sigma),
        "ANALYSIS_THRESH": _number(s.analysis_thresh_sigma),
        "FILTER": "Y", "FILTER_NAME": s.filter_path,
        "DEBLEND_NTHRESH": str(s.deblend_nthresh), "DEBLEND_MINCONT": repr(s.deblend_cont),
        "CLEAN": "Y" if s.clean else "N", "CLEAN_PARAM": _number(s.clean_param),
        "MASK_TYPE": s.mask_type,
        "PHOT_APERTURES": ",".join(_number(d) for d in s.aperture_diameters_px),
        "PHOT_AUTOPARAMS": f"{_number(s.kron_factor)},{_number(s.kron_min_radius)}",
        "SATUR_LEVEL": repr(float(saturation_adu)), "SATUR_KEY": _ABSENT_KEY,
        "GAIN": "0.0", "GAIN_KEY": _ABSENT_KEY, "MAG_ZEROPOINT": "0.0",
        "PIXEL_SCALE": _number(s.pixel_scale_arcsec), "SEEING_FWHM": repr(float(seeing_arcsec)),
        "STARNNW_NAME": s.nnw_path, "BACK_TYPE": "AUTO", "BACK_SIZE": str(s.back_size_px),
        "BACK_FILTERSIZE": str(s.back_filter_size), "BACKPHOTO_TYPE": s.backphoto_type,
        "BACKPHOTO_THICK": str(s.backphoto_thick_px),
        "MEMORY_PIXSTACK": str(s.memory_pixstack), "MEMORY_OBJSTACK": str(s.memory_objstack),
        "VERBOSE_TYPE": "QUIET", "WRITE_XML": "N", "NTHREADS": "1",
        "WEIGHT_TYPE": "NONE" if weight is None else "MAP_WEIGHT",
    }
    if weight is not None:
        options |= {"WEIGHT_IMAGE": str(weight), "INTERP_TYPE": "ALL",
                    "INTERP_MAXXLAG": str(s.interp_max_lag_px),
                    "INTERP_MAXYLAG": str(s.interp_max_lag_px)}
    if flags is not None:
        options |= {"FLAG_IMAGE": str(flags), "FLAG_TYPE": "OR"}
    if check_images:
        options |= {"CHECKIMAGE_TYPE": ",".join(check_images),
                    "CHECKIMAGE_NAME": ",".join(str(p) for p in check_images.values())}
    else:
        options["CHECKIMAGE_TYPE"] = "NONE"
    command = [str(binary), str(image), "-c", str(SEXTRACTOR_SHARE / "default.sex")]
    for key, value in options.items():
        command += [f"-{key}", value]
    return command


def _parameters_text(n_apertures: int, with_flag_image: bool) -> str:
    """The PARAMETERS_NAME file: one output column per line (IMAFLAGS_ISO needs a FLAG_IMAGE:
    without one SExtractor tries to open the configuration's ``flag.fits`` and fails)."""
    names = [p.format(n=n_apertures) for p in OUTPUT_PARAMETERS
             if with_flag_image or p != "IMAFLAGS_ISO"]
    return "\n".join(names) + "\n"


def _write_inputs(folder: Path, shape: tuple[int, int], bad: np.ndarray | None,
                  mask: np.ndarray | None) -> tuple[Path | None, Path | None]:
    """The weight map (0 where ``bad``, 1 elsewhere) and the FLAG_IMAGE (``mask``), if given."""
    weight = flags = None
    for name, array in (("bad", bad), ("mask", mask)):
        if array is not None and np.shape(array) != shape:
            raise ValueError(f"{name}: shape {np.shape(array)} differs from the image {shape}")
    if bad is not None:
        weight = folder / "weight.fits"
        fits.PrimaryHDU((~np.asarray(bad, dtype=bool)).astype(np.float32)).writeto(weight)
    if mask is not None:
        flags = folder / "flags.fits"
        fits.PrimaryHDU(np.asarray(mask).astype(np.int32)).writeto(flags)
    return weight, flags


def _seeing(image: Path, header: fits.Header, seeing_arcsec: float | None) -> float:
    """SEEING_FWHM: the given value, else the header's SEEING."""
    if seeing_arcsec is None:
        if "SEEING" not in header:
            raise InputError(image, "header has no SEEING (stellar FWHM, arcsec) for "
                                    "SEEING_FWHM", key="SEEING")
        seeing_arcsec = float(header["SEEING"])
    if not (math.isfinite(seeing_arcsec) and seeing_arcsec > 0):
        raise InputError(image, f"SEEING must be a positive number, got {seeing_arcsec}",
                         key="SEEING")
    return seeing_arcsec


def prepare_sextractor(folder: Path, image: Path, settings: SExtractorSettings, *,
                       bad: np.ndarray | None = None, mask: np.ndarray | None = None,
                       seeing_arcsec: float | None = None,
                       check_images: Mapping[str, Path] | None = None
                       ) -> tuple[list[str], Path]:
    """Write a run's parameter, weight and flag files into ``folder``; return the argument
    list and the catalog path (arguments as :func:`run_sextractor`; the benchmark wraps the
    argument list in GNU ``time``)."""
    binary = find_sextractor()
    image = Path(image).resolve()
    header = fits.getheader(image)
    seeing = _seeing(image, header, seeing_arcsec)
    saturation = float(header.get("SATURATE", settings.saturation_adu))
    weight, flags = _write_inputs(folder, (header["NAXIS2"], header["NAXIS1"]), bad, mask)
    parameters = folder / "catalog.param"
    parameters.write_text(_parameters_text(len(settings.aperture_diameters_px),
                                           flags is not None))
    catalog = folder / "catalog.fits"
    command = sextractor_command(binary, image, catalog, parameters, settings,
                                 seeing_arcsec=seeing, saturation_adu=saturation,
                                 weight=weight, flags=flags, check_images=check_images)
    return command, catalog


def read_catalog(catalog: Path) -> Table:
    """A FITS_1.0 SExtractor catalog as an astropy Table (SExtractor's column names)."""
    return Table.read(catalog, format="fits", hdu=1)


def run_sextractor(image: Path, settings: SExtractorSettings | None = None, *,
                   bad: np.ndarray | None = None, mask: np.ndarray | None = None,
                   seeing_arcsec: float | None = None,
                   check_images: Mapping[str, Path] | None = None) -> Table:
    """Run SExtractor on the FITS ``image`` (primary HDU) and return its catalog.

    Parameters
    ----------
    image : Path
        Co-add (or any single-HDU FITS image).
    settings : SExtractorSettings, optional
        Defaults: DR1's detection settings (module docstring).
    bad : numpy.ndarray, optional
        Pixels without usable data (bool, image shape), e.g. NDITH = 0: weight 0 in a
        ``MAP_WEIGHT`` map, interpolated for detection, mirrored in the photometry.
    mask : numpy.ndarray, optional
        DR1 mask bits (image shape): the ``FLAG_IMAGE`` behind ``IMAFLAGS_ISO``.
    seeing_arcsec : float, optional
        SEEING_FWHM; default the image header's ``SEEING``.
    check_images : mapping, optional
        SExtractor CHECKIMAGE_TYPE -> output path (e.g. ``{"SEGMENTATION": p}``).

    Returns
    -------
    astropy.table.Table
        One row per object, SExtractor's column names (:data:`OUTPUT_PARAMETERS`, without
        ``IMAFLAGS_ISO`` when no mask is given; aperture columns are vectors, one value per
        aperture, in the order of the settings).

    Raises
    ------
    SExtractorNotFound
        No SExtractor binary.
    InputError
        The header has no positive ``SEEING`` and none was given.
    SExtractorFailed
        SExtractor exited with an error (its standard error ends the message).
    """
    with tempfile.TemporaryDirectory(prefix="ks4-sextractor-") as tmp:
        folder = Path(tmp)
        command, catalog = prepare_sextractor(folder, image, settings or SExtractorSettings(),
                                              bad=bad, mask=mask, seeing_arcsec=seeing_arcsec,
                                              check_images=check_images)
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SExtractorFailed(f"{Path(command[0]).name} failed on {command[1]} (exit "
                                   f"{done.returncode}): {done.stderr.strip()[-2000:]}")
        return read_catalog(catalog)
