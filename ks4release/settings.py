"""Settings of the reduction stages: one frozen dataclass per ``release.toml`` section.

Each field is made with :func:`documented`, so its meaning and default travel into
``ks4release config show`` and the comments of a written ``release.toml``. The stage modules in
:mod:`ks4release.reduction` take these as their ``settings`` argument; they live in the
vocabulary so that the configuration (:mod:`ks4release.config`) can hold them without importing
the reduction. Every number that DR1 does not state is a default of ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ks4release.camera import CCD_NAMES, COADD_PIXEL_SCALE_ARCSEC, N_AMPLIFIERS, Camera
from ks4release.survey import BANDS, REFERENCE_ZEROPOINT

__all__ = [
    "BACKPHOTO_TYPES",
    "EXPORT_FORMATS",
    "AstrometrySettings",
    "CoaddSettings",
    "DetectSettings",
    "ExportSettings",
    "MapSettings",
    "MaskSettings",
    "MasterSettings",
    "PhotometrySettings",
    "PostprocessSettings",
    "ScaleSettings",
    "ZeropointSettings",
    "documented",
]

#: Band suffixes of the catalog columns (b, v, r, i).
_CATALOG_BANDS = tuple(b.name.lower() for b in BANDS)

#: SExtractor's BACKPHOTO_TYPE values: fluxes on the background mesh, or on a local level too.
BACKPHOTO_TYPES = ("GLOBAL", "LOCAL")
#: Every DR1 bad-pixel bit (1 cosmic ray or crosstalk, 2 bleed, 4 CCD defect, 8 amplifier defect).
_DR1_BITS_ALL = 15


def documented(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose documentation travels with it (into release.toml comments).

    Every settings section uses it: ``threshold: float = documented("...", default=1.5)``.
    """
    return field(metadata={"doc": text}, **kwargs)


def _positive(obj: Any, *names: str) -> None:
    """Each named field must be > 0."""
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(obj, name)}")


def _at_least(obj: Any, low: float, *names: str) -> None:
    """Each named field must be >= ``low``."""
    for name in names:
        if not getattr(obj, name) >= low:
            raise ValueError(f"{name} must be >= {low:g}, got {getattr(obj, name)}")


def _fraction(obj: Any, *names: str) -> None:
    """Each named field must be in (0, 1]."""
    for name in names:
        if not 0.0 < getattr(obj, name) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(obj, name)}")


def _bits(obj: Any, *names: str) -> None:
    """Each named field must be a bit set of 8 bits."""
    for name in names:
        if not 0 <= getattr(obj, name) <= 255:
            raise ValueError(f"{name} must be a bit mask in [0, 255], got {getattr(obj, name)}")


@dataclass(frozen=True, kw_only=True)
class MaskSettings:
    """``[masks]``: how the bad-pixel masks are made (DR1 states none of these numbers)."""

    amp_level_nsigma: float = documented(
        "An amplifier segment whose median departs from the median of the CCD's segments by more "
        "than this many times their typical noise is defective (bit 8).",
        default=10.0)
    amp_noise_ratio: float = documented(
        "An amplifier segment whose robust noise is more than this factor above or below the "
        "typical noise of the CCD's segments is defective (bit 8).",
        default=2.0)
    bad_column_block_rows: int = documented(
        "Rows per block when comparing a column with its neighbours, pixels.",
        default=32)
    bad_column_half_width: int = documented(
        "Neighbouring columns on each side a column is compared with, pixels.",
        default=3)
    bad_column_nsigma: float = documented(
        "A block of a column is bad when its median departs from its neighbours' by more than "
        "this many times the robust scatter of such departures.",
        default=5.0)
    bad_column_min_blocks: int = documented(
        "Shortest run of bad blocks taken as a bad column, blocks.",
        default=3)
    bad_column_margin_px: int = documented(
        "Rows added at each end of a bad column, pixels.",
        default=2)
    bad_pixel_map: str = documented(
        "Optional static bad-pixel map: a FITS file with one uint8 image per CCD (EXTNAME KK, MM, "
        "NN, TT), non-zero = bad, OR'd into bit 4; empty = none.",
        default="")
    saturation_fraction: float = documented(
        "Pixels at or above this fraction of SATURATE are saturated (bit 2).",
        default=0.98)
    bleed_directions: tuple[int, ...] = documented(
        "Bleed direction of each CCD in the order KK, MM, NN, TT: +1 towards +Y, -1 towards -Y, 0 "
        "= infer from the data (falls back to both ways when undecided).",
        default=tuple(Camera.kmtnet().ccd(name).bleed_direction for name in CCD_NAMES))
    bleed_margin_px: int = documented(
        "Pixels added beyond each saturated run along the bleed direction (the partly filled end "
        "of a trail).",
        default=2)
    amp_reversed_readout: tuple[bool, ...] = documented(
        "Per amplifier (AMPSEC1..8), true when its readout starts at its highest column: "
        "amplifiers read out in mirrored directions, so crosstalk ghosts are mirrored between "
        "neighbours.",
        default=(False, True) * 4)
    crosstalk_source_fraction: float = documented(
        "Pixels at or above this fraction of SATURATE are crosstalk sources.",
        default=0.5)
    crosstalk_coefficient: float = documented(
        "Crosstalk ghost / source charge between neighbouring amplifiers.",
        default=0.002)
    crosstalk_falloff: float = documented(
        "Factor applied to the crosstalk coefficient per further amplifier of distance.",
        default=0.5)
    crosstalk_min_e: float = documented(
        "Predicted crosstalk ghosts of at least this many electrons are flagged (bit 1).",
        default=10.0)
    crosstalk_grow_px: int = documented(
        "Predicted crosstalk footprints are dilated by this many pixels.",
        default=1)
    crosstalk_correct: bool = documented(
        "Subtract the predicted crosstalk ghosts in the scale stage and let the co-add use those "
        "pixels (they keep bit 1 in the exposure masks, plus the internal bit 16). DR1 only "
        "masked them: false restores that.",
        default=True)
    cr_sigclip: float = documented(
        "astroscrappy sigclip: Laplacian-to-noise limit of a cosmic-ray pixel.",
        default=4.5)
    cr_sigfrac: float = documented(
        "astroscrappy sigfrac: fraction of sigclip for the neighbours of a cosmic-ray pixel.",
        default=0.3)
    cr_objlim: float = documented(
        "astroscrappy objlim: minimum contrast between the Laplacian and the fine-structure image "
        "(higher protects star cores; the PSF FWHM is ~5 px).",
        default=5.0)
    cr_niter: int = documented(
        "astroscrappy niter: iterations of L.A.Cosmic (2 finds as many hits as 4 on the demo "
        "survey in half the time).",
        default=2)
    cr_block_rows: int = documented(
        "Rows of the CCD given to astroscrappy at a time (bounds memory on full-size chips); 0 = "
        "the whole chip at once.",
        default=2048)
    cr_block_overlap: int = documented(
        "Rows shared by consecutive astroscrappy blocks, pixels.",
        default=32)
    cr_edge_pad_px: int = documented(
        "Pixels mirrored beyond the chip's edges before astroscrappy (stars cut by the edge "
        "otherwise look sharp).",
        default=16)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        _positive(self, "amp_level_nsigma", "bad_column_nsigma", "crosstalk_coefficient",
                  "crosstalk_min_e", "cr_sigclip", "cr_objlim")
        _at_least(self, 1.0, "bad_column_block_rows", "bad_column_half_width",
                  "bad_column_min_blocks", "cr_niter")
        if not self.amp_noise_ratio > 1.0:
            raise ValueError(f"amp_noise_ratio must be > 1, got {self.amp_noise_ratio}")
        _at_least(self, 0.0, "bad_column_margin_px", "bleed_margin_px", "crosstalk_grow_px",
                  "cr_block_rows", "cr_block_overlap", "cr_edge_pad_px")
        _fraction(self, "saturation_fraction", "crosstalk_source_fraction", "crosstalk_falloff",
                  "cr_sigfrac")
        if len(self.bleed_directions) != len(CCD_NAMES) or not set(self.bleed_directions) <= {
                -1, 0, 1}:
            raise ValueError("bleed_directions needs one of -1, 0, +1 per CCD (KK, MM, NN, TT), "
                             f"got {self.bleed_directions}")
        if len(self.amp_reversed_readout) != N_AMPLIFIERS:
            raise ValueError(f"amp_reversed_readout needs {N_AMPLIFIERS} values, got "
                             f"{len(self.amp_reversed_readout)}")
        if self.cr_block_rows and self.cr_block_rows <= 2 * self.cr_block_overlap:
            raise ValueError(f"cr_block_rows must be 0 (whole chip) or more than twice "
                             f"cr_block_overlap ({self.cr_block_overlap}), "
                             f"got {self.cr_block_rows}")

    def bleed_direction(self, ccd_name: str) -> int:
        """The configured bleed direction of CCD ``ccd_name`` (+1, -1, or 0 = infer)."""
        return self.bleed_directions[CCD_NAMES.index(ccd_name)]


