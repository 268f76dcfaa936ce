"""Artificial stars injected into a built release's co-adds: how the photometry measures them.

    python benchmarks/inject_stars.py RELEASE_DIR --out benchmarks/results/inject_stars.json
                                      [--bands BVRI] [--runs 3] [--region 2048] [--seed 1]

The artificial-star test of :mod:`ks4release.reduction.artificial_stars` (which the release's
``auto-noise`` stage runs with fewer grids to calibrate MAG_AUTO), needing no truth, so it runs
on real data as well, reported in full: per band and bin of measured S/N (FLUX_AUTO /
FLUXERR_AUTO), the median MAG_AUTO (after the Kron loss correction, before the noise-bias
correction that the stage calibrates) and MAG_APER5 less true, relative to the bright injected
stars, with their standard errors; the fitted ``k`` of ``-k / snr**2``; and the fraction of the
stars found per bin of true S/N (placed at random, some fall on brighter sources or masked
pixels). ``--runs`` grids per co-add, in its central ``--region`` square.

Prints a summary; the JSON holds every figure and the settings used. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
from astropy.table import Table

from ks4release.config import load_config
from ks4release.layout import coadd_path
from ks4release.reduction.artificial_stars import (
    fit_auto_noise,
    inject_coadd,
    median_se,
    offsets,
)
from ks4release.reduction.stellarity import read_nnw

MEASURED_SNR_EDGES = (10, 15, 20, 30, 45, 70, 120)
TRUE_SNR_EDGES = (8, 10, 12, 15, 20, 30, 50, 150)


def band_summary(tables: list[Table], band: str) -> dict:
    """Per band: offsets per measured-S/N bin, completeness per true-S/N bin."""
    b = band.lower()
    measured = [offsets(t, band) for t in tables]
    snr = np.concatenate([np.asarray(t[f"snr_{b}"]) for t in measured])
    bright = np.concatenate([np.asarray(t["bright"]) for t in measured])
    d_auto = np.concatenate([np.asarray(t["d_auto"]) for t in measured])
    d_aper = np.concatenate([np.asarray(t["d_aper5"]) for t in measured])
    bins = []
    for lo, hi in pairwise(MEASURED_SNR_EDGES):
        sel = ~bright & (snr >= lo) & (snr < hi)
        auto, auto_se, n = median_se(d_auto[sel])
        aper, aper_se, _ = median_se(d_aper[sel])
        bins.append({"snr_lo": lo, "snr_hi": hi, "n": n, "mag_auto": round(auto, 4),
                     "mag_auto_se": round(auto_se, 4), "mag_aper5": round(aper, 4),
                     "mag_aper5_se": round(aper_se, 4)})
    true_snr = np.concatenate([np.asarray(t["true_snr"]) for t in tables])
    found = np.concatenate([np.asarray(t["found"]) for t in tables])
    completeness = []
    for lo, hi in pairwise(TRUE_SNR_EDGES):
        sel = (true_snr >= lo) & (true_snr < hi)
        completeness.append({"true_snr_lo": lo, "true_snr_hi": hi, "n": int(sel.sum()),
                             "found": round(float(found[sel].mean()), 4) if sel.any() else None})
    fit = fit_auto_noise(band, snr[~bright], d_auto[~bright])
    return {"coadds": len(tables), "injected": int(true_snr.size),
            "auto_noise": dataclasses.asdict(fit),
            "measured_faint": int((~bright).sum()), "offsets_by_measured_snr": bins,
            "completeness_by_true_snr": completeness,
            "psf": [{"tile": t["tile"][0] if len(t) else None, **t.meta} for t in tables]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bands", default="BVRI")
    parser.add_argument("--runs", type=int, default=3, help="injection grids per co-add")
    parser.add_argument("--region", type=int, default=2048,
                        help="side (px) of the central square injected and measured")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    config = load_config(args.release / "release.toml")
    settings = config.photometry
    network = read_nnw(config.resolve(settings.nnw_path))
    t0 = time.perf_counter()
    report = {"release": str(args.release), "runs": args.runs, "region_px": args.region,
              "seed": args.seed, "bands": {}}
    tiles = sorted(p.name for p in (args.release / "images").iterdir() if p.is_dir())
    for band in args.bands.upper():
        tables = [inject_coadd(args.release, tile, band, settings, network, args.runs,
                               args.region, args.seed)
                  for tile in tiles if coadd_path(args.release, tile, band, "coadd").is_file()]
        if not tables:
            continue
        summary = band_summary(tables, band)
        report["bands"][band] = summary
        print(f"{band}: {summary['injected']} injected on {summary['coadds']} co-adds")
        for row in summary["offsets_by_measured_snr"]:
            print(f"  S/N {row['snr_lo']:>3}-{row['snr_hi']:<3} n={row['n']:5d}  MAG_AUTO "
                  f"{row['mag_auto']:+.4f} +- {row['mag_auto_se']:.4f}  MAG_APER5 "
                  f"{row['mag_aper5']:+.4f} +- {row['mag_aper5_se']:.4f}")
        fit = summary["auto_noise"]
        print(f"  fitted MAG_AUTO - true = -k / snr^2: k = {fit['k']:.2f} +- {fit['k_err']:.2f}")
        print("  found by true S/N: " + ", ".join(
            f"{c['true_snr_lo']}-{c['true_snr_hi']}: {c['found']}"
            for c in summary["completeness_by_true_snr"]))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
