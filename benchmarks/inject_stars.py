"""Artificial stars injected into a built release's co-adds: how the photometry measures them.

    python benchmarks/inject_stars.py RELEASE_DIR --out benchmarks/results/inject_stars.json
                                      [--bands BVRI] [--runs 3] [--region 2048] [--seed 1]

The classic artificial-star test, which needs no truth and so runs on real data as well: Moffat
stars of each co-add's SEEING and PSFBETA (pixel-integrated, :func:`integrated_moffat`) are added
on a grid (one star per ``max(70 px, 15 FWHM)`` cell, placed at random inside it, wherever the
co-add has data) to the co-add's central ``--region`` square, which the photometry then measures
as the release measured the co-add (the release's ``[photometry]`` settings, its mask, NDITH,
exposure list and excluded pixels), but for the median stack's flux factors
(``stack_flux_correction``): the injected light never went through the median. 15% of the stars are bright (S/N 400, the reference),
the others have a true S/N log-uniform between 8 and 150 (S/N over the co-add's median RMS with
the PSF's noise-equivalent area). Each co-add gets ``--runs`` independent grids.

A star is found when a detection lies within 1 px of it; found stars with FLAGS < 4 are measured:
MAG_AUTO after the catalogs' Kron loss correction (:func:`kron_loss_correction` with the
co-add's SEEING and PSFBETA, every injected star a target) and the 5" aperture magnitude, each
less the star's true magnitude (the aperture's true light from the Moffat profile) and less the
bright stars' median of the same co-add. Per band, in bins of measured S/N (FLUX_AUTO /
FLUXERR_AUTO): the median offsets with their standard errors (1.2533 x 1.4826 MAD / sqrt(n)),
and the fraction found per bin of true S/N. The injected stars sit on the co-add's own noise,
background and neighbours, so the offsets hold all that the photometry adds to a faint star's
magnitude, which the catalogs' corrections are meant to remove.

Prints a summary; the JSON holds every figure and the settings used. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import zlib
from itertools import pairwise
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_scales

from ks4release.config import load_config
from ks4release.layout import coadd_excluded_path, coadd_exposures_path, coadd_path
from ks4release.reduction.coadd import read_excluded
from ks4release.reduction.coadd_maps import coadd_wcs, read_exposures_json
from ks4release.reduction.median_stack import integrated_moffat, moffat_enclosed_fraction
from ks4release.reduction.photometry import measure_single, psf_beta
from ks4release.reduction.photometry_blocks import central_block, crop_excluded, crop_header
from ks4release.reduction.postprocess import kron_loss_correction
from ks4release.reduction.stellarity import read_nnw
from ks4release.settings import PhotometrySettings, PostprocessSettings

BRIGHT_SNR, BRIGHT_SHARE, FAINT_SNR = 400.0, 0.15, (8.0, 150.0)
MEASURED_SNR_EDGES = (10, 15, 20, 30, 45, 70, 120)
TRUE_SNR_EDGES = (8, 10, 12, 15, 20, 30, 50, 150)
MATCH_PX, MIN_STEP_PX, STEP_FWHM = 1.0, 70, 15.0


def _grid(shape: tuple[int, int], step: int, depth: np.ndarray, margin: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random position per ``step`` cell, at least ``margin`` px inside, on data."""
    ys = np.arange(margin, shape[0] - margin - step + 1, step)
    xs = np.arange(margin, shape[1] - margin - step + 1, step)
    y0, x0 = (v.ravel() for v in np.meshgrid(ys, xs, indexing="ij"))
    x = x0 + rng.uniform(0, step, x0.size)
    y = y0 + rng.uniform(0, step, y0.size)
    on = depth[np.rint(y).astype(int), np.rint(x).astype(int)] > 0
    return x[on], y[on]


def _inject(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, half: int,
            fwhm_px: float, beta: float) -> np.ndarray:
    """``image`` plus the stars (pixel-integrated Moffat stamps of ``half`` px)."""
    out = image.copy()
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = round(xi), round(yi)
        out[iy - half:iy + half + 1, ix - half:ix + half + 1] += \
            fi * integrated_moffat(half, fwhm_px, beta, xi - ix, yi - iy)
    return out