@dataclass(frozen=True, kw_only=True)
class DetectSettings:
    """``[detect]``: sep source extraction on single-epoch CCDs (DR1 used SExtractor)."""

    thresh_sigma: float = documented(
        "Detection threshold in units of the local background RMS (DR1: not stated, 'low').",
        default=1.5)
    min_area_px: int = documented(
        "Minimum number of pixels above threshold (DR1 DETECT_MINAREA 9).",
        default=9)
    deblend_nthresh: int = documented(
        "Number of deblending sub-thresholds.",
        default=32)
    deblend_cont: float = documented(
        "Minimum contrast for deblending (DR1 DEBLEND_MINCONT).",
        default=5e-05)
    back_size_px: int = documented(
        "Background mesh size, pixels.",
        default=64)
    back_filter_size: int = documented(
        "Background median filter size, meshes.",
        default=3)
    aperture_diameter_arcsec: float = documented(
        "Diameter of the fixed circular aperture, arcsec (DR1 MAG_APER5 = 5 arcsec).",
        default=5.0)
    mask_bits: int = documented(
        "Bad-pixel mask bits that exclude a pixel from background and detection (1 cosmic "
        "ray/crosstalk, 2 bleed, 4 bad column, 8 dead amplifier).",
        default=15)
    saturation_fraction: float = documented(
        "A footprint pixel at or above this fraction of SATURATE flags the source saturated.",
        default=0.98)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        _positive(self, "thresh_sigma", "aperture_diameter_arcsec")
        _at_least(self, 1.0, "min_area_px", "deblend_nthresh", "back_size_px", "back_filter_size")
        _fraction(self, "deblend_cont", "saturation_fraction")
        _bits(self, "mask_bits")


@dataclass(frozen=True, kw_only=True)
class AstrometrySettings:
    """``[astrometry]``: Gaia DR3 astrometric solution and DR1's quality check."""

    sip_degree: int = documented(
        "Highest total degree of the polynomial fitted on top of the prior distortion (1 = prior "
        "+ affine map; the .ahead models are cubic). Fewer stars lower it (see "
        "min_stars_per_term).",
        default=3)
    max_offset_arcsec: float = documented(
        "Largest offset of the header WCS searched for, per axis, arcsec.",
        default=30.0)
    offset_bin_arcsec: float = documented(
        "Bin size of the offset-voting histogram, arcsec.",
        default=1.0)
    initial_match_radius_arcsec: float = documented(
        "Match radius after the offset search (covers the unmodelled distortion), arcsec.",
        default=3.0)
    match_radius_arcsec: float = documented(
        "Match radius with the fitted model, arcsec (DR1 validation: 1.0).",
        default=1.0)
    clip_sigma: float = documented(
        "Residuals beyond this many robust sigmas are rejected.",
        default=3.0)
    n_iterations: int = documented(
        "Match-clip-fit iterations.",
        default=4)
    min_snr: float = documented(
        "Detections below this S/N are not used.",
        default=5.0)
    bad_flags: int = documented(
        "Detection flags that exclude a source from the fit (1 masked pixels in the aperture, 4 "
        "saturated, 8 edge, 16 aperture truncated).",
        default=29)
    ref_mag_limit: float = documented(
        "Faintest Gaia G used for matching, mag.",
        default=21.0)
    position_floor_arcsec: float = documented(
        "Added in quadrature to every position error in the fit weights, arcsec.",
        default=0.01)
    propagate_proper_motion: bool = documented(
        "Move Gaia positions from 2016.0 to the exposure epoch (DR1: no; KS4 exposures are 4-8 "
        "years later, and the unmoved stars bias the fit: on a demo survey with 8 times the "
        "stars, 8 of 284 CCDs failed the quality check without it, 1 with it).",
        default=True)
    prior_radial_cubic_deg: float = documented(
        "Prior focal-plane distortion d(xi) = c xi r^2 (deg^-2) about the optical axis, the cubic "
        "term of the KMTNet .ahead models (PV1_7 ~ PV1_9 ~ -0.01); it assumes each CCD header's "
        "CRPIX is the optical axis. 0 = no prior.",
        default=-0.01)
    min_stars_per_term: float = documented(
        "Matched stars needed per polynomial term and axis before the fit uses a higher degree "
        "(few stars: the prior distortion and an affine map).",
        default=8.0)
    min_matches: int = documented(
        "A chip needs at least this many kept matches (guards against a chip without data; the "
        "shared model constrains chips with few stars).",
        default=2)
    subsection_side: int = documented(
        "Sub-sections per chip side of the quality check (DR1: 8, i.e. 64).",
        default=8)
    min_good_subsections: int = documented(
        "Good sub-sections a chip needs to pass (DR1: 62 of 64).",
        default=62)
    min_match_rate: float = documented(
        "Least fraction of expected Gaia stars matched in a good sub-section (DR1: not stated); "
        "a sub-section fails when its rate is significantly below it (qa_significance).",
        default=0.5)
    qa_significance: float = documented(
        "Binomial probability below which a sub-section's or a chip's matched count is "
        "significantly below min_match_rate (one unmatched star of one or two expected is not).",
        default=0.01)
    max_subsection_rms_arcsec: float = documented(
        "Largest RMS per axis of the matched residuals in a good sub-section, arcsec (DR1: not "
        "stated).",
        default=0.1)
    qa_mag_range: tuple[float, ...] = documented(
        "Gaia G range of the stars expected in the quality check, mag (brighter saturate, fainter "
        "may be lost in the noise).",
        default=(14.0, 20.0))
    qa_min_snr: float = documented(
        "Least detection S/N of the matches whose residuals make a sub-section's RMS (fainter "
        "ones count for the match rate only: at S/N 10 a star's own noise is ~0.06 arcsec per "
        "axis, and one of them would decide a sub-section's RMS; SCAMP keeps separate "
        "statistics for high-S/N sources too).",
        default=20.0)
    isolation_arcsec: float = documented(
        "Expected stars have no brighter Gaia star within this radius, arcsec (a neighbour's halo "
        "or bleed trail swallows them).",
        default=10.0)
    edge_margin_px: float = documented(
        "Expected stars lie at least this far from the chip edge and from masked pixels, px.",
        default=3.0)
    mask_bits: int = documented(
        "Mask bits that make a pixel masked in the quality check.",
        default=15)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        _positive(self, "max_offset_arcsec", "offset_bin_arcsec", "initial_match_radius_arcsec",
                  "match_radius_arcsec", "clip_sigma", "min_stars_per_term",
                  "max_subsection_rms_arcsec")
        _at_least(self, 0.0, "min_snr", "qa_min_snr", "position_floor_arcsec",
                  "isolation_arcsec", "edge_margin_px")
        _at_least(self, 1.0, "sip_degree", "n_iterations", "min_matches", "subsection_side")
        _fraction(self, "min_match_rate", "qa_significance")
        _bits(self, "bad_flags", "mask_bits")
        if not 0 <= self.min_good_subsections <= self.subsection_side**2:
            raise ValueError(f"min_good_subsections must be in [0, {self.subsection_side**2}], "
                             f"got {self.min_good_subsections}")
        if len(self.qa_mag_range) != 2 or not self.qa_mag_range[0] < self.qa_mag_range[1]:
            raise ValueError(f"qa_mag_range must be (bright, faint), got {self.qa_mag_range}")


