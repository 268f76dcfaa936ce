"""The release catalogs ``idual_master`` and ``single_master`` (DR1 section 4.2).

:func:`build_idual_master` reads every tile's dual-mode catalog, keeps the detections that pass
DR1's cuts in the detection band (``snr > snr_min`` and ``flags < flags_max``), links them across
tiles within 0.5 arcsec (:mod:`publish.link`) and writes one aggregated row per source
(:mod:`publish.aggregate`). :func:`build_single_master` first merges each tile's single-band
lists band by band within 0.8 arcsec (:mod:`publish.bandmerge`; a single-band detection enters
when it passes the same cuts in its band), then links and aggregates the merged entries across
tiles the same way.

Both then add the derived columns: ``coadd_object_id`` and ``healpix_index``
(:mod:`ks4release.ids`; the running number counts sources in a cell in order of right ascension
then declination, so a rerun on the same inputs gives the same identifiers, whatever the order of
the input files and rows), ``glon``/``glat`` and ``ebmv_sfd`` (:mod:`ks4release.sfd`). The output
is a Parquet file whose columns, types, units, UCDs and descriptions come from the felis schema
(:mod:`ks4release.schemas`), sorted by ``coadd_object_id``.

Memory: the first pass streams the tile catalogs into an uncompressed Arrow file beside the
output (deleted at the end) and keeps only positions in memory; the second pass aggregates
``chunk_rows`` sources at a time, reading from the Arrow file only the record batches (pieces of
tile catalogs) that hold their detections (sources are in HEALPix order, so a chunk covers a
compact patch of sky and few tiles), and appends them to the output as one Parquet row group.
Memory grows with the number of detections only through positions, the KD-tree of the linking
and group indices (roughly 100 bytes per detection).
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from ks4release import __version__
from ks4release.atomic import atomic_path, temporary_sibling
from ks4release.errors import InputError
from ks4release.ids import encode_ids, healpix_index, running_numbers
from ks4release.publish.aggregate import aggregate_groups
from ks4release.publish.bandmerge import NdithLookup, merge_bands
from ks4release.publish.link import link_detections, mean_positions, merge_disjoint_groups
from ks4release.schemas import CatalogSchema, catalog_schema, columns_to_batch
from ks4release.settings import MasterSettings
from ks4release.sfd import SfdMap, SfdMapMissingWarning
from ks4release.tile_catalogs import BANDS, band_columns, parse_tile_catalog_name

__all__ = [
    "MasterSettings",
    "build_idual_master",
    "build_single_master",
    "plan_sources",
]

logger = logging.getLogger(__name__)

_NDITH_RE = re.compile(r"^(?P<tile>.+)_(?P<band>[BVRI])_ndith\.fits$")



@dataclass
class _Staged:
    """Detections staged in an Arrow file, with their positions and tiles in memory."""

    path: Path
    ra: np.ndarray
    dec: np.ndarray
    tile_code: np.ndarray
    batch_rows: np.ndarray  # rows of each record batch of the file


def _float_columns(batch: pa.RecordBatch | pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    """float64 numpy columns with NaN for null (booleans become 0/1)."""
    out = {}
    for name in names:
        column = batch.column(name)
        if pa.types.is_boolean(column.type):
            column = pc.cast(column, pa.int8())
        out[name] = np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False),
                               dtype=np.float64)
    return out


def _require_columns(path: Path, available: Sequence[str], needed: Sequence[str]) -> None:
    missing = [n for n in needed if n not in available]
    if missing:
        raise InputError(path, f"tile catalog lacks column(s) {', '.join(missing)}",
                         column=missing[0])


def _passes_cuts(cols: dict[str, np.ndarray], band: str, settings: MasterSettings) -> np.ndarray:
    snr = cols[f"snr_{band}"]
    flags = cols[f"flags_{band}"]
    with np.errstate(invalid="ignore"):
        return (snr > settings.snr_min) & (flags < settings.flags_max)


class _StageWriter:
    """Appends float64 column batches plus a tile code to an Arrow IPC file."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = path
        self.names = list(names)
        fields = [pa.field(n, pa.float64()) for n in self.names]
        fields.append(pa.field("tile_code", pa.int32()))
        self.schema = pa.schema(fields)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self.ra: list[np.ndarray] = []
        self.dec: list[np.ndarray] = []
        self.tile_code: list[np.ndarray] = []
        self.batch_rows: list[int] = []

    def write(self, cols: dict[str, np.ndarray], tile_code: int) -> None:
        n = len(cols["ra"])
        if n == 0:
            return
        codes = np.full(n, tile_code, dtype=np.int32)
        arrays = [pa.array(cols[name], type=pa.float64()) for name in self.names]
        self._writer.write_batch(pa.record_batch(arrays + [pa.array(codes)], schema=self.schema))
        self.ra.append(cols["ra"])
        self.dec.append(cols["dec"])
        self.tile_code.append(codes)
        self.batch_rows.append(n)

    def close(self) -> _Staged:
        self._writer.close()
        self._sink.close()
        return _Staged(self.path, _concat(self.ra, np.float64), _concat(self.dec, np.float64),
                       _concat(self.tile_code, np.int32),
                       np.asarray(self.batch_rows, dtype=np.int64))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _stage_dual(tile_catalogs: Sequence[Path], stage_path: Path,
                settings: MasterSettings) -> _Staged:
    names = ["ra", "dec"] + [n for b in BANDS for n in band_columns(b)]
    det = settings.detection_band
    writer = _StageWriter(stage_path, names)
    for code, path in enumerate(_sorted_by_tile(tile_catalogs, mode="dual")):
        parquet = pq.ParquetFile(path, pre_buffer=False)  # no read-ahead of the whole file
        needed = names + [f"snr_{det}"]
        _require_columns(path, parquet.schema_arrow.names, needed)
        for batch in parquet.iter_batches(columns=needed, batch_size=settings.chunk_rows):
            cols = _float_columns(batch, needed)
            keep = _passes_cuts(cols, det, settings)
            writer.write({n: cols[n][keep] for n in names}, code)
    return writer.close()


