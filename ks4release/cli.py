"""The ``ks4release`` command line.

Every command works on a release directory holding a ``release.toml``. Commands that are listed
here work; the stages that later parts of the suite add appear in ``build dr1`` as they land.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler

from ks4release import __version__
from ks4release.config import (
    CONFIG_FILENAME,
    ReleaseConfig,
    config_to_toml,
    load_config,
)
from ks4release.engine import Engine, RunSummary
from ks4release.errors import Ks4ReleaseError
from ks4release.refcat.cli import refcat_group
from ks4release.schema_cli import schema_group
from ks4release.simulate import SimulationConfig
from ks4release.stages import (
    ReleaseContext,
    SimulationContext,
    dr1_stages,
    simulation_stages,
)

__all__ = ["main", "cli"]

#: Where ``build dr1`` puts the demo survey when it is given no release.
DEMO_DIR = Path("ks4-dr1-demo")

_console = Console(stderr=True)


def _engine_options(func):
    """Options shared by every command that runs tasks on the engine."""
    options = [
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="Dask worker processes (default: release.toml, 0 = sized to the machine)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Address of an existing Dask scheduler (tcp://host:port)."),
        click.option("--local", is_flag=True,
                     help="Run every task in this process, one at a time (debugging)."),
        click.option("--no-progress", is_flag=True, help="Do not draw progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _make_engine(release_dir: Path, config: ReleaseConfig | None, *, workers: int | None,
                 scheduler: str | None, local: bool, no_progress: bool) -> Engine:
    """An engine set up from the command line, falling back on ``[engine]`` of the config."""
    engine_cfg = (config or ReleaseConfig()).engine
    return Engine(
        release_dir,
        workers=engine_cfg.workers if workers is None else workers,
        threads_per_worker=engine_cfg.threads_per_worker,
        scheduler=scheduler if scheduler is not None else (engine_cfg.scheduler or None),
        memory_limit=engine_cfg.memory_limit,
        local=local,
        progress=not no_progress,
    )


def _finish(summary: RunSummary) -> None:
    """Print the run summary; exit non-zero when anything failed."""
    _console.print(summary.render())
    if not summary.ok:
        raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ks4release")
@click.option("-v", "--verbose", is_flag=True, help="Log every task, not only warnings.")
def cli(verbose: bool) -> None:
    """Build, validate and publish a KS4-style survey data release."""
    handler = RichHandler(console=_console, show_path=False)
    # The engine's own loggers run at INFO for the build log file; the console shows less.
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(message)s", handlers=[handler])


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=DEMO_DIR)
@click.option("--seed", type=int, default=SimulationConfig().seed, show_default=True,
              help="Random seed; the same seed gives byte-identical files.")
@click.option("--scale", type=click.FloatRange(min=0.0, min_open=True, max=1.0),
              default=SimulationConfig().scale, show_default=True,
              help="CCD scale factor (1.0 = full 9232 x 9216 px chips).")
@click.option("--anchor", default=SimulationConfig().anchor_tile, show_default=True,
              help="KS4 grid tile the demo survey is centred on.")
@click.option("--tiles-ra", type=click.IntRange(min=1), default=SimulationConfig().n_tiles_ra,
              show_default=True, help="Adjacent tiles along RA.")
@click.option("--tiles-dec", type=click.IntRange(min=1), default=SimulationConfig().n_tiles_dec,
              show_default=True, help="Adjacent tiles along Dec.")
@click.option("--bands", default="".join(SimulationConfig().bands), show_default=True,
              help="Bands to simulate, e.g. BVRI or I.")
@click.option("--star-density", type=click.FloatRange(min=0.0, min_open=True),
              default=SimulationConfig().star_density_factor, show_default=True,
              help="Star counts relative to tile 0000's (b = -54 deg); about 30 gives DR1's "
                   "dense tile 0294.")
@_engine_options
def simulate(directory: Path, seed: int, scale: float, anchor: str, tiles_ra: int,
             tiles_dec: int, bands: str, star_density: float, workers: int | None,
             scheduler: str | None, local: bool, no_progress: bool) -> None:
    """Write a simulated KS4 survey with known truth into DIRECTORY.

    Exposures, reference catalogs and a release.toml in the pipeline's input formats, plus a
    truth/ folder the pipeline never reads. A rerun resumes where a previous one stopped.
    """
    sim = SimulationConfig(seed=seed, scale=scale, anchor_tile=anchor, n_tiles_ra=tiles_ra,
                           n_tiles_dec=tiles_dec, bands=tuple(bands.upper()),
                           star_density_factor=star_density)
    _run_simulation(directory, sim, workers=workers, scheduler=scheduler, local=local,
                    no_progress=no_progress)
    _console.print(f"Simulated survey written to [bold]{directory}[/]")


def _run_simulation(directory: Path, sim: SimulationConfig, **engine_args) -> None:
    """Simulate ``sim`` into ``directory`` on the engine; exit non-zero on failure."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    engine = _make_engine(directory, None, **engine_args)
    summary = engine.run(simulation_stages(), SimulationContext(directory=directory, config=sim))
    if not summary.ok:
        _finish(summary)


@cli.group()
def build() -> None:
    """Build a release."""


@build.command("dr1")
@click.argument("release", type=click.Path(path_type=Path), required=False)
@_engine_options
def build_dr1(release: Path | None, workers: int | None, scheduler: str | None, local: bool,
              no_progress: bool) -> None:
    """Run every stage of a DR1-style release.

    RELEASE is a release directory or its release.toml. Without it, the demo survey is
    simulated into ./ks4-dr1-demo (when not already there) and built.
    """
    engine_args = dict(workers=workers, scheduler=scheduler, local=local,
                       no_progress=no_progress)
    if release is None:
        release = DEMO_DIR
        if not (release / CONFIG_FILENAME).is_file():
            _console.print(f"No release given: simulating the demo survey into {release}")
        _run_simulation(release, SimulationConfig(), **engine_args)
    config_path = release / CONFIG_FILENAME if release.is_dir() else release
    config = load_config(config_path)
    engine = _make_engine(config.release_dir, config, **engine_args)
    summary = engine.run(dr1_stages(), ReleaseContext.from_config(config))
    _console.print(f"Release directory: [bold]{config.release_dir}[/]")
    _finish(summary)


@cli.group()
def config() -> None:
    """Inspect and check release.toml files."""


@config.command("show")
def config_show() -> None:
    """Print a release.toml with every key at its default, each with its meaning."""
    click.echo(config_to_toml(ReleaseConfig()), nl=False)


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate the release.toml at PATH (or in the folder PATH)."""
    if path.is_dir():
        path = path / CONFIG_FILENAME
    loaded = load_config(path)
    _console.print(f"{path}: valid; release directory {loaded.release_dir}")


cli.add_command(refcat_group)
cli.add_command(schema_group)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ks4release`` console script; returns the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="ks4release",
                 standalone_mode=False)
    except click.exceptions.Abort:
        _console.print("Aborted.")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except Ks4ReleaseError as exc:
        _console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
