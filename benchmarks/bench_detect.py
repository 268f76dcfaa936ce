"""Benchmark of detection and photometry: our sep stage against SExtractor on the same co-add.

Three images, each a co-add with its mask and NDITH map in a release folder:

* ``demo``: the demo release's I co-add of tile 0000.000-62 (1368 x 1368 px; ``--coadd``);
* ``tiled``: a 4096 x 4096 co-add made by tiling the demo co-add, its mask and NDITH 3 x 3 and
  cropping (real sources and noise, 9x the area; the WCS is the demo's, stretched);
* ``large``: the same at 8192 x 8192.

Cases, each in a fresh process (``harness.run_in_child``):

* ``sep``: :func:`ks4release.reduction.photometry.run_photometry` in single mode (read the
  co-add, background, interpolation, sep detection, every measurement including CLASS_STAR,
  Parquet written); ``measure_s`` is ``measure_single`` alone;
* ``sextractor``: Debian SExtractor configured like sep
  (:meth:`SExtractorSettings.from_photometry`, NDITH = 0 as zero weight, the mask as FLAG_IMAGE,
  FITS_1.0 catalog); the binary's own time and peak memory come from GNU ``time`` (Linux
  carries a parent's peak into a forked child, so ``RUSAGE_CHILDREN`` cannot tell);
* ``sep_blocks`` (``tiled`` only): the same task with ``block_size_px`` 2048, the co-add
  measured in 2 x 2 blocks (:mod:`ks4release.reduction.photometry_blocks`), and its catalog
  against the whole co-add's: the share of the whole co-add's detections found again within
  0.5 px, and the MAG_AUTO and 5" changes of the clean (FLAGS 0) S/N > 20 ones;
* ``large`` (8192 x 8192, the demo co-add tiled 6 x 6): ``sep_blocks`` with the default blocks
  (2 x 2 of 4096 px) and SExtractor, to show the memory held to a block's as the co-add grows;
* ``tiled_local``: ``sep`` and ``sextractor`` on the tiled co-add with ``BACKPHOTO_TYPE LOCAL``
  (kmtnet.sex; ``[photometry] backphoto_type``), each object's level measured in its annulus;
* ``python_baseline``: the interpreter with the modules of the ``sep`` case imported and
  nothing run, the floor under the ``sep`` figure.

SExtractor's ``objects_on_data`` counts its detections on pixels with data (NDITH > 0): its
``INTERP_TYPE ALL`` also detects in the band along the data's edges that it fills by
interpolation (a third of its detections on the tiled co-add).

Ratios are ours over SExtractor's (time: ``run_photometry``, and ``measure_single`` alone, over
the SExtractor binary; memory: the ``sep`` process's peak over the binary's, and the same after
subtracting the baseline). The ``sep`` case's ``wall_s`` also holds its imports and the second,
``measure_single``-only run.

    python benchmarks/bench_detect.py --out benchmarks/results/detect.json [--coadd FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import machine, run_in_child

if TYPE_CHECKING:  # the cases import their modules in their own process (the baseline's floor)
    import numpy as np
    from astropy.table import Table

TILE, BAND = "0000.000-62", "I"
#: The I co-add of ``make dr1``'s release (``ks4-dr1-demo`` beside this checkout's README).
DEMO = Path(__file__).resolve().parent.parent / "ks4-dr1-demo" / "images" / TILE / \
    f"{TILE}_{BAND}_coadd.fits"
TILED_SIZE = 4096
#: Side of the large co-add, measured in blocks only (a whole one would take ~3.5 GB).
LARGE_SIZE = 8192


def _sibling(coadd: Path, kind: str) -> Path:
    """The mask or NDITH file next to a co-add (``..._coadd.fits`` -> ``..._<kind>.fits``)."""
    return coadd.with_name(coadd.name.replace("_coadd.fits", f"_{kind}.fits"))


def _link_exposures(coadd: Path, release: Path) -> None:
    """The co-add's exposure list (``..._exposures.json``, read by the photometry task for its
    seeing map) linked into ``release``."""
    from ks4release.layout import coadd_exposures_path

    target = coadd_exposures_path(release, TILE, BAND)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(coadd.with_name(
            coadd.name.replace("_coadd.fits", "_exposures.json")).resolve())


def _source_release(coadd: Path) -> Path:
    """The release folder a co-add belongs to (``<release>/images/<tile>/<file>``)."""
    return coadd.resolve().parents[2]


def _link_release(coadd: Path, release: Path) -> None:
    """A release folder holding the co-add, mask, NDITH, exposure list and excluded pixels
    (symbolic links)."""
    from ks4release.layout import coadd_excluded_path, coadd_path

    for kind in ("coadd", "mask", "ndith"):
        target = coadd_path(release, TILE, BAND, kind)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to((coadd if kind == "coadd" else _sibling(coadd, kind)).resolve())
    _link_exposures(coadd, release)
    # the pixels where each exposure's masked data stayed out of the median (seeing map)
    target = coadd_excluded_path(release, TILE, BAND)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(coadd_excluded_path(_source_release(coadd), TILE, BAND))


def _tiled_release(coadd: Path, release: Path, size: int) -> None:
    """Co-add, mask and NDITH tiled to ``size`` x ``size`` pixels, written into ``release``
    (with an empty list of excluded pixels)."""
    import numpy as np
    from astropy.io import fits

    from ks4release.layout import coadd_excluded_path, coadd_path
    from ks4release.reduction.coadd import write_excluded

    for kind in ("coadd", "mask", "ndith"):
        with fits.open(coadd if kind == "coadd" else _sibling(coadd, kind)) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        reps = -(-size // min(data.shape))
        tiled = np.tile(data, (reps, reps))[:size, :size]
        header["CRPIX1"], header["CRPIX2"] = (size + 1) / 2.0, (size + 1) / 2.0
        target = coadd_path(release, TILE, BAND, kind)
        target.parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(tiled, header).writeto(target, overwrite=True)
    _link_exposures(coadd, release)
    # the demo's excluded pixels do not map onto the tiled grid: none are excluded there
    write_excluded(coadd_excluded_path(release, TILE, BAND), {}, (size, size))


def _sep_case(release: str, backphoto: str = "GLOBAL") -> dict:
    """Our photometry task on one co-add, with ``measure_single``'s own time."""
    import numpy as np
    from astropy.io import fits
    from astropy.table import Table

    from ks4release.layout import coadd_path
    from ks4release.reduction.photometry import (
        PhotometrySettings,
        measure_single,
        measured_path,
        run_photometry,
    )
    from ks4release.reduction.stellarity import DEFAULT_NNW, read_nnw

    release_dir, settings = Path(release), PhotometrySettings(backphoto_type=backphoto)
    t0 = time.perf_counter()
    run_photometry(release_dir=release_dir, tile=TILE, mode="single", bands=(BAND,),
                   settings=settings, nnw_path=DEFAULT_NNW)
    task_s = time.perf_counter() - t0
    rows = len(Table.read(measured_path(release_dir, TILE, "single", BAND)))
    arrays = [fits.getdata(coadd_path(release_dir, TILE, BAND, k)) for k in
              ("coadd", "mask", "ndith")]
    header = fits.getheader(coadd_path(release_dir, TILE, BAND, "coadd"))
    t0 = time.perf_counter()
    measure_single(arrays[0].astype(np.float32), arrays[1], header, BAND, settings,
                   read_nnw(DEFAULT_NNW), ndith=arrays[2])
    return {"task_s": round(task_s, 3), "measure_s": round(time.perf_counter() - t0, 3),
            "objects": rows}


