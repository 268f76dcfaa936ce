"""The layout of a release directory: where every stage reads and writes.

Stages talk through files; this module is the one place that names them, so that a stage, its
tests and the stages after it agree. Every function takes the release directory first.

::

    <release>/release.toml, logs/
    <release>/work/ingest/<stem>.json                      validated exposure summary
    <release>/work/<tile>/<band>/inventory.ecsv            exposures of a tile and band
    <release>/work/refcat/<tile>_<catalog>.parquet         reference sources of a tile
    <release>/work/masks/<stem>_mask.fits                  DR1 bad-pixel bits per CCD
    <release>/work/detect/<stem>_sources.parquet           single-epoch detections (all CCDs)
    <release>/work/astrometry/<stem>_wcs.fits              fitted WCS and quality per CCD
    <release>/work/photometry/<stem>_zpstars.ecsv          measured zero-point tie stars
    <release>/work/photometry/site_pattern.ecsv            amplifier pattern of each site
    <release>/work/photometry/<stem>_zp.ecsv               zero-point model per amplifier
    <release>/work/scaled/<stem>.fits                      exposure scaled to ZP = 30, fitted WCS
    <release>/images/<tile>/<tile>_<band>_{coadd,mask,ndith}.fits
    <release>/images/<tile>/<tile>_<band>_exposures.json   footprints and MJDs of the inputs
    <release>/catalogs/tiles/<tile>_dual.parquet, <tile>_single_<b>.parquet  tile catalogs
    <release>/catalogs/<catalog>.parquet                   idual_master, single_master
    <release>/export/<catalog>/...                         archive exports, manifest, READY
    <release>/work/stamps/<stage>/<task>.json              what a rerun may skip

The tile-catalog paths are in :mod:`ks4release.tile_catalogs`, with their format.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ingest_json_path",
    "inventory_path",
    "tile_refcat_path",
    "mask_path",
    "sources_path",
    "wcs_path",
    "zeropoint_path",
    "zeropoint_stars_path",
    "site_pattern_path",
    "scaled_path",
    "coadd_path",
    "coadd_exposures_path",
    "coadd_excluded_path",
    "master_catalog_path",
    "export_dir",
]


def _work(release_dir: Path, *parts: str) -> Path:
    return Path(release_dir) / "work" / Path(*parts)


def ingest_json_path(release_dir: Path, stem: str) -> Path:
    """Summary of one validated exposure (ingest stage)."""
    return _work(release_dir, "ingest", f"{stem}.json")


def inventory_path(release_dir: Path, tile: str, band: str) -> Path:
    """The exposures of one tile and band (inventory stage)."""
    return _work(release_dir, tile, band, "inventory.ecsv")


def tile_refcat_path(release_dir: Path, tile: str, catalog: str) -> Path:
    """Reference sources of ``catalog`` over one tile (refcat stage)."""
    return _work(release_dir, "refcat", f"{tile}_{catalog}.parquet")


def mask_path(release_dir: Path, stem: str) -> Path:
    """Bad-pixel mask of one exposure: a uint8 image per CCD with DR1's bits."""
    return _work(release_dir, "masks", f"{stem}_mask.fits")


def sources_path(release_dir: Path, stem: str) -> Path:
    """Single-epoch detections of one exposure, all CCDs."""
    return _work(release_dir, "detect", f"{stem}_sources.parquet")


def wcs_path(release_dir: Path, stem: str) -> Path:
    """Fitted WCS and astrometric quality of each CCD of one exposure."""
    return _work(release_dir, "astrometry", f"{stem}_wcs.fits")


def zeropoint_stars_path(release_dir: Path, stem: str) -> Path:
    """Measured zero-point tie stars of one exposure."""
    return _work(release_dir, "photometry", f"{stem}_zpstars.ecsv")


def site_pattern_path(release_dir: Path) -> Path:
    """The amplifier zero-point pattern of every site's camera."""
    return _work(release_dir, "photometry", "site_pattern.ecsv")


def zeropoint_path(release_dir: Path, stem: str) -> Path:
    """Zero-point model of each amplifier of one exposure."""
    return _work(release_dir, "photometry", f"{stem}_zp.ecsv")


def scaled_path(release_dir: Path, stem: str) -> Path:
    """One exposure scaled to ZP = 30 per amplifier, with its fitted WCS."""
    return _work(release_dir, "scaled", f"{stem}.fits")


def coadd_path(release_dir: Path, tile: str, band: str, kind: str) -> Path:
    """A co-add product of one tile and band; ``kind`` is coadd, mask or ndith."""
    if kind not in ("coadd", "mask", "ndith"):
        raise ValueError(f"unknown co-add product {kind!r}; expected coadd, mask or ndith")
    return Path(release_dir) / "images" / tile / f"{tile}_{band}_{kind}.fits"


def coadd_exposures_path(release_dir: Path, tile: str, band: str) -> Path:
    """Footprint polygon and MJD of every exposure that went into a co-add."""
    return Path(release_dir) / "images" / tile / f"{tile}_{band}_exposures.json"


def coadd_excluded_path(release_dir: Path, tile: str, band: str) -> Path:
    """Per exposure of a co-add, the grid pixels where its masked data stayed out of the median."""
    return _work(release_dir, "coadd", f"{tile}_{band}_excluded.npz")


def master_catalog_path(release_dir: Path, catalog: str) -> Path:
    """A release catalog (``idual_master`` or ``single_master``) as Parquet."""
    return Path(release_dir) / "catalogs" / f"{catalog}.parquet"


def export_dir(release_dir: Path, catalog: str) -> Path:
    """Folder of a release catalog's archive exports, their manifest and ``READY`` marker."""
    return Path(release_dir) / "export" / catalog
