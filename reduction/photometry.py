"""Detection and photometry of the co-adds with sep, in DR1's dual and single modes.

DR1 ran SExtractor on every co-add twice: in dual-image mode, detecting on I and measuring every
band at the I positions, apertures and segmentation, and in single mode, detecting on each band
alone. This module does the same with sep, the way ``tools.md`` found it to reproduce
SExtractor:

* **Background and masked pixels** (per band). :class:`sep.Background` (mesh
  ``back_size_px``, median filter ``back_filter_size``) on the pixels with data, subtracted
  (by default measured a second time without the sources above ``background_mask_sigma``,
  whose wings lift SExtractor's one-pass mesh, nor discs of ``background_mask_wings`` times
  their footprint radius over the wings beyond; 0 gives SExtractor's single pass);
  then masked pixels (no data, i.e. NDITH = 0 or not finite, plus any co-add mask bit in
  ``bad_bits``) in runs of at most ``interp_max_gap_px`` along a row are filled by linear
  interpolation (:func:`ks4release.reduction.coadd.fill_masked_pixels`), DR1's "MASK_TYPE
  CORRECT, masked pixels interpolated". Pixels left unfilled are masked in every sep call.
  The co-add mask is the OR of the *inputs'* bits, most of which the median already rejected,
  so by default (``bad_bits`` = 0) its bits only flag the photometry (``IMAFLAGS_ISO``) and do
  not remove pixels. The mesh's RMS map is scaled per pixel by the noise measured at each NDITH
  value (:func:`coverage_noise_factors`, ``coverage_rms``): a median of fewer exposures is
  noisier, and the mesh cannot follow the steps at the exposures' edges (SExtractor's weight
  map; DR1 ran without one).
* **Detection** on the detection image: ``sep.extract`` with a threshold of
  ``detect_thresh_sigma`` times the background RMS map, DETECT_MINAREA 9, 32 deblending
  thresholds, DEBLEND_MINCONT 0.00005, cleaning, and SExtractor's ``default.conv`` kernel with
  ``filter_type='conv'`` (sep's default 'matched' finds 3x more, mostly noise, peaks). CLEAN
  credits each detection with Moffat wings of the co-add's own PSFBETA rather than
  kmtnet.sex's CLEAN_PARAM 1.0 (:func:`clean_beta`). Then each saturated star's footprint is
  extracted again with its fitted wings subtracted (:func:`_with_halos`,
  :mod:`.halo_detection`; ``halo_detection``, not in DR1): the faint sources on its wings
  that DEBLEND_MINCONT left in it.
* **Positions**: windowed centroids on the detection image (SExtractor's XWIN_IMAGE, Gaussian
  window of FWHM 2 x min(object, PSF) half-light radius; the isophotal barycentre X_IMAGE where
  the iteration fails), written 1-based like SExtractor; ``ra``/``dec`` from the co-add WCS.
  Every aperture is centred there; forced bands use the detection positions. A saturated
  detection (a saturation bit within ``saturation_core_px`` of its peak, as FLAGS bit 4) is
  centred instead by a Moffat fit to its unsaturated wings (:func:`_saturated_centres`): the
  flat core and the bleed trail pull the windowed centroid 0.76" off on the demo (median), the
  fit 0.07". Deblended pieces whose centres then end within 0.5 px of each other are one
  source, listed once (:func:`_merge_twins`): faint galaxies split by the deblending, and the
  pieces of a saturated star that all fit its wings; so are pieces of one blend closer than
  ``deblend_twin_fwhm`` times the co-add's SEEING, and touching pieces closer than
  ``deblend_dip_fwhm`` SEEING between which the filtered image dips by less than
  ``deblend_dip_sigma`` of its noise (:func:`_shallow_splits`; neither in DR1: noise
  splitting a faint galaxy, and each such split in one tile but not in its neighbour lists
  the galaxy twice in the master catalogs). A merged source is measured as one object: the
  moments of its pieces' union (:func:`.sep_objects.combined_pieces`) and a windowed
  centroid started from their barycentre (:func:`_recentred`). (On the demo co-adds the
  median offset from the truth of S/N >= 10 sources is 0.08-0.09" against 0.10-0.11" for
  the barycentre.)
* **Fluxes** in every band: circular apertures of 3, 5 and 10 arcsec diameter (radius from the
  WCS pixel scale, 3.75/6.25/12.5 px at 0.4 arcsec/px), ``sum_circle(subpix=5)``; MAG_AUTO as
  SExtractor: ``kron_radius`` on the detection image with neighbours masked through the
  segmentation map, then ``sum_ellipse`` with ``max(2.5 kronrad, 3.5)`` (``subpix=5``).
  **Neighbours and masked pixels** in every aperture (AUTO and the circles) as SExtractor's
  MASK_TYPE CORRECT (DR1's setting; ``photom.c``): while an object is measured, each pixel of
  another object's footprint (the detection band's segmentation map) or masked is replaced by
  its mirror pixel through the object's centre, or by 0 when the mirror pixel is off the image,
  another object's or masked; the error takes the mirror pixel's variance (none for a 0).
  Only objects whose aperture box holds such pixels are corrected, each over a stamp summed by
  sep with the same sub-pixel weights, so isolated objects keep sep's sums exactly
  (:func:`_aperture_sums`). On the crowded 1/16-scale I co-add this moves the median of the
  S/N > 50 sources from 0.07 (AUTO) and 0.17 mag (10") brighter than SExtractor to within
  0.001 mag (``tests/test_sextractor_parity.py``), and costs ~0.15 ms per corrected object
  and band (0.05 s on a demo co-add, 0.3-0.45 s before; 5.6 -> 7.4 s on a 2000 x 2000 field of
  13,000 detections, 87% of them corrected).
  SExtractor leaves an object's pixels unblanked once measured, so which neighbours it
  corrects depends on its measurement order; we correct every neighbour, the rule its
  documentation states. In dual mode the Kron ellipse and the segmentation are I's:
  SExtractor too computes the Kron radius on the detection image (``computeautoflux``), so a
  forced band with a wider PSF than I's loses more light in AUTO than its single-mode AUTO.
* **Median-stack flux factors** (``stack_flux_correction``; not in DR1): on a median of
  exposures of different seeing a faint point source keeps a different share of its flux in a
  given aperture than a bright one (:mod:`ks4release.reduction.median_stack`). The Kron and
  aperture fluxes and errors of detections with CLASS_STAR >= ``stack_flux_class_star_min``
  are divided by the factor that module predicts for the exposures whose CCD outlines hold the
  object (the co-add's exposure list: their PSF half-light radii and sky noise, the header's
  PSFBETA; a pixel an exposure's mask left out of the median does not count), the
  object's flux over the RMS map at its centre and the aperture's radius (the Kron ellipse as
  the circle of its area), so that faint and bright stars share the zero-point maps'
  calibration. Without those inputs nothing is divided.
* **Errors**: background RMS map plus the Poisson term of the source with the co-add's effective
  gain: header ``GAIN`` when present, else the setting ``gain_e_per_adu`` (0 = no Poisson term,
  SExtractor's GAIN = 0; the co-add headers of this pipeline carry no GAIN so far).
* **Shape** (detection image, copied to every band in dual mode): A/B/THETA from the second
  moments (THETA in degrees, counter-clockwise from +x, -90..90), ELLIPTICITY = 1 - B/A,
  KRON_RADIUS = the Kron factor actually used, max(2.5 kronrad, 3.5), in units of A and B.
* **Per band**: FLUX_RADIUS (radius holding half of FLUX_AUTO, ``flux_radius`` with
  ``rmax = 6 A`` and neighbours masked), FLUX_MAX (largest background-subtracted pixel in the
  footprint), FWHM_IMAGE and CLASS_STAR from :mod:`ks4release.reduction.stellarity` on that
  band's unfiltered image within the detection footprint (the isophotal profile of the forced
  band inside I's footprint, thresholds ``detect_thresh_sigma`` x that band's RMS at the peak
  pixel), FLAGS and IMAFLAGS_ISO (below). In dual mode a forced band's CLASS_STAR takes the
  isophotes of the band's own detection where its segment holds the object alone
  (``dual_own_isophotes``, :func:`_own_isophotes`; SExtractor would count them inside I's
  footprint, which cuts the outer isophotes of galaxies that are larger in the band). A
  saturated detection's FWHM_IMAGE and CLASS_STAR see its saturated pixels replaced by the
  Moffat fit to its wings (:func:`_restored_cores`), not a flat top.
* **CLASS_STAR's seeing map** (``local_seeing``): SEEING_FWHM is not the header's SEEING
  everywhere but each object's: the PSF of a median co-add is that of the exposures covering
  the pixel, 1.5 times SEEING where one or two bad-seeing dithers cover it alone (chip gaps,
  borders) or where the other exposures' data were masked. Each exposure's PSF size is the
  stars' half-light radius that the zero-point stage measured on it (``psf_r50_arcsec`` in the
  co-add's exposure list, from the scaled CCDs' ``PSFR50``); which exposures made an object's
  PSF are those whose CCD polygon holds it and whose data entered the median there (the
  co-add's excluded pixels); each object gets SEEING scaled by the PSF predicted for that set
  over the typical one (:func:`local_seeing`). Without an exposure list or PSF sizes
  (``measure_*`` called without ``exposures``), SEEING everywhere.

* **Large co-adds** (:func:`run_photometry`): a co-add with a side longer than
  ``block_size_px`` is read memory-mapped and measured in overlapping blocks
  (:mod:`ks4release.reduction.photometry_blocks`), each as a whole co-add but with the whole
  co-add's RMS factors per NDITH (:func:`blockwise_noise_factors`) and PSF half-light radius
  (:func:`_psf_radius` on its central block), each detection kept by the block whose core
  holds it.

``flags_{b}`` (:data:`FLAG_BITS`, SExtractor meanings):
1 more than ``crowding_fraction`` of the Kron ellipse's pixels belong to other objects or are
masked; 2 deblended from a blend; 4 saturated: a pixel within ``saturation_core_px`` of the
detection peak or of the source's centre carries a ``saturation_bits`` bit in the band's co-add
mask (bit 2, bleed and saturated cores, by default; the centre matters in dual mode, where the
peak is the detection band's), or a footprint pixel reaches the header's SATURATE when there is
one; 8 the footprint touches the image border or pixels without data; 16 an aperture (3/5/10
arcsec or Kron) is truncated by the border or holds masked pixels; 32 the footprint holds
interpolated or masked pixels; 64 deblending overflow (sep's OBJ_DOVERFLOW). 128 (extraction
overflow) is never set: sep raises instead, reported as a :class:`StageError`.
``imaflags_iso_{b}``: bitwise OR of the band's co-add mask bits over the footprint, grown by one
pixel into the masked pixels that the footprint could not include.

The measurement table (columns in :data:`COLUMNS`, ``{b}`` = lower-case band) is the contract
of issue 5: M's zero-point maps and Q's post-processing read it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Self

import numpy as np
import sep
from astropy import units as u
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import Table
from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy import sparse
from scipy.ndimage import binary_dilation, distance_transform_edt, grey_dilation
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ks4release import __version__
from ks4release.atomic import atomic_path
from ks4release.errors import InputError, StageError
from ks4release.layout import coadd_excluded_path, coadd_exposures_path, coadd_path
from ks4release.reduction.coadd import fill_masked_pixels, read_excluded
from ks4release.reduction.coadd_maps import coadd_wcs, exposure_footprints, read_exposures_json
from ks4release.reduction.halo_detection import HaloSettings, halo_detections
from ks4release.reduction.local_background import local_levels
from ks4release.reduction.median_stack import point_source_factors
from ks4release.reduction.neighbour_model import model_image, model_widths, own_sums
from ks4release.reduction.photometry_blocks import (
    Block,
    central_block,
    crop_excluded,
    crop_header,
    measure_in_blocks,
    plan_blocks,
)
from ks4release.reduction.sep_objects import (
    CONV_KERNEL,
    WingFit,
    combined_pieces,
    dip_significance,
    ellipse,
    footprint_max,
    half_light_radii,
    psf_half_light_radius,
    set_extraction_limits,
    sky_mask,
    touching_pieces,
    windowed_centroids,
    wing_fits,
)
from ks4release.reduction.stellarity import Network, class_star, isophotal_profile, read_nnw
from ks4release.settings import PhotometrySettings

__all__ = [
    "APERTURE_DIAMETERS_ARCSEC",
    "COLUMNS",
    "FLAG_BITS",
    "PhotometrySettings",
    "blockwise_noise_factors",
    "clean_beta",
    "coverage",
    "exposure_psf_widths",
    "exposure_sky_sigmas",
    "local_seeing",
    "measure_dual",
    "measure_single",
    "measured_path",
    "median_psf_fwhm",
    "psf_beta",
    "read_measured",
    "run_photometry",
]

logger = logging.getLogger(__name__)

#: Diameters of the fixed apertures, arcsec (DR1; the columns flux_aper3/5/10_{b}).
APERTURE_DIAMETERS_ARCSEC = (3.0, 5.0, 10.0)
#: Moffat index of the neighbour model (``[photometry] neighbour_model``) on a co-add without a
#: usable PSFBETA (a median co-add's stars have 2.5-3.5).
NEIGHBOUR_MODEL_BETA = 3.0

#: Bits of the ``flags_{b}`` columns (SExtractor FLAGS meanings; our rules in the docstring).
FLAG_BITS = {
    1: "Kron ellipse crowded: neighbours or masked pixels above crowding_fraction",
    2: "object was deblended from a blend",
    4: "saturated: saturation mask bit near the peak or centre or a pixel at SATURATE",
    8: "footprint truncated at the image border or at pixels without data",
    16: "an aperture (3/5/10 arcsec or Kron) truncated or holding masked pixels",
    32: "footprint holds interpolated or masked pixels",
    64: "deblending overflow",
    128: "extraction overflow (never set: sep raises)",
}

#: Columns common to every table: (name, unit, description).
_COMMON = (
    ("number", None, "Running object number, 1-based"),
    ("x_image", u.pix, "Windowed centroid x on the detection image, 1-based pixel (XWIN_IMAGE)"),
    ("y_image", u.pix, "Windowed centroid y on the detection image, 1-based pixel (YWIN_IMAGE)"),
    ("ra", u.deg, "Right ascension of (x_image, y_image), co-add WCS (ICRS)"),
    ("dec", u.deg, "Declination of (x_image, y_image), co-add WCS (ICRS)"),
    ("errx2win_image", u.pix ** 2, "Variance of x_image (ERRX2WIN_IMAGE, pixel noise only)"),
    ("erry2win_image", u.pix ** 2, "Variance of y_image (ERRY2WIN_IMAGE, pixel noise only)"),
    ("tile", None, "KS4 tile name"),
)

#: Per-band columns, ``{b}`` replaced by the lower-case band: (name, unit, description).
_PER_BAND = (
    ("flux_auto_{b}", u.adu, "Flux in the Kron ellipse (FLUX_AUTO), co-add ADU (ZP 30)"),
    ("fluxerr_auto_{b}", u.adu, "1-sigma error of flux_auto"),
    ("flux_aper3_{b}", u.adu, "Flux in a 3 arcsec diameter circle"),
    ("fluxerr_aper3_{b}", u.adu, "1-sigma error of flux_aper3"),
    ("flux_aper5_{b}", u.adu, "Flux in a 5 arcsec diameter circle"),
    ("fluxerr_aper5_{b}", u.adu, "1-sigma error of flux_aper5"),
    ("flux_aper10_{b}", u.adu, "Flux in a 10 arcsec diameter circle"),
    ("fluxerr_aper10_{b}", u.adu, "1-sigma error of flux_aper10"),
    ("snr_{b}", None, "flux_auto / fluxerr_auto (0 when the error is not positive)"),
    ("fwhm_image_{b}", u.pix, "FWHM of a Gaussian fitted to the footprint pixels (FWHM_IMAGE)"),
    ("class_star_{b}", None, "SExtractor neural-network stellarity, 0 galaxy .. 1 star"),
    ("psf_fwhm_{b}", u.arcsec, "PSF FWHM at the object: the co-add's SEEING scaled by the PSF "
     "of the exposures that made it (CLASS_STAR's SEEING_FWHM, see local_seeing)"),
    ("flux_radius_{b}", u.pix, "Radius holding half of flux_auto (FLUX_RADIUS)"),
    ("kron_radius_{b}", None, "Kron factor used, max(2.5 r_Kron, 3.5), units of A and B"),
    ("flux_max_{b}", u.adu, "Largest background-subtracted pixel of the footprint"),
    ("theta_image_{b}", u.deg, "Position angle of A, counter-clockwise from +x, -90..90"),
    ("ellipticity_{b}", None, "1 - B/A"),
    ("a_image_{b}", u.pix, "Semi-major axis, second moments (A_IMAGE)"),
    ("b_image_{b}", u.pix, "Semi-minor axis, second moments (B_IMAGE)"),
    ("flags_{b}", None, "SExtractor-style flags: " + "; ".join(
        f"{k} {v}" for k, v in FLAG_BITS.items())),
    ("imaflags_iso_{b}", None, "OR of the co-add mask bits over the footprint"),
)

#: Every column of a table with the bands ``b``: the common ones, then the per-band ones.
COLUMNS = {"common": _COMMON, "per_band": _PER_BAND}

_INT_COLUMNS = {"number": np.int32, "flags": np.int16, "imaflags_iso": np.int16}


def _dtype(name: str) -> type:
    """Output dtype of a column (per-band columns by their name without the band suffix)."""
    if name == "tile":
        return str
    return _INT_COLUMNS.get(name, _INT_COLUMNS.get(name.rsplit("_", 1)[0], np.float64))


def _column_specs(bands: list[str]) -> list[tuple[str, u.UnitBase | None, str]]:
    """(name, unit, description) of every column of a table with ``bands``."""
    return list(_COMMON) + [(name.format(b=band.lower()), unit, text)
                            for band in bands for name, unit, text in _PER_BAND]
_MODES = ("dual", "single")


def measured_path(release_dir: Path, tile: str, mode: str, band: str | None = None) -> Path:
    """The measurement table of one tile: ``work/catalog/<tile>_dual_measured.parquet`` or
    ``work/catalog/<tile>_single_<BAND>_measured.parquet`` (band upper case, as in the co-add
    file names)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'dual' or 'single', got {mode!r}")
    if (mode == "single") != (band is not None):
        raise ValueError(f"mode {mode!r}: band must be given for 'single' mode only")
    name = f"{tile}_dual" if band is None else f"{tile}_single_{band.upper()}"
    return Path(release_dir) / "work" / "catalog" / f"{name}_measured.parquet"