def _blocks_case(release: str, whole: str | None, block_size: int | None) -> dict:
    """Our photometry task on the co-add in blocks of ``block_size`` pixels (None: the
    default; the default margin), and, given the ``whole`` release the ``sep`` case measured,
    its catalog against that."""
    from astropy.table import Table

    from ks4release.reduction.photometry import PhotometrySettings, measured_path, run_photometry
    from ks4release.reduction.stellarity import DEFAULT_NNW

    settings = PhotometrySettings() if block_size is None else \
        PhotometrySettings(block_size_px=block_size)
    t0 = time.perf_counter()
    run_photometry(release_dir=Path(release), tile=TILE, mode="single", bands=(BAND,),
                   settings=settings, nnw_path=DEFAULT_NNW)
    task_s = time.perf_counter() - t0
    ours = Table.read(measured_path(Path(release), TILE, "single", BAND))
    report = {"task_s": round(task_s, 3), "objects": len(ours), "blocks": ours.meta["blocks"],
              "block_size_px": settings.block_size_px, "block_margin_px": settings.block_margin_px}
    if whole is not None:
        report.update(_against_whole(ours, Table.read(measured_path(Path(whole), TILE,
                                                                    "single", BAND))))
    return report


def _against_whole(ours, ref) -> dict:
    """The share of the whole co-add's detections (``ref``) found again within 0.5 px, and the
    MAG_AUTO and 5" changes of its clean (FLAGS 0) S/N > 20 ones."""
    import numpy as np
    from scipy.spatial import cKDTree

    distance, match = cKDTree(np.c_[ours["x_image"], ours["y_image"]]).query(
        np.c_[ref["x_image"], ref["y_image"]])
    b = BAND.lower()
    clean = (distance < 0.5) & (ref[f"flags_{b}"] == 0) & (ref[f"snr_{b}"] > 20)
    dmag = {k: np.abs(2.5 * np.log10(np.asarray(ours[f"flux_{k}_{b}"])[match[clean]]
                                     / np.asarray(ref[f"flux_{k}_{b}"])[clean]))
            for k in ("auto", "aper5")}
    return {"whole_objects_found_within_0.5px": round(float(np.mean(distance < 0.5)), 4),
            "clean_snr20_matched": int(clean.sum()),
            "clean_snr20_share_auto_within_0.001mag": round(float(np.mean(dmag["auto"] <= 1e-3)),
                                                            4),
            "clean_snr20_max_aper5_dmag": round(float(dmag["aper5"].max()), 5)}


