"""``ks4release schema``: check release catalog files against their felis schemas.

Registered in the main command line with ``cli.add_command(schema_group)``::

    ks4release schema check out/idual_master.fits
    ks4release schema check out/datalab/single_master.csv --catalog single_master \\
        --manifest out/manifest.json --json report.json

``check`` prints one line per problem and a verdict, optionally writes the JSON report, and exits
with status 0 when the file passes, 1 when it does not and 2 when it cannot be read.
"""

from __future__ import annotations

from pathlib import Path

import click

from ks4release.atomic import atomic_write_text
from ks4release.schemas import CATALOGS

__all__ = ["schema_group"]


@click.group("schema")
def schema_group() -> None:
    """Release catalog schemas (felis YAML) and the schema checker."""


@schema_group.command("check")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--catalog", type=click.Choice(CATALOGS), default=None,
              help="Catalog the file holds (default: from its metadata or name).")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="manifest.json of the export, for the row count.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the full report (every check) as JSON here.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Rows read at a time.")
def check_command(file: Path, catalog: str | None, manifest: Path | None,
                  json_path: Path | None, chunk_rows: int) -> None:
    """Check FILE (Parquet, FITS, VOTable, CSV or VizieR) against its catalog schema."""
    from ks4release.publish.schema_check import check_catalog

    try:
        report = check_catalog(file, catalog, manifest, chunk_rows=chunk_rows)
    except (OSError, ValueError) as exc:
        click.echo(f"{file}: cannot check: {exc}", err=True)
        raise SystemExit(2) from exc
    click.echo(report.summary())
    if json_path is not None:
        atomic_write_text(json_path, report.to_json() + "\n")
    raise SystemExit(0 if report.ok else 1)
