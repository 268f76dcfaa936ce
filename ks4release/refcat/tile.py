"""The reference sources of one tile, as a file that the reduction stages read.

The ``refcat`` stage of a build runs :func:`write_tile_refcat` once per tile and catalog, so
that per-exposure work (astrometry, zero points) reads a small local Parquet file instead of
querying an archive, and so that every exposure of a tile is calibrated against the same rows.
"""

from __future__ import annotations

from pathlib import Path

from ks4release.atomic import atomic_path
from ks4release.camera import Camera
from ks4release.config import load_config
from ks4release.grid import Tile
from ks4release.refcat.fetch import fetch_region
from ks4release.refcat.region import Region

__all__ = ["write_tile_refcat"]


def write_tile_refcat(catalog: str, tile: Tile, config_path: Path, out_path: Path) -> None:
    """Fetch ``catalog`` over ``tile``'s footprint plus the configured margin; write Parquet.

    The footprint is the camera field at the release's ``camera_scale`` around the tile
    centre, widened by ``[refcat] tile_margin_deg`` to take in the dithers.
    """
    config = load_config(config_path)
    camera = Camera.kmtnet(config.survey.camera_scale)
    region = Region.from_tile(tile, camera, config.refcat.tile_margin_deg)
    table = fetch_region(catalog, region, config)
    table.meta["tile"] = tile.name
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(out_path)) as tmp:
        table.write(tmp, format="parquet")