def _sextractor_case(release: str, folder: str, backphoto: str = "GLOBAL") -> dict:
    """SExtractor on the same co-add, timed and measured by GNU time."""
    from astropy.io import fits

    from ks4release.layout import coadd_path
    from ks4release.reduction.photometry import PhotometrySettings, psf_beta
    from ks4release.reduction.sextractor import (
        SExtractorSettings,
        prepare_sextractor,
        read_catalog,
    )

    release_dir, work = Path(release), Path(folder)
    work.mkdir(parents=True, exist_ok=True)
    image = coadd_path(release_dir, TILE, BAND, "coadd")
    ndith = fits.getdata(coadd_path(release_dir, TILE, BAND, "ndith"))
    t0 = time.perf_counter()
    command, catalog = prepare_sextractor(
        work, image, SExtractorSettings.from_photometry(
            PhotometrySettings(backphoto_type=backphoto), 0.4, psf_beta(fits.getheader(image))),
        bad=ndith <= 0, mask=fits.getdata(coadd_path(release_dir, TILE, BAND, "mask")))
    inputs_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *command], cwd=work,
                          check=True, capture_output=True, text=True)
    binary_s = time.perf_counter() - t0
    rss_kb = [line.split("=", 1)[1] for line in done.stderr.splitlines()
              if line.startswith("maxrss_kb=")]
    table = read_catalog(catalog)
    return {"inputs_s": round(inputs_s, 3), "binary_s": round(binary_s, 3),
            "binary_peak_rss_mb": round(int(rss_kb[-1]) / 1024, 1),
            "objects": len(table), "objects_on_data": _on_data(table, ndith)}


def _on_data(table: Table, ndith: np.ndarray) -> int:
    """SExtractor's detections whose isophotal centre lies on a pixel with data (NDITH > 0).
    INTERP_TYPE ALL fills zero-weight pixels up to INTERP_MAXXLAG from the last good one, so it
    also detects in a band along the edges of the data, which sep, masking them, does not."""
    import numpy as np

    ix = np.clip(np.rint(np.asarray(table["X_IMAGE"]) - 1).astype(int), 0, ndith.shape[1] - 1)
    iy = np.clip(np.rint(np.asarray(table["Y_IMAGE"]) - 1).astype(int), 0, ndith.shape[0] - 1)
    return int(np.count_nonzero(ndith[iy, ix] > 0))


def _baseline_case() -> dict:
    """The modules of the sep case imported, nothing run."""
    import sep  # noqa: F401
    from astropy.table import Table  # noqa: F401

    from ks4release.reduction import photometry  # noqa: F401

    return {}


