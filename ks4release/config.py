"""The release configuration file, ``release.toml``: every tunable parameter with its default.

A configuration is a tree of frozen, keyword-only dataclasses, one per TOML table. Each field
carries its documentation in ``metadata["doc"]``; the same text is written as a comment by
:func:`save_config` and listed by ``ks4release config show``. Loading checks every key and value
and raises :class:`~ks4release.errors.ConfigError` naming the file and the dotted key
(``[engine] workrs: unknown key; did you mean 'workers'?``), so a misspelt key never silently
falls back to a default.

Relative paths in the file are relative to the folder that holds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ks4release.atomic import atomic_write_text
from ks4release.errors import ConfigError
from ks4release.grid import Tile, tile_by_name
from ks4release.settings import (
    AstrometrySettings,
    CoaddSettings,
    DetectSettings,
    ExportSettings,
    MapSettings,
    MaskSettings,
    MasterSettings,
    PhotometrySettings,
    PostprocessSettings,
    ScaleSettings,
    ZeropointSettings,
    documented,
)
from ks4release.survey import BANDS

__all__ = [
    "CONFIG_FILENAME",
    "CustomTile",
    "EngineSection",
    "InputsSection",
    "RefcatSection",
    "RefcatSource",
    "ReleaseConfig",
    "ReleaseSection",
    "SurveySection",
    "load_config",
    "save_config",
    "config_to_toml",
    "documented",
]

#: Name of the configuration file inside a release directory.
CONFIG_FILENAME = "release.toml"

_REFCAT_SOURCES = ("local", "tap", "vizier")


@dataclass(frozen=True, kw_only=True)
class ReleaseSection:
    """``[release]``: what the release is called and where its products go."""

    name: str = documented("Release name, written into product metadata.", default="ks4-dr1")
    output: str = documented(
        "Release directory for every product, relative to this file.", default="."
    )

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("must not be empty")


@dataclass(frozen=True, kw_only=True)
class InputsSection:
    """``[inputs]``: where the single-epoch exposures are."""

    exposures: tuple[str, ...] = documented(
        "Glob patterns of exposure files (multi-extension FITS), relative to this file.",
        default=("raw/**/*.fits",),
    )

    def __post_init__(self) -> None:
        if not self.exposures:
            raise ValueError("needs at least one glob pattern")


@dataclass(frozen=True, kw_only=True)
class CustomTile:
    """``[[survey.custom_tiles]]``: a tile that is not on the KS4 grid (the scaled demo)."""

    name: str = documented("Tile name, as in the TILE header keyword.")
    ra: float = documented("Centre right ascension, deg (ICRS).")
    dec: float = documented("Centre declination, deg (ICRS).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ra < 360.0:
            raise ValueError(f"ra must be in [0, 360) deg, got {self.ra}")
        if not -90.0 <= self.dec <= 90.0:
            raise ValueError(f"dec must be in [-90, 90] deg, got {self.dec}")


@dataclass(frozen=True, kw_only=True)
class SurveySection:
    """``[survey]``: which tiles and bands make up the release."""

    bands: tuple[str, ...] = documented(
        "Bands to process, from B, V, R, I.", default=tuple(b.name for b in BANDS)
    )
    camera_scale: float = documented(
        "CCD scale factor the exposures were taken with (1.0 = the real KMTNet camera; the "
        "demo survey shrinks chips, gaps and tile spacing together).",
        default=1.0,
    )
    tiles: tuple[str, ...] = documented(
        "KS4 grid tiles to process (names like '0376.321-70'); empty = every tile found in "
        "the inputs.",
        default=(),
    )
    custom_tiles: tuple[CustomTile, ...] = documented(
        "Tiles with explicit centres, used instead of the grid (the scaled demo survey).",
        default=(),
    )

    def __post_init__(self) -> None:
        known = {b.name for b in BANDS}
        for b in self.bands:
            if b not in known:
                raise ValueError(f"unknown band {b!r}; KS4 bands are B, V, R, I")
        if not self.bands:
            raise ValueError("needs at least one band")
        if not 0.0 < self.camera_scale <= 1.0:
            raise ValueError(f"camera_scale must be in (0, 1], got {self.camera_scale}")
        for name in self.tiles:
            tile_by_name(name)
        names = [t.name for t in self.custom_tiles]
        if len(set(names)) != len(names):
            raise ValueError("custom tile names must be unique")


@dataclass(frozen=True, kw_only=True)
class RefcatSource:
    """Where one reference catalog comes from."""

    source: str = documented(
        "One of 'local' (a file), 'tap' (the archive's TAP service, cached) or 'vizier' "
        "(VizieR via astroquery, cached; Gaia DR3 and Gaia XP only).",
        default="local",
    )
    path: str = documented(
        "For source = 'local': Parquet or FITS file with the archive's column names, "
        "relative to this file.",
        default="",
    )
    tap_url: str = documented(
        "For source = 'tap': TAP base URL; empty = the archive's own service (Gaia: "
        "https://gea.esac.esa.int/tap-server/tap, DELVE: https://datalab.noirlab.edu/tap).",
        default="",
    )
    vizier_url: str = documented(
        "For source = 'vizier': VizieR server base URL; empty = https://vizier.cds.unistra.fr.",
        default="",
    )

    def __post_init__(self) -> None:
        if self.source not in _REFCAT_SOURCES:
            raise ValueError(f"source must be one of {', '.join(_REFCAT_SOURCES)}")
        if self.source == "local" and not self.path:
            raise ValueError("a local reference catalog needs a path")
        for name in ("tap_url", "vizier_url"):
            url = getattr(self, name)
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must start with http:// or https://, got {url!r}")


@dataclass(frozen=True, kw_only=True)
class RefcatSection:
    """``[refcat]``: the reference catalogs for calibration and validation."""

    cache_dir: str = documented(
        "Cache of catalogs fetched from TAP or VizieR (Parquet per HEALPix cell with a JSON "
        "sidecar), relative to this file.",
        default="refcat/cache",
    )
    cache_order: int = documented(
        "HEALPix order of the cache cells (7 = cells of about 0.2 deg2).", default=7
    )
    offline: bool = documented(
        "Use the cache only; a region whose cells are not all cached is an error.",
        default=False,
    )
    row_limit: int = documented(
        "Most rows one query may return (TAP MAXREC, VizieR -out.max); a truncated answer is "
        "split into the cell's four sub-cells, down to split_max_order.",
        default=1_000_000,
    )
    split_max_order: int = documented(
        "Finest HEALPix order a truncated cell query is split down to before giving up.",
        default=10,
    )
    timeout_s: float = documented("Timeout of every HTTP request, seconds.", default=120.0)
    async_timeout_s: float = documented(
        "Longest wait for an asynchronous TAP job, seconds.", default=3600.0
    )
    async_area_deg2: float = documented(
        "Cell queries covering more than this area (deg2) run as asynchronous TAP jobs.",
        default=0.25,
    )
    retries: int = documented(
        "Retries after a timeout, connection failure or HTTP 5xx/429.", default=3
    )
    backoff_s: float = documented(
        "Pause before the first retry, seconds; doubled before each further retry.",
        default=2.0,
    )
    tile_margin_deg: float = documented(
        "Margin around a tile footprint when fetching its reference sources, deg (covers the "
        "4'/7' dithers and the matching radius).",
        default=0.2,
    )
    propagate_to_epoch: float = documented(
        "Move Gaia positions from epoch 2016.0 to this epoch (Julian year) with their proper "
        "motions; 0 = no propagation, as in DR1.",
        default=0.0,
    )
    gaia_dr3: RefcatSource = documented(
        "Gaia DR3 gaia_source (astrometry, recovery).",
        default=RefcatSource(path="refcat/gaia_dr3.parquet"),
    )
    gaia_xp: RefcatSource = documented(
        "Gaia XP synthetic photometry, Johnson-Kron-Cousins B, V, R, I (photometry).",
        default=RefcatSource(path="refcat/gaia_xp.parquet"),
    )
    delve_dr2: RefcatSource = documented(
        "DELVE DR2 objects (spurious-source cleaning, recovery).",
        default=RefcatSource(path="refcat/delve_dr2.parquet"),
    )

    def __post_init__(self) -> None:
        if not self.cache_dir.strip():
            raise ValueError("cache_dir must not be empty")
        if not 0 <= self.cache_order <= 12:
            raise ValueError(f"cache_order must be in [0, 12], got {self.cache_order}")
        if not self.cache_order <= self.split_max_order <= 12:
            raise ValueError(f"split_max_order must be in [cache_order, 12], got "
                             f"{self.split_max_order}")
        if self.row_limit < 1:
            raise ValueError(f"row_limit must be >= 1, got {self.row_limit}")
        for name in ("timeout_s", "async_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.async_area_deg2 < 0:
            raise ValueError(f"async_area_deg2 must be >= 0, got {self.async_area_deg2}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.tile_margin_deg < 0:
            raise ValueError(f"tile_margin_deg must be >= 0, got {self.tile_margin_deg}")
        if self.propagate_to_epoch != 0.0 and not 1900.0 <= self.propagate_to_epoch <= 2100.0:
            raise ValueError("propagate_to_epoch must be 0 (off) or a Julian year in "
                             f"[1900, 2100], got {self.propagate_to_epoch}")
        if self.delve_dr2.source == "vizier":
            raise ValueError("delve_dr2 is not in VizieR: use source = 'tap' or 'local'")


@dataclass(frozen=True, kw_only=True)
class EngineSection:
    """``[engine]``: how the tasks run (Dask distributed)."""

    workers: int = documented("Worker processes; 0 = sized to this machine.", default=0)
    threads_per_worker: int = documented("Threads per worker process.", default=1)
    scheduler: str = documented(
        "Address of an existing Dask scheduler (tcp://host:port); empty = start a local "
        "cluster.",
        default="",
    )
    memory_limit: str = documented(
        "Memory limit per worker ('auto' or a size such as '4GB').", default="auto"
    )

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")


@dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    """A whole ``release.toml``; ``source_path`` is the file it was read from, if any."""

    release: ReleaseSection = documented("The release.", default=ReleaseSection())
    inputs: InputsSection = documented("Input exposures.", default=InputsSection())
    survey: SurveySection = documented("Tiles and bands.", default=SurveySection())
    refcat: RefcatSection = documented("Reference catalogs.", default=RefcatSection())
    engine: EngineSection = documented("Task execution.", default=EngineSection())
    masks: MaskSettings = documented("Bad-pixel masks.", default=MaskSettings())
    detect: DetectSettings = documented("Single-epoch detection.", default=DetectSettings())
    astrometry: AstrometrySettings = documented(
        "Astrometric solution against Gaia DR3.", default=AstrometrySettings())
    zeropoint: ZeropointSettings = documented(
        "Per-amplifier zero points against Gaia XP.", default=ZeropointSettings())
    scale: ScaleSettings = documented("Scaling to ZP = 30.", default=ScaleSettings())
    coadd: CoaddSettings = documented("Co-adds per tile and band.", default=CoaddSettings())
    photometry: PhotometrySettings = documented(
        "Detection and photometry on the co-adds (sep).", default=PhotometrySettings())
    maps: MapSettings = documented(
        "Zero-point and alignment maps against Gaia XP and Gaia DR3.", default=MapSettings())
    postprocess: PostprocessSettings = documented(
        "Post-processing of the tile catalogs (DR1 3.2).", default=PostprocessSettings())
    master: MasterSettings = documented("Master catalogs.", default=MasterSettings())
    export: ExportSettings = documented("Catalog exports.", default=ExportSettings())
    source_path: Path | None = field(default=None, compare=False, metadata={"internal": True})

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the file are relative to."""
        return self.source_path.parent if self.source_path else Path.cwd()

    @property
    def release_dir(self) -> Path:
        """The release directory, absolute."""
        return (self.base_dir / self.release.output).resolve()

    def resolve(self, relative: str) -> Path:
        """A path from the file, made absolute against the file's folder."""
        return (self.base_dir / relative).resolve()

    def tiles(self) -> list[Tile]:
        """The tiles of the release: custom tiles first, then named grid tiles."""
        custom = [
            Tile(index=-1, name=t.name, ra_deg=t.ra, dec_deg=t.dec)
            for t in self.survey.custom_tiles
        ]
        return custom + [tile_by_name(name) for name in self.survey.tiles]