@dataclass(frozen=True, kw_only=True)
class ZeropointSettings:
    """Photometry and fit of the per-amplifier zero points (``[zeropoint]``)."""

    aperture_r50: float = documented(
        "Photometric aperture radius in units of the stars' median half-light radius (3 ~ 1.9 "
        "FWHM for a Moffat beta = 3 PSF: 4.5 % of the light outside, corrected by the curve of "
        "growth; on the demo, 3 instead of 5 halves the sky noise and the faint neighbours in "
        "the aperture and cut the per-amplifier zero-point error by a quarter).",
        default=3.0)
    correction_factor: float = documented(
        "Radius of the curve-of-growth aperture, in units of the photometric aperture.",
        default=3.0)
    background_box_px: int = documented(
        "Box size of the sep background mesh, px.",
        default=64)
    detect_sigma: float = documented(
        "Detection threshold (sigma) of the sources searched for blends and masked out of the "
        "background.",
        default=3.0)
    background_grow_px: int = documented(
        "Detected sources' pixels are grown by this many px and masked when the background "
        "mesh is measured a second time (their wings would lift it in crowded fields).",
        default=4)
    blend_fraction: float = documented(
        "A star is dropped when other detected sources within its aperture (plus two half-light "
        "radii) carry more than this fraction of its flux.",
        default=0.005)
    saturation_fraction: float = documented(
        "A star is dropped when a pixel within 2 half-light radii reaches this fraction of "
        "SATURATE.",
        default=0.9)
    max_ref_err_mag: float = documented(
        "Largest accepted Gaia XP magnitude error, mag.",
        default=0.05)
    error_floor_mag: float = documented(
        "Added in quadrature to each star's error, mag.",
        default=0.003)
    clip_sigma: float = documented(
        "Outlier rejection threshold in robust standard deviations.",
        default=3.5)
    colour_pivot: float = documented(
        "(V-I)_AB colour at which the zero point is defined, mag.",
        default=0.4)
    prior_colour_term: float = documented(
        "Prior width of the colour term of each site in a tile and band, mag/mag.",
        default=0.1)
    prior_ccd_offset_mag: float = documented(
        "Prior width of a CCD's offset from the exposure zero point (gain included), mag.",
        default=0.1)
    prior_ccd_slope_mag: float = documented(
        "Prior width of a CCD's zero-point gradient over its height, mag (DR1: up to 0.1 mag "
        "along Y; a gradient spread evenly within +-0.1 has a standard deviation of 0.058).",
        default=0.06)
    prior_amp_offset_mag: float = documented(
        "Prior width of an amplifier's offset from its CCD, mag.",
        default=0.02)
    prior_amp_slope_mag: float = documented(
        "Prior width of an amplifier's gradient from its CCD's, mag over the CCD height.",
        default=0.03)
    fallback_aperture_correction: float = documented(
        "Aperture correction (large / small aperture flux) used for a tile and band in which "
        "fewer than three clean stars measure it; 1 = none (the zero point is then too faint by "
        "the PSF's true correction, about 0.045 mag for a Moffat beta = 3 PSF and the default "
        "aperture).",
        default=1.0)
    min_stars_amp: int = documented(
        "Amplifiers with fewer stars get the FEW_STARS flag.",
        default=3)
    apcorr_min_snr: float = documented(
        "Smallest S/N (photometric aperture) of the stars whose weighted mean large- to "
        "small-aperture flux ratio is the aperture correction of a tile and band.",
        default=30.0)
    tie_min_snr: float = documented(
        "Smallest S/N of a single-epoch detection used to tie the exposures of a tile and band "
        "together.",
        default=10.0)
    tie_max_size_ratio: float = documented(
        "Largest half-light radius of a tie star, in units of its CCD's stellar half-light "
        "radius (keeps galaxies, whose aperture flux depends on the seeing, out).",
        default=1.1)
    r50_min_stars: int = documented(
        "A CCD with at least this many clean S/N >= 50 detections gets its own stellar "
        "half-light radius (the photometric aperture's unit); one with fewer, the exposure's.",
        default=10)
    tie_match_arcsec: float = documented(
        "Radius linking detections of different exposures into one star, and a star to its "
        "Gaia XP source, arcsec.",
        default=1.0)
    prior_star_colour: float = documented(
        "Prior width of the (V-I)_AB colour of a tie star without Gaia XP about the median "
        "colour of the Gaia XP stars, mag (only differences between sites' colour terms see "
        "it).",
        default=0.5)
    site_pattern: bool = documented(
        "Fit the amplifier pattern of each site's camera (offsets and gradients along Y) once "
        "from every exposure of the release, all bands together, and fit each exposure as a "
        "departure from it (DR1: the variations are consistent across filters, of instrumental "
        "origin). Off: each tile and band alone, with the hierarchical priors above.",
        default=True)
    estimate_amp_widths: bool = documented(
        "In the site-pattern fit, estimate the widths of the amplifiers' offsets and gradients "
        "about their CCD's from the fit itself (empirical Bayes) instead of "
        "prior_amp_offset_mag and prior_amp_slope_mag, which then only start it.",
        default=True)
    pattern_max_exposures: int = documented(
        "Most exposures per site the site pattern is fitted from, spread evenly over the dates "
        "(the fit's dense system has one parameter per exposure: DR1's 17,600 exposures would "
        "not fit in memory, and a few hundred full-size exposures measure every amplifier "
        "with thousands of stars).",
        default=400)
    pooled_aperture_correction: bool = documented(
        "With the site pattern: one aperture correction per band over the whole release "
        "(measured by the zp-pattern stage) instead of one per tile and band (it depends on "
        "the shape of the PSF's wings, not on the seeing; a tile's 20-60 bright stars measured "
        "it to 0.5-1 %).",
        default=True)
    pattern_offset_mag: float = documented(
        "Prior width of an exposure's departure from its site's pattern, per CCD and again per "
        "amplifier (offset at mid-height), mag. The uncertainty of the pattern itself is added "
        "in quadrature.",
        default=0.005)
    pattern_slope_mag: float = documented(
        "Prior width of an exposure's departure from its site's pattern in the gradient over "
        "the CCD height, per CCD and again per amplifier, mag.",
        default=0.01)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        _positive(self, "aperture_r50", "detect_sigma", "max_ref_err_mag", "clip_sigma",
                  "prior_colour_term", "prior_ccd_offset_mag", "prior_ccd_slope_mag",
                  "prior_amp_offset_mag", "prior_amp_slope_mag", "tie_match_arcsec",
                  "prior_star_colour", "pattern_offset_mag", "pattern_slope_mag")
        _at_least(self, 0.0, "tie_min_snr", "apcorr_min_snr", "background_grow_px")
        _at_least(self, 1.0, "background_box_px", "min_stars_amp", "tie_max_size_ratio",
                  "r50_min_stars", "pattern_max_exposures")
        _at_least(self, 0.0, "error_floor_mag")
        _fraction(self, "blend_fraction", "saturation_fraction")
        _at_least(self, 1.0, "fallback_aperture_correction")
        if not self.correction_factor > 1.0:
            raise ValueError(f"correction_factor must be > 1, got {self.correction_factor}")


@dataclass(frozen=True, kw_only=True)
class ScaleSettings:
    """Background subtraction and scaling of the exposures (``[scale]``)."""

    zp_target: float = documented(
        "Zero point of the scaled images, AB mag giving 1 count (DR1: 30).",
        default=REFERENCE_ZEROPOINT)
    background_box_px: int = documented(
        "Box size of the sep background mesh, px.",
        default=64)
    background_filter: int = documented(
        "Median filter size of the background mesh, boxes.",
        default=3)
    background_mask_sigma: float = documented(
        "Sources above this many sigma (grown by background_grow_px) are masked and the "
        "background measured again, as the zero-point photometry measures it; 0 = one pass "
        "with the sources in, which subtracts the sources' wings with the sky. On the demo "
        "survey with 5 times the stars, the source-free sky of the 16 co-adds is 0.35 ADU "
        "(0.029 sigma) below 0 (median; -0.74 to -0.09) with the second pass, 0.68 ADU (0.058 "
        "sigma; -1.32 to -0.28) with one.",
        default=3.0)
    background_grow_px: int = documented(
        "Detected sources' pixels are grown by this many px before the second background pass "
        "(background_mask_sigma).",
        default=4)

    def __post_init__(self) -> None:
        """Check every field; errors name the field."""
        _positive(self, "zp_target")
        _at_least(self, 8.0, "background_box_px")
        _at_least(self, 1.0, "background_filter")
        _at_least(self, 0.0, "background_mask_sigma", "background_grow_px")
        if not math.isfinite(self.zp_target):
            raise ValueError(f"zp_target must be a finite magnitude, got {self.zp_target}")


