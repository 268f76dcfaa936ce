"""Generated tile catalogs (the format of :mod:`ks4release.tile_catalogs`) from a known list of true sources.

A seeded truth table of point sources is observed on a grid of overlapping square tiles: each
tile detects the sources inside its footprint with per-detection noise on positions (a
tile-dependent 0.05-0.1 arcsec per coordinate) and magnitudes (errors from a 5-sigma depth),
S/N from the same depth, so faint sources fall below the S/N cut or are not detected at all, and
a few flags. Every generated detection carries its ``truth_id`` (an extra column that the release
code ignores), so that tests can measure linking against truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ks4release.schemas import catalog_schema
from ks4release.tile_catalogs import BANDS, band_columns, dual_catalog_path, single_catalog_path

__all__ = ["SurveyTruth", "TileSpec", "make_truth", "make_tiles", "observe_dual", "observe_single",
           "make_valid_catalog", "write_sfd_maps",
           "write_dual_catalogs", "write_single_catalogs"]

#: 5-sigma depths of the generated tiles per band (AB mag).
DEPTH = {"b": 22.0, "v": 22.3, "r": 22.3, "i": 22.0}
PIXEL_ARCSEC = 0.4


@dataclass(frozen=True)
class TileSpec:
    """A square tile: name, centre and half side (deg)."""

    name: str
    ra: float
    dec: float
    half: float

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        dx = ((ra - self.ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(self.dec))
        return (np.abs(dx) < self.half) & (np.abs(dec - self.dec) < self.half)

    def edge_distance(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        dx = ((ra - self.ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(self.dec))
        return self.half - np.maximum(np.abs(dx), np.abs(dec - self.dec))


@dataclass(frozen=True)
class SurveyTruth:
    """True sources: ids, positions (deg) and magnitudes per band letter."""

    ids: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    mags: dict[str, np.ndarray]


def make_truth(n: int, *, ra0: float = 150.0, dec0: float = -30.0, size_deg: float = 0.2,
               seed: int = 0) -> SurveyTruth:
    """``n`` point sources uniform in a square of ``size_deg`` around (ra0, dec0)."""
    rng = np.random.default_rng(seed)
    half = size_deg / 2
    dec = dec0 + rng.uniform(-half, half, n)
    ra = (ra0 + rng.uniform(-half, half, n) / np.cos(np.radians(dec0))) % 360.0
    base = 16.0 + 7.0 * rng.power(2.5, n)  # more faint sources than bright ones
    color = rng.normal(0.6, 0.3, n)
    mags = {"b": base + color, "v": base + 0.5 * color, "r": base + 0.2 * color, "i": base}
    return SurveyTruth(np.arange(n), ra, dec, mags)


def make_tiles(*, ra0: float = 150.0, dec0: float = -30.0, n_ra: int = 2, n_dec: int = 2,
               side_deg: float = 0.12, overlap_deg: float = 0.03) -> list[TileSpec]:
    """A grid of overlapping square tiles centred on (ra0, dec0)."""
    step = side_deg - overlap_deg
    tiles = []
    for j in range(n_dec):
        for i in range(n_ra):
            dec = dec0 + (j - (n_dec - 1) / 2) * step
            ra = (ra0 + (i - (n_ra - 1) / 2) * step / np.cos(np.radians(dec0))) % 360.0
            tiles.append(TileSpec(f"T{i}{j}", ra, dec, side_deg / 2))
    return tiles


def _snr(mag: np.ndarray, band: str) -> np.ndarray:
    return 5.0 * 10 ** (-0.4 * (mag - DEPTH[band]))


def _band_values(rng: np.random.Generator, truth_mag: np.ndarray, band: str, edge: np.ndarray,
                 tile_index: int) -> dict[str, np.ndarray]:
    """Noisy Table 3 measurements of one band (float64, NaN for null)."""
    n = len(truth_mag)
    snr = _snr(truth_mag, band) * rng.uniform(0.9, 1.1, n)
    err = 1.0857 / snr
    out: dict[str, np.ndarray] = {f"snr_{band}": snr}
    mag = truth_mag + rng.normal(0.0, err)
    out[f"mag_auto_{band}"] = np.where(snr > 1.0, mag, np.nan)
    out[f"magerr_auto_{band}"] = np.where(snr > 1.0, err, np.nan)
    for k, radius in ((3, 3.0), (5, 5.0), (10, 10.0)):
        aper_err = err * (radius / 4.0)
        aper = truth_mag + 0.1 / radius + rng.normal(0.0, aper_err)
        out[f"mag_aper{k}_{band}"] = np.where(snr > 1.0, aper, np.nan)
        out[f"magerr_aper{k}_{band}"] = np.where(snr > 1.0, aper_err, np.nan)
    mjd = 58000.0 + 400.0 * tile_index + {"b": 0.0, "v": 1.0, "r": 2.0, "i": 3.0}[band]
    out[f"min_mjd_{band}"] = np.full(n, mjd)
    out[f"max_mjd_{band}"] = np.full(n, mjd + 0.01)
    out[f"mean_mjd_{band}"] = np.full(n, mjd + 0.005)
    fwhm = rng.uniform(1.0, 2.0) + rng.normal(0.0, 0.05, n)
    out[f"fwhm_image_{band}"] = fwhm
    out[f"class_star_{band}"] = np.clip(rng.normal(0.9, 0.05, n), 0.0, 1.0)
    out[f"flux_radius_{band}"] = fwhm / 2.0
    out[f"kron_radius_{band}"] = rng.uniform(3.5, 4.5, n)
    out[f"flux_max_{band}"] = 10 ** (-0.4 * (truth_mag - 30.0)) / 20.0
    out[f"theta_image_{band}"] = rng.uniform(-90.0, 90.0, n)
    out[f"ellipticity_{band}"] = rng.uniform(0.0, 0.2, n)
    out[f"a_image_{band}"] = fwhm / PIXEL_ARCSEC / 2.0
    out[f"b_image_{band}"] = out[f"a_image_{band}"] * (1.0 - out[f"ellipticity_{band}"])
    flags = np.zeros(n)
    flags[rng.random(n) < 0.03] = 2.0  # blended
    flags[truth_mag < 16.5] = 4.0  # saturated
    out[f"flags_{band}"] = flags
    out[f"imaflags_iso_{band}"] = np.where(rng.random(n) < 0.02, rng.choice([1, 2, 4, 8], n), 0)
    out[f"ssflag_{band}"] = (rng.random(n) < 0.01).astype(np.float64)
    out[f"sscount_30_{band}"] = rng.integers(0, 3, n).astype(np.float64)
    out[f"ndith_{band}"] = np.full(n, float(rng.integers(3, 6)))
    out[f"edge_{band}"] = (edge < 30.0 / 3600.0).astype(np.float64)
    return out


def _positions(rng: np.random.Generator, truth: SurveyTruth, rows: np.ndarray, tile: TileSpec,
               sigma_arcsec: float) -> dict[str, np.ndarray]:
    dec = truth.dec[rows] + rng.normal(0.0, sigma_arcsec / 3600.0, len(rows))
    ra = (truth.ra[rows] + rng.normal(0.0, sigma_arcsec / 3600.0, len(rows))
          / np.cos(np.radians(truth.dec[rows]))) % 360.0
    dx = ((ra - tile.ra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(tile.dec))
    return {"ra": ra, "dec": dec,
            "x_image": dx * 3600.0 / PIXEL_ARCSEC + tile.half * 3600.0 / PIXEL_ARCSEC,
            "y_image": (dec - tile.dec + tile.half) * 3600.0 / PIXEL_ARCSEC,
            "truth_id": truth.ids[rows].astype(np.float64)}


def observe_dual(truth: SurveyTruth, tiles: list[TileSpec], *, seed: int = 1,
                 detect_snr: float = 2.0) -> dict[str, dict[str, np.ndarray]]:
    """Dual-mode detections per tile: I-band detection with S/N > ``detect_snr``."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, tile in enumerate(tiles):
        rows = np.flatnonzero(tile.contains(truth.ra, truth.dec)
                              & (_snr(truth.mags["i"], "i") > detect_snr))
        cols = _positions(rng, truth, rows, tile, rng.uniform(0.05, 0.1))
        edge = tile.edge_distance(truth.ra[rows], truth.dec[rows])
        for band in BANDS:
            cols.update(_band_values(rng, truth.mags[band][rows], band, edge, index))
        out[tile.name] = cols
    return out