def _image_report(name: str, release: Path, work: Path, shape: tuple[int, int],
                  backphoto: str = "GLOBAL") -> dict:
    """Our task and SExtractor on one co-add, side by side."""
    ours = run_in_child(_sep_case, str(release), backphoto)
    theirs = run_in_child(_sextractor_case, str(release), str(work / f"sex_{name}"), backphoto)
    return {"shape": list(shape), "sep": ours, "sextractor": theirs,
            "ratio_time_sep_over_sextractor": round(ours["task_s"] / theirs["binary_s"], 2),
            "ratio_time_measure_single_over_sextractor": round(
                ours["measure_s"] / theirs["binary_s"], 2),
            "ratio_peak_rss_sep_over_sextractor": round(
                ours["peak_rss_mb"] / theirs["binary_peak_rss_mb"], 2)}


def _large_report(work: Path) -> dict:
    """The large co-add: our task with the default blocks, and SExtractor."""
    ours = run_in_child(_blocks_case, str(work / "large"), None, None)
    theirs = run_in_child(_sextractor_case, str(work / "large"), str(work / "sex_large"))
    return {"shape": [LARGE_SIZE, LARGE_SIZE], "sep_blocks": ours, "sextractor": theirs,
            "ratio_time_sep_blocks_over_sextractor": round(ours["task_s"] / theirs["binary_s"],
                                                           2),
            "ratio_peak_rss_sep_blocks_over_sextractor": round(
                ours["peak_rss_mb"] / theirs["binary_peak_rss_mb"], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--coadd", type=Path, default=DEMO,
                        help="a co-add with _mask.fits and _ndith.fits beside it (default: the "
                             "demo release of `make dr1`)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if not args.coadd.is_file():
        parser.error(f"co-add not found: {args.coadd} (give --coadd)")
    from astropy.io import fits

    from ks4release.layout import coadd_path
    from ks4release.reduction.sextractor import find_sextractor

    version = subprocess.run([str(find_sextractor()), "-v"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        _link_release(args.coadd, work / "demo")
        _tiled_release(args.coadd, work / "tiled", TILED_SIZE)
        baseline = run_in_child(_baseline_case)
        images = {"demo": _image_report("demo", work / "demo", work,
                                        fits.getdata(args.coadd).shape),
                  "tiled": _image_report("tiled", work / "tiled", work,
                                         (TILED_SIZE, TILED_SIZE))}
        _link_release(coadd_path(work / "tiled", TILE, BAND, "coadd"), work / "tiled_blocks")
        blocks = run_in_child(_blocks_case, str(work / "tiled_blocks"), str(work / "tiled"),
                              TILED_SIZE // 2)
        tiled = images["tiled"]
        tiled["sep_blocks"] = blocks
        tiled["ratio_time_blocks_over_whole"] = round(blocks["task_s"] / tiled["sep"]["task_s"],
                                                      2)
        tiled["ratio_peak_rss_blocks_over_sextractor"] = round(
            blocks["peak_rss_mb"] / tiled["sextractor"]["binary_peak_rss_mb"], 2)
        images["tiled_local"] = _image_report("tiled_local", work / "tiled", work,
                                              (TILED_SIZE, TILED_SIZE), "LOCAL")
        _tiled_release(args.coadd, work / "large", LARGE_SIZE)
        images["large"] = _large_report(work)
    for report in images.values():
        for case in ("sep", "sep_blocks"):
            if case in report:
                report[f"ratio_peak_rss_above_baseline_{case}_over_sextractor"] = round(
                    (report[case]["peak_rss_mb"] - baseline["peak_rss_mb"])
                    / report["sextractor"]["binary_peak_rss_mb"], 2)
    result = {"machine": {**machine(), "platform": platform.platform(), "sextractor": version},
              "inputs": {"coadd": str(args.coadd), "tile": TILE, "band": BAND,
                         "tiled_size": TILED_SIZE, "large_size": LARGE_SIZE},
              "python_baseline": baseline, "images": images,
              "notes": ("sep task_s: run_photometry (read, measure, write Parquet); measure_s: "
                        "measure_single alone; wall_s/peak_rss_mb: the whole child process "
                        "(imports, both runs). SExtractor: the binary alone, single thread "
                        "(NTHREADS 1); writing its weight and flag files in inputs_s.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