@dataclass(frozen=True, kw_only=True)
class CoaddSettings:
    """``[coadd]``: how the co-adds are made and measured."""

    pixel_scale_arcsec: float = documented(
        "Pixel scale of the co-add grid, arcsec/px (DR1: 0.4).", default=COADD_PIXEL_SCALE_ARCSEC)
    grid_margin_arcsec: float = documented(
        "Margin added on every side of the dithered field when sizing the tile grid, arcsec at "
        "full camera size (scaled with the camera); 120 gives DR1's ~22000 x 22000 px.",
        default=120.0)
    square_grid: bool = documented(
        "Make the tile grid square (the larger side for both), as DR1's 22000 x 22000 co-adds.",
        default=True)
    combine_type: str = documented("SWarp COMBINE_TYPE (DR1: MEDIAN).", default="MEDIAN")
    resampling_type: str = documented("SWarp RESAMPLING_TYPE (DR1: LANCZOS3).",
                                      default="LANCZOS3")
    swarp_binary: str = documented("SWarp executable (Debian package 'swarp').", default="SWarp")
    projection_err_px: float = documented(
        "SWarp PROJECTION_ERR: largest error of its approximated pixel mapping, output px. "
        "SWarp's 0.001 is never met by a distorted KMTNet CCD and forces the exact mapping "
        "(4.5x slower); 0.01 (0.004 arcsec) changes fluxes by < 3e-4.", default=0.01)
    nthreads: int = documented("Threads SWarp may use.", default=1)
    timeout_s: float = documented("Longest a SWarp run may take, s.", default=3600.0)
    ignore_bits: int = documented(
        "Mask bits of input pixels whose values must not be used (DR1 bits 1, 2, 4, 8 = 15): "
        "filled when in a short run (fill_max_gap_px), weight 0 otherwise.", default=_DR1_BITS_ALL)
    fill_max_gap_px: int = documented(
        "Masked runs up to this many pixels along a row (cosmic rays, bad columns, bleed "
        "trails) are filled by linear interpolation between their good neighbours before "
        "resampling; longer runs get weight 0. SWarp zeroes the weight of every output pixel "
        "whose LANCZOS3 kernel touches a zero-weight input pixel, so masking every cosmic ray "
        "would leave ~10% of each exposure out of the median; the filled pixels themselves "
        "are then left out of it (weight 0 after resampling).", default=16)
    map_step_px: int = documented(
        "Output pixels between exact WCS evaluations when projecting masks (spline between).",
        default=16)
    star_snr_min: float = documented(
        "Least S/N of a star used for the seeing measurement.", default=50.0)
    star_count_max: int = documented(
        "Most stars fitted for the seeing (the brightest unsaturated ones).", default=300)
    depth_aperture_fwhm: float = documented(
        "Diameter of the limiting-magnitude aperture in units of the measured seeing FWHM.",
        default=2.0)
    depth_sigma: float = documented("Significance of the limiting magnitude (DR1: 5).",
                                    default=5.0)
    depth_grid: int = documented(
        "The limiting magnitude is the median of the local ones in depth_grid x depth_grid "
        "cells of the tile, so that an artifact in one exposure (a stray-light ring lifted "
        "through the median) does not set the depth of the whole tile.", default=4)
    depth_apertures: int = documented(
        "Random empty apertures drawn per cell for the limiting magnitude.", default=400)
    quality_window_px: int = documented(
        "Seeing and depth are measured in the central window of this many pixels a side (the "
        "whole demo co-add; a third of the area of a full-size 22000 x 22000 one, whose "
        "detection maps would otherwise need several GB).", default=12000)
    seed: int = documented("Seed of the random aperture positions.", default=1)
    background_match: bool = documented(
        "Match the backgrounds of the resampled exposures before the median (Montage-style): "
        "subtract from each exposure its smooth offset from the others (least squares of the "
        "background maps of all pairwise differences, sources masked, the majority level taken "
        "as 0; reduction.coadd.background_offsets), so that scattered light or a ghost ring in "
        "one exposure (no DR1 mask bit) does not lift the median (stars under an 8-sigma ring "
        "of the test survey: 0.065 mag too bright otherwise). Costs "
        "n(n-1)/2 background maps (+1.3 s, 40% more time, on a demo tile of 4 "
        "exposures), a matched copy of every resampled frame on disk and ~20 bytes of memory "
        "per exposure and pixel of a block of background_match_block_rows rows (~4.2 GB for a "
        "full-size tile of 7 exposures). Off by default (DR1's plain median); on in the demo "
        "survey's release.toml, whose exposures carry simulated stray-light rings.",
        default=False)
    background_match_block_rows: int = documented(
        "The background matching works on blocks of this many grid rows (a multiple of "
        "background_match_mesh_px), each computed with a margin of background_match_filter // 2 "
        "+ 9 meshes on either side and kept in its own rows only: memory ~20 bytes x exposures "
        "x grid width x (rows + 2 margins), ~4.2 GB for 7 exposures of a 21886 px wide "
        "full-size tile at 1024 (the whole grid would need ~70 GB). Smaller blocks cost more "
        "margin (31% more pixels at 1024 with 16 px meshes); the offsets stay within ~4e-5 of a "
        "pixel's sigma of the whole grid's but where that flips a threshold decision.",
        default=1024)
    background_match_mesh_px: int = documented(
        "Mesh of the background maps of the pairwise differences of exposures, co-add px. "
        "Must be well below the width of the structure it removes (a demo stray-light ring has "
        "a Gaussian profile of sigma ~36 px); galaxies and stars cancel in the difference and "
        "are masked, so a small mesh does not eat them.", default=16)
    background_match_filter: int = documented(
        "Median filter of the background-match maps, in meshes (sep's fw = fh): takes out the "
        "single meshes that the seeing difference of two exposures leaves around a star (they "
        "bias the map upwards in the worse-seeing exposure, making stars faint).", default=3)
    background_match_source_sigma: float = documented(
        "Sources left out of the background-match maps: sep detections above this many sigma "
        "on the median of the exposures. Only cores need masking (stars and galaxies cancel in "
        "the differences but for seeing); a larger mask makes the map interpolate over the "
        "scattered light it should follow.", default=5.0)
    background_match_source_grow_px: int = documented(
        "Growth of the background-match source mask, co-add px.", default=1)
    background_match_min_sigma: float = documented(
        "Values of a pairwise background-match map smaller than this many times the noise of "
        "one mesh (1.2533 x the difference image's local rms / mesh) are set to 0, so that the "
        "maps' own noise stays out of the co-add where there is no scattered light; 0 keeps "
        "all.",
        default=3.0)

    def __post_init__(self) -> None:
        if self.background_match_mesh_px < 2:
            raise ValueError(f"background_match_mesh_px must be >= 2, got "
                             f"{self.background_match_mesh_px}")
        if (self.background_match_block_rows < self.background_match_mesh_px
                or self.background_match_block_rows % self.background_match_mesh_px):
            raise ValueError(f"background_match_block_rows must be a positive multiple of "
                             f"background_match_mesh_px ({self.background_match_mesh_px}), got "
                             f"{self.background_match_block_rows}")
        if self.background_match_min_sigma < 0:
            raise ValueError(f"background_match_min_sigma must be >= 0, got "
                             f"{self.background_match_min_sigma}")
        if self.background_match_source_grow_px < 0:
            raise ValueError(f"background_match_source_grow_px must be >= 0, got "
                             f"{self.background_match_source_grow_px}")
        for name in ("pixel_scale_arcsec", "timeout_s", "depth_aperture_fwhm", "depth_sigma",
                     "star_snr_min", "projection_err_px", "background_match_source_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.grid_margin_arcsec < 0:
            raise ValueError(f"grid_margin_arcsec must be >= 0, got {self.grid_margin_arcsec}")
        for name in ("nthreads", "map_step_px", "star_count_max", "depth_apertures", "depth_grid",
                     "quality_window_px", "fill_max_gap_px", "background_match_filter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ignore_bits",):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"{name} must be a uint8 bit mask, got {getattr(self, name)}")
        if self.combine_type not in ("MEDIAN", "AVERAGE", "WEIGHTED", "CLIPPED"):
            raise ValueError(f"combine_type must be MEDIAN, AVERAGE, WEIGHTED or CLIPPED, got "
                             f"{self.combine_type!r}")
        if not self.resampling_type.startswith(("LANCZOS", "BILINEAR", "NEAREST")):
            raise ValueError(f"resampling_type must be a SWarp type such as LANCZOS3, got "
                             f"{self.resampling_type!r}")