# --------------------------------------------------------------------------------------------
# One band, prepared


@dataclass(frozen=True, eq=False)
class _Band:
    """One co-add ready for sep: background subtracted, short masked runs interpolated."""

    name: str
    image: np.ndarray        # background-subtracted, interpolated; masked pixels 0 (float32)
    rms: np.ndarray          # background RMS map (float32)
    masked: np.ndarray       # pixels still missing after interpolation (bool)
    touched: np.ndarray      # pixels interpolated or missing (bool)
    no_data: np.ndarray      # pixels without data (bool)
    mesh_mask: np.ndarray    # pixels the background mesh left out (bool)
    bits: np.ndarray         # co-add mask bits (uint8)
    exposures: dict          # the co-add's exposure list (empty without one)
    excluded: dict           # stem -> flat pixels where its masked data left the median
    depth: np.ndarray        # exposures per pixel (NDITH; 0 without data), -1 where not given
    saturate: float          # header SATURATE above the background, inf when absent
    gain: float              # effective gain used, 0 = no Poisson term
    seeing_arcsec: float
    psf_beta: float          # header PSFBETA (the co-add PSF's Moffat index), NaN when absent
    pixel_scale_arcsec: float
    wcs: WCS
    tile: str
    shape: tuple[int, int]
    psf_r_half: float | None  # the PSF's half-light radius (px) capping the centroid windows;
    #                           None: the median of the band's own bright compact detections


def read_measured(path: Path) -> Table:
    """A measurement table (Parquet), with an InputError naming the file when unreadable."""
    try:
        return Table.read(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the measurement table ({exc})") from exc


@dataclass(frozen=True, eq=False)
class _Sky:
    """One co-add's background-subtracted pixels and noise, before any interpolation."""

    sub: np.ndarray          # image - background, 0 where missing (float32)
    rms: np.ndarray          # the mesh's RMS map (float32), not yet scaled per NDITH
    missing: np.ndarray      # no data, or a bad_bits bit (bool)
    no_data: np.ndarray      # NDITH 0 or not finite (bool)
    mesh_mask: np.ndarray    # pixels the mesh left out: missing, and the sources' (bool)
    globalback: float        # the mesh's global background level


def _mesh_mask(data: np.ndarray, bad: np.ndarray, settings: PhotometrySettings) -> np.ndarray:
    """The pixels the photometry's background mesh leaves out (``sky_mask`` with the settings'
    box, filter and source masking)."""
    return sky_mask(data, bad, box=settings.back_size_px, filter_size=settings.back_filter_size,
                    mask_sigma=settings.background_mask_sigma,
                    grow_px=settings.background_grow_px,
                    wing_factor=settings.background_mask_wings)


def _mesh(data: np.ndarray, mask: np.ndarray, settings: PhotometrySettings) -> sep.Background:
    """The photometry's background mesh of an image, without the pixels of ``mask``."""
    return sep.Background(data, mask=mask, bw=settings.back_size_px, bh=settings.back_size_px,
                          fw=settings.back_filter_size, fh=settings.back_filter_size)


def _sky(data: np.ndarray, bits: np.ndarray, ndith: np.ndarray | None,
         settings: PhotometrySettings) -> _Sky:
    """Background mesh of one co-add (:func:`_mesh_mask`, :func:`_mesh`), subtracted."""
    no_data = ~np.isfinite(data)
    if ndith is not None:
        no_data |= np.asarray(ndith) <= 0
    missing = no_data | ((bits & settings.bad_bits) != 0)
    clean = np.ascontiguousarray(np.where(missing, 0.0, data), dtype=np.float32)
    mesh_mask = _mesh_mask(clean, missing, settings)
    background = _mesh(clean, mesh_mask, settings)
    sub = clean - background.back()
    sub[missing] = 0.0
    return _Sky(sub=sub, rms=background.rms(), missing=missing, no_data=no_data,
                mesh_mask=mesh_mask, globalback=float(background.globalback))


def _prepare(image: np.ndarray, mask: np.ndarray, header: fits.Header, band: str,
             settings: PhotometrySettings, ndith: np.ndarray | None,
             exposures: dict | None = None,
             excluded: dict[str, np.ndarray] | None = None,
             noise_factors: np.ndarray | None = None,
             psf_r_half: float | None = None) -> _Band:
    """Background, RMS and MASK_TYPE CORRECT-like interpolation of one co-add.
    ``noise_factors`` (index NDITH) replaces the factors measured on this image
    (:func:`coverage_noise_factors`) and ``psf_r_half`` the PSF's half-light radius measured on
    its detections (:func:`_psf_radius`): a block's are the whole co-add's."""
    data = np.asarray(image, dtype=np.float32)
    bits = np.asarray(mask).astype(np.uint8)
    if bits.shape != data.shape or (ndith is not None and np.shape(ndith) != data.shape):
        raise ValueError(f"band {band}: mask {bits.shape} or NDITH "
                         f"{None if ndith is None else np.shape(ndith)} differs from the image "
                         f"shape {data.shape}")
    if "SEEING" not in header or not float(header["SEEING"]) > 0:
        raise ValueError(f"band {band}: co-add header has no positive SEEING (arcsec), "
                         "needed for CLASS_STAR")
    sky = _sky(data, bits, ndith, settings)
    filled, masked = fill_masked_pixels(sky.sub, sky.missing, settings.interp_max_gap_px)
    rms = sky.rms
    if ndith is not None and settings.coverage_rms:
        depth = np.clip(np.asarray(ndith), 0, None)
        if noise_factors is None:
            noise_factors = coverage_noise_factors(sky.sub, rms, np.asarray(ndith), ~sky.missing)
        rms *= noise_factors[depth]
    wcs = coadd_wcs(header)
    scale = float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)  # deg -> arcsec
    saturate = float(header["SATURATE"]) - sky.globalback if "SATURATE" in header else math.inf
    gain = float(header.get("GAIN", settings.gain_e_per_adu))
    return _Band(name=band, image=np.ascontiguousarray(filled, dtype=np.float32),
                 rms=np.ascontiguousarray(rms, dtype=np.float32), masked=masked,
                 touched=sky.missing, no_data=sky.no_data, mesh_mask=sky.mesh_mask,
                 bits=bits,
                 exposures=exposures or {}, excluded=excluded or {},
                 depth=np.where(sky.no_data, 0, -1 if ndith is None else np.asarray(ndith)),
                 saturate=saturate, gain=gain,
                 seeing_arcsec=float(header["SEEING"]), psf_beta=psf_beta(header),
                 pixel_scale_arcsec=scale, wcs=wcs,
                 tile=str(header.get("TILE", "")), shape=data.shape, psf_r_half=psf_r_half)


