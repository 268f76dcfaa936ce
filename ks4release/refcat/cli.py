"""``ks4release refcat``: fetch reference catalogs into the cache, and show what is there.

Registered in the main command line with ``cli.add_command(refcat_group)``::

    ks4release refcat fetch --release DIR --tiles 0376.321-70,0377.325-70 --catalog gaia_xp
    ks4release refcat fetch --catalog gaia_dr3 --source vizier --offline
    ks4release refcat info --release DIR
"""

from __future__ import annotations

from pathlib import Path

import click

from ks4release.camera import Camera
from ks4release.config import CONFIG_FILENAME, ReleaseConfig, load_config
from ks4release.grid import tile_by_name
from ks4release.refcat.cache import RefcatCache
from ks4release.refcat.fetch import FetchStats, fetch_region, service_url
from ks4release.refcat.formats import REFCAT_FORMATS
from ks4release.refcat.region import Region

__all__ = ["refcat_group"]

_release_option = click.option(
    "--release", "release", type=click.Path(path_type=Path), default=Path("."),
    show_default=True, help="Release directory (or its release.toml).",
)


def _load(release: Path) -> ReleaseConfig:
    path = release / CONFIG_FILENAME if release.is_dir() else release
    return load_config(path)


def _tiles(config: ReleaseConfig, names: tuple[str, ...]):
    """Tiles named on the command line (custom tiles of the release first), or all of them."""
    custom = {t.name: t for t in config.tiles() if t.index < 0}
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not wanted:
        tiles = config.tiles()
        if not tiles:
            raise click.UsageError("no --tiles given and the release lists no tiles")
        return tiles
    return [custom[n] if n in custom else tile_by_name(n) for n in wanted]


@click.group("refcat")
def refcat_group() -> None:
    """Reference catalogs: fetch from TAP or VizieR into the cache, or inspect it."""


@refcat_group.command("fetch")
@_release_option
@click.option("--tiles", multiple=True, metavar="NAMES",
              help="Tiles, comma-separated or repeated (default: every tile of the release).")
@click.option("--catalog", type=click.Choice(sorted(REFCAT_FORMATS)), required=True,
              help="Reference catalog.")
@click.option("--source", type=click.Choice(["local", "tap", "vizier"]), default=None,
              help="Override the source in release.toml.")
@click.option("--offline", is_flag=True, help="Use the cache only; fail on a missing cell.")
@click.option("--margin", type=click.FloatRange(min=0.0), default=None,
              help="Margin around each tile, deg (default: [refcat] tile_margin_deg).")
def fetch_command(release: Path, tiles: tuple[str, ...], catalog: str, source: str | None,
                  offline: bool, margin: float | None) -> None:
    """Fetch a reference catalog for the footprint of each tile (plus a margin) into the cache."""
    config = _load(release)
    camera = Camera.kmtnet(config.survey.camera_scale)
    margin = config.refcat.tile_margin_deg if margin is None else margin
    total = FetchStats()
    for tile in _tiles(config, tiles):
        stats = FetchStats()
        table = fetch_region(catalog, Region.from_tile(tile, camera, margin), config,
                             source=source, offline=offline or None, stats=stats)
        click.echo(f"{tile.name}: {len(table)} {catalog} sources; {stats.cells} cells "
                   f"({stats.cache_hits} cached, {stats.fetched} fetched, "
                   f"{stats.refetched_corrupt} refetched after a failed checksum), "
                   f"{stats.queries} queries")
        for name in ("cells", "cache_hits", "fetched", "refetched_corrupt", "queries", "rows"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    click.echo(f"total: {total.rows} sources, {total.cache_hits} cached cells reused, "
               f"{total.fetched} cells fetched with {total.queries} queries")


@refcat_group.command("info")
@_release_option
def info_command(release: Path) -> None:
    """Show where each reference catalog comes from and what the cache holds."""
    config = _load(release)
    section = config.refcat
    cache_root = config.resolve(section.cache_dir)
    click.echo(f"cache: {cache_root} (HEALPix order {section.cache_order}); "
               f"offline: {'yes' if section.offline else 'no'}; proper-motion propagation: "
               f"{section.propagate_to_epoch if section.propagate_to_epoch else 'off'}")
    for catalog in REFCAT_FORMATS:
        source_cfg = getattr(section, catalog)
        where = (str(config.resolve(source_cfg.path)) if source_cfg.source == "local"
                 else service_url(catalog, source_cfg))
        click.echo(f"{catalog}: {source_cfg.source} {where}")
        for source in ("tap", "vizier"):
            summary = RefcatCache(cache_root, catalog, source, section.cache_order).summary()
            if summary["cells"]:
                click.echo(f"  cached from {source}: {summary['cells']} cells, "
                           f"{summary['rows']} rows, {summary['bytes'] / 1e6:.1f} MB, fetched "
                           f"{summary['first_fetch']} .. {summary['last_fetch']}")
