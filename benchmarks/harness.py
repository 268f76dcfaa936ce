"""What every benchmark script shares: run one case in a fresh process and measure it.

Each case runs in its own spawned process, so its peak resident memory (``ru_maxrss``) is its
own and not the benchmark driver's; the figure also covers the case's own child processes
(SWarp, Dask workers) once they have been waited for.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

__all__ = ["machine", "run_in_child"]


def machine() -> dict[str, Any]:
    """The facts of this machine that a reader needs to compare figures."""
    return {"python": platform.python_version(), "cpus": mp.cpu_count()}


def _measure(func: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    """Child side: run ``func(*args)`` and send back its result with time and peak memory."""
    t0 = time.perf_counter()
    result = func(*args)
    wall = time.perf_counter() - t0
    rss_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    queue.put({**result, "wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1)})


def run_in_child(func: Callable[..., dict], *args: Any) -> dict:
    """``func(*args)`` (a module-level function returning a dict) measured in a fresh process.

    Returns its dict plus ``wall_s`` and ``peak_rss_mb``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(func, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