# --- loading ------------------------------------------------------------------------------


def load_config(path: str | Path) -> ReleaseConfig:
    """Read and validate a ``release.toml``; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read the configuration ({exc.strerror})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML ({exc})") from exc
    config = _build(ReleaseConfig, data, path, prefix="")
    return dataclasses.replace(config, source_path=path.resolve())


def _public_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: Any, path: Path, prefix: str) -> Any:
    """Make dataclass ``cls`` from a TOML table, checking keys, types and values."""
    where = prefix or "top level"
    if not isinstance(data, dict):
        raise ConfigError(path, where, f"expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in _public_fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(path, _join(prefix, key), f"unknown key{hint}")
    kwargs = {
        name: _convert(hints[name], data[name], path, _join(prefix, name))
        for name in fields
        if name in data
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key without default is missing
        raise ConfigError(path, where, str(exc)) from exc
    except ValueError as exc:
        raise ConfigError(path, where, str(exc)) from exc


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(hint: Any, value: Any, path: Path, key: str) -> Any:
    """Check one TOML value against a field's type and convert it."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, key)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(path, key, f"expected a list, got {_toml_type(value)}")
        return tuple(
            _convert(item_type, item, path, f"{key}[{i}]") for i, item in enumerate(value)
        )
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported configuration type for {key}: {hint}")
    return _scalar(hint, value, path, key)


