"""Benchmark of ks4release.simulate: the demo survey and one full-size exposure.

Writes JSON with wall time and peak memory of each case. Each case runs in its own child
process, so ``ru_maxrss`` (peak resident memory) is that case's alone; ``tracemalloc`` gives the
peak of Python and NumPy allocations inside it.

    python benchmarks/bench_simulate.py --out bench_simulate.json [--skip-full | --skip-demo]
                                        [--workdir DIR]

Not a test: it takes a minute or two and writes about 2 GB (the full-size exposure is four
9232 x 9216 float32 CCDs plus masks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path


def _demo(workdir: str) -> dict:
    """Simulate the default demo survey."""
    from ks4release.simulate import SimulationConfig, plan_survey, simulate_survey

    cfg = SimulationConfig()
    out = Path(workdir) / "demo"
    simulate_survey(cfg, out)
    files = list(out.rglob("*"))
    return {"exposures": len(plan_survey(cfg).exposures),
            "bytes_written": sum(f.stat().st_size for f in files if f.is_file())}


def _full_exposure(workdir: str) -> dict:
    """Simulate one full-size exposure (scale 1.0, four 9232 x 9216 CCDs)."""
    from ks4release.simulate import SimulationConfig, make_sources, plan_survey
    from ks4release.simulate.writer import _write_rendered

    cfg = SimulationConfig(scale=1.0, tiles=("0000.000-62",), bands=("R",))
    plan = plan_survey(cfg)
    t0 = time.perf_counter()
    sources = make_sources(cfg, plan)
    t1 = time.perf_counter()
    paths = _write_rendered(plan.exposures[0], sources, cfg, Path(workdir) / "full")
    t2 = time.perf_counter()
    return {"ccd_shape": list(cfg.camera.ccds[0].shape), "n_sources": len(sources),
            "make_sources_s": round(t1 - t0, 2), "render_and_write_s": round(t2 - t1, 2),
            "bytes_written": sum(p.stat().st_size for p in paths)}


def _child(name: str, workdir: str, queue: mp.Queue) -> None:
    """Run one case with tracemalloc and report time and peak memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    extra = {"demo_survey": _demo, "full_size_exposure": _full_exposure}[name](workdir)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"case": name, "wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
               "peak_tracemalloc_mb": round(peak / 2**20, 1), **extra})


def run_case(name: str, workdir: str) -> dict:
    """Run one case in a fresh process and return its measurements."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, workdir, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the cases and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_simulate.json", help="JSON file to write")
    parser.add_argument("--skip-full", action="store_true", help="only the demo survey")
    parser.add_argument("--skip-demo", action="store_true", help="only the full-size exposure")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_simulate_"))
    cases = ([] if args.skip_demo else ["demo_survey"]) + (
        [] if args.skip_full else ["full_size_exposure"])
    results = {"machine": {"python": platform.python_version(), "cpus": mp.cpu_count()},
               "cases": [run_case(c, str(workdir)) for c in cases]}
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
