"""Benchmark of the release catalogs: merge, exports and the schema checker at scale.

Synthetic dual-mode tile catalogs (the format of :mod:`ks4release.tile_catalogs`) with
``--detections`` detections in all (default 10 million) on a grid of overlapping tiles are
written first; then, each in its own child process so that ``ru_maxrss`` is that case's peak
resident memory:

* ``merge``: :func:`build_idual_master` on all tiles (detections per second);
* ``export_<format>``: :func:`export_catalog` of the master in one format, without the
  automatic check (rows per second); VOTable and VizieR (written through astropy and
  cdspyreadme, per part) on the first ``--slow-rows`` rows only;
* ``check_parquet`` / ``check_fits``: :func:`check_catalog` on the exports (rows per second);
* ``peer_fits`` / ``peer_votable``: astropy ``Table.write`` of the first ``--peer-rows`` /
  ``--slow-rows`` rows read whole into memory, the usual way to write these formats.

    python benchmarks/bench_publish.py --out benchmarks/results/publish.json
                                       [--detections 10000000] [--workdir DIR]

A ``--workdir`` that already holds the tile catalogs of the same size is reused.

Not a test: 10 million detections write about 8 GB of tile catalogs and need tens of minutes
on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import machine, run_in_child

ROWS_PER_TILE = 250_000
OVERLAP = 0.12  # deg of a 1-deg tile side shared with each neighbour
CELL = 0.1  # deg: side of the cells that seed the synthetic sky


def _write_tiles(workdir: Path, n_detections: int, seed: int = 0) -> list[Path]:
    """Dual-mode tile catalogs with about ``n_detections`` detections on a square grid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ks4release.schemas import catalog_schema
    from ks4release.tile_catalogs import BANDS, band_columns, dual_catalog_path

    rng = np.random.default_rng(seed)
    n_tiles = max(1, int(round(n_detections / ROWS_PER_TILE)))
    side = int(np.ceil(np.sqrt(n_tiles)))
    step = 1.0 - OVERLAP  # tiles of 1 x 1 deg (in the tangent plane of dec -40)
    per_cell = int(ROWS_PER_TILE * CELL**2)
    spec = {c.name: c for c in catalog_schema("idual_master").columns}
    paths = []
    for t in range(n_tiles):
        i, j = t % side, t // side
        ra, dec = _sky_sources(i * step - 0.5, i * step + 0.5, j * step - 0.5, j * step + 0.5,
                               per_cell)
        n = len(ra)
        cols: dict[str, np.ndarray] = {"ra": ra + rng.normal(0, 0.07 / 3600, n),
                                       "dec": dec + rng.normal(0, 0.07 / 3600, n)}
        for band in BANDS:
            cols[f"snr_{band}"] = rng.uniform(2, 200, n)
            for name in band_columns(band):
                low = max(spec[name].low, 0.0)
                cols[name] = rng.uniform(low, min(spec[name].high, low + 30), n)
            cols[f"mag_auto_{band}"] = rng.uniform(16, 24, n)
            cols[f"magerr_auto_{band}"] = rng.uniform(0.01, 0.3, n)
            cols[f"flags_{band}"] = rng.choice([0, 0, 0, 2, 4], n).astype(float)
        arrays, fields = [], []
        for name, values in cols.items():
            dtype = spec[name].dtype if name in spec else np.dtype(np.float64)
            arrays.append(pa.array(values != 0 if dtype.kind == "b" else values.astype(dtype)))
            fields.append(pa.field(name, arrays[-1].type))
        path = dual_catalog_path(workdir / "release", f"B{t:04d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
        paths.append(path)
    return paths


def _sky_sources(x0: float, x1: float, y0: float, y1: float,
                 per_cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources in a box of the tangent plane (deg), the same on every tile that covers them.

    The plane is cut into CELL-sized cells, each with its own seeded sources, so overlapping
    tiles detect the same true sources (and the linking has real work to do).
    """
    ras, decs = [], []
    for ci in range(int(np.floor(x0 / CELL)), int(np.ceil(x1 / CELL))):
        for cj in range(int(np.floor(y0 / CELL)), int(np.ceil(y1 / CELL))):
            cell_rng = np.random.default_rng([ci + 10_000, cj + 10_000])
            x = (ci + cell_rng.random(per_cell)) * CELL
            y = (cj + cell_rng.random(per_cell)) * CELL
            keep = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
            ras.append(10.0 + x[keep] / np.cos(np.radians(-40.0 + y[keep])))
            decs.append(-40.0 + y[keep])
    return np.concatenate(ras), np.concatenate(decs)


def _merge(workdir: Path, args: dict) -> dict:
    import warnings

    from ks4release.publish.master import MasterSettings, build_idual_master
    from ks4release.sfd import SfdMapMissingWarning

    tiles = sorted((workdir / "release" / "catalogs" / "tiles").glob("*_dual.parquet"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SfdMapMissingWarning)
        t0 = time.perf_counter()
        build_idual_master(tiles, workdir / "idual_master.parquet", MasterSettings())
        wall = time.perf_counter() - t0
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(workdir / "idual_master.parquet").metadata.num_rows
    return {"wall_s": wall, "detections": args["detections"], "sources": rows,
            "detections_per_s": args["detections"] / wall}


def _subset(workdir: Path, rows: int) -> Path:
    """The first ``rows`` rows of the master catalog, as a catalog of their own."""
    import pyarrow.parquet as pq

    out = workdir / "subset" / f"master_{rows}.parquet"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        source = pq.ParquetFile(workdir / "idual_master.parquet", pre_buffer=False)
        with pq.ParquetWriter(out, source.schema_arrow) as writer:
            left = rows
            for batch in source.iter_batches(batch_size=min(rows, 100_000)):
                writer.write_batch(batch.slice(0, left))
                left -= min(left, batch.num_rows)
                if left == 0:
                    break
    return out


def _export(workdir: Path, args: dict) -> dict:
    import pyarrow.parquet as pq

    from ks4release.publish.export import ExportSettings, export_catalog

    fmt = args["format"]
    master = (workdir / "idual_master.parquet" if fmt in ("parquet", "fits", "csv")
              else _subset(workdir, args["slow_rows"]))
    rows = pq.ParquetFile(master).metadata.num_rows
    t0 = time.perf_counter()
    export_catalog(master, workdir / f"export_{fmt}", (fmt,), ExportSettings(check=False))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall}


def _check(workdir: Path, args: dict) -> dict:
    from ks4release.publish.schema_check import check_catalog

    path = {"parquet": workdir / "export_parquet" / "idual_master.parquet",
            "fits": workdir / "export_fits" / "idual_master.fits"}[args["format"]]
    t0 = time.perf_counter()
    report = check_catalog(path, "idual_master")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": report.rows, "rows_per_s": report.rows / wall,
            "ok": report.ok}


def _peer(workdir: Path, args: dict) -> dict:
    import pyarrow.parquet as pq
    from astropy.table import Table

    master = _subset(workdir, args["rows"])
    t0 = time.perf_counter()
    table = Table(pq.read_table(master).to_pandas().to_dict("list"))
    out = workdir / f"peer.{'fits' if args['format'] == 'fits' else 'vot'}"
    table.write(out, format="fits" if args["format"] == "fits" else "votable", overwrite=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": len(table), "rows_per_s": len(table) / wall}


_CASES = {"merge": _merge, "export": _export, "check": _check, "peer": _peer}


def _case(kind: str, workdir: str, args: dict) -> dict:
    """One case, its floats rounded for the JSON."""
    result = _CASES[kind](Path(workdir), args)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def run_case(kind: str, workdir: Path, **args) -> dict:
    """Run one case in a fresh process and return its measurements."""
    result = run_in_child(_case, kind, str(workdir), args)
    name = kind + (f"_{args['format']}" if "format" in args else "")
    print(name, result, flush=True)
    return {"case": name, **result}


def main(argv: list[str] | None = None) -> int:
    """Generate the tile catalogs, run the cases and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_publish.json", help="JSON file to write")
    parser.add_argument("--detections", type=int, default=10_000_000,
                        help="tile detections in all (default 10 million)")
    parser.add_argument("--slow-rows", type=int, default=20_000,
                        help="rows exported as VOTable and VizieR")
    parser.add_argument("--peer-rows", type=int, default=1_000_000,
                        help="rows written whole by astropy as the FITS peer")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_publish_"))
    t0 = time.perf_counter()
    tiles = sorted((workdir / "release" / "catalogs" / "tiles").glob("*_dual.parquet"))
    if len(tiles) != max(1, int(round(args.detections / ROWS_PER_TILE))):  # else reuse them
        tiles = _write_tiles(workdir, args.detections)
    detections = len(tiles) * ROWS_PER_TILE
    generate_s = time.perf_counter() - t0
    cases = [run_case("merge", workdir, detections=detections)]
    for fmt in ("parquet", "fits", "csv", "votable", "vizier"):
        cases.append(run_case("export", workdir, format=fmt, slow_rows=args.slow_rows))
    for fmt in ("parquet", "fits"):
        cases.append(run_case("check", workdir, format=fmt))
    cases.append(run_case("peer", workdir, format="fits", rows=args.peer_rows))
    cases.append(run_case("peer", workdir, format="votable", rows=args.slow_rows))
    results = {"machine": machine(),
               "detections": detections, "tiles": len(tiles),
               "generate_tiles_s": round(generate_s, 2), "cases": cases}
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