#: Fewest sampled pixels of one NDITH value for its noise factor.
_NOISE_MIN_PIXELS = 2000
#: Every this-many-th pixel of every this-many-th row is sampled for the noise factors.
_NOISE_STEP = 2
#: Most pixels sampled for the noise factors of a co-add measured in blocks (a sparser lattice
#: beyond 8192^2 px: 2^24 samples hold 100 MB and fix a MAD to 0.03%).
_NOISE_MAX_SAMPLES = 2**24


def coverage_noise_factors(residual: np.ndarray, rms: np.ndarray, ndith: np.ndarray,
                           usable: np.ndarray, *, min_pixels: int = _NOISE_MIN_PIXELS,
                           step: int = _NOISE_STEP) -> np.ndarray:
    """Factors on the mesh RMS map per number of contributing exposures (index = NDITH).

    The mesh follows the noise over ``back_size_px``, but a co-add's noise steps at every edge
    of an exposure's footprint, within a mesh: a median of two exposures is noisier than one of
    four. For each NDITH value with at least ``min_pixels`` usable pixels (every ``step``-th
    pixel of every ``step``-th row), the factor is the robust standard deviation (astropy's
    mad_std, 1.4826 x MAD) of ``residual / rms`` there; 1 for the other values. As SExtractor's
    weight map (WEIGHT_TYPE MAP_WEIGHT), but measured on the co-add itself.

    The sources' pixels, all on one side, lift the MAD by about their fraction (1.3% for 1% of
    the pixels far out). On the demo (mesh 256 px) the factors are 1.4-1.8 for NDITH 1 and
    0.85-0.90 for the most common NDITH, whose noise the mesh overestimates by mixing in the
    noisier pixels. A clipped MAD, with or without rescaling the factors to a mean square of 1,
    gave factors 2-3% lower and 8-31% more detections matching no true source, while the true
    sources of S/N >= 10 found changed by -1 to +2 per band, so the plain MAD stays.
    """
    z, n = _noise_samples(residual, rms, ndith, usable, step)
    return _noise_factors(z, n, int(np.max(ndith, initial=0)), min_pixels)


