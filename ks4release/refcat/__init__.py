"""Reference catalogs (Gaia DR3, Gaia XP, DELVE DR2) for calibration and validation.

Sources: local Parquet/FITS files (the demo survey), TAP services through pyvo (ESA Gaia
archive, NOIRLab Astro Data Lab) and VizieR through astroquery, the latter two cached per
HEALPix cell with an offline mode. The entry point is :func:`fetch_region`::

    from ks4release.refcat import Region, fetch_region
    region = Region.from_tile(tile, camera, margin_deg=config.refcat.tile_margin_deg)
    table = fetch_region("gaia_xp", region, config)
"""

from ks4release.refcat.adql import TAP_TABLES, build_cell_query
from ks4release.refcat.cache import CellEntry, RefcatCache
from ks4release.refcat.exceptions import (
    RefcatError,
    RefcatOfflineError,
    RefcatOverflowError,
    RefcatServiceError,
)
from ks4release.refcat.fetch import (
    DEFAULT_TAP_URLS,
    FetchStats,
    fetch_region,
    service_url,
)
from ks4release.refcat.formats import (
    DELVE_DR2,
    GAIA_DR3,
    GAIA_XP,
    REFCAT_FORMATS,
    RefcatFormat,
    RefColumn,
    conform_table,
    read_refcat,
    refcat_format,
)
from ks4release.refcat.propagate import GAIA_DR3_EPOCH, epoch_position_error, propagate_positions
from ks4release.refcat.region import (
    BoxRegion,
    CellBounds,
    ConeRegion,
    MocRegion,
    Region,
    cell_bounds,
    cell_of,
)
from ks4release.refcat.tap import QueryLimits, tap_query
from ks4release.refcat.vizier import DEFAULT_VIZIER_URL, VIZIER_TABLES, vizier_query

__all__ = [
    "BoxRegion",
    "CellBounds",
    "CellEntry",
    "ConeRegion",
    "DEFAULT_TAP_URLS",
    "DEFAULT_VIZIER_URL",
    "DELVE_DR2",
    "FetchStats",
    "GAIA_DR3",
    "GAIA_DR3_EPOCH",
    "GAIA_XP",
    "MocRegion",
    "QueryLimits",
    "REFCAT_FORMATS",
    "RefColumn",
    "Region",
    "RefcatCache",
    "RefcatError",
    "RefcatFormat",
    "RefcatOfflineError",
    "RefcatOverflowError",
    "RefcatServiceError",
    "TAP_TABLES",
    "VIZIER_TABLES",
    "build_cell_query",
    "cell_bounds",
    "cell_of",
    "conform_table",
    "fetch_region",
    "epoch_position_error",
    "propagate_positions",
    "read_refcat",
    "refcat_format",
    "service_url",
    "tap_query",
    "vizier_query",
]
