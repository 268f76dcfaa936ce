"""Toy task functions and stages for the engine tests (importable by Dask worker processes).

Workers of a LocalCluster import task functions by module name; the tests put this folder on
``PYTHONPATH`` before they start a cluster, and ``engine_build_script.py`` runs beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
import warnings
from pathlib import Path

from ks4release.atomic import atomic_path, atomic_write_text
from ks4release.engine import Stage, Task

#: Records of loggers under ``ks4release`` reach the build log, also from worker processes.
log = logging.getLogger("ks4release.tests.engine_tasks")


def upper(src: str, dst: str) -> None:
    """Stage 1: copy a text file in upper case."""
    log.info("upper-casing %s", Path(src).name)
    atomic_write_text(dst, Path(src).read_text().upper())


def digest(src: str, dst: str, salt: str = "") -> None:
    """Stage 2: the SHA-256 of a file (plus salt)."""
    data = salt.encode() + Path(src).read_bytes()
    atomic_write_text(dst, hashlib.sha256(data).hexdigest() + "\n")


def caution(src: str, dst: str) -> None:
    """Stage 1 with a Python warning on the way."""
    warnings.warn(f"{Path(src).name} looks odd", UserWarning, stacklevel=1)
    upper(src, dst)


def explode(src: str, dst: str) -> None:
    """A task that raises."""
    raise RuntimeError(f"cannot process {Path(src).name}")


def forget(src: str, dst: str) -> None:
    """A task that returns without writing its output."""


def slow_write(index: int, dst: str, delay: float = 0.2) -> None:
    """Write a file in pieces, slowly, through a temporary name (for the kill test)."""
    with atomic_path(dst) as tmp, open(tmp, "w") as handle:
        for part in range(4):
            handle.write(f"task {index} part {part}\n" * 50)
            handle.flush()
            time.sleep(delay / 4)


def done(dst: str) -> None:
    """Write 'done'."""
    atomic_write_text(dst, "done\n")


def swallowed_interrupt(dst: str) -> None:
    """Ctrl-C arrives while the task runs and something swallows the KeyboardInterrupt, as
    Python does when it is raised inside a finaliser; then the output is written."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2.0)  # the handler raises here
    except KeyboardInterrupt:
        pass
    done(dst)


def two_stages(raw: Path, names: list[str], *, salt: str = "", fail: frozenset[str] = frozenset(),
               forgetful: frozenset[str] = frozenset(),
               cautious: frozenset[str] = frozenset()) -> list[Stage]:
    """``upper`` over ``raw/<name>.txt`` into ``up/``, then ``digest`` of each into ``sha/``."""

    def plan_upper(context) -> list[Task]:
        tasks = []
        for name in names:
            func = (explode if name in fail else forget if name in forgetful
                    else caution if name in cautious else upper)
            src, dst = raw / f"{name}.txt", Path("up") / f"{name}.txt"
            tasks.append(Task(key=f"{name}/B", func=func, tile=name, band="B", file=src,
                              kwargs={"src": str(src), "dst": str(context / dst)},
                              inputs=(src,), outputs=(dst,)))
        return tasks

    def plan_digest(context) -> list[Task]:
        return [Task(key=f"{name}/B", func=digest, tile=name, band="B",
                     file=context / "up" / f"{name}.txt",
                     kwargs={"src": str(context / "up" / f"{name}.txt"),
                             "dst": str(context / "sha" / f"{name}.sha"), "salt": salt},
                     inputs=(Path("up") / f"{name}.txt",), outputs=(Path("sha") / f"{name}.sha",))
                for name in names]

    return [Stage(name="upper", description="upper-case copies", plan=plan_upper),
            Stage(name="digest", description="SHA-256 of the copies", plan=plan_digest)]


def slow_stage(count: int, delay: float) -> Stage:
    """One stage of ``count`` slow writers into ``out/<i>.txt``."""

    def plan(context) -> list[Task]:
        return [Task(key=f"t{i:02d}", func=slow_write, tile=f"t{i:02d}",
                     kwargs={"index": i, "dst": str(context / "out" / f"{i:02d}.txt"),
                             "delay": delay},
                     outputs=(Path("out") / f"{i:02d}.txt",)) for i in range(count)]

    return Stage(name="slow", description="slow writers", plan=plan)
