"""Benchmark of ``ks4release simulate``: the demo survey and one full-size exposure.

Writes JSON with wall time and peak memory of each case. The demo case runs the command itself
(``ks4release simulate DIR``, on its Dask LocalCluster, and again with ``--local`` in one
process); the full-size case runs the two task functions of the simulation stages for one
exposure. Each case runs in its own child process, so ``ru_maxrss`` (peak resident memory) is
that case's alone (for the command: of its largest process, a Dask worker or the driver).

    python benchmarks/bench_simulate.py --out bench_simulate.json [--skip-full | --skip-demo]
                                        [--workdir DIR]

Not a test: it takes a minute or two and writes about 2 GB (the full-size exposure is four
9232 x 9216 float32 CCDs plus masks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, run_in_child


def _bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _command(workdir: str, *options: str) -> dict:
    """Run ``ks4release simulate`` on the default demo survey as a user would."""
    from ks4release.simulate import SimulationConfig, plan_survey

    out = Path(workdir) / ("demo" + "".join(options).replace("-", "_"))
    command = [sys.executable, "-m", "ks4release.cli", "simulate", str(out), "--no-progress",
               *options]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"command": " ".join(["ks4release", *command[3:]]),
            "exposures": len(plan_survey(SimulationConfig()).exposures),
            "bytes_written": _bytes_under(out)}


def _demo_cluster(workdir: str) -> dict:
    """The demo survey through the command on its default LocalCluster."""
    return _command(workdir)


def _demo_local(workdir: str) -> dict:
    """The demo survey through the command in one process (``--local``)."""
    return _command(workdir, "--local")


def _full_exposure(workdir: str) -> dict:
    """One full-size exposure (scale 1.0, four 9232 x 9216 CCDs), as the stages make it."""
    from ks4release.simulate import SimulationConfig, plan_survey, write_exposure, write_sky

    cfg = SimulationConfig(scale=1.0, tiles=("0000.000-62",), bands=("R",))
    out = Path(workdir) / "full"
    t0 = time.perf_counter()
    sources = write_sky(cfg, out)
    t1 = time.perf_counter()
    paths = write_exposure(plan_survey(cfg).exposures[0], sources, cfg, out)
    t2 = time.perf_counter()
    return {"ccd_shape": list(cfg.camera.ccds[0].shape),
            "sky_and_refcats_s": round(t1 - t0, 2), "render_and_write_s": round(t2 - t1, 2),
            "bytes_written": sum(p.stat().st_size for p in paths)}


_CASES = {"demo_survey_cluster": _demo_cluster, "demo_survey_local": _demo_local,
          "full_size_exposure": _full_exposure}


def main(argv: list[str] | None = None) -> int:
    """Run the cases and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_simulate.json", help="JSON file to write")
    parser.add_argument("--skip-full", action="store_true", help="only the demo survey")
    parser.add_argument("--skip-demo", action="store_true", help="only the full-size exposure")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_simulate_"))
    cases = ([] if args.skip_demo else ["demo_survey_cluster", "demo_survey_local"]) + (
        [] if args.skip_full else ["full_size_exposure"])
    results = {"machine": machine(),
               "cases": [{"case": c, **run_in_child(_CASES[c], str(workdir))} for c in cases]}
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