def _noise_samples(residual: np.ndarray, rms: np.ndarray, ndith: np.ndarray,
                   usable: np.ndarray, step: int = _NOISE_STEP
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``residual / rms`` and NDITH of the usable pixels with data on a ``step`` lattice."""
    sub = (slice(None, None, step), slice(None, None, step))
    n_sub = np.asarray(ndith[sub])
    keep = np.asarray(usable[sub]) & (n_sub > 0) & (np.asarray(rms[sub]) > 0)
    z = np.asarray(residual[sub])[keep] / np.asarray(rms[sub])[keep]
    return z.astype(np.float32), n_sub[keep].astype(np.uint16)


def _noise_factors(z: np.ndarray, n: np.ndarray, max_ndith: int,
                   min_pixels: int = _NOISE_MIN_PIXELS) -> np.ndarray:
    """Per NDITH value (0..``max_ndith``), the mad_std of the samples ``z`` of that value
    (:func:`_noise_samples`) when there are at least ``min_pixels``, else 1."""
    factors = np.ones(max(max_ndith, 0) + 1, dtype=np.float32)
    for value in np.unique(n):
        values = z[n == value]
        if values.size >= min_pixels:
            factors[value] = mad_std(values)
    return factors


def blockwise_noise_factors(crop: Callable[[Block], tuple[np.ndarray, np.ndarray, np.ndarray]],
                            blocks: list[Block], shape: tuple[int, int],
                            settings: PhotometrySettings) -> np.ndarray:
    """:func:`coverage_noise_factors` of a whole co-add of numpy ``shape`` measured block by
    block: each block's background as its measurement will have it, sampled over its core only
    on the lattice of the whole co-add (every second pixel of every second row, sparser when
    that would exceed :data:`_NOISE_MAX_SAMPLES` pixels), the factors from all samples at once.
    ``crop(block)`` gives the block's image, mask bits and NDITH."""
    step = _NOISE_STEP
    while (shape[0] // step) * (shape[1] // step) > _NOISE_MAX_SAMPLES:
        step += 1
    zs, ns, top = [], [], 0
    for block in blocks:
        image, bits, ndith = crop(block)
        sky = _sky(np.asarray(image, dtype=np.float32), np.asarray(bits).astype(np.uint8),
                   ndith, settings)
        rows, cols = block.core_slices
        # the first core row and column on the co-add's lattice
        core = (slice(rows.start + (-block.core[0]) % step, rows.stop),
                slice(cols.start + (-block.core[2]) % step, cols.stop))
        z, n = _noise_samples(sky.sub[core], sky.rms[core], np.asarray(ndith)[core],
                              ~sky.missing[core], step)
        zs.append(z)
        ns.append(n)
        top = max(top, int(np.max(ndith, initial=0)))
    return _noise_factors(np.concatenate(zs), np.concatenate(ns), top)


def psf_beta(header: fits.Header) -> float:
    """The co-add's PSFBETA (Moffat index of its stars, > 1), NaN when absent or unusable."""
    value = header.get("PSFBETA")
    return float(value) if isinstance(value, (int, float)) and value > 1.0 else math.nan


def clean_beta(settings: PhotometrySettings, psf_beta: float) -> float:
    """CLEAN_PARAM of a co-add whose stars have the Moffat index ``psf_beta`` (its PSFBETA; NaN
    when unknown): the index of the wings that CLEAN credits each detection with. With
    ``clean_beta_from_psf``, the co-add's own (a median co-add's stars have beta ~2.5-3.5);
    otherwise, or without it, ``clean_param`` (kmtnet.sex's 1.0: wings falling as 1/r**2 let a
    bright star explain away real S/N ~10 neighbours 50-300 px off; on the demo release,
    PSFBETA raised the completeness of S/N >= 10 sources by 0.003-0.008 per band and the
    spurious detections that the post-processing removes from 0.907-0.964 to 0.924-0.974)."""
    if settings.clean_beta_from_psf and math.isfinite(psf_beta) and psf_beta > 1.0:
        return psf_beta
    return settings.clean_param


def _detect(band: _Band, settings: PhotometrySettings) -> tuple[np.ndarray, np.ndarray]:
    """sep extraction on the prepared detection image: (objects, segmentation map)."""
    set_extraction_limits(band.image.size, settings.pixel_stack)
    try:
        objects, segmap = sep.extract(
            band.image, settings.detect_thresh_sigma, err=band.rms, mask=band.masked,
            minarea=settings.min_area_px, filter_kernel=CONV_KERNEL, filter_type="conv",
            deblend_nthresh=settings.deblend_nthresh, deblend_cont=settings.deblend_cont,
            clean=settings.clean, clean_param=clean_beta(settings, band.psf_beta),
            segmentation_map=True)
    except Exception as exc:  # sep raises a bare Exception on internal overflows
        raise StageError(f"sep extraction failed: {exc}", stage="photometry",
                         tile=band.tile or None, band=band.name) from exc
    return objects, segmap.astype(np.int32)


def _with_halos(band: _Band, objects: np.ndarray, segmap: np.ndarray,
                settings: PhotometrySettings, memo: _WingMemo
                ) -> tuple[np.ndarray, np.ndarray]:
    """The detections plus the sources found in the halos of the saturated ones, their fitted
    wings subtracted (:mod:`.halo_detection`; ``halo_detection``); the fits go into ``memo``."""
    if not settings.halo_detection or objects.size == 0:
        return objects, segmap
    fitted = _fitted_wings(band, objects, segmap, objects["x"], objects["y"], settings, memo)
    if not fitted:
        return objects, segmap

    def detect(image: np.ndarray, rms: np.ndarray, mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        return _detect(replace(band, image=image, rms=rms, masked=mask), settings)

    rule = HaloSettings(band.seeing_arcsec / band.pixel_scale_arcsec,
                        settings.halo_min_radius_fwhm, settings.halo_max_profile_sigma,
                        settings.halo_min_peak_ratio)
    return halo_detections(band.image, band.rms, band.masked, _saturation_mask(band, settings),
                           objects, segmap, fitted, detect, rule)


def _psf_radius(band: _Band, settings: PhotometrySettings,
                detected: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """The PSF's half-light radius (pixels) on a prepared co-add, as its windowed centroids
    take it: the median over its bright, compact, undeblended detections
    (:func:`.sep_objects.psf_half_light_radius`); inf without three of them. ``detected``:
    the co-add's (objects, segmentation map) from :func:`_detect`, when already extracted."""
    objects, segmap = _detect(band, settings) if detected is None else detected
    if not objects.size:
        return math.inf
    r_half = half_light_radii(band.image, objects, band.masked, segmap,
                              np.arange(1, objects.size + 1, dtype=np.int32))
    return psf_half_light_radius(objects, r_half, band.rms)


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True, eq=False)
class _Detection:
    """What the detection image fixes for every band: objects, footprints, Kron ellipses."""

    objects: np.ndarray
    segmap: np.ndarray
    x: np.ndarray            # 0-based windowed centroid
    y: np.ndarray
    x_err: np.ndarray        # its 1-sigma error (ERRX2WIN, pixel noise only)
    y_err: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray        # radians
    kron: np.ndarray         # Kron factor used, max(kron_factor * r_Kron, kron_min_radius)
    seg_id: np.ndarray
    dilated: np.ndarray      # segmentation map dilated by one pixel (3 x 3 maximum)
    wings: tuple[tuple[int, WingFit], ...] = ()  # (row, wing fit) of the saturated detections


#: Detections whose windowed centroids end closer than this (pixels) are one source.
_TWIN_PX = 0.5


def _merge_twins(objects: np.ndarray, segmap: np.ndarray, x: np.ndarray, y: np.ndarray,
                 deblended_px: float = 0.0, also: np.ndarray | None = None) -> np.ndarray:
    """The row each detection is merged into when deblended pieces of one source converged on
    one centroid (its own row for a detection that stays); ``segmap`` relabelled in place.

    DEBLEND_MINCONT 0.00005 splits some faint galaxies into pieces whose windowed centroids
    then slide onto the same peak: the catalog would list the source twice at one position
    (12 such pairs on the demo co-adds, 0.2" or closer, none between 0.2" and 0.5"). Pieces of
    one blend (both flagged deblended by sep) closer than ``deblended_px`` are one source too:
    two peaks closer than about half the PSF's FWHM are not resolved, and such pieces are
    noise splitting one galaxy (``deblend_twin_fwhm``). So are the pairs of rows ``also``
    (:func:`_shallow_splits`). Of each group the piece of largest flux owns the others and
    takes their footprint (the owners' segment numbers become 1..n in order);
    :func:`.sep_objects.combined_pieces` then describes the group as one object.
    """
    n = objects.size
    tree = cKDTree(np.c_[x, y])
    pairs = tree.query_pairs(_TWIN_PX, output_type="ndarray")
    if deblended_px > _TWIN_PX:
        close = tree.query_pairs(deblended_px, output_type="ndarray")
        split = (np.asarray(objects["flag"]) & sep.OBJ_MERGED) != 0
        pairs = np.concatenate([pairs, close[split[close[:, 0]] & split[close[:, 1]]]])
    if also is not None:
        pairs = np.concatenate([pairs, np.asarray(also, dtype=pairs.dtype).reshape(-1, 2)])
    if len(pairs) == 0:
        return np.arange(n)
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    by_flux = np.lexsort((-np.asarray(objects["flux"], dtype=np.float64), group))
    brightest = by_flux[np.r_[True, np.diff(group[by_flux]) != 0]]  # one per group, in order
    owner = brightest[group]
    keep = owner == np.arange(n)
    label = np.zeros(n + 1, dtype=segmap.dtype)
    label[1:] = (np.cumsum(keep) * keep)[owner]
    segmap[...] = label[segmap]
    return owner


#: Moffat index of the wing fit when the co-add header has no PSFBETA (Trujillo et al. 2001:
#: 4.765 for a Kolmogorov seeing profile).
_KOLMOGOROV_BETA = 4.765
#: Largest radius (pixels) of the wing fit of a saturated star.
_MAX_WING_RADIUS_PX = 100.0


def _saturation_mask(band: _Band, settings: PhotometrySettings) -> np.ndarray:
    """The band's pixels carrying a ``saturation_bits`` bit of the co-add mask."""
    return (band.bits & settings.saturation_bits) != 0


def _saturated_near(saturated: np.ndarray, core_px: int, col: np.ndarray,
                    row: np.ndarray) -> np.ndarray:
    """Whether a ``saturated`` pixel (:func:`_saturation_mask`) lies within ``core_px`` (a
    square; ``saturation_core_px``) of each pixel ``(col, row)``: an object whose peak is such
    a pixel is saturated (FLAGS bit 4) and centred on its wings (:func:`_wing_fits`). Asked at
    the points only (Chebyshev distance to the saturated pixels, which are few), not by
    dilating the whole mask: on a 4096^2 co-add that took 0.28 s per call and a full-size
    temporary."""
    ys, xs = np.nonzero(saturated)
    col, row = np.asarray(col), np.asarray(row)
    if ys.size == 0 or col.size == 0:
        return np.zeros(col.size, dtype=bool)
    distance, _ = cKDTree(np.column_stack([xs, ys])).query(
        np.column_stack([col, row]), p=np.inf, distance_upper_bound=core_px + 0.5)
    return np.isfinite(distance)


#: Wing fits of one band already made, by start position and radius (px): the halo pass and
#: the detection fit the same saturated stars from the same cores (:func:`_wing_fits`).
_WingMemo = dict[tuple[float, float, int], WingFit | None]


def _wing_fits(band: _Band, objects: np.ndarray, segmap: np.ndarray, x: np.ndarray,
               y: np.ndarray, settings: PhotometrySettings, memo: _WingMemo | None = None
               ) -> tuple[np.ndarray, list[WingFit | None]]:
    """The rows of the saturated detections (:func:`_saturated_near` their peak) and the Moffat
    fits to their unsaturated wings (:func:`.sep_objects.wing_fits`), started from their cores
    (:func:`_core_starts`; ``(x, y)`` without saturated pixels), within the saturated area's
    radius plus 6 FWHM. With ``memo`` (for ``band`` alone), a fit from the same start and
    radius is taken from it instead of being made again."""
    saturated = _saturation_mask(band, settings)
    which = np.flatnonzero(_saturated_near(saturated, settings.saturation_core_px,
                                           objects["xpeak"], objects["ypeak"]))
    if which.size == 0:
        return which, []
    area = np.bincount(segmap[saturated], minlength=objects.size + 1)[1:][which]
    fwhm_px = band.seeing_arcsec / band.pixel_scale_arcsec
    radius = np.minimum(np.sqrt(area / np.pi) + 6.0 * fwhm_px, _MAX_WING_RADIUS_PX)
    usable = ~saturated & ~band.touched & (band.image < band.saturate)
    beta = band.psf_beta if math.isfinite(band.psf_beta) and band.psf_beta > 1.0 \
        else _KOLMOGOROV_BETA
    start_x, start_y = _core_starts(saturated, segmap, objects, which, x, y)
    memo = {} if memo is None else memo
    keys = list(zip(start_x.tolist(), start_y.tolist(), radius.astype(int).tolist()))
    missing = [i for i, key in enumerate(keys) if key not in memo]
    if missing:
        memo.update(zip([keys[i] for i in missing],
                        wing_fits(band.image, band.rms, usable, start_x[missing], start_y[missing],
                                  radius[missing], fwhm_px, beta)))
    return which, [memo[key] for key in keys]


def _core_starts(saturated: np.ndarray, segmap: np.ndarray, objects: np.ndarray,
                 which: np.ndarray, x: np.ndarray, y: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of the wing fits of the detections ``which``: the saturated pixel of each
    footprint (segment ``row + 1``) deepest inside its saturated region, i.e. the centre of the
    flat core, since a bleed trail is only a few pixels wide; ``(x, y)`` where the footprint
    holds no saturated pixel. The centroid itself can lie beyond the fit's reach: a 25-row
    trail pulls the windowed centroid of a test star 8.4 px down its trail."""
    start_x = np.array(x, dtype=np.float64)[which]
    start_y = np.array(y, dtype=np.float64)[which]
    for i, k in enumerate(which):
        o = objects[k]
        box = (slice(o["ymin"], o["ymax"] + 1), slice(o["xmin"], o["xmax"] + 1))
        region = saturated[box] & (segmap[box] == k + 1)
        if region.any():
            depth = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
            start_x[i], start_y[i] = col + o["xmin"], row + o["ymin"]
    return start_x, start_y


def _fitted_wings(band: _Band, objects: np.ndarray, segmap: np.ndarray, x: np.ndarray,
                  y: np.ndarray, settings: PhotometrySettings, memo: _WingMemo | None = None
                  ) -> list[tuple[int, WingFit]]:
    """(row, fit) of the saturated detections whose wing fit succeeded (:func:`_wing_fits`)."""
    return [(int(k), fit)
            for k, fit in zip(*_wing_fits(band, objects, segmap, x, y, settings, memo))
            if fit is not None]


def _saturated_centres(x: np.ndarray, y: np.ndarray, x_err: np.ndarray, y_err: np.ndarray,
                       fitted: list[tuple[int, WingFit]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The centroids, those of saturated detections replaced by their wing fits' centres."""
    x, y, x_err, y_err = (np.array(v, dtype=np.float64) for v in (x, y, x_err, y_err))
    for k, fit in fitted:
        x[k], y[k], x_err[k], y_err[k] = fit.x, fit.y, fit.x_err, fit.y_err
    return x, y, x_err, y_err


def _restored_cores(band: _Band, det: _Detection, settings: PhotometrySettings,
                    forced: bool = False) -> np.ndarray:
    """CLASS_STAR's view of the band: the image with the saturated pixels of each saturated
    detection's footprint (core and bleed trail) replaced by its wing fit, so that the network
    sees the star's profile rather than a flat top (``band.image`` itself when nothing is
    replaced). On the demo the flat tops made 7 of the 21 wrong dual-R classifications. The
    detection's own fits (``det.wings``) serve its band; a ``forced`` band is fitted anew."""
    fitted = _fitted_wings(band, det.objects, det.segmap, det.x, det.y, settings) if forced \
        else det.wings
    if not fitted:
        return band.image
    saturated = (band.bits & settings.saturation_bits) != 0
    image = band.image.copy()
    for k, fit in fitted:
        o = det.objects[k]
        box = (slice(o["ymin"], o["ymax"] + 1), slice(o["xmin"], o["xmax"] + 1))
        rows, cols = np.nonzero(saturated[box] & (det.segmap[box] == det.seg_id[k]))
        image[box][rows, cols] = fit.profile(cols + o["xmin"], rows + o["ymin"])
    return image


def _detection(band: _Band, objects: np.ndarray, segmap: np.ndarray,
               settings: PhotometrySettings, memo: _WingMemo) -> _Detection:
    """Positions, ellipses and Kron radii from the detection image (converged deblending
    pieces merged, :func:`_merge_twins`, and measured as one object: the union's moments and
    a windowed centroid started from its barycentre, :func:`_recentred`); saturated stars'
    wing fits already in ``memo`` (the halo pass's) are not made again."""
    gain = band.gain if band.gain > 0 else None
    cen = windowed_centroids(band.image, objects, band.rms, band.masked, segmap,
                             np.arange(1, objects.size + 1, dtype=np.int32), gain,
                             band.psf_r_half)
    fitted = _fitted_wings(band, objects, segmap, cen.x, cen.y, settings, memo)
    x, y, x_err, y_err = _saturated_centres(cen.x, cen.y, cen.x_err, cen.y_err, fitted)
    seeing_px = band.seeing_arcsec / band.pixel_scale_arcsec
    owner = _merge_twins(objects, segmap, x, y, settings.deblend_twin_fwhm * seeing_px,
                         _shallow_splits(band, objects, segmap, x, y, settings))
    keep = owner == np.arange(objects.size)
    grouped = (np.bincount(owner, minlength=objects.size) > 1)[keep]
    objects = combined_pieces(objects, owner, band.image, segmap, band.rms)[keep]
    x, y, x_err, y_err = x[keep], y[keep], x_err[keep], y_err[keep]
    row = np.cumsum(keep) - 1
    wings = tuple((int(row[k]), fit) for k, fit in fitted if keep[k])
    grouped[[k for k, _ in wings]] = False  # a saturated star keeps its wing fit's centre
    _recentred(band, objects, segmap, grouped, (x, y, x_err, y_err), gain, cen.psf_r_half)
    n = objects.size
    seg_id = np.arange(1, n + 1, dtype=np.int32)
    a, b, theta = ellipse(objects)
    r_kron, _ = sep.kron_radius(band.image, x, y, a, b, theta, 6.0, mask=band.masked,
                                segmap=segmap, seg_id=seg_id)
    r_kron = np.where(np.isfinite(r_kron) & (r_kron > 0), r_kron, 0.0)
    kron = np.maximum(settings.kron_factor * r_kron, settings.kron_min_radius)
    return _Detection(objects=objects, segmap=segmap, x=x, y=y, x_err=x_err,
                      y_err=y_err, a=a, b=b, theta=theta,
                      kron=kron, seg_id=seg_id, dilated=grey_dilation(segmap, size=3),
                      wings=wings)


def _shallow_splits(band: _Band, objects: np.ndarray, segmap: np.ndarray, x: np.ndarray,
                    y: np.ndarray, settings: PhotometrySettings) -> np.ndarray:
    """Pairs of touching deblended pieces (rows) that the data do not show to be two sources:
    centres closer than ``deblend_dip_fwhm`` times the SEEING and a dip between them below
    ``deblend_dip_sigma`` (:func:`.sep_objects.dip_significance`). None when that is 0."""
    if settings.deblend_dip_sigma <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = touching_pieces(objects, segmap)
    apart_px = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
    pairs = pairs[apart_px * band.pixel_scale_arcsec
                  < settings.deblend_dip_fwhm * band.seeing_arcsec]
    significance = dip_significance(band.image, band.rms, band.masked | band.touched, segmap,
                                    pairs)
    return pairs[significance < settings.deblend_dip_sigma]


def _recentred(band: _Band, objects: np.ndarray, segmap: np.ndarray, rows: np.ndarray,
               position: tuple[np.ndarray, ...], gain: float | None, psf_r_half: float) -> None:
    """Windowed centroids (x, y and their errors, ``position``, updated in place) of the merged
    objects ``rows`` (a mask), started from their union's barycentre with the PSF's window:
    the piece the merge kept was centred on its own part of the source."""
    if not rows.any():
        return
    cen = windowed_centroids(band.image, objects[rows], band.rms, band.masked, segmap,
                             (np.flatnonzero(rows) + 1).astype(np.int32), gain, psf_r_half)
    for values, new in zip(position, (cen.x, cen.y, cen.x_err, cen.y_err)):
        values[rows] = new


def _aperture_radii_px(diameters: tuple[float, ...], pixel_scale: float) -> list[float]:
    """Radii in pixels of apertures of the given diameters in arcsec."""
    return [0.5 * d / pixel_scale for d in diameters]


def _mirror_deltas(band: _Band, variance: np.ndarray, segmap: np.ndarray, own: int, x0: float,
                   y0: float, box: tuple[int, int, int, int]) -> tuple[np.ndarray, int] | None:
    """SExtractor's MASK_TYPE CORRECT for one object, as changes to the pixels sep summed.

    In the stamp ``box`` = (xlo, xhi, ylo, yhi) every pixel of another object (``segmap`` not 0
    and not ``own``) or masked is replaced by its mirror through the object's centre (x0, y0),
    with SExtractor's rounding of the mirror pixel, ``int(2 x0 + 0.49999 - x)``; by 0 (and
    variance 0) when the mirror pixel is off the image, another object's or masked
    (``photom.c``, ``computeaperflux``/``computeautoflux``). Returns one image holding side by
    side the stamp of (replacement - pixel value), masked pixels being 0 in ``band.image``, and
    from column ``offset`` on the stamp of (replacement variance - pixel variance), with zeros
    between them as wide as the stamp (an aperture that the image edge truncates never reaches
    the other stamp), and ``offset``; None when the box holds no such pixel.
    """
    xlo, xhi, ylo, yhi = box
    ny, nx = band.shape
    seg = segmap[ylo:yhi, xlo:xhi]
    bad = ((seg > 0) & (seg != own)) | band.masked[ylo:yhi, xlo:xhi]
    if not bad.any():
        return None
    yy, xx = np.nonzero(bad)
    gx, gy = xx + xlo, yy + ylo
    mx = np.trunc(2.0 * x0 + 0.49999 - gx).astype(np.int64)
    my = np.trunc(2.0 * y0 + 0.49999 - gy).astype(np.int64)
    ok = (mx >= 0) & (mx < nx) & (my >= 0) & (my < ny)
    mirror = segmap[my[ok], mx[ok]]
    ok[ok] = ~(((mirror > 0) & (mirror != own)) | band.masked[my[ok], mx[ok]])
    value = np.zeros(gx.size)
    value[ok] = band.image[my[ok], mx[ok]]
    value_var = np.zeros(gx.size)
    value_var[ok] = variance[my[ok], mx[ok]]
    offset = 2 * bad.shape[1] + 4
    deltas = np.zeros((bad.shape[0], offset + bad.shape[1]))
    deltas[yy, xx] = value - band.image[gy, gx]
    deltas[yy, xx + offset] = value_var - variance[gy, gx]
    return deltas, offset


def _half_extents(det: _Detection, radii: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Half width and half height (pixels) of each object's Kron ellipse and largest circle."""
    cos, sin = np.cos(det.theta), np.sin(det.theta)
    return (np.maximum(det.kron * np.hypot(det.a * cos, det.b * sin), max(radii)),
            np.maximum(det.kron * np.hypot(det.a * sin, det.b * cos), max(radii)))


def _boxes(det: _Detection, radii: list[float], shape: tuple[int, int]) -> np.ndarray:
    """(n, 4) int: xlo, xhi, ylo, yhi of the box around each object holding its Kron ellipse
    and its largest circle, with a margin of 2 pixels, clipped to the image."""
    half_x, half_y = _half_extents(det, radii)
    ny, nx = shape
    return np.column_stack([np.clip(np.floor(det.x - half_x) - 2, 0, nx),
                            np.clip(np.ceil(det.x + half_x) + 3, 0, nx),
                            np.clip(np.floor(det.y - half_y) - 2, 0, ny),
                            np.clip(np.ceil(det.y + half_y) + 3, 0, ny)]).astype(int)


def _any_in_boxes(pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each box (rows of xlo, xhi, ylo, yhi) holds a True pixel (summed-area table).

    The table is summed in place, in int32 while the image has fewer than 2**31 pixels: 8
    bytes a pixel at the peak (the table and numpy's copy for the in-place row sums), where
    two int64 sums and their copy took 24 (a 4096^2 image: 128 MB and 0.36 s against 384 MB
    and 0.84 s).
    """
    dtype = np.int32 if pixels.size < 2**31 else np.int64
    table = np.zeros((pixels.shape[0] + 1, pixels.shape[1] + 1), dtype=dtype)
    inner = table[1:, 1:]
    np.cumsum(pixels, axis=0, dtype=dtype, out=inner)
    np.cumsum(inner, axis=1, out=inner)
    xlo, xhi, ylo, yhi = boxes.T
    return (table[yhi, xhi] - table[ylo, xhi] - table[yhi, xlo] + table[ylo, xlo]) > 0


def _masked_flags(band: _Band, det: _Detection, radii: list[float], near: np.ndarray
                  ) -> np.ndarray:
    """sep's aperture flags (``APER_HASMASKED`` ...) with the mask, for the objects ``near``
    (bool) masked pixels, OR-ed over the Kron ellipse and the circles."""
    x, y = det.x[near], det.y[near]
    common = {"mask": band.masked, "subpix": 5}
    flags = sep.sum_ellipse(band.image, x, y, det.a[near], det.b[near], det.theta[near],
                            det.kron[near], **common)[2]
    for radius in radii:
        flags |= sep.sum_circle(band.image, x, y, radius, **common)[2]
    return flags


def _aperture_sums(band: _Band, det: _Detection, radii: list[float]
                   ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Fluxes and errors in the Kron ellipse and the circles of ``radii`` (in this order),
    with neighbours and masked pixels corrected the way SExtractor's MASK_TYPE CORRECT does
    (:func:`_mirror_deltas`), and the OR of sep's aperture flags.

    sep sums every aperture over the whole image (``subpix=5``) without a mask: given one,
    sep would fill masked pixels with the aperture's mean surface brightness, which is not
    SExtractor's rule; masked pixels are 0 in ``band.image``. Then each object whose box
    (:func:`_boxes`) holds another object's or a masked pixel gets the changes of its replaced
    pixels summed by sep itself over a stamp, with the same pixel weights, so that isolated
    objects keep sep's values exactly. The variance changes by the replaced pixels' (a zeroed
    pixel has none), as in SExtractor; with a gain, the Poisson term follows the corrected
    flux. The flags of objects near masked pixels come from sep's sums with the mask
    (``APER_HASMASKED``).
    """
    gain = band.gain if band.gain > 0 else None
    common = {"err": band.rms, "gain": gain, "subpix": 5}
    sums = [sep.sum_ellipse(band.image, det.x, det.y, det.a, det.b, det.theta, det.kron,
                            **common)]
    sums += [sep.sum_circle(band.image, det.x, det.y, radius, **common) for radius in radii]
    flags = np.bitwise_or.reduce([flag for _, _, flag in sums])
    boxes = _boxes(det, radii, band.shape)
    near = _any_in_boxes(band.masked, boxes)
    flags[near] |= _masked_flags(band, det, radii, near)
    fluxes = [np.asarray(flux, dtype=np.float64) for flux, _, _ in sums]
    variances = [np.square(err, dtype=np.float64) for _, err, _ in sums]
    if gain:
        variances = [v - np.maximum(f, 0.0) / gain for f, v in zip(fluxes, variances)]
    variance = np.square(band.rms, dtype=np.float64)
    n_radii, radius_pairs = len(radii), np.repeat(np.asarray(radii, dtype=np.float64), 2)
    for i in range(det.x.size):
        deltas = _mirror_deltas(band, variance, det.segmap, int(det.seg_id[i]), det.x[i],
                                det.y[i], tuple(boxes[i]))
        if deltas is None:
            continue
        stamps, offset = deltas
        x = det.x[i] - boxes[i, 0] + np.array([0.0, offset])
        y = np.full(2, det.y[i] - boxes[i, 2])
        d_flux, d_var = sep.sum_ellipse(stamps, x, y, det.a[i], det.b[i], det.theta[i],
                                        det.kron[i], subpix=5)[0]
        fluxes[0][i] += d_flux
        variances[0][i] += d_var
        circles = sep.sum_circle(stamps, np.tile(x, n_radii), np.tile(y, n_radii),
                                 radius_pairs, subpix=5)[0]
        for k in range(n_radii):
            fluxes[k + 1][i] += circles[2 * k]
            variances[k + 1][i] += circles[2 * k + 1]
    if gain:
        variances = [v + np.maximum(f, 0.0) / gain for f, v in zip(fluxes, variances)]
    return fluxes, [np.sqrt(np.maximum(v, 0.0)) for v in variances], flags


def _cut_by_border(det: _Detection, radii: list[float], shape: tuple[int, int]
                   ) -> np.ndarray:
    """Whether each object's Kron ellipse or largest circle reaches beyond the image."""
    half_x, half_y = _half_extents(det, radii)
    ny, nx = shape
    return ((det.x - half_x < -0.5) | (det.x + half_x > nx - 0.5)
            | (det.y - half_y < -0.5) | (det.y + half_y > ny - 0.5))


def _aperture_areas(det: _Detection, radii: list[float], shape: tuple[int, int]
                    ) -> list[np.ndarray]:
    """Pixel area of the Kron ellipse and of the circles of ``radii`` (the order of
    :func:`_aperture_sums`) inside the image: the area a local background level is taken off
    over. Analytic where the aperture lies inside; summed by sep, with the same sub-pixel
    weights as the fluxes, over a stamp of ones where :func:`_boxes` is cut by the border."""
    areas = [math.pi * det.a * det.b * det.kron ** 2]
    areas += [np.full(det.x.size, math.pi * radius ** 2) for radius in radii]
    boxes = _boxes(det, radii, shape)
    for i in np.flatnonzero(_cut_by_border(det, radii, shape)):
        xlo, xhi, ylo, yhi = boxes[i]
        stamp = np.ones((max(yhi - ylo, 1), max(xhi - xlo, 1)), dtype=np.float32)
        x, y = np.array([det.x[i] - xlo]), np.array([det.y[i] - ylo])
        areas[0][i] = sep.sum_ellipse(stamp, x, y, det.a[i:i + 1], det.b[i:i + 1],
                                      det.theta[i:i + 1], det.kron[i:i + 1], subpix=5)[0][0]
        for k, radius in enumerate(radii):
            areas[k + 1][i] = sep.sum_circle(stamp, x, y, radius, subpix=5)[0][0]
    return areas


def _local_background(band: _Band, det: _Detection, radii: list[float],
                      settings: PhotometrySettings) -> tuple[np.ndarray, list[np.ndarray]]:
    """SExtractor's BACKPHOTO_TYPE LOCAL (:mod:`.local_background`): every object's level in
    its annulus of ``backphoto_thick_px`` on this band's pixels with data, and the areas of
    its apertures (:func:`_aperture_areas`) that the level is taken off over."""
    boxes = np.column_stack([det.objects[name] for name in ("xmin", "xmax", "ymin", "ymax")])
    levels = local_levels(band.image, band.touched, boxes, settings.backphoto_thick_px)
    return levels, _aperture_areas(det, radii, band.shape)


def _crowded(band: _Band, det: _Detection, settings: PhotometrySettings) -> np.ndarray:
    """FLAGS bit 1: fraction of the Kron ellipse in other objects or masked pixels.

    One full-size float32 map serves the three sums in turn (segmented pixels, then plus the
    masked ones, then all ones), so the stage's peak memory does not grow by three of them."""
    args = (det.x, det.y, det.a, det.b, det.theta, det.kron)
    counted = (det.segmap > 0).astype(np.float32)
    # The object's own pixels (seg_id < 0 keeps only those) ...
    own, _, _ = sep.sum_ellipse(counted, *args, subpix=1, segmap=det.segmap,
                                seg_id=-det.seg_id)
    # ... out of those of any object or masked (a masked object pixel counts twice) ...
    np.add(counted, band.masked, out=counted)
    total, _, _ = sep.sum_ellipse(counted, *args, subpix=1)
    # ... against the ellipse's area on the image.
    counted.fill(1.0)
    area, _, _ = sep.sum_ellipse(counted, *args, subpix=1)
    return total - own > settings.crowding_fraction * np.maximum(area, 1.0)


def _grown(band: _Band, det: _Detection) -> np.ndarray:
    """The footprints grown by one pixel into the band's interpolated or missing pixels, which
    a footprint cannot hold (missing) or holds only by interpolation."""
    return np.where((det.segmap == 0) & band.touched, det.dilated, det.segmap)


def _at(values: np.ndarray, det: _Detection) -> np.ndarray:
    """``values`` at each object's peak pixel."""
    return values[det.objects["ypeak"], det.objects["xpeak"]]


def _centre_pixels(det: _Detection, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(col, row) of the pixel of each object's centre (windowed centroid, or wing-fit centre
    of a saturated star). In dual mode a band's saturated core sits there, while the peak is
    the detection band's: for a star saturated in I it can be anywhere in the flat top or down
    the bleed trail, many pixels from the smaller core of the same star in B."""
    ny, nx = shape
    return (np.clip(np.rint(det.x).astype(np.intp), 0, nx - 1),
            np.clip(np.rint(det.y).astype(np.intp), 0, ny - 1))


def _at_centre(values: np.ndarray, det: _Detection) -> np.ndarray:
    """``values`` at the pixel of each object's centre (:func:`_centre_pixels`)."""
    col, row = _centre_pixels(det, values.shape)
    return values[row, col]


def _flags(band: _Band, det: _Detection, grown: np.ndarray, aper_flags: np.ndarray,
           crowded: np.ndarray, settings: PhotometrySettings) -> np.ndarray:
    """FLAGS of one band (see :data:`FLAG_BITS` and the module docstring)."""
    n = det.objects.size
    ny, nx = band.shape
    objects = det.objects
    flags = np.where(crowded, 1, 0).astype(np.int16)
    flags |= np.where(objects["flag"] & sep.OBJ_MERGED, 2, 0).astype(np.int16)
    raw_max = footprint_max(det.segmap, band.image, n, bitwise=False)
    col, row = _centre_pixels(det, band.shape)  # at the peak or at the centre, one query
    saturated = _saturated_near(_saturation_mask(band, settings), settings.saturation_core_px,
                                np.r_[objects["xpeak"], col],
                                np.r_[objects["ypeak"], row]).reshape(2, n).any(axis=0)
    flags |= np.where(saturated | (raw_max >= band.saturate), 4, 0).astype(np.int16)
    at_border = ((objects["xmin"] <= 0) | (objects["ymin"] <= 0) | (objects["xmax"] >= nx - 1)
                 | (objects["ymax"] >= ny - 1))
    near_gap = binary_dilation(band.no_data) & ~band.no_data
    at_gap = footprint_max(det.segmap, near_gap.astype(np.uint8), n, bitwise=True) > 0
    flags |= np.where(at_border | at_gap, 8, 0).astype(np.int16)
    bad_aper = aper_flags & (sep.APER_TRUNC | sep.APER_HASMASKED | sep.APER_ALLMASKED)
    flags |= np.where(bad_aper, 16, 0).astype(np.int16)
    touched = footprint_max(grown, band.touched.astype(np.uint8), n, bitwise=True) > 0
    flags |= np.where(touched, 32, 0).astype(np.int16)
    flags |= np.where(objects["flag"] & sep.OBJ_DOVERFLOW, 64, 0).astype(np.int16)
    return flags


#: FLAGS bits that keep a detection out of the PSF sample of :func:`local_seeing`: deblended,
#: saturated, truncated at the border or a gap, footprint holding interpolated or masked pixels.
_NOT_PSF_FLAGS = 2 | 4 | 8 | 32


#: Radii (units of the widest exposure's FWHM) on which :func:`median_psf_fwhm` samples the
#: median profile.
_PROFILE_RADII = np.linspace(0.0, 1.5, 301)
#: Fewest profile samples above a fifth of the peak that :func:`median_psf_fwhm` fits.
_MIN_PROFILE_SAMPLES = 20


def median_psf_fwhm(widths: np.ndarray) -> float:
    """FWHM_IMAGE of the pixel-wise median of unit-flux circular Gaussians of FWHM ``widths``:
    a point source on a median co-add of exposures with these seeings (an even count: the mean
    of the middle two, as numpy's and SWarp's MEDIAN).

    Measured as :func:`~ks4release.reduction.stellarity.isophotal_profile` measures
    FWHM_IMAGE: a Gaussian fitted to ln(value) against r^2 over the profile above a fifth of its
    peak, weights value^2 (per unit area, 2 pi r dr), so that the broad wings a narrow core
    sits on widen it as they widen the measured stars.
    """
    widths = np.asarray(widths, dtype=np.float64)
    sigma2 = (widths[:, None] / 2.3548) ** 2

    def sampled(radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        profile = np.median(np.exp(-0.5 * radii**2 / sigma2) / sigma2, axis=0)
        return radii, profile, profile > profile[0] / 5.0

    r, profile, use = sampled(_PROFILE_RADII * widths.max())
    if use.sum() < _MIN_PROFILE_SAMPLES:
        # a core far narrower than the widest exposure: sample the part above a fifth of the
        # peak finely (the median profile falls monotonically)
        r, profile, use = sampled(np.linspace(0.0, r[np.argmin(use)], _PROFILE_RADII.size))
    weight = profile[use] ** 2 * r[use]
    slope = np.polyfit(r[use] ** 2, np.log(profile[use]), 1, w=np.sqrt(weight))[0]
    return float(1.6651 / math.sqrt(-slope))


def coverage(exposures: dict, wcs: WCS, x: np.ndarray, y: np.ndarray, *,
             excluded: dict[str, np.ndarray] | None = None,
             shape: tuple[int, int] | None = None) -> np.ndarray:
    """Which usable exposure of a co-add entered its median at each position: (n, n_exposures)
    bool.

    ``exposures`` is the co-add's exposure list (``coadd_exposures_path`` JSON); an exposure
    covers a position inside the polygon of one of its kept CCDs (``ccds``; ``ok`` false
    exposures are left out), the polygon's [ra, dec] vertices projected with the co-add ``wcs``
    and joined by straight lines. ``excluded`` (stem -> sorted flat pixel indices of the grid
    of numpy ``shape``, ``coadd.read_excluded``) removes an exposure where its masked data
    stayed out of the median at the position's nearest pixel: there the co-add's PSF is the
    median of the other exposures. ``x``, ``y``: 0-based pixels.
    """
    points = np.column_stack([x, y])
    flat = None
    if excluded and shape is not None:
        iy = np.clip(np.rint(y).astype(np.int64), 0, shape[0] - 1)
        ix = np.clip(np.rint(x).astype(np.int64), 0, shape[1] - 1)
        flat = iy * shape[1] + ix
    columns = []
    for exposure, paths in exposure_footprints(exposures, wcs, origin=0):
        inside = np.zeros(len(points), dtype=bool)
        for path in paths:
            inside |= path.contains_points(points)
        left_out = None if flat is None else excluded.get(exposure["stem"])
        if left_out is not None and left_out.size:
            at = np.minimum(np.searchsorted(left_out, flat), left_out.size - 1)
            inside &= left_out[at] != flat
        columns.append(inside)
    return np.column_stack(columns) if columns else np.zeros((len(points), 0), dtype=bool)


def _exposure_values(exposures: dict, key: str) -> np.ndarray | None:
    """``key`` of each usable exposure of a co-add's exposure list, in the order of
    :func:`coverage`'s columns; None when the list has no usable exposure or one lacks a
    positive value."""
    values = [e.get(key) for e in exposures.get("exposures", []) if e.get("ok")]
    if not values or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def exposure_sky_sigmas(exposures: dict) -> np.ndarray | None:
    """Each usable exposure's per-pixel sky noise (``sky_sigma``, scaled counts) in the order
    of :func:`coverage`'s columns; None when the list has no usable exposure or one lacks a
    positive value."""
    return _exposure_values(exposures, "sky_sigma")


def exposure_psf_widths(exposures: dict) -> np.ndarray | None:
    """Each usable exposure's PSF as the FWHM of a Gaussian of the same half-light radius
    (``2 * psf_r50_arcsec``), in the order of :func:`coverage`'s columns; None when the list
    has no usable exposure or one lacks a positive ``psf_r50_arcsec``."""
    r50 = _exposure_values(exposures, "psf_r50_arcsec")
    return None if r50 is None else 2.0 * r50


def local_seeing(fwhm: np.ndarray, snr: np.ndarray, flags: np.ndarray, covered: np.ndarray,
                 depth: np.ndarray, widths: np.ndarray | None, seeing_arcsec: float,
                 settings: PhotometrySettings) -> np.ndarray:
    """SEEING_FWHM of each object for CLASS_STAR, arcsec: the co-add's SEEING scaled by the PSF
    of the exposures that made the object's pixels (a seeing map of the co-add).

    A median co-add's PSF at a pixel is the median of the PSFs of the exposures that entered
    it: where one or two dithers do (chip gaps, borders, the others masked) it is their
    seeing, up to 1.5 times the co-add's ``SEEING`` (a median over the whole co-add), and the
    network, fed ``SEEING``, calls the broader stars there galaxies. SExtractor takes one
    SEEING_FWHM per run, or with SEEING_FWHM = 0 the FWHM of a PSF model; users of a co-add
    with a varying PSF run each region with its own. We give every object the seeing of its
    exposures: with each exposure's measured PSF ``widths`` (:func:`exposure_psf_widths`), an
    object made by the exposures ``S`` (``covered``, :func:`coverage`) has the PSF
    :func:`median_psf_fwhm` ``(widths[S])``, and gets ``SEEING`` times that over the median
    prediction of the bright, clean, point-like detections (``snr >= seeing_min_snr``,
    positive FWHM_IMAGE, no :data:`_NOT_PSF_FLAGS` bit, NDITH equal to its exposure count):
    where the coverage is typical the result is ``SEEING``. The widths come from the
    exposures themselves, not from the co-add: fitted through the median they came out 0.8x
    too narrow for the broadest exposures, which only few detections see alone.

    Every object keeps ``SEEING`` when ``local_seeing`` is off, ``widths`` is None or the
    sample has fewer than ``seeing_min_sources`` detections; an object that no exposure made
    keeps it too.

    Parameters
    ----------
    fwhm, snr, flags, depth : numpy.ndarray
        (n,) FWHM_IMAGE [pix], S/N, FLAGS and NDITH (at the peak; -1: unknown) of each
        object.
    covered : numpy.ndarray
        (n, n_exposures) bool from :func:`coverage`.
    widths : numpy.ndarray or None
        (n_exposures,) PSF FWHM of each exposure (any unit: only ratios count).
    seeing_arcsec : float
        The co-add's SEEING.
    settings : PhotometrySettings
    """
    seeing = np.full(fwhm.size, float(seeing_arcsec))
    counts = covered.sum(axis=1)
    sample = (snr >= settings.seeing_min_snr) & (fwhm > 0) & ((flags & _NOT_PSF_FLAGS) == 0) \
        & (counts > 0) & ((depth == counts) | (depth < 0))
    if not settings.local_seeing or widths is None or covered.shape[1] == 0 \
            or sample.sum() < settings.seeing_min_sources:
        return seeing
    if len(widths) != covered.shape[1]:
        raise ValueError(f"{len(widths)} exposure widths for {covered.shape[1]} exposures")
    patterns, which = np.unique(covered, axis=0, return_inverse=True)
    predicted = _pattern_fwhm(np.asarray(widths, dtype=np.float64), patterns)[which.ravel()]
    inside = counts > 0
    seeing[inside] = seeing_arcsec * predicted[inside] / float(np.median(predicted[sample]))
    return seeing


def _pattern_fwhm(widths: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Predicted FWHM_IMAGE of each coverage pattern (rows of bool over the exposures; 0 for
    an empty one) given the exposures' seeing ``widths``."""
    return np.array([median_psf_fwhm(widths[row]) if row.any() else 0.0 for row in patterns])


def _stack_flux_factors(band: _Band, det: _Detection, radii: list[float], flux: np.ndarray
                        ) -> np.ndarray:
    """:func:`~ks4release.reduction.median_stack.point_source_factors` of the Kron ellipse (as
    the circle of its area) and the circles of ``radii``: (n, 1 + len(radii)). ``flux`` is each
    object's total flux, 0 for those not to correct; x is it over the co-add's noise at the
    object's centre. The exposures of an object are those whose CCD outlines hold it: a pixel
    where one exposure's masked data left the median (a cosmic ray) changes one pixel of an
    aperture, not its median's PSF, and leaving such pixels out keeps the sets to tabulate few.
    All 1 when the exposure list lacks PSF sizes or sky noise, or the co-add header a Moffat
    PSFBETA."""
    n = det.x.size
    r50 = _exposure_values(band.exposures, "psf_r50_arcsec")
    sigma = exposure_sky_sigmas(band.exposures)
    covered = coverage(band.exposures, band.wcs, det.x, det.y)
    if r50 is None or sigma is None or not band.psf_beta > 1.0 \
            or covered.shape[1] != r50.size:
        if band.exposures:
            logger.warning("tile %s band %s: no median-stack flux factors: the co-add's "
                           "exposure list lacks psf_r50_arcsec or sky_sigma for an exposure "
                           "(co-adds made before the lists carried sky_sigma) or its header "
                           "a Moffat PSFBETA", band.tile, band.name)
        return np.ones((n, 1 + len(radii)))
    r50_px = r50 / band.pixel_scale_arcsec
    noise = _at_centre(band.rms, det).astype(np.float64)
    x = np.where(noise > 0, np.maximum(flux, 0.0) / np.where(noise > 0, noise, 1.0), 0.0)
    apertures = np.column_stack([det.kron * np.sqrt(det.a * det.b)]
                                + [np.full(n, radius) for radius in radii])
    return point_source_factors(covered, r50_px, sigma, band.psf_beta, x, apertures)


def _class_star(iso: np.ndarray, flux_max: np.ndarray, threshold: np.ndarray,
                seeing: np.ndarray, band: _Band, network: Network) -> np.ndarray:
    """CLASS_STAR of every object with its own SEEING_FWHM (one network call per value)."""
    out = np.zeros(seeing.size)
    values, which = np.unique(seeing, return_inverse=True)
    for i, value in enumerate(values):
        rows = which == i
        out[rows] = class_star(iso[rows], flux_max[rows], threshold=threshold[rows],
                               seeing_arcsec=float(value),
                               pixel_scale_arcsec=band.pixel_scale_arcsec, network=network)
    return out


def _own_isophotes(band: _Band, det: _Detection, settings: PhotometrySettings,
                   image: np.ndarray, iso: np.ndarray, flux_max: np.ndarray,
                   threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CLASS_STAR's inputs of a forced band (dual mode) from the band's own detection.

    SExtractor's dual mode counts a band's isophotal areas inside the detection band's
    footprint; where a galaxy is larger in the band than in I, that cuts its outer isophotes
    and the network calls it a star (demo dual V: 7 of 101 galaxies of S/N > 30). Here the band
    is detected on its own (as single mode does) and an object whose peak pixel lies in a
    band segment that holds no other object takes that segment's isophotal areas and peak on
    ``image`` (the band's, saturated cores restored) and threshold; the others keep ``iso``,
    ``flux_max`` and ``threshold`` (copies returned).
    """
    own, segmap = _detect(band, settings)
    segment = _at_centre(segmap, det)
    shared = np.bincount(segment, minlength=own.size + 1)
    alone = (segment > 0) & (shared[segment] == 1)
    iso, flux_max, threshold = iso.copy(), flux_max.copy(), threshold.copy()
    if not alone.any():
        return iso, flux_max, threshold
    own_threshold = settings.detect_thresh_sigma * band.rms[own["ypeak"], own["xpeak"]].astype(
        np.float64)
    own_iso, _ = isophotal_profile(image, segmap, own, own_threshold, saturation=band.saturate)
    own_max = footprint_max(segmap, image, own.size, bitwise=False).astype(np.float64)
    k = segment[alone] - 1
    iso[alone], flux_max[alone], threshold[alone] = own_iso[k], own_max[k], own_threshold[k]
    return iso, flux_max, threshold


def _snr(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    """S/N of a flux: the flux over its error, 0 where the error is not positive."""
    return np.where(err > 0, flux / np.where(err > 0, err, 1.0), 0.0)


def _subtract_neighbour_model(band: _Band, det: _Detection, radii: list[float],
                              cols: dict[str, np.ndarray], fwhm: np.ndarray,
                              settings: PhotometrySettings) -> None:
    """``[photometry] neighbour_model`` (:mod:`.neighbour_model`): the Kron and aperture fluxes
    in ``cols`` (and the S/N) lose the other detections' modelled light in their apertures and
    the level the mesh takes from the sources' light, measured again on the co-add less the
    model of its detections, on the first mesh's sky pixels (``band.mesh_mask``)."""
    b = band.name.lower()
    names = ["auto"] + [f"aper{d:g}" for d in APERTURE_DIAMETERS_ARCSEC]
    auto = cols[f"flux_auto_{b}"]
    beta = band.psf_beta if band.psf_beta > 1.0 else NEIGHBOUR_MODEL_BETA
    width = model_widths(cols[f"class_star_{b}"], fwhm,
                         band.seeing_arcsec / band.pixel_scale_arcsec)
    model = model_image(band.shape, det.x, det.y, auto, width, beta)
    in_model, _, _ = _aperture_sums(replace(band, image=model), det, radii)
    residual = np.subtract(band.image, model, out=model)  # the model's memory, reused
    delta = _mesh(residual, band.mesh_mask, settings).back()
    delta[band.masked] = 0.0  # masked pixels stay 0 in band.image
    in_delta = [sep.sum_ellipse(delta, det.x, det.y, det.a, det.b, det.theta, det.kron,
                                subpix=5)[0]]
    in_delta += [sep.sum_circle(delta, det.x, det.y, radius, subpix=5)[0] for radius in radii]
    own = own_sums(det.x, det.y, auto, width, beta, det.a, det.b, det.theta, det.kron, radii)
    for name, m, d, o in zip(names, in_model, in_delta, own):
        cols[f"flux_{name}_{b}"] = cols[f"flux_{name}_{b}"] - (m - o) - d
    cols[f"snr_{b}"] = _snr(cols[f"flux_auto_{b}"], cols[f"fluxerr_auto_{b}"])


def _measure_band(band: _Band, det: _Detection, settings: PhotometrySettings,
                  network: Network, forced: bool = False) -> dict[str, np.ndarray]:
    """Every per-band column of one band at the detection's positions and apertures
    (``forced``: a band measured at another band's detections, dual mode)."""
    b = band.name.lower()
    n = det.objects.size
    cols: dict[str, np.ndarray] = {}
    radii = _aperture_radii_px(APERTURE_DIAMETERS_ARCSEC, band.pixel_scale_arcsec)
    fluxes, errors, aper_flags = _aperture_sums(band, det, radii)
    mesh_auto = fluxes[0]  # FLUX_RADIUS's total: its growth curve stands on the mesh
    level = np.zeros(n)
    if settings.backphoto_type == "LOCAL":
        level, areas = _local_background(band, det, radii, settings)
        fluxes = [flux - level * area for flux, area in zip(fluxes, areas)]
    crowded = _crowded(band, det, settings)  # before the full-size maps below: a lower peak
    auto, auto_err = fluxes[0], errors[0]
    cols[f"flux_auto_{b}"], cols[f"fluxerr_auto_{b}"] = auto, auto_err
    for diameter, flux, err in zip(APERTURE_DIAMETERS_ARCSEC, fluxes[1:], errors[1:]):
        cols[f"flux_aper{diameter:g}_{b}"], cols[f"fluxerr_aper{diameter:g}_{b}"] = flux, err
    cols[f"snr_{b}"] = _snr(auto, auto_err)
    threshold = settings.detect_thresh_sigma * _at(band.rms, det).astype(np.float64)
    restored = _restored_cores(band, det, settings, forced)
    iso, fwhm = isophotal_profile(restored, det.segmap, det.objects, threshold,
                                  saturation=band.saturate)
    flux_max = footprint_max(det.segmap, band.image, n, bitwise=False).astype(np.float64)
    peak = flux_max if restored is band.image else \
        footprint_max(det.segmap, restored, n, bitwise=False).astype(np.float64)
    flux_max -= level  # CLASS_STAR's peak stays above the mesh, against the mesh's threshold
    grown = _grown(band, det)
    flags = _flags(band, det, grown, aper_flags, crowded, settings)
    covered = coverage(band.exposures, band.wcs, det.x, det.y, excluded=band.excluded,
                       shape=band.shape)
    seeing = local_seeing(fwhm, cols[f"snr_{b}"], flags, covered, _at(band.depth, det),
                          exposure_psf_widths(band.exposures), band.seeing_arcsec, settings)
    cols[f"fwhm_image_{b}"] = fwhm
    cols[f"psf_fwhm_{b}"] = seeing
    if forced and settings.dual_own_isophotes:
        cols[f"class_star_{b}"] = _class_star(
            *_own_isophotes(band, det, settings, restored, iso, peak, threshold), seeing, band,
            network)
    else:
        cols[f"class_star_{b}"] = _class_star(iso, peak, threshold, seeing, band, network)
    if settings.neighbour_model and settings.backphoto_type == "GLOBAL":
        _subtract_neighbour_model(band, det, radii, cols, fwhm, settings)
    if settings.stack_flux_correction:
        point = cols[f"class_star_{b}"] >= settings.stack_flux_class_star_min
        factors = _stack_flux_factors(band, det, radii, np.where(point, auto, 0.0))
        for k, name in enumerate(["auto"] + [f"aper{d:g}" for d in APERTURE_DIAMETERS_ARCSEC]):
            cols[f"flux_{name}_{b}"] = cols[f"flux_{name}_{b}"] / factors[:, k]
            cols[f"fluxerr_{name}_{b}"] = cols[f"fluxerr_{name}_{b}"] / factors[:, k]
    r_half, _ = sep.flux_radius(band.image, det.x, det.y, 6.0 * det.a, 0.5,
                                normflux=np.where(mesh_auto > 0, mesh_auto, np.nan),
                                mask=band.masked,
                                segmap=det.segmap, seg_id=det.seg_id, subpix=5)
    cols[f"flux_radius_{b}"] = r_half
    cols[f"kron_radius_{b}"] = det.kron
    cols[f"flux_max_{b}"] = flux_max
    cols[f"theta_image_{b}"] = np.degrees(det.theta)
    cols[f"ellipticity_{b}"] = 1.0 - det.b / det.a
    cols[f"a_image_{b}"] = det.a
    cols[f"b_image_{b}"] = det.b
    cols[f"flags_{b}"] = flags
    cols[f"imaflags_iso_{b}"] = footprint_max(grown, band.bits, n, bitwise=True).astype(np.int16)
    return cols


def _table(detection: _Band, det: _Detection, per_band: list[dict[str, np.ndarray]],
           bands: list[str], meta: dict) -> Table:
    """The measurement table: common columns, then each band's, with units and descriptions."""
    n = det.objects.size
    ra, dec = detection.wcs.all_pix2world(det.x, det.y, 0)
    values = {"number": np.arange(1, n + 1), "x_image": det.x + 1.0, "y_image": det.y + 1.0,
              "ra": np.asarray(ra) % 360.0, "dec": np.asarray(dec),
              "errx2win_image": det.x_err ** 2, "erry2win_image": det.y_err ** 2,
              "tile": np.full(n, detection.tile)}
    for cols in per_band:
        values.update(cols)
    table = Table()
    for name, unit, text in _column_specs(bands):
        table[name] = np.asarray(values[name], dtype=_dtype(name))
        table[name].unit = unit
        table[name].description = text
    table.meta.update(meta)
    return table


def _measure(detection: _Band, bands: list[str], prepare: Callable[[str], _Band],
             settings: PhotometrySettings, network: Network, mode: str) -> Table:
    """Detect on ``detection`` and measure every band of ``bands`` at its objects; the other
    bands are prepared one at a time (``prepare``), so that only two co-adds' worth of work
    arrays are held at once."""
    detected = _detect(detection, settings)
    if detection.psf_r_half is None:
        # from the extraction before the halo pass, as a block takes it (_Coadd.psf_r_half):
        # the pass flags a saturated star deblended, which takes it out of the median
        detection = replace(detection, psf_r_half=_psf_radius(detection, settings, detected))
    memo: _WingMemo = {}
    objects, segmap = _with_halos(detection, *detected, settings, memo)
    meta = {"mode": mode, "tile": detection.tile, "detection_band": detection.name,
            "bands": list(bands), "ks4release_version": __version__,
            "sep_version": sep.__version__, "pixel_origin": 1,
            "detect_background_rms_adu": float(np.median(detection.rms)),
            "settings": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(settings).items()}}
    det = _detection(detection, objects, segmap, settings, memo) if objects.size else None
    per_band = []
    for name in bands:
        band = detection if name == detection.name else prepare(name)
        meta[f"gain_{name.lower()}"] = band.gain
        meta[f"seeing_{name.lower()}"] = band.seeing_arcsec
        meta[f"psf_beta_{name.lower()}"] = (band.psf_beta if math.isfinite(band.psf_beta)
                                            else None)
        if det is not None:
            per_band.append(_measure_band(band, det, settings, network,
                                          forced=band is not detection))
    if det is None:
        return _empty_table(bands, meta)
    return _table(detection, det, per_band, bands, meta)


def _empty_table(bands: list[str], meta: dict) -> Table:
    """The table of an image without detections: every column, no rows."""
    table = Table()
    for name, unit, text in _column_specs(bands):
        table[name] = np.zeros(0, dtype=_dtype(name))
        table[name].unit = unit
        table[name].description = text
    table.meta.update(meta)
    return table


def measure_single(image: np.ndarray, mask: np.ndarray, header: fits.Header, band: str,
                   settings: PhotometrySettings, network: Network, *,
                   ndith: np.ndarray | None = None, exposures: dict | None = None,
                   excluded: dict[str, np.ndarray] | None = None,
                   noise_factors: np.ndarray | None = None,
                   psf_r_half: float | None = None) -> Table:
    """Detect and measure one co-add alone (DR1's single mode).

    Parameters
    ----------
    image : numpy.ndarray
        The co-add, ADU at ZP 30 (any byte order).
    mask : numpy.ndarray
        Its DR1 mask bits (uint8, same shape).
    header : astropy.io.fits.Header
        Its header: celestial WCS, SEEING (arcsec), TILE; GAIN and SATURATE when present.
    band : str
        Band letter (B, V, R, I): the column suffix is its lower case.
    settings : PhotometrySettings
    network : Network
        Stellarity network (``stellarity.read_nnw``).
    ndith : numpy.ndarray, optional
        Exposures per pixel; pixels with 0 have no data. Without it only non-finite pixels are
        taken as missing.
    exposures : dict, optional
        The co-add's exposure list (``coadd_exposures_path`` JSON): CLASS_STAR then takes each
        object's seeing from the exposures covering it (:func:`local_seeing`); without it, the
        header's SEEING everywhere.
    excluded : dict, optional
        Exposure stem -> flat pixels where its masked data stayed out of the median
        (``coadd.read_excluded``), so that the seeing map takes the exposures that entered it.
    noise_factors : numpy.ndarray, optional
        The RMS map's factors per NDITH (index NDITH) to use instead of measuring them on
        ``image`` (:func:`coverage_noise_factors`): a block of a co-add takes the whole
        co-add's (:func:`blockwise_noise_factors`).
    psf_r_half : float, optional
        The PSF's half-light radius (pixels) capping the windowed centroids' windows instead
        of the one measured on ``image`` (:func:`_psf_radius`): a block of a co-add takes the
        whole co-add's.

    Returns
    -------
    astropy.table.Table
        The measurement table (module docstring), one row per detection.
    """
    prepared = _prepare(image, mask, header, band.upper(), settings, ndith, exposures, excluded,
                        noise_factors, psf_r_half)
    return _measure(prepared, [prepared.name], _no_other_band, settings, network, "single")


def _no_other_band(band: str) -> _Band:
    """Single mode measures the detection band only."""
    raise ValueError(f"single mode has no band {band} besides the detection band")


def _check_grid(images: dict[str, tuple[np.ndarray, np.ndarray, fits.Header]],
                detection_band: str) -> None:
    """Raise when the co-adds of a tile are not all on the detection band's pixel grid."""
    image, _, header = images[detection_band]
    shape, wcs = np.shape(image), coadd_wcs(header)
    tile = header.get("TILE", "?")
    for band, (other, _, other_header) in images.items():
        if np.shape(other) != shape or not coadd_wcs(other_header).wcs.compare(
                wcs.wcs, cmp=WCSCOMPARE_ANCILLARY, tolerance=1e-9):
            raise ValueError(f"tile {tile}: band {band} co-add (shape {np.shape(other)}) is not "
                             f"on the pixel grid of detection band {detection_band} (shape "
                             f"{shape}); dual mode needs one grid (shape and WCS) for all bands")


def measure_dual(images: dict[str, tuple[np.ndarray, np.ndarray, fits.Header]],
                 settings: PhotometrySettings, network: Network, detection_band: str = "I", *,
                 ndith: dict[str, np.ndarray] | None = None,
                 exposures: dict[str, dict] | None = None,
                 excluded: dict[str, dict[str, np.ndarray]] | None = None,
                 noise_factors: dict[str, np.ndarray] | None = None,
                 psf_r_half: float | None = None) -> Table:
    """Detect on ``detection_band`` and measure every band at the same objects (dual mode).

    Parameters
    ----------
    images : dict
        Band letter -> (co-add, mask, header) of one tile, all on one pixel grid; the bands
        present get columns, in the order B, V, R, I.
    settings, network
        As :func:`measure_single`.
    detection_band : str
        The band to detect on (DR1: I); must be in ``images``.
    ndith : dict, optional
        Band letter -> exposures per pixel (see :func:`measure_single`).
    exposures : dict, optional
        Band letter -> the co-add's exposure list (see :func:`measure_single`).
    excluded : dict, optional
        Band letter -> the co-add's excluded pixels per exposure (see :func:`measure_single`).
    noise_factors : dict, optional
        Band letter -> the RMS map's factors per NDITH (see :func:`measure_single`).
    psf_r_half : float, optional
        The detection band's PSF half-light radius (see :func:`measure_single`).

    Raises
    ------
    ValueError
        The detection band is missing, or a band's co-add is not on the detection grid (the
        message names the tile and the band).
    """
    ndith = ndith or {}
    exposures = {band.upper(): value for band, value in (exposures or {}).items()}
    excluded = {band.upper(): value for band, value in (excluded or {}).items()}
    noise_factors = {band.upper(): value for band, value in (noise_factors or {}).items()}
    upper = {band.upper(): value for band, value in images.items()}
    if detection_band.upper() not in upper:
        raise ValueError(f"detection band {detection_band} not among the co-adds "
                         f"{sorted(upper)}")
    _check_grid(upper, detection_band.upper())
    order = sorted(upper, key=lambda b: "BVRI".find(b) if b in "BVRI" else 99)

    def prepare(band: str) -> _Band:
        return _prepare(*upper[band], band, settings, ndith.get(band, ndith.get(band.lower())),
                        exposures.get(band), excluded.get(band), noise_factors.get(band),
                        psf_r_half if band == detection_band.upper() else None)

    return _measure(prepare(detection_band.upper()), order, prepare, settings, network, "dual")


# --------------------------------------------------------------------------------------------
# The task


class _Coadd:
    """The products of one co-add (image, mask, NDITH, exposure list, excluded pixels), the
    images memory-mapped so that a block reads only its own pixels. A context manager: the
    files close on exit."""

    def __init__(self, release_dir: Path, tile: str, band: str) -> None:
        self.tile, self.band = tile, band
        self._files: list[fits.HDUList] = []
        self.arrays: dict[str, np.ndarray] = {}
        try:
            self._open(release_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, release_dir: Path) -> None:
        """Map the three images and read the exposure list and the excluded pixels."""
        tile, band = self.tile, self.band
        for kind in ("coadd", "mask", "ndith"):
            path = coadd_path(release_dir, tile, band, kind)
            try:
                hdul = fits.open(path, memmap=True)
                self._files.append(hdul)
                data = hdul[0].data
                if kind == "coadd":
                    self.header = hdul[0].header.copy()
            except (OSError, IndexError) as exc:
                raise InputError(path, f"cannot read the {kind} of tile {tile} band {band}: "
                                       f"{exc}") from None
            if data is None or data.ndim != 2:
                raise InputError(path, "expected a 2-d image, got shape "
                                       f"{None if data is None else data.shape}")
            self.arrays[kind] = data
        self.shape = self.arrays["coadd"].shape
        self.exposures = read_exposures_json(coadd_exposures_path(release_dir, tile, band))
        self.excluded = read_excluded(coadd_excluded_path(release_dir, tile, band), self.shape)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the memory-mapped files."""
        for hdul in self._files:
            hdul.close()
        self._files = []

    def crop(self, block: Block) -> tuple[np.ndarray, np.ndarray, fits.Header, np.ndarray,
                                           dict[str, np.ndarray]]:
        """Image (float32), mask, header, NDITH (native byte order) and excluded pixels of
        ``block``, read from the files."""
        rows, cols = block.slices
        image, mask, ndith = (np.asarray(self.arrays[k][rows, cols],
                                         dtype=self.arrays[k].dtype.newbyteorder("="))
                              for k in ("coadd", "mask", "ndith"))
        return (image.astype(np.float32, copy=False), mask, crop_header(self.header, block),
                ndith, crop_excluded(self.excluded, self.shape, block))

    def noise_factors(self, blocks: list[Block], settings: PhotometrySettings
                      ) -> np.ndarray | None:
        """The whole co-add's RMS factors per NDITH when it is measured in several blocks
        (:func:`blockwise_noise_factors`); None for one block (measured with the image) or
        without ``coverage_rms``."""
        if len(blocks) == 1 or not settings.coverage_rms:
            return None

        def pixels(block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            image, mask, _, ndith, _ = self.crop(block)
            return image, mask, ndith

        return blockwise_noise_factors(pixels, blocks, self.shape, settings)

    def psf_r_half(self, blocks: list[Block], settings: PhotometrySettings) -> float | None:
        """The whole co-add's PSF half-light radius when it is measured in several blocks:
        :func:`_psf_radius` on its central block (:func:`.photometry_blocks.central_block`),
        the whole co-add when that is no larger; None for one block (measured with the
        image)."""
        if len(blocks) == 1:
            return None
        centre = central_block(self.shape, settings.block_size_px, settings.block_margin_px,
                               settings.back_size_px)
        image, mask, header, ndith, _ = self.crop(centre)
        return _psf_radius(_prepare(image, mask, header, self.band, settings, ndith), settings)


def _blocks(shape: tuple[int, int], settings: PhotometrySettings) -> list[Block]:
    """The blocks a co-add of ``shape`` is measured in (one when it is small enough)."""
    return plan_blocks(shape, settings.block_size_px, settings.block_margin_px,
                       settings.back_size_px)


def run_photometry(*, release_dir: Path, tile: str, mode: str, bands: tuple[str, ...],
                   settings: PhotometrySettings, nnw_path: Path,
                   detection_band: str = "I") -> None:
    """Measure the co-adds of one tile and write the measurement table(s).

    Mode ``dual``: detect on ``detection_band`` and measure every band of ``bands`` whose co-add
    exists (a band without a co-add gets no columns); writes
    ``measured_path(release_dir, tile, "dual")``. Mode ``single``: each band of ``bands`` alone;
    writes ``measured_path(release_dir, tile, "single", band)`` per band. A co-add with a side
    longer than ``settings.block_size_px`` is measured in blocks
    (:mod:`ks4release.reduction.photometry_blocks`).

    Reads ``coadd_path(release_dir, tile, band, kind)`` for kind coadd, mask and ndith,
    ``coadd_exposures_path(release_dir, tile, band)``, ``coadd_excluded_path(release_dir, tile,
    band)`` and the network ``nnw_path``. Every table is written atomically as Parquet, units
    and descriptions on the columns, settings and provenance in the metadata.

    Raises
    ------
    InputError
        A co-add product is unreadable, or the detection band has no co-add (dual mode).
    StageError
        The co-adds cannot be measured (different grids, no SEEING, a sep overflow); the
        message names the tile and band.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'dual' or 'single', got {mode!r}")
    release_dir = Path(release_dir)
    network = read_nnw(nnw_path)
    bands = tuple(b.upper() for b in bands)
    if mode == "single":
        for band in bands:
            with _Coadd(release_dir, tile, band) as coadd:
                blocks = _blocks(coadd.shape, settings)
                factors = coadd.noise_factors(blocks, settings)

                def measure(block: Block, psf_r_half: float | None, coadd: _Coadd = coadd,
                            band: str = band, factors: np.ndarray | None = factors) -> Table:
                    image, mask, header, ndith, excluded = coadd.crop(block)
                    return measure_single(image, mask, header, band, settings, network,
                                          ndith=ndith, exposures=coadd.exposures,
                                          excluded=excluded, noise_factors=factors,
                                          psf_r_half=psf_r_half)
                try:
                    table = measure_in_blocks(
                        partial(measure, psf_r_half=coadd.psf_r_half(blocks, settings)), blocks,
                        label=f"tile {tile} band {band}")
                except ValueError as exc:  # a co-add that breaks what the measurement needs
                    raise StageError(str(exc), stage="photometry", tile=tile, band=band,
                                     path=coadd_path(release_dir, tile, band, "coadd")) from exc
            _write(table, tile, measured_path(release_dir, tile, "single", band))
        return
    present = [b for b in bands if coadd_path(release_dir, tile, b, "coadd").exists()]
    if detection_band.upper() not in present:
        raise InputError(coadd_path(release_dir, tile, detection_band.upper(), "coadd"),
                         f"tile {tile}: the dual-mode detection band {detection_band} has no "
                         "co-add")
    for band in sorted(set(bands) - set(present)):
        logger.info("tile %s: no %s co-add; its columns are left out", tile, band)
    with ExitStack() as stack:
        coadds = {band: stack.enter_context(_Coadd(release_dir, tile, band))
                  for band in present}

        shape = coadds[detection_band.upper()].shape
        blocks = _blocks(shape, settings)
        factors: dict[str, np.ndarray] = {}

        def measure_block(block: Block, psf_r_half: float | None) -> Table:
            crops = {band: coadd.crop(block) for band, coadd in coadds.items()}
            return measure_dual({b: c[:3] for b, c in crops.items()}, settings, network,
                                detection_band, ndith={b: c[3] for b, c in crops.items()},
                                exposures={b: coadds[b].exposures for b in crops},
                                excluded={b: c[4] for b, c in crops.items()},
                                noise_factors=factors, psf_r_half=psf_r_half)

        try:
            _check_grid({b: (c.arrays["coadd"], None, c.header) for b, c in coadds.items()},
                        detection_band.upper())
            for band, coadd in coadds.items():
                measured = coadd.noise_factors(blocks, settings)
                if measured is not None:
                    factors[band] = measured
            radius = coadds[detection_band.upper()].psf_r_half(blocks, settings)
            table = measure_in_blocks(partial(measure_block, psf_r_half=radius), blocks,
                                      label=f"tile {tile} (dual)")
        except ValueError as exc:  # co-adds on different grids, or a header without SEEING
            raise StageError(str(exc), stage="photometry", tile=tile) from exc
    _write(table, tile, measured_path(release_dir, tile, "dual"))


def _write(table: Table, tile: str, path: Path) -> None:
    """Write one measurement table atomically as Parquet, named after the task's tile (the
    co-add header's TILE may be absent)."""
    description = table["tile"].description
    table["tile"] = np.full(len(table), tile)
    table["tile"].description = description
    table.meta["tile"] = tile
    with atomic_path(path) as tmp:
        table.write(tmp, format="parquet", overwrite=True)