def _sorted_by_tile(paths: Sequence[Path], *, mode: str) -> list[Path]:
    """Tile catalogs in order of tile name, checking their mode."""
    keyed = []
    for path in paths:
        tile, band = parse_tile_catalog_name(Path(path))
        if (band is None) != (mode == "dual"):
            raise InputError(path, f"expected a {mode}-mode tile catalog")
        keyed.append((tile, band or "", Path(path)))
    return [p for _, _, p in sorted(keyed)]


def _ndith_lookups(ndith_maps: Sequence[Path]) -> dict[tuple[str, str], NdithLookup]:
    """NDITH map readers by (tile, band letter) from ``<tile>_<BAND>_ndith.fits`` files."""
    lookups: dict[tuple[str, str], NdithLookup] = {}
    for path in ndith_maps:
        match = _NDITH_RE.match(Path(path).name)
        if match is None:
            raise InputError(path, "not an NDITH map name (expected <tile>_<BAND>_ndith.fits)")
        lookups[(match["tile"], match["band"].lower())] = _ndith_lookup(Path(path))
    return lookups


def _ndith_lookup(path: Path) -> NdithLookup:
    def lookup(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        with fits.open(path, memmap=True) as hdul:
            data = hdul[0].data
            x, y = WCS(hdul[0].header).celestial.wcs_world2pix(ra, dec, 0)
            ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
            inside = (ix >= 0) & (iy >= 0) & (ix < data.shape[1]) & (iy < data.shape[0])
            out = np.zeros(len(ra))
            out[inside] = data[iy[inside], ix[inside]]
        return out

    return lookup


def _stage_single(tile_catalogs: Sequence[Path], stage_path: Path, settings: MasterSettings,
                  ndith_maps: Sequence[Path]) -> _Staged:
    by_tile: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in _sorted_by_tile(tile_catalogs, mode="single"):
        tile, band = parse_tile_catalog_name(path)
        by_tile[tile][band] = path
    lookups = _ndith_lookups(ndith_maps)
    names = ["ra", "dec", "raerr", "decerr"] + [n for b in BANDS for n in band_columns(b)]
    writer = _StageWriter(stage_path, names)
    for code, tile in enumerate(sorted(by_tile)):
        band_tables = {}
        for band, path in by_tile[tile].items():
            needed = ["ra", "dec", "raerr", "decerr", f"snr_{band}", *band_columns(band)]
            parquet = pq.ParquetFile(path, pre_buffer=False)  # no read-ahead of the whole file
            _require_columns(path, parquet.schema_arrow.names, needed)
            cols = _float_columns(parquet.read(columns=needed), needed)
            keep = _passes_cuts(cols, band, settings)
            band_tables[band] = {n: v[keep] for n, v in cols.items()}
        merged = merge_bands(
            band_tables, order=settings.band_merge_order,
            radius_arcsec=settings.band_merge_radius_arcsec,
            merge_radius_arcsec=settings.second_pass_radius_arcsec,
            ndith_lookup={b: f for (t, b), f in lookups.items() if t == tile})
        writer.write(merged, code)
    return writer.close()


# --- linking, ordering and the chunked aggregation -------------------------------------------


@dataclass
class _Plan:
    """Which staged rows make each output source, in output order."""

    rows: np.ndarray  # staged row indices, grouped by output source
    starts: np.ndarray  # start of each source in ``rows`` (plus the end)
    ra: np.ndarray
    dec: np.ndarray
    cells: np.ndarray
    ids: np.ndarray


def plan_sources(staged: _Staged, link_radius_arcsec: float,
                 second_pass_radius_arcsec: float = 0.0) -> _Plan:
    """Link staged detections and order the sources by HEALPix cell, RA and Dec."""
    canonical = np.lexsort((staged.dec, staged.ra, staged.tile_code))
    ra, dec, tiles = staged.ra[canonical], staged.dec[canonical], staged.tile_code[canonical]
    labels = link_detections(ra, dec, tiles, link_radius_arcsec)
    if second_pass_radius_arcsec > 0:
        labels = merge_disjoint_groups(ra, dec, labels, tiles, second_pass_radius_arcsec)
    n_groups = int(labels.max()) + 1 if labels.size else 0
    gra, gdec = mean_positions(ra, dec, labels, n_groups)
    cells = healpix_index(gra, gdec)
    group_order = np.lexsort((gdec, gra, cells))
    rank = np.empty(n_groups, dtype=np.int64)
    rank[group_order] = np.arange(n_groups)
    by_rank = np.argsort(rank[labels], kind="stable")
    rows = canonical[by_rank]
    counts = np.bincount(rank[labels], minlength=n_groups)
    cells = cells[group_order]
    return _Plan(rows=rows, starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                 ra=gra[group_order], dec=gdec[group_order], cells=cells,
                 ids=encode_ids(cells, running_numbers(cells)))


def _derived_columns(plan: _Plan, a: int, b: int, sfd: SfdMap | None) -> dict[str, np.ndarray]:
    ra, dec = plan.ra[a:b], plan.dec[a:b]
    galactic = SkyCoord(ra=ra, dec=dec, unit="deg", frame="icrs").galactic
    glon, glat = galactic.l.deg % 360.0, galactic.b.deg
    return {
        "coadd_object_id": plan.ids[a:b], "healpix_index": plan.cells[a:b],
        "ra": ra, "dec": dec, "glon": glon, "glat": glat,
        "ebmv_sfd": sfd.ebv(glon, glat) if sfd else np.full(b - a, np.nan),
    }


def _iter_chunks(plan: _Plan, chunk_rows: int) -> Iterator[tuple[int, int]]:
    n = len(plan.ids)
    for a in range(0, n, chunk_rows):
        yield a, min(n, a + chunk_rows)


def _read_rows(reader: pa.ipc.RecordBatchFileReader, batch_rows: np.ndarray,
               rows: np.ndarray) -> pa.Table:
    """Rows of the staged file, in the given order, reading only the batches that hold them."""
    offsets = np.concatenate([[0], np.cumsum(batch_rows)])
    which = np.searchsorted(offsets, rows, side="right") - 1
    needed = np.unique(which)
    table = pa.Table.from_batches([reader.get_batch(int(i)) for i in needed],
                                  schema=reader.schema)
    local_offsets = np.concatenate([[0], np.cumsum(batch_rows[needed])])
    local = rows - offsets[which] + local_offsets[np.searchsorted(needed, which)]
    return table.take(pa.array(local))


def _write_master(staged: _Staged, out_path: Path, schema: CatalogSchema,
                  settings: MasterSettings) -> int:
    """Link, aggregate and write the catalog; returns its number of rows."""
    plan = plan_sources(staged, settings.link_radius_arcsec, settings.second_pass_radius_arcsec)
    sfd = SfdMap(settings.sfd_ngp, settings.sfd_sgp) if settings.sfd_ngp else None
    if sfd is None:
        warnings.warn(f"{schema.catalog}: no SFD dust map configured (sfd_ngp, sfd_sgp): "
                      "ebmv_sfd is null", SfdMapMissingWarning, stacklevel=3)
    reader = pa.ipc.open_file(pa.OSFile(str(staged.path)))
    value_names = [n for n in reader.schema.names if n != "tile_code"]
    arrow_schema = schema.arrow_schema().with_metadata({
        **schema.arrow_schema().metadata, b"release": settings.release_name.encode(),
        b"software": f"ks4release {__version__}".encode()})
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, arrow_schema) as writer:
        for a, b in _iter_chunks(plan, settings.chunk_rows):
            rows = plan.rows[plan.starts[a]:plan.starts[b]]
            group = np.repeat(np.arange(b - a), np.diff(plan.starts[a:b + 1]))
            cols = _float_columns(_read_rows(reader, staged.batch_rows, rows), value_names)
            out = aggregate_groups(cols, group, b - a, BANDS)
            out.update(_derived_columns(plan, a, b, sfd))
            for band in BANDS:  # no measurement in the band: not near an edge
                out[f"edge_{band}"] = np.nan_to_num(out[f"edge_{band}"], nan=0.0)
            batch = columns_to_batch(out, schema)
            writer.write_batch(batch.replace_schema_metadata(arrow_schema.metadata))
    return len(plan.ids)