def inject_coadd(release: Path, tile: str, band: str, settings: PhotometrySettings,
                 network: dict, runs: int, region: int, seed: int) -> Table:
    """Every injected star of one co-add: true values and, when found, the measured ones."""
    path = coadd_path(release, tile, band, "coadd")
    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header.copy()
        block = central_block(hdul[0].data.shape, region, 0, settings.back_size_px)
        rows, cols = block.slices
        image = np.asarray(hdul[0].data[rows, cols], dtype=np.float32)
        full_shape = hdul[0].data.shape
    mask = np.asarray(fits.getdata(coadd_path(release, tile, band, "mask"))[rows, cols])
    depth = np.asarray(fits.getdata(coadd_path(release, tile, band, "ndith"))[rows, cols])
    excluded = crop_excluded(read_excluded(coadd_excluded_path(release, tile, band), full_shape),
                             full_shape, block)
    exposures = read_exposures_json(coadd_exposures_path(release, tile, band))
    header = crop_header(header, block)
    scale = float(np.mean(proj_plane_pixel_scales(coadd_wcs(header))) * 3600.0)
    fwhm_px = float(header["SEEING"]) / scale
    beta = psf_beta(header)
    beta = 3.0 if math.isnan(beta) else beta
    half = math.ceil(6 * fwhm_px)
    noise_area = 1.0 / float((integrated_moffat(half, fwhm_px, beta) ** 2).sum())
    sky = image[(depth > 0) & np.isfinite(image)]
    sigma = 1.4826 * float(np.median(np.abs(sky - np.median(sky))))
    step = max(MIN_STEP_PX, math.ceil(STEP_FWHM * fwhm_px))
    rng = np.random.default_rng([seed, zlib.crc32(f"{tile}/{band}".encode())])
    b = band.lower()
    found_rows = []
    for run in range(runs):
        x, y = _grid(image.shape, step, depth, half + 2, rng)
        bright = rng.random(x.size) < BRIGHT_SHARE
        snr = np.where(bright, BRIGHT_SNR, np.exp(rng.uniform(*np.log(FAINT_SNR), x.size)))
        flux = snr * sigma * math.sqrt(noise_area)
        table = measure_single(_inject(image, x, y, flux, half, fwhm_px, beta), mask, header,
                               band, settings, network, ndith=depth, exposures=exposures,
                               excluded=excluded)
        mx = np.asarray(table["x_image"], float) - 1.0
        my = np.asarray(table["y_image"], float) - 1.0
        for i in range(x.size):
            distance = np.hypot(mx - x[i], my - y[i]) if len(table) else np.array([np.inf])
            j = int(np.argmin(distance))
            row = {"tile": tile, "band": band, "run": run, "x": x[i], "y": y[i],
                   "flux": flux[i], "true_snr": snr[i], "bright": bool(bright[i]),
                   "found": bool(distance[j] <= MATCH_PX)}
            for name in ("flux_auto", "flux_aper5", "snr", "a_image", "b_image", "theta_image",
                         "kron_radius", "class_star", "flags"):
                row[f"{name}_{b}"] = float(table[f"{name}_{b}"][j]) if row["found"] else math.nan
            found_rows.append(row)
    out = Table(rows=found_rows)
    out.meta.update(fwhm_px=fwhm_px, psf_beta=beta, pixel_scale=scale, sky_sigma=sigma)
    return out


def offsets(table: Table, band: str) -> Table:
    """MAG_AUTO (Kron loss corrected) and MAG_APER5 less true, less the bright stars' median,
    for the found FLAGS < 4 stars of one co-add (``table`` from :func:`inject_coadd`)."""
    b = band.lower()
    ok = np.asarray(table["found"]) & (np.nan_to_num(np.asarray(table[f"flags_{b}"]), nan=99) < 4)
    t = table[ok]
    true_mag = -2.5 * np.log10(np.asarray(t["flux"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        t[f"mag_auto_{b}"] = -2.5 * np.log10(np.asarray(t[f"flux_auto_{b}"]))
    meta = table.meta
    corrected, _ = kron_loss_correction(t, band, meta["fwhm_px"] * meta["pixel_scale"],
                                        meta["pixel_scale"], PostprocessSettings(),
                                        targets=np.ones(len(t), dtype=bool),
                                        psf_beta=meta["psf_beta"])
    aperture = moffat_enclosed_fraction(meta["fwhm_px"] * meta["pixel_scale"], meta["psf_beta"],
                                        5.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auto = np.asarray(corrected[f"mag_auto_{b}"], float) - true_mag
        aper5 = -2.5 * np.log10(np.asarray(t[f"flux_aper5_{b}"]) / aperture) - true_mag
    bright = np.asarray(t["bright"])
    t["d_auto"] = auto - np.nanmedian(auto[bright])
    t["d_aper5"] = aper5 - np.nanmedian(aper5[bright])
    return t


def _median_se(values: np.ndarray) -> tuple[float, float, int]:
    """Median, its standard error from the MAD, and the count of the finite values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan, 0
    mad = float(np.median(np.abs(v - np.median(v))))
    return float(np.median(v)), 1.2533 * 1.4826 * mad / math.sqrt(v.size), int(v.size)


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
        auto, auto_se, n = _median_se(d_auto[sel])
        aper, aper_se, _ = _median_se(d_aper[sel])
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
    return {"coadds": len(tables), "injected": int(true_snr.size),
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
    # the injected light was never median-stacked: the stack's flux factors do not apply to it
    settings = dataclasses.replace(config.photometry, stack_flux_correction=False)
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
        print("  found by true S/N: " + ", ".join(
            f"{c['true_snr_lo']}-{c['true_snr_hi']}: {c['found']}"
            for c in summary["completeness_by_true_snr"]))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