def observe_single(truth: SurveyTruth, tiles: list[TileSpec], *, seed: int = 2,
                   detect_snr: float = 2.0,
                   bands_of: dict[str, tuple[str, ...]] | None = None,
                   ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Single-mode detections per tile and band (S/N > ``detect_snr`` in that band)."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, tile in enumerate(tiles):
        for band in (bands_of or {}).get(tile.name, BANDS):
            rows = np.flatnonzero(tile.contains(truth.ra, truth.dec)
                                  & (_snr(truth.mags[band], band) > detect_snr))
            sigma = rng.uniform(0.05, 0.1)
            cols = _positions(rng, truth, rows, tile, sigma)
            cols["raerr"] = np.full(len(rows), sigma)
            cols["decerr"] = np.full(len(rows), sigma)
            edge = tile.edge_distance(truth.ra[rows], truth.dec[rows])
            cols.update(_band_values(rng, truth.mags[band][rows], band, edge, index))
            out[(tile.name, band)] = cols
    return out


def _to_table(cols: dict[str, np.ndarray], tile: str, names: list[str]) -> pa.Table:
    spec = {c.name: c for c in catalog_schema("idual_master").columns}
    fields, arrays = [], []
    for name in names:
        values = np.asarray(cols[name])
        null = np.isnan(values)
        if name in spec:
            dtype = spec[name].dtype
            meta = {"unit": spec[name].unit, "description": spec[name].description}
        else:
            dtype = np.dtype(np.float32) if name != "truth_id" else np.dtype(np.int64)
            meta = {"unit": "deg" if name in ("ra", "dec") else "", "description": name}
            if name in ("ra", "dec"):
                dtype = np.dtype(np.float64)
        filled = np.where(null, 0, values)
        typed = filled != 0 if dtype.kind == "b" else filled.astype(dtype)
        arrays.append(pa.array(typed, mask=null if null.any() else None))
        fields.append(pa.field(name, arrays[-1].type, metadata=meta))
    fields.append(pa.field("tile", pa.string()))
    arrays.append(pa.array([tile] * len(arrays[0]), type=pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_dual_catalogs(release_dir: Path,
                        observed: dict[str, dict[str, np.ndarray]]) -> list[Path]:
    """Write ``<tile>_dual.parquet`` files; returns their paths."""
    names = ["ra", "dec", "x_image", "y_image", "truth_id"]
    names += [f"snr_{b}" for b in BANDS] + [n for b in BANDS for n in band_columns(b)]
    paths = []
    for tile, cols in observed.items():
        path = dual_catalog_path(release_dir, tile)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_to_table(cols, tile, names), path)
        paths.append(path)
    return paths


def write_single_catalogs(release_dir: Path,
                          observed: dict[tuple[str, str], dict[str, np.ndarray]]) -> list[Path]:
    """Write ``<tile>_single_<band>.parquet`` files; returns their paths."""
    paths = []
    for (tile, band), cols in observed.items():
        names = ["ra", "dec", "raerr", "decerr", "x_image", "y_image", "truth_id", f"snr_{band}"]
        names += list(band_columns(band))
        path = single_catalog_path(release_dir, tile, band)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_to_table(cols, tile, names), path)
        paths.append(path)
    return paths


def write_sfd_maps(folder: Path, ebv, *, scale: int = 32) -> tuple[Path, Path]:
    """Small E(B-V) maps in SFD's file format (Lambert ZEA, one per Galactic hemisphere).

    Same headers as ``SFD_dust_4096_{ngp,sgp}.fits`` (``LAM_NSGP``, ``LAM_SCAL``, ``GLON-ZEA``,
    ``CRVAL1 = +-90``, ``LONPOLE = 180``) with ``LAM_SCAL = scale`` instead of 2048 pixels from
    pole to equator; each pixel holds ``ebv(l, b)`` at its centre (as in SFD's files, the
    projection goes on a little past the equator, so interpolation near b = 0 stays within one
    file).
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    folder.mkdir(parents=True, exist_ok=True)
    cdelt = np.degrees(np.sqrt(2.0)) / scale
    paths = []
    for sign, name in ((1, "ngp"), (-1, "sgp")):
        header = fits.Header()
        header["CTYPE1"], header["CTYPE2"] = "GLON-ZEA", "GLAT-ZEA"
        header["CRPIX1"] = header["CRPIX2"] = scale + 0.5
        header["CRVAL1"], header["CRVAL2"] = 90.0 * sign, 90.0 * sign
        header["CDELT1"], header["CDELT2"] = -cdelt * sign, cdelt * sign
        header["LONPOLE"] = 180.0
        header["LAM_NSGP"] = sign
        header["LAM_SCAL"] = scale
        wcs = WCS(header)
        iy, ix = np.mgrid[0:2 * scale, 0:2 * scale]
        with np.errstate(invalid="ignore"):
            glon, glat = wcs.wcs_pix2world(ix.ravel(), iy.ravel(), 0)
        values = np.where(np.isfinite(glat), ebv(glon, glat), 0.0)
        data = np.nan_to_num(values).reshape(ix.shape).astype(np.float32)
        path = folder / f"SFD_dust_{2 * scale}_{name}.fits"
        fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]


def make_valid_catalog(catalog: str, n: int, seed: int = 0, null_fraction: float = 0.2) -> pa.Table:
    """A random catalog table that satisfies its schema (ids consistent with positions).

    Values are uniform within each column's allowed range (at most 2000 wide, from -1000 up),
    nullable columns are null with probability ``null_fraction``; rows are sorted by
    ``coadd_object_id``. The schema metadata names the catalog, as the master builder writes.
    """
    from astropy.coordinates import SkyCoord

    from ks4release.ids import encode_ids, healpix_index, running_numbers
    from ks4release.schemas import columns_to_batch

    schema = catalog_schema(catalog)
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for spec in schema.columns:
        if spec.datatype == "boolean":
            values = rng.integers(0, 2, n).astype(np.float64)
        else:
            low = max(spec.low, -1000.0)
            high = min(spec.high, low + 2000.0)
            values = rng.uniform(low, high, n)
            if spec.datatype in ("short", "int", "long"):
                values = np.clip(np.round(values), np.ceil(low), np.floor(high))
                if not spec.high_inclusive:
                    values = np.minimum(values, np.ceil(high) - 1)
                if not spec.low_inclusive:
                    values = np.maximum(values, np.floor(low) + 1)
            if spec.datatype == "float":  # keep float32 rounding inside the range
                values = np.clip(values, np.nextafter(np.float32(low), np.float32(high)),
                                 np.nextafter(np.float32(high), np.float32(low))).astype(np.float32)
        if spec.nullable:
            values = np.where(rng.random(n) < null_fraction, np.nan, values)
        cols[spec.name] = np.asarray(values, dtype=np.float64)
    cols["ra"] = rng.uniform(0, 360, n)
    cols["dec"] = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    cells = healpix_index(cols["ra"], cols["dec"])
    order = np.lexsort((cols["dec"], cols["ra"], cells))
    cols = {k: v[order] for k, v in cols.items()}
    cells = cells[order]
    cols["healpix_index"] = cells
    cols["coadd_object_id"] = encode_ids(cells, running_numbers(cells))
    galactic = SkyCoord(ra=cols["ra"], dec=cols["dec"], unit="deg").galactic
    cols["glon"], cols["glat"] = galactic.l.deg % 360.0, galactic.b.deg
    batch = columns_to_batch(cols, schema)
    return pa.Table.from_batches([batch])