# --------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True, kw_only=True)
class MasterSettings:
    """Settings of the master catalogs (``[master]``)."""

    link_radius_arcsec: float = documented(
        "Linking length of detections of one source on different tiles, arcsec (DR1: 0.5).",
        default=0.5)
    second_pass_radius_arcsec: float = documented(
        "Second pass of the cross-tile linking and of the band merge: groups that are mutual "
        "nearest neighbours within this radius and share no tile (band) are joined, catching "
        "faint sources whose noisy centroids land beyond DR1's radius on one tile (band); two "
        "sources one image resolved are never joined; the joining is repeated until nothing "
        "is left to join. 0 = DR1's single pass. Our default 1.5: on the demo, 0.5 alone "
        "leaves 5% of the overlap sources twice in idual_master; 1.0 leaves one galaxy twice "
        "there and four in single_master (S/N 5-9, centroids 0.8-1.6\" apart), 1.5 and 2.0 "
        "none (a single round of joining left one in single_master at 1.5 and joined two true "
        "sources at 2.5).",
        default=1.5)
    band_merge_radius_arcsec: float = documented(
        "Matching radius of the per-tile band merge of single-mode lists, arcsec (DR1: 0.8).",
        default=0.8)
    band_merge_order: tuple[str, ...] = documented(
        "Order in which single-band lists are merged (band letters). DR1 merges two bands, "
        "then a third, then the fourth, but the band names are lost from the published text; "
        "the default goes from the deepest band to the shallowest.",
        default=("i", "r", "v", "b"))
    detection_band: str = documented(
        "Band whose S/N and FLAGS select detections of the dual-mode catalogs (DR1: I).",
        default="i")
    snr_min: float = documented(
        "Detections need S/N > snr_min. DR1's threshold is lost from the published text; 3 "
        "keeps low-significance detections as DR1 describes.", default=3.0)
    flags_max: int = documented(
        "Detections need FLAGS < flags_max (DR1: 4, which drops saturated detections).",
        default=4)
    chunk_rows: int = documented(
        "Sources aggregated and written per Parquet row group.", default=200_000)
    sfd_ngp: str = documented(
        "SFD (1998) E(B-V) map of the northern Galactic hemisphere (SFD_dust_4096_ngp.fits); "
        "empty = no map, ebmv_sfd is null.", default="")
    sfd_sgp: str = documented(
        "SFD (1998) E(B-V) map of the southern Galactic hemisphere (SFD_dust_4096_sgp.fits).",
        default="")
    release_name: str = documented("Release name written into the catalog metadata.",
                                   default="ks4-dr1")

    def __post_init__(self) -> None:
        for name in ("link_radius_arcsec", "band_merge_radius_arcsec"):
            if not 0.0 < getattr(self, name) <= 10.0:
                raise ValueError(f"{name} must be in (0, 10] arcsec, got {getattr(self, name)}")
        if not 0.0 <= self.second_pass_radius_arcsec <= 10.0:
            raise ValueError("second_pass_radius_arcsec must be in [0, 10] arcsec, got "
                             f"{self.second_pass_radius_arcsec}")
        if sorted(self.band_merge_order) != sorted(_CATALOG_BANDS):
            raise ValueError(f"band_merge_order must be a permutation of {_CATALOG_BANDS}, got "
                             f"{self.band_merge_order}")
        if self.detection_band not in _CATALOG_BANDS:
            raise ValueError(f"detection_band must be one of {_CATALOG_BANDS}, "
                             f"got {self.detection_band!r}")
        if not 0 < self.flags_max <= 256:
            raise ValueError(f"flags_max must be in (0, 256], got {self.flags_max}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if bool(self.sfd_ngp) != bool(self.sfd_sgp):
            raise ValueError("sfd_ngp and sfd_sgp must both be set or both be empty")


# --- staging: tile catalogs -> one Arrow file of float64 columns -----------------------------


#: Export formats of the release catalogs, in the order they are written.
EXPORT_FORMATS = ("parquet", "fits", "votable", "csv", "vizier")


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    """Settings of the catalog exports (``[export]``)."""

    chunk_rows: int = documented("Rows read and written at a time.", default=200_000)
    part_rows: int = documented(
        "Rows per file of the formats written in parts (VOTable, VizieR).", default=500_000)
    title: str = documented(
        "Title of the VizieR ReadMe.",
        default="KMTNet Synoptic Survey of the Southern Sky (KS4) first data release catalogs")
    author: str = documented("First author of the VizieR ReadMe.", default="KS4 team")
    release_name: str = documented("Release name written into the file metadata.",
                                   default="ks4-dr1")
    formats: tuple[str, ...] = documented(
        "Formats written by build dr1: parquet, fits, votable (BINARY2 with UCDs), csv (with "
        "the TAP_SCHEMA SQL for Data Lab) and vizier (CDS ReadMe bundle).",
        default=EXPORT_FORMATS)
    check: bool = documented(
        "Run the schema checker on every exported file and write READY only if all pass "
        "(off only to time the writers alone).", default=True)

    def __post_init__(self) -> None:
        for name in ("chunk_rows", "part_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.part_rows < self.chunk_rows:
            raise ValueError("part_rows must be >= chunk_rows")
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown or not self.formats:
            raise ValueError("formats must be a non-empty list among "
                             f"{', '.join(EXPORT_FORMATS)}, got {list(self.formats)}")


#: Fixed apertures MAG_AUTO's bias may be measured against.
_BIAS_APERTURES = ("aper3", "aper5", "aper10")


@dataclass(frozen=True, kw_only=True)
class PostprocessSettings:
    """``[postprocess]``: spurious-source cleaning, coverage columns, MAG_AUTO bias correction."""

    match_radius_arcsec: float = documented(
        "Radius of the cross-match with the reference catalogs; detections without a "
        "counterpart within it are spurious candidates, arcsec (DR1: 1.1).", default=1.1)
    dbscan_eps_deg: float = documented(
        "DBSCAN eps on the unmatched detections, deg of great circle (DR1: 0.03, unit not "
        "stated; read as degrees, see the module documentation).", default=0.03)
    dbscan_min_samples: int = documented(
        "DBSCAN min_samples, the point itself included (DR1: 2, i.e. one unmatched neighbour "
        "within eps makes a cluster).", default=2)
    sscount_radius_arcsec: float = documented(
        "Radius within which removed spurious sources are counted (SSCOUNT_30), arcsec "
        "(DR1: 30).", default=30.0)
    boundary_pad_px: float = documented(
        "The tile boundary is the extent of the initial catalog plus this margin; reference "
        "sources outside it are ignored, co-add px (DR1: 3).", default=3.0)
    pixel_scale_arcsec: float = documented(
        "Co-add pixel scale used to turn boundary_pad_px into an angle, arcsec/px (DR1: 0.4).",
        default=0.4)
    remove_spurious: bool = documented(
        "Remove the detections flagged as spurious from the catalog (DR1 does); false keeps "
        "them with ssflag = 1 for inspection.", default=True)
    propagate_proper_motion: bool = documented(
        "Move the reference stars with a proper motion from their catalog epoch (Gaia: 2016.0) "
        "to the co-add's mean epoch (header MJD-MEAN) before the spurious-source and "
        "point-source matches (DR1: no). On the demo, 4 years after 2016.0, the cleaning "
        "removed 3-5 real sources per band (B, V, R) without it, 1-3 with it.", default=True)
    edge_px: float = documented(
        "Sources within this distance of the co-add border or of the end of the exposure "
        "coverage are flagged EDGE and get NDITH = 1 (DR1 gives no distance; our default), "
        "co-add px.", default=10.0)
    bias_aperture: str = documented(
        "Fixed aperture MAG_AUTO is compared with for the bias correction: aper3, aper5 or "
        "aper10 (DR1 does not say; ours: aper10, which gave the smallest residual bias against "
        "truth on the demo, see the module documentation).", default="aper10")
    bias_reference: str = documented(
        "Reference catalog whose point sources make the calibration sample of the MAG_AUTO "
        "bias curve: gaia_xp as DR1 (G < 17.65, bright where MAG_AUTO's bias is small) or "
        "gaia_dr3 (to G ~ 21, where the Kron aperture of faint sources loses more light; our "
        "default).", default="gaia_dr3")
    bias_match_radius_arcsec: float = documented(
        "Radius of the match with Gaia XP (calibration sample) and Gaia DR3 (objects the "
        "correction is applied to), arcsec (our default).", default=1.0)
    bias_class_star_min: float = documented(
        "Least CLASS_STAR of a calibration star (DR1's value is not legible; our default).",
        default=0.9)
    bias_flags_max: int = documented(
        "Largest FLAGS of a calibration star (DR1's value is not legible; 0 = clean).",
        default=0)
    bias_isolation_arcsec: float = documented(
        "A calibration star has no other detection within this radius, arcsec (DR1: 5).",
        default=5.0)
    bias_max_aperture_err: float = documented(
        "Largest error of a calibration star's MAG_APER (bias_aperture), mag; 0 = no limit. "
        "The curve is against the fixed aperture, which at low S/N carries the background's "
        "error (a co-add sky 0.05 sigma off moves a 10\" aperture by ~1.1 / (its S/N) mag): "
        "faint nodes would pass that error on to MAG_AUTO instead of correcting it. Beyond "
        "the last node the curve holds its value and the Kron loss correction carries the "
        "magnitude dependence. On the demo survey with 5 times the stars (S/N > 20 stars, "
        "16 band/mode/selection cells, 0.5-mag bins from 19.5 mag) the mean median(MAG_AUTO "
        "- true) went from +0.010 (no limit) to +0.004 (0.02) and +0.006 (0.01), and the bins "
        "beyond 0.005 mag plus twice their standard error from 18 to 11 and 17.",
        default=0.02)
    bias_bin_min_mag: float = documented(
        "Narrowest magnitude bin of the correction curve, mag (DR1: 0.125).", default=0.125)
    bias_bin_max_mag: float = documented(
        "Widest magnitude bin of the correction curve, mag (DR1: 0.25).", default=0.25)
    bias_bin_stars: int = documented(
        "Stars that close a bin once it is at least bias_bin_min_mag wide; a bin that reaches "
        "bias_bin_max_mag with fewer than bias_bin_min_stars stars gives no node (our default).",
        default=20)
    bias_bin_min_stars: int = documented(
        "Fewest stars of a bin that gives a node of the curve (its median), our default.",
        default=3)
    bias_min_stars: int = documented(
        "Fewest calibration stars for a correction; below it MAG_AUTO is left as it is and the "
        "reason is logged (our default).", default=10)
    bias_min_nodes: int = documented(
        "Fewest curve nodes (bins) for a correction (our default).", default=2)
    bias_apply_class_star_min: float = documented(
        "Least CLASS_STAR of a source without a Gaia counterpart whose MAG_AUTO gets the "
        "point-source corrections (Kron loss, bias curve). DR1: 'high-confidence point "
        "sources', no value given. Ours: 0.5, the usual star/galaxy split. On the demo (point "
        "sources of S/N > 20 in 16 band/mode/selection cells) the 0.5-mag bins whose median "
        "MAG_AUTO - true exceeds 0.005 mag + 2 standard errors were 17 at 0.95, 12 at 0.8 and 10 "
        "at 0.5, and the worst I bin went from 0.066 to 0.026 mag. The 5-12 galaxies per band "
        "with CLASS_STAR from 0.5 to 0.95 came 0.01-0.02 mag closer to truth, because MAG_AUTO "
        "misses part of their light too.", default=0.5)
    kron_loss_correction: bool = documented(
        "Before DR1's empirical curve, correct the point sources' MAG_AUTO for the PSF light "
        "outside their own Kron ellipse relative to the bright stars that set the AUTO zero "
        "point (the ellipse shrinks at low S/N: on the demo +0.02 to +0.08 mag at 20-23 mag "
        "otherwise). Ours; DR1 has only the curve.", default=True)
    kron_loss_compact: bool = documented(
        "Give the Kron loss correction also to sources that are not point sources by "
        "bias_apply_class_star_min when their Kron ellipse holds less of the PSF's light than "
        "the bright stars' ellipses (an ellipse shrunk at low S/N: such a source misses at "
        "least what a point source would). At S/N 20-60 CLASS_STAR puts 19-28% of the "
        "isolated stars of the demo with 5 times the stars below 0.5; stars of S/N 10-40 "
        "(measured) so misclassified came out +0.013 to +0.054 mag faint without this, -0.016 "
        "to +0.011 with it, and faint galaxies of CLASS_STAR < 0.5 moved 0.00-0.01 closer to "
        "the truth (most have larger ellipses and are not touched).", default=True)
    kron_psf_beta: float = documented(
        "Moffat index of the PSF model of the Kron loss correction when the co-add header has "
        "no usable PSFBETA (the median index the co-add stage fits to its stars).", default=3.0)
    kron_reference_snr: float = documented(
        "Least S/N of the bright point sources whose median Kron light fraction is the "
        "reference of the Kron loss correction.", default=100.0)
    astrometric_floor_snr_min: float = documented(
        "Least S/N of the Gaia stars (FLAGS = 0, within 0.5 arcsec) that measure the co-add's "
        "astrometric floor, the error added to RAERR/DECERR in quadrature (ours; the "
        "windowed-centroid errors count the pixel noise only).", default=50.0)
    astrometric_floor_min_stars: int = documented(
        "Fewest such stars for a floor; with fewer, none is added and the summary says why.",
        default=10)

    def __post_init__(self) -> None:
        for name in ("match_radius_arcsec", "dbscan_eps_deg", "sscount_radius_arcsec",
                     "pixel_scale_arcsec", "bias_match_radius_arcsec", "bias_bin_min_mag",
                     "bias_bin_max_mag"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("boundary_pad_px", "edge_px", "bias_isolation_arcsec", "bias_flags_max",
                     "bias_max_aperture_err",
                     "astrometric_floor_snr_min"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dbscan_min_samples", "bias_bin_stars", "bias_bin_min_stars",
                     "bias_min_stars", "bias_min_nodes", "astrometric_floor_min_stars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kron_psf_beta", "kron_reference_snr"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)}")
        for name in ("bias_class_star_min", "bias_apply_class_star_min"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.bias_bin_max_mag < self.bias_bin_min_mag:
            raise ValueError(f"bias_bin_max_mag ({self.bias_bin_max_mag}) must be >= "
                             f"bias_bin_min_mag ({self.bias_bin_min_mag})")
        if self.bias_reference not in ("gaia_xp", "gaia_dr3"):
            raise ValueError("bias_reference must be gaia_xp or gaia_dr3, got "
                             f"{self.bias_reference!r}")
        if self.bias_aperture not in _BIAS_APERTURES:
            raise ValueError(f"bias_aperture must be one of {', '.join(_BIAS_APERTURES)}, "
                             f"got {self.bias_aperture!r}")


@dataclass(frozen=True, kw_only=True)
class PhotometrySettings:
    """``[photometry]``: detection and measurement on the co-adds (numbers DR1 does not state
    are our documented defaults)."""

    detect_thresh_sigma: float = documented(
        "Detection threshold in units of the background RMS (DETECT_THRESH; DR1: not stated, "
        "'low'). On the demo co-adds 1.3 finds >= 98% of the isolated point sources and >= 93% "
        "of the isolated galaxies of true S/N >= 10 in B, V, R and I, with 3-11% of the "
        "detections noise peaks matching no true source; 1.5 loses 3-5% of the galaxies, 1.2 "
        "doubles the noise peaks.", default=1.3)
    min_area_px: int = documented("DETECT_MINAREA, pixels (DR1: 9).", default=9)
    deblend_nthresh: int = documented("DEBLEND_NTHRESH (DR1: 32).", default=32)
    deblend_cont: float = documented("DEBLEND_MINCONT (DR1: 0.00005).", default=0.00005)
    deblend_twin_fwhm: float = documented(
        "Deblended pieces of one blend whose centres end closer than this many times the "
        "co-add's SEEING are one source (kept: the brightest, with the others' footprint). "
        "A noiseless image of two equal point sources shows two peaks only beyond 0.85 FWHM, "
        "so pieces this close are noise splitting a faint galaxy: on a 1/8-scale survey "
        "every detection pair closer than 1.0\" was two pieces of one true source (58 pairs; "
        "9 left with 0.5), while the detections of real pairs came no closer than 1.18\". "
        "Ours (DR1's SExtractor keeps them); 0: only pieces within 0.5 px of each other.",
        default=0.5)
    deblend_dip_sigma: float = documented(
        "Deblended pieces of one blend whose footprints touch, whose centres end closer than "
        "deblend_dip_fwhm times the co-add's SEEING, and between which the filtered image "
        "dips below the fainter piece's filtered peak by less than this many times its noise "
        "there, are one source: the data do not show two sources (DEBLEND_MINCONT 0.00005 "
        "splits faint galaxies on noise peaks, and a galaxy split in one tile but not in its "
        "neighbour is listed twice in the master catalogs). Of the touching pieces 0.5-1.0 "
        "SEEING apart on a 1/8-scale survey, 27 of 76 pairs on one true source dip by less "
        "than 1 sigma and 1 of 17 pairs on two (true sources 2.3\" apart, their detections "
        "1.2\"); 1.5 sigma would join 56 and 6. Ours, not DR1's; 0: off.", default=1.0)
    deblend_dip_fwhm: float = documented(
        "Farthest centres, in units of the co-add's SEEING, of two pieces that "
        "deblend_dip_sigma may join.", default=1.0)
    halo_detection: bool = documented(
        "Detect again in the footprint of each saturated star with its fitted Moffat wings "
        "subtracted (ks4release.reduction.halo_detection): DEBLEND_MINCONT takes its fraction "
        "of the whole blend's flux, so faint sources on a saturated star's wings stay its "
        "pixels. Ours, not DR1's.", default=True)
    halo_min_radius_fwhm: float = documented(
        "A halo detection counts beyond this many times the co-add's SEEING from the star's "
        "centre, where the fitted profile follows the star's.", default=3.0)
    halo_max_profile_sigma: float = documented(
        "A halo detection counts where the subtracted profile is below this many times the "
        "background RMS (the profile's error grows with it).", default=20.0)
    halo_min_peak_ratio: float = documented(
        "A halo detection counts when its peak over the subtracted profile exceeds this "
        "fraction of the profile there.", default=0.5)
    clean: bool = documented("CLEAN: remove spurious detections in the wings of bright ones.",
                             default=True)
    clean_param: float = documented(
        "CLEAN_PARAM: Moffat index of the wings CLEAN credits a detection with (kmtnet.sex: "
        "1.0); used when clean_beta_from_psf is off or the co-add has no PSFBETA.", default=1.0)
    clean_beta_from_psf: bool = documented(
        "CLEAN_PARAM from the co-add's measured PSFBETA (its stars' Moffat index): with 1.0 "
        "a bright star's 1/r^2 wings explain away faint real neighbours far beyond its true "
        "wings.", default=True)
    back_size_px: int = documented("BACK_SIZE: background mesh, pixels (kmtnet.sex: 256).",
                                   default=256)
    back_filter_size: int = documented("BACK_FILTERSIZE: median filter of the mesh, meshes.",
                                       default=3)
    coverage_rms: bool = documented(
        "Scale the background RMS map by the noise measured at each NDITH value "
        "(:func:`coverage_noise_factors`), so that detection thresholds and errors follow the "
        "co-add's noise where fewer exposures entered the median (SExtractor's weight map; "
        "kmtnet.sex has WEIGHT_TYPE NONE, so DR1 did not). Ours. On the demo the pixels of "
        "NDITH 1 (2-13% of a co-add's data) are 1.4-1.8 times noisier than the 256-px mesh says, "
        "those of the most common NDITH 0.85-0.90 times; with the factors the detections "
        "matching no true source fell from 142/235/383/142 to 84/145/246/110 (B/V/R/I) and the "
        "completeness at true S/N >= 10 rose by 1-2 sources per band.", default=True)
    background_mask_sigma: float = documented(
        "Sources above this many sigma (grown by background_grow_px) are masked and the "
        "background mesh measured again; 0 = one pass, as SExtractor and DR1. The sources' "
        "wings lift a one-pass mesh, and subtracting it takes most from the largest apertures "
        "and the faintest sources: the sky between the demo's sources sat 0.05-0.2 ADU below "
        "zero, 0.3-0.5 ADU with 5 times the stars, where 3 cuts the 0.5-mag bins of "
        "MAG_AUTO/APER5 - true off by more than 0.005 + 2 standard errors from 75 to 20 and "
        "halves the faint-end bias (R isolated stars, MAG_AUTO at R 21-21.5: +0.070 -> "
        "+0.031). On the demo itself CLASS_STAR accuracy is unchanged (V dual 0.966 -> 0.967) "
        "and the spurious cleaning removes 104 of 114 unmatched I detections instead of 97 of "
        "110. Parity with SExtractor needs 0.", default=3.0)
    background_grow_px: int = documented(
        "Pixels by which the masked sources' footprints are grown (see "
        "background_mask_sigma).", default=4)
    background_mask_wings: float = documented(
        "With background_mask_sigma: also mask a disc of this many times each masked source's "
        "footprint radius (sqrt(npix / pi)) over the wings (mostly galaxies') that still lift "
        "the mesh; 0 = only the grown footprints. Ours. The sky between the true sources of "
        "the demo's 16 co-adds sat 0.07-0.39 ADU below zero, 0.02-0.21 with 3 (4 masks no "
        "better); on the 1/4-scale survey, whose 3,000-3,800 isolated point sources per band "
        "show it, the median MAG_APER5 - true of the S/N 30-55 bins fell from +0.005..+0.011 "
        "to +0.002..+0.006 mag (every S/N 20-60 bin by 0.002-0.008), with completeness and "
        "spurious cleaning unchanged within 0.015.", default=3.0)
    backphoto_type: str = documented(
        "BACKPHOTO_TYPE: GLOBAL, the fluxes stand on the background mesh; LOCAL (kmtnet.sex), "
        "each object's fluxes also lose its aperture's area times the level measured in a "
        "rectangular annulus around it, as SExtractor does "
        "(ks4release.reduction.local_background). On the demo, against truth, LOCAL moved the "
        "median MAG - true of point sources of S/N > 20 from -0.0017 to +0.0001 mag (mean of "
        "the 32 band/mode/aperture/selection entries) but added the annulus's noise: the mean "
        "|median| of the 0.5-mag bins went from 0.0071 to 0.0087 mag and the I APER5 ZP map "
        "from 0.0036 to 0.0049 mag RMS off the injected pattern; completeness, spurious "
        "cleaning and CLASS_STAR as with GLOBAL. Hence GLOBAL over a mesh measured without "
        "the sources (background_mask_sigma), not DR1's LOCAL.", default="GLOBAL")
    backphoto_thick_px: int = documented(
        "BACKPHOTO_THICK: width of the LOCAL annulus, pixels (kmtnet.sex: 24).", default=24)
    kron_factor: float = documented("PHOT_AUTOPARAMS Kron factor (DR1: 2.5).", default=2.5)
    kron_min_radius: float = documented("PHOT_AUTOPARAMS minimum radius, units of A/B (3.5).",
                                        default=3.5)
    gain_e_per_adu: float = documented(
        "Effective gain of a co-add, e-/ADU, for the Poisson term of the flux errors when the "
        "co-add header has no GAIN; 0 = no Poisson term (background noise only, SExtractor's "
        "GAIN = 0).", default=0.0)
    bad_bits: int = documented(
        "Co-add mask bits whose pixels are treated as missing (interpolated or masked) besides "
        "the pixels without data; 0: the co-add mask is the OR of the inputs' bits, which the "
        "median mostly rejected, so it only flags (IMAFLAGS_ISO).", default=0)
    interp_max_gap_px: int = documented(
        "Missing pixels in runs up to this long along a row are interpolated (MASK_TYPE "
        "CORRECT-like); longer runs stay masked.", default=16)
    saturation_bits: int = documented(
        "Co-add mask bits that mark saturation for FLAGS bit 4 (DR1 bit 2: bleed trails and "
        "saturated cores).", default=2)
    saturation_core_px: int = documented(
        "FLAGS bit 4 looks for saturation_bits within this many pixels of the peak.", default=2)
    crowding_fraction: float = documented(
        "FLAGS bit 1 when more than this fraction of the Kron ellipse's pixels belong to other "
        "objects or are masked (SExtractor: 0.1).", default=0.1)
    pixel_stack: int = documented(
        "Largest sep extraction pixel stack (sep.set_extract_pixstack; never more than the "
        "image's pixel count): pixels of all objects open at once during the scan "
        "(kmtnet.sex: 3000000; sep allocates it up front).",
        default=3_000_000)
    nnw_path: str = documented(
        "SExtractor neural-network weights (.nnw) of CLASS_STAR; Debian's source-extractor "
        "installs SExtractor's default.nnw, the network DR1 used (kmtnet.nnw).",
        default="/usr/share/source-extractor/default.nnw")
    local_seeing: bool = documented(
        "CLASS_STAR's SEEING_FWHM per object from the exposures whose data made it (a seeing "
        "map: the co-add's SEEING scaled by the PSF of those exposures' median, each "
        "exposure's PSF as measured on it, as SExtractor users run each region with its own "
        "SEEING_FWHM) instead of the co-add's SEEING everywhere.", default=True)
    dual_own_isophotes: bool = documented(
        "Dual mode: CLASS_STAR of a forced band from the band's own isophotes (its own "
        "detection's segment, when that segment holds the object alone) instead of "
        "SExtractor's counting inside the detection band's footprint, which cuts the outer "
        "isophotes of galaxies larger in the band than in I.", default=True)
    neighbour_model: bool = documented(
        "Take the other detections' light out of each source's Kron and aperture fluxes and "
        "the sources' light out of the background mesh, from a Moffat model of every "
        "detection (ks4release.reduction.neighbour_model; ours, not DR1's: false measures as "
        "DR1 did). Faint sources near brighter ones read too bright without it, the others "
        "too faint (the mesh sits above the bare sky). On the 1/4-scale survey the 0.5-mag "
        "bins of MAG_AUTO and MAG_APER5 - true of point sources of S/N > 20 beyond 0.005 mag "
        "by more than twice their standard error went from 5 of 236 to 1 (B 22-22.5 "
        "MAG_APER5 -0.018 -> -0.010), at about 20% more photometry time. With backphoto_type "
        "LOCAL the annulus levels stand instead and the model is not applied.", default=True)
    stack_flux_correction: bool = documented(
        "Divide the Kron and aperture fluxes of point-like detections (CLASS_STAR >= "
        "stack_flux_class_star_min) by the share of a point source's flux such an aperture "
        "holds on the median of the exposures that covered it, at its flux over the co-add's "
        "noise, relative to a bright star's (a median of exposures of different seeing keeps "
        "a different fraction of a faint star's flux in an aperture than of a bright one's; "
        "ks4release.reduction.median_stack). DR1: not corrected.", default=True)
    stack_flux_class_star_min: float = documented(
        "Smallest CLASS_STAR of the detections stack_flux_correction treats as point sources "
        "(the bias correction's bias_apply_class_star_min by default).", default=0.5)
    seeing_min_snr: float = documented(
        "Smallest S/N (snr) of the detections whose coverage sets the typical PSF of the "
        "seeing map.",
        default=50.0)
    seeing_min_sources: int = documented(
        "Fewest such detections for a seeing map; fewer: the co-add's SEEING everywhere.",
        default=10)
    block_size_px: int = documented(
        "A co-add with a side longer than this is measured in blocks of at most this many "
        "pixels a side (rounded up to whole background meshes), each grown by "
        "block_margin_px, so that the memory follows the block, not the co-add (about 41 "
        "bytes a pixel of a block for one band; ks4release.reduction.photometry_blocks). Ours; "
        "the demo's co-adds are measured whole.", default=4096)
    block_margin_px: int = documented(
        "Pixels by which each block reaches beyond the part of the co-add it answers for "
        "(rounded up to whole background meshes): objects whose footprint fits in it are "
        "measured as on the whole co-add; larger ones carry FLAGS bit 8. The background mesh "
        "feels a block's edge about two meshes in: with 3 meshes (768 px) a 4096^2 co-add "
        "measured in 2048-px blocks gave a catalog as close to the whole co-add's as adding "
        "+-0.001 ADU of noise to it does (2 meshes: 3 times the MAG_AUTO changes above 0.001 "
        "mag among clean S/N > 20 sources).", default=768)
    auto_noise_runs: int = documented(
        "Grids of artificial stars injected into each co-add to calibrate the noise bias of "
        "faint point sources' MAG_AUTO, which the catalogs then remove "
        "(reduction/artificial_stars.py: their Kron ellipses are drawn by the noise they "
        "sum; on the demo injected stars read 0.017-0.040 mag too bright at S/N 10-20 after "
        "the Kron loss correction). About 300 stars per grid on a demo co-add; 0: no "
        "calibration, MAG_AUTO as measured. Ours, not DR1's.", default=2)
    auto_noise_region_px: int = documented(
        "Side of the central square of each co-add that the artificial stars go into (the "
        "whole co-add when it is smaller).", default=2048)
    auto_noise_seed: int = documented(
        "Seed of the artificial stars' positions and fluxes (with each co-add's tile and "
        "band), so that a rebuild gives the same calibration.", default=1)

    def __post_init__(self) -> None:
        for name in ("detect_thresh_sigma", "deblend_cont", "clean_param", "kron_factor",
                     "kron_min_radius", "crowding_fraction", "seeing_min_snr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_area_px", "deblend_nthresh", "back_size_px", "back_filter_size",
                     "interp_max_gap_px", "pixel_stack", "seeing_min_sources",
                     "block_size_px", "auto_noise_region_px", "backphoto_thick_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gain_e_per_adu < 0:
            raise ValueError(f"gain_e_per_adu must be >= 0, got {self.gain_e_per_adu}")
        if self.backphoto_type not in BACKPHOTO_TYPES:
            raise ValueError(f"backphoto_type must be one of {BACKPHOTO_TYPES}, got "
                             f"{self.backphoto_type!r}")
        for name in ("saturation_core_px", "background_mask_sigma", "background_grow_px",
                     "background_mask_wings", "block_margin_px", "deblend_twin_fwhm",
                     "deblend_dip_sigma", "deblend_dip_fwhm", "auto_noise_runs",
                     "halo_min_radius_fwhm", "halo_max_profile_sigma",
                     "halo_min_peak_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("bad_bits", "saturation_bits"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"{name} must be a bit mask in [0, 255], got "
                                 f"{getattr(self, name)}")
        if self.deblend_cont > 1:
            raise ValueError(f"deblend_cont must be <= 1, got {self.deblend_cont}")
        if not 0.0 <= self.stack_flux_class_star_min <= 1.0:
            raise ValueError("stack_flux_class_star_min must be in [0, 1], got "
                             f"{self.stack_flux_class_star_min}")


@dataclass(frozen=True, kw_only=True)
class MapSettings:
    """``[maps]``: how the zero-point and alignment maps are measured."""

    match_radius_arcsec: float = documented(
        "Largest separation of a detection from its Gaia XP star for the ZP map, arcsec (ours; "
        "the toolkit matches at 2\" and then cuts at max(0.5\", local alignment)).",
        default=1.0)
    align_match_radius_arcsec: float = documented(
        "Largest separation of a detection from its Gaia DR3 star for the alignment map, arcsec "
        "(the toolkit's 2\").",
        default=2.0)
    class_star_min: float = documented(
        "Stars used have class_star above this (DR1: 0.8).", default=0.8)
    star_mask_bits_allowed: int = documented(
        "IMAFLAGS_ISO bits a map star may carry (DR1: 0, none). 1 (ours) lets in stars whose "
        "footprint holds an exposure's cosmic-ray or crosstalk pixels, which stayed out of "
        "the median co-add: on the demo they sit 0.0005 mag from the other stars' zero point "
        "with a scatter of 0.017 mag against 0.014, and add 45% to the stars of a tile.",
        default=1)
    ref_mag_min: float = documented(
        "Brightest Gaia XP reference magnitude used, AB mag (DR1: 14).", default=14.0)
    ref_mag_max: float = documented(
        "Faintest Gaia XP reference magnitude used, AB mag (DR1: 19).", default=19.0)
    require_xp_flag: bool = documented(
        "Use only Gaia XP stars whose {band}_jkc_flag is 1 (the toolkit keeps flag == 1).",
        default=True)
    clip_sigma: float = documented(
        "Clipping threshold of a bin's zero points, in standard deviations around the median, "
        "iterated until nothing changes (DR1: 2).",
        default=2.0)
    zp_window_bins: float = documented(
        "Side of the square window, in bins, centred on a ZP-map bin, whose stars give the "
        "bin's value: 1 = DR1's rule (the bin's own stars); wider smooths the map for sparse "
        "reference stars (see the module docstring).",
        default=1.0)
    zp_shrinkage: bool = documented(
        "Pull each ZP-map bin's median toward the tile-wide zero point by the share of the "
        "bins' spread that their star counts explain as noise (empirical Bayes; the spatial "
        "variance is estimated from the tile's bins). False = DR1's plain per-bin median.",
        default=True)
    local_aperture_correction: bool = documented(
        "Take each Gaia XP star's aperture loss under its own PSF (the photometry's psf_fwhm, "
        "a Moffat of the co-add's PSFBETA) out of the 3/5/10\" zero points, so the maps hold "
        "for the co-add's SEEING, and give it back to every source by its own PSF when "
        "calibrating. False = DR1's maps, whose values mix the zero point with the local PSF.",
        default=True)
    site_colour_correction: bool = documented(
        "Take each site's colour term out of every source before the ZP maps are measured and "
        "applied (ours; reduction/site_colour.py): the mean over the exposures covering the "
        "source of their flux factors 10**(0.4 colour_term ((V-I) - pivot)), with the source's "
        "(V-I) from the dual-mode table. False = DR1's catalogs, whose co-adds mix the sites' "
        "photometric systems.",
        default=True)
    colour_match_arcsec: float = documented(
        "Largest separation of a single-mode detection from the dual-mode detection whose "
        "(V-I) it takes for the site colour correction, arcsec.",
        default=1.0)
    colour_min_snr: float = documented(
        "Least S/N of the 5\" aperture in V and in I for a (V-I) used by the site colour "
        "correction; sources below it are not corrected.",
        default=5.0)
    colour_min: float = documented(
        "Bluest (V-I)_AB the site colour correction uses, mag (bluer colours are clipped).",
        default=-0.5)
    colour_max: float = documented(
        "Reddest (V-I)_AB the site colour correction uses, mag (redder colours are clipped).",
        default=4.0)
    align_window_bins: float = documented(
        "Side of the square window, in bins, centred on an alignment-map bin, whose stars give "
        "the bin's value (the toolkit: 1000 px around 200 px bins = 5).",
        default=5.0)
    align_gaia_g_min: float = documented(
        "Brightest Gaia G of the alignment stars, mag (the toolkit: 14).", default=14.0)
    align_gaia_g_max: float = documented(
        "Faintest Gaia G of the alignment stars, mag (the toolkit: 20).", default=20.0)
    align_snr_min: float = documented(
        "Least flux_auto / fluxerr_auto of the alignment stars (the toolkit's MAGERR_AUTO < "
        "0.05 is S/N > 21.7).",
        default=21.7)

    def __post_init__(self) -> None:
        for name in ("match_radius_arcsec", "align_match_radius_arcsec", "clip_sigma",
                     "colour_match_arcsec"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("zp_window_bins", "align_window_bins"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.class_star_min < 1.0:
            raise ValueError(f"class_star_min must be in [0, 1), got {self.class_star_min}")
        if not 0 <= self.star_mask_bits_allowed <= 255:
            raise ValueError(f"star_mask_bits_allowed must be a mask of bits in 0-255, got "
                             f"{self.star_mask_bits_allowed}")
        if not self.ref_mag_min < self.ref_mag_max:
            raise ValueError(f"ref_mag_min must be < ref_mag_max, got {self.ref_mag_min} and "
                             f"{self.ref_mag_max}")
        if not self.align_gaia_g_min < self.align_gaia_g_max:
            raise ValueError(f"align_gaia_g_min must be < align_gaia_g_max, got "
                             f"{self.align_gaia_g_min} and {self.align_gaia_g_max}")
        if not self.align_snr_min >= 0:
            raise ValueError(f"align_snr_min must be >= 0, got {self.align_snr_min}")
        if not self.colour_min_snr >= 0:
            raise ValueError(f"colour_min_snr must be >= 0, got {self.colour_min_snr}")
        if not self.colour_min < self.colour_max:
            raise ValueError(f"colour_min must be < colour_max, got {self.colour_min} and "
                             f"{self.colour_max}")
