"""Benchmark of the masks stage: ``ccd_mask`` per CCD at several camera scales.

For each scale, one exposure of the demo sky is simulated (``SimulationConfig(scale=...)``) and
every CCD is masked in a fresh child process, so that ``ru_maxrss`` is that case's alone. Side
by side: astroscrappy's ``detect_cosmics`` with its defaults on the whole CCD (the peer: plain
L.A.Cosmic, niter 4), and our cosmic-ray step alone. Full-size time is extrapolated linearly in
pixel count from the largest scale run (``--scales 1`` runs the real 9232 x 9216 CCD: minutes
and ~6 GB).

    python benchmarks/bench_masks.py --out benchmarks/results/masks.json [--scales 0.0625 0.25]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from harness import machine, run_in_child

_FULL_PIXELS = 9232 * 9216


def _case(scale: float, workdir: str) -> dict:
    """Simulate one exposure at ``scale`` and time the masks of its four CCDs."""
    import astroscrappy
    import numpy as np

    from ks4release.exposure import read_ccd, read_exposure_header
    from ks4release.reduction.masks import MaskSettings, ccd_mask, cosmic_ray_mask
    from ks4release.simulate import SimulationConfig, plan_survey, write_exposure, write_sky

    cfg = SimulationConfig(scale=scale, tiles=("0000.000-62",), bands=("R",))
    out = Path(workdir) / f"scale_{scale:g}"
    sources = write_sky(cfg, out)
    raw, _ = write_exposure(plan_survey(cfg).exposures[0], sources, cfg, out)
    info = read_exposure_header(raw)
    settings = MaskSettings()
    ccds = []
    for ccd in info.ccds:
        image, _ = read_ccd(raw, ccd.name)
        t0 = time.perf_counter()
        ccd_mask(image, ccd, settings)
        t1 = time.perf_counter()
        cosmic_ray_mask(image, np.zeros(image.shape, bool), gain=ccd.gain,
                        read_noise=ccd.read_noise, saturation_adu=ccd.saturation,
                        settings=settings)
        t2 = time.perf_counter()
        astroscrappy.detect_cosmics(image, gain=ccd.gain, readnoise=ccd.read_noise,
                                    satlevel=ccd.saturation * ccd.gain)
        t3 = time.perf_counter()
        ccds.append({"ccd": ccd.name, "ccd_mask_s": round(t1 - t0, 3),
                     "our_cosmic_step_s": round(t2 - t1, 3),
                     "astroscrappy_defaults_s": round(t3 - t2, 3)})
    pixels = int(np.prod(info.ccds[0].shape))
    mean = sum(c["ccd_mask_s"] for c in ccds) / len(ccds)
    return {"scale": scale, "ccd_shape": list(info.ccds[0].shape), "ccds": ccds,
            "mean_ccd_mask_s": round(mean, 3),
            "full_size_ccd_estimate_s": round(mean * _FULL_PIXELS / pixels, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the scales and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_masks.json", help="JSON file to write")
    parser.add_argument("--scales", type=float, nargs="+", default=[1 / 16, 1 / 4],
                        help="camera scales to run (1 = full-size CCDs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_masks_"))
    try:
        results = {"machine": machine(),
                   "cases": [run_in_child(_case, s, str(workdir)) for s in args.scales]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
