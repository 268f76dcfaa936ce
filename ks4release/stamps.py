"""Stamps: JSON records of finished tasks, so that a rerun skips finished work.

A stamp lives at ``<release>/work/stamps/<stage>/<safe key>.json`` and is written (atomically)
only after its task returned and every declared output exists. It holds the task's *fingerprint*:

.. code-block:: json

    {
      "format": 1,
      "fingerprint": {
        "stage": "coadd", "key": "0000.000-62/B",
        "func": "ks4release.reduction.coadd:run_coadd", "code_version": "0.1.0",
        "params": {"pixscale": 0.4},
        "kwargs": {"tile": "0000.000-62", "raw": "/data/raw/a.fits",
                   "out": "$RELEASE/images/0000.000-62/0000.000-62_B_coadd.fits"},
        "inputs": [{"path": "/data/raw/a.fits", "size": 123, "sha256": "..."},
                   {"path": "/data/raw/big.fits", "size": 9000000, "mtime_ns": 1700000000}],
        "outputs": ["images/0000.000-62/0000.000-62_B_coadd.fits"]
      },
      "finished_utc": "2026-11-26T00:50:00Z",
      "duration_s": 1.25
    }

A task is up to date when its stamp's fingerprint equals the fingerprint computed now and every
output exists. Inputs up to :data:`HASH_MAX_BYTES` are fingerprinted by content (SHA-256), so an
upstream rerun that rewrites identical bytes does not cascade; larger ones by size and
``mtime_ns``. Paths inside the release directory are stored relative to it (inputs and outputs
as relative paths, strings in kwargs and params with a ``$RELEASE`` prefix), so a release folder
can be moved without invalidating its stamps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

__all__ = [
    "HASH_MAX_BYTES",
    "STAMP_FORMAT",
    "canonical",
    "file_fingerprint",
    "outputs_exist",
    "read_stamp",
    "safe_name",
    "write_stamp",
]

#: Inputs up to this size are fingerprinted by their SHA-256; larger ones by size and mtime.
HASH_MAX_BYTES = 4 * 1024 * 1024
#: Version of the stamp layout; a stamp of another format never matches.
STAMP_FORMAT = 1

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(key: str) -> str:
    """A file-name-safe, collision-free rendering of a task key (``a/b`` -> ``a_b-<8 hex>``)."""
    cleaned = _UNSAFE.sub("_", key).strip("._") or "task"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:120]}-{digest}"


def canonical(value: Any) -> Any:
    """``value`` as JSON-compatible data for a fingerprint.

    Paths become strings, tuples and lists lists, sets sorted lists, mappings dicts with string
    keys, dataclass instances dicts of their fields, NumPy scalars and small arrays Python
    numbers and lists; callables their qualified name. Any other object contributes only its
    type name, so a setting that changes outputs must be passed as plain data.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__qualname__,
                **{f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if hasattr(value, "dtype") and hasattr(value, "tolist") and getattr(value, "size", 0) <= 10_000:
        return canonical(value.tolist())
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', '?')}"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def file_fingerprint(path: Path, release_dir: Path) -> dict[str, Any]:
    """Fingerprint of one input file (see module docstring); raises FileNotFoundError if absent."""
    stat = path.stat()
    try:
        shown = path.relative_to(release_dir).as_posix()
    except ValueError:
        shown = os.fspath(path)
    record: dict[str, Any] = {"path": shown, "size": stat.st_size}
    if path.is_dir():
        record["mtime_ns"] = stat.st_mtime_ns
    elif stat.st_size <= HASH_MAX_BYTES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        record["sha256"] = digest.hexdigest()
    else:
        record["mtime_ns"] = stat.st_mtime_ns
    return record


def read_stamp(path: Path) -> dict[str, Any] | None:
    """The stamp at ``path``, or None when it is missing, unreadable or of another format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != STAMP_FORMAT:
        return None
    return data


def write_stamp(path: Path, fingerprint: Mapping[str, Any], *, finished_utc: str,
                duration_s: float) -> None:
    """Write a stamp atomically (see module docstring for the layout)."""
    record = {"format": STAMP_FORMAT, "fingerprint": dict(fingerprint),
              "finished_utc": finished_utc, "duration_s": round(duration_s, 3)}
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def outputs_exist(outputs: Sequence[Path]) -> bool:
    """True when every path in ``outputs`` exists."""
    return all(os.path.lexists(p) for p in outputs)