def build_idual_master(tile_catalogs: Sequence[Path], out_path: Path,
                       settings: MasterSettings) -> None:
    """Build ``idual_master`` from dual-mode tile catalogs (task function).

    Reads every ``<tile>_dual.parquet`` of ``tile_catalogs``; writes ``out_path`` (Parquet)
    atomically, with a temporary staging file beside it that is removed at the end.
    """
    _build(tile_catalogs, Path(out_path), settings, "idual_master", ndith_maps=())


def build_single_master(tile_catalogs: Sequence[Path], out_path: Path,
                        settings: MasterSettings, ndith_maps: Sequence[Path] = ()) -> None:
    """Build ``single_master`` from single-mode tile catalogs (task function).

    Reads every ``<tile>_single_<band>.parquet`` of ``tile_catalogs`` and the optional NDITH
    maps ``<tile>_<BAND>_ndith.fits`` (the co-add products) used for non-detections; writes
    ``out_path`` (Parquet) atomically.
    """
    _build(tile_catalogs, Path(out_path), settings, "single_master", ndith_maps=ndith_maps)


def _build(tile_catalogs: Sequence[Path], out_path: Path, settings: MasterSettings,
           catalog: str, ndith_maps: Sequence[Path]) -> None:
    if not tile_catalogs:
        raise ValueError(f"{catalog}: no tile catalogs given")
    work = temporary_sibling(out_path)
    work.mkdir(parents=True)  # parents: the output folder may not exist yet
    try:
        stage_path = work / "detections.arrow"
        if catalog == "idual_master":
            staged = _stage_dual(tile_catalogs, stage_path, settings)
        else:
            staged = _stage_single(tile_catalogs, stage_path, settings, ndith_maps)
        n = _write_master(staged, out_path, catalog_schema(catalog), settings)
        logger.info("%s: %d sources from %d detections", catalog, n, len(staged.ra))
    finally:
        shutil.rmtree(work, ignore_errors=True)
