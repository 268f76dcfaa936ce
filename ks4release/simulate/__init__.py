"""Simulated KS4 survey with known truth: the embedded demo of ``ks4release build dr1``.

A mini-survey in exactly the pipeline's input formats, deterministic by seed: 2 x 2 real
adjacent KS4 tiles x B V R I around tile 0000.000-62, CCDs shrunk by ``scale`` (1/16 by
default) while pixel scale and seeing stay real. See :class:`SimulationConfig` for every
default and :mod:`ks4release.simulate.masks` for the truth-mask bits.

Output layout (``simulate_survey(cfg, out)``)::

    out/release.toml                           the release configuration (ks4release.config)
    out/raw/<tile>/<band>/<tile>_<band>_NN.fits  raw exposures, 4 CCD extensions KK MM NN TT
    out/refcat/gaia_dr3.parquet, gaia_xp.parquet, delve_dr2.parquet
    out/truth/sources.parquet, exposures.parquet, zeropoints.parquet   (never read by the pipeline)
    out/truth/masks/<stem>_mask.fits           injected-artifact masks, true TAN-SIP WCS

Modules: ``arguments`` (configuration), ``plan`` (which exposures), ``sky`` (true sources),
``astrometry`` (true and header WCS), ``render`` (pixels of one exposure), ``artifacts``
(defects), ``refcat`` (reference catalogs), ``headers`` (FITS cards), ``masks`` (bits),
``writer`` (files).
"""

from ks4release.simulate.arguments import DEMO_ANCHOR_TILE, DEMO_SCALE, SimulationConfig
from ks4release.simulate.masks import DR1_BITS, MaskBit, mask_bit_descriptions
from ks4release.simulate.plan import ExposurePlan, SurveyPlan, demo_tiles, plan_survey
from ks4release.simulate.refcat import VEGA_FLUX_W_M2_NM, VEGA_TO_AB
from ks4release.simulate.render import amp_zeropoints, ccd_true_wcs, render_exposure
from ks4release.simulate.sky import (
    GAIA_EPOCH_MJD,
    make_sources,
    positions_at,
    stellar_locus,
)
from ks4release.simulate.writer import (
    SOURCES_PATH,
    mask_path,
    simulate_survey,
    write_exposure,
    write_reference_catalogs,
    write_release_config,
    write_sky,
    write_truth_tables,
)

__all__ = [
    "DEMO_ANCHOR_TILE",
    "DEMO_SCALE",
    "DR1_BITS",
    "GAIA_EPOCH_MJD",
    "SOURCES_PATH",
    "VEGA_FLUX_W_M2_NM",
    "VEGA_TO_AB",
    "ExposurePlan",
    "MaskBit",
    "SimulationConfig",
    "SurveyPlan",
    "amp_zeropoints",
    "ccd_true_wcs",
    "demo_tiles",
    "make_sources",
    "mask_bit_descriptions",
    "mask_path",
    "plan_survey",
    "positions_at",
    "render_exposure",
    "simulate_survey",
    "stellar_locus",
    "write_exposure",
    "write_reference_catalogs",
    "write_release_config",
    "write_sky",
    "write_truth_tables",
]