def _scalar(hint: type, value: Any, path: Path, key: str) -> Any:
    """Check a scalar; integers are accepted where floats are expected."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(path, key, "must be a finite number")
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(path, key, f"expected {hint.__name__}, got {_toml_type(value)}")
    return value


def _toml_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


# --- writing ------------------------------------------------------------------------------


def config_to_toml(config: ReleaseConfig) -> str:
    """The configuration as TOML text, every key with its documentation as a comment."""
    lines = [
        "# ks4release configuration. Every key is shown with its value; relative paths are",
        "# relative to this file. `ks4release config show` lists the keys and their defaults.",
    ]
    _emit_table(config, "", lines)
    return "\n".join(lines) + "\n"


def _emit_table(obj: Any, prefix: str, lines: list[str]) -> None:
    """Append ``obj``'s scalar keys, then its sub-tables, to ``lines``."""
    nested = []
    for f in _public_fields(type(obj)):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f, value))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            nested.append((f, value))
        else:
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(value)}")
    for f, value in nested:
        name = _join(prefix, f.name)
        if isinstance(value, tuple):
            for item in value:
                lines.extend(["", f"[[{name}]]"])
                _emit_table(item, name, lines)
        else:
            lines.extend(["", f"[{name}]", f"# {type(value).__doc__.strip().splitlines()[0]}"])
            _emit_table(value, name, lines)


def _toml_value(value: Any) -> str:
    """One TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def save_config(config: ReleaseConfig, path: str | Path) -> Path:
    """Write ``config`` to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, config_to_toml(config))
