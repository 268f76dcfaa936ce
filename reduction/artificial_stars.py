"""Artificial stars injected into the co-adds: the noise bias of faint point sources' MAG_AUTO.

At low S/N a point source's Kron ellipse is drawn by the same noise it then sums (and by the
light of the sources below the detection threshold around it): an excess widens the isophotes
and the first moment, and the wider ellipse takes the excess in. So faint stars' MAG_AUTO
reads brighter than the light a noiseless PSF leaves in their ellipse, which is all that
:func:`.postprocess.kron_loss_correction` restores (``tests/test_faint_auto_photometry.py``).
On the demo's co-adds injected stars read 0.017-0.040 mag too bright at S/N 10-20 and
0.004-0.009 at 20-30 after that correction; at 1/4 scale the catalogs' true stars read about as
much (``benchmarks/inject_stars.py``).

The classic artificial-star test measures it where it arises: Moffat stars of the co-add's
SEEING and PSFBETA (pixel-integrated, :func:`.moffat.integrated_moffat`) are added on a
grid (one star per ``max(70 px, 15 FWHM)`` cell, at a random place in it, wherever the co-add
has data) to the co-add's central square, which the photometry then measures as it measured
the co-add, but without the median stack's flux factors (injected light never went through the
median). 15% of the stars are bright (S/N 400, the reference), the others of true S/N
log-uniform between 8 and 150 (over the co-add's sky noise, with the PSF's noise-equivalent
area). A star is found when a detection lies within 1 px; found stars with FLAGS < 4 give
MAG_AUTO after the Kron loss correction, and the 5" magnitude, less the true ones and less the
bright stars' median of the same co-add (:func:`offsets`).

:func:`run_auto_noise_calibration` does this for every co-add of a band and fits
``offset = -k / snr**2`` (``snr`` = FLUX_AUTO / FLUXERR_AUTO as measured) by weighted least
squares to the median offsets in bins of S/N 10-70 (:func:`fit_auto_noise`); the catalogs add
``k / max(snr, 10)**2`` to the MAG_AUTO of the sources that get the Kron loss correction, in
single mode and for dual mode's detection band (a forced band's ellipse comes from the
detection band's noise, not its own). Ours, not DR1's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs.utils import proj_plane_pixel_scales

from ks4release.atomic import atomic_write_text
from ks4release.layout import coadd_excluded_path, coadd_exposures_path, coadd_path
from ks4release.reduction.coadd import read_excluded
from ks4release.reduction.coadd_maps import coadd_wcs, read_exposures_json
from ks4release.reduction.moffat import integrated_moffat, moffat_enclosed_fraction
from ks4release.reduction.photometry import measure_single, psf_beta
from ks4release.reduction.photometry_blocks import central_block, crop_excluded, crop_header
from ks4release.reduction.postprocess import kron_loss_correction
from ks4release.reduction.stellarity import Network, read_nnw
from ks4release.settings import PhotometrySettings, PostprocessSettings

__all__ = ["AutoNoiseBias", "auto_noise_path", "fit_auto_noise", "inject_coadd", "median_se",
           "offsets", "read_auto_noise", "run_auto_noise_calibration"]

BRIGHT_SNR, BRIGHT_SHARE, FAINT_SNR = 400.0, 0.15, (8.0, 150.0)
#: Bins of measured S/N whose median offsets :func:`fit_auto_noise` fits.
FIT_SNR_EDGES = (10, 15, 20, 30, 45, 70)
#: Fewest stars of a bin that enters the fit.
FIT_MIN_STARS = 20
#: The S/N below which the correction stays at its value at this S/N (the fit's lowest bin).
SNR_FLOOR = 10.0
MATCH_PX, MIN_STEP_PX, STEP_FWHM = 1.0, 70, 15.0


@dataclass(frozen=True)
class AutoNoiseBias:
    """One band's calibration: a point source of measured S/N ``s`` reads ``k / s**2`` mag too
    bright after the Kron loss correction. Not ``applied`` (k = 0): ``reason`` says why."""

    band: str
    k: float
    k_err: float
    n_stars: int
    snr: tuple[float, ...] = ()       # median measured S/N of each fitted bin
    offset: tuple[float, ...] = ()    # median offset there (mag)
    error: tuple[float, ...] = ()     # its standard error
    applied: bool = True
    reason: str = ""

    def correction(self, snr: np.ndarray) -> np.ndarray:
        """Magnitudes to add to MAG_AUTO at measured ``snr`` (0 where it is not finite)."""
        s = np.maximum(np.asarray(snr, dtype=float), SNR_FLOOR)
        return np.where(np.isfinite(s), self.k / s ** 2, 0.0) if self.applied \
            else np.zeros(np.shape(snr))


def auto_noise_path(release_dir: Path, band: str) -> Path:
    """``work/catalog/auto_noise_<BAND>.json`` beside the measurement tables."""
    return Path(release_dir) / "work" / "catalog" / f"auto_noise_{band.upper()}.json"


def read_auto_noise(path: Path) -> AutoNoiseBias:
    """A calibration written by :func:`run_auto_noise_calibration`."""
    payload = json.loads(Path(path).read_text())
    fields = {f.name for f in dataclasses.fields(AutoNoiseBias)}
    return AutoNoiseBias(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in payload.items() if k in fields})


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


def _crop(path: Path, rows: slice, cols: slice) -> np.ndarray:
    """The ``rows, cols`` part of a FITS image, read memory-mapped (native byte order)."""
    with fits.open(path, memmap=True) as hdul:
        data = hdul[0].data
        return np.asarray(data[rows, cols], dtype=data.dtype.newbyteorder("="))


def inject_coadd(release: Path, tile: str, band: str, settings: PhotometrySettings,
                 network: Network, runs: int, region: int, seed: int) -> Table:
    """Every star injected into one co-add's central ``region`` square in ``runs`` grids:
    true values and, when found, the measured ones (NaN otherwise)."""
    settings = dataclasses.replace(settings, stack_flux_correction=False)
    path = coadd_path(release, tile, band, "coadd")
    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header.copy()
        shape = hdul[0].data.shape
        block = central_block(shape, region, 0, settings.back_size_px)
        rows, cols = block.slices
        image = np.asarray(hdul[0].data[rows, cols], dtype=np.float32)
    mask, depth = (_crop(coadd_path(release, tile, band, kind), rows, cols)
                   for kind in ("mask", "ndith"))
    excluded = crop_excluded(read_excluded(coadd_excluded_path(release, tile, band), shape),
                             shape, block)
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
    out = []
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
            out.append(row)
    result = Table(rows=out) if out else Table()
    result.meta.update(fwhm_px=fwhm_px, psf_beta=beta, pixel_scale=scale, sky_sigma=sigma)
    return result


def offsets(table: Table, band: str) -> Table:
    """The found FLAGS < 4 stars of one co-add (``table`` from :func:`inject_coadd`) with
    ``d_auto`` (MAG_AUTO after the Kron loss correction, every star a target) and ``d_aper5``
    (5" magnitude over the Moffat profile's share), each less true and less the bright
    stars' median."""
    b = band.lower()
    ok = np.asarray(table["found"]) & (np.nan_to_num(np.asarray(table[f"flags_{b}"]), nan=99)
                                       < 4)
    t = table[ok]
    meta = table.meta
    true_mag = -2.5 * np.log10(np.asarray(t["flux"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        t[f"mag_auto_{b}"] = -2.5 * np.log10(np.asarray(t[f"flux_auto_{b}"]))
    corrected, _ = kron_loss_correction(t, band, meta["fwhm_px"] * meta["pixel_scale"],
                                        meta["pixel_scale"], PostprocessSettings(),
                                        targets=np.ones(len(t), dtype=bool),
                                        psf_beta=meta["psf_beta"])
    share = moffat_enclosed_fraction(meta["fwhm_px"] * meta["pixel_scale"], meta["psf_beta"],
                                     5.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auto = np.asarray(corrected[f"mag_auto_{b}"], float) - true_mag
        aper5 = -2.5 * np.log10(np.asarray(t[f"flux_aper5_{b}"]) / share) - true_mag
    bright = np.asarray(t["bright"])
    t["d_auto"] = auto - np.nanmedian(auto[bright])
    t["d_aper5"] = aper5 - np.nanmedian(aper5[bright])
    return t


def median_se(values: np.ndarray) -> tuple[float, float, int]:
    """Median of the finite values, its standard error (1.2533 x 1.4826 MAD / sqrt(n)), n."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan, 0
    mad = float(np.median(np.abs(v - np.median(v))))
    return float(np.median(v)), 1.2533 * 1.4826 * mad / math.sqrt(v.size), int(v.size)


def fit_auto_noise(band: str, snr: np.ndarray, offset: np.ndarray) -> AutoNoiseBias:
    """``k`` of ``offset = -k / snr**2`` over the faint injected stars' measured S/N and
    offsets: the median per :data:`FIT_SNR_EDGES` bin with its standard error, fitted by
    weighted least squares; not applied with fewer than two bins of FIT_MIN_STARS stars."""
    rows = []
    for lo, hi in pairwise(FIT_SNR_EDGES):
        sel = (snr >= lo) & (snr < hi)
        median, se, n = median_se(offset[sel])
        if n >= FIT_MIN_STARS:
            rows.append((float(np.median(snr[sel & np.isfinite(offset)])), median,
                         max(se, 1e-4)))
    n_stars = int(np.isfinite(offset).sum())
    if len(rows) < 2:
        return AutoNoiseBias(band, 0.0, math.nan, n_stars, applied=False,
                             reason=f"{len(rows)} S/N bins with >= {FIT_MIN_STARS} stars < 2")
    s, d, e = (np.array(v) for v in zip(*rows))
    x, w = -1.0 / s ** 2, 1.0 / e ** 2
    k = float((w * x * d).sum() / (w * x * x).sum())
    return AutoNoiseBias(band, k, float(1.0 / math.sqrt((w * x * x).sum())), n_stars,
                         tuple(round(float(v), 2) for v in s),
                         tuple(round(float(v), 5) for v in d),
                         tuple(round(float(v), 5) for v in e))


def run_auto_noise_calibration(*, release_dir: Path, band: str, tiles: tuple[str, ...],
                               settings: PhotometrySettings, nnw_path: Path) -> None:
    """Inject ``settings.auto_noise_runs`` grids into each tile's co-add of ``band`` (its
    central ``auto_noise_region_px`` square), fit :class:`AutoNoiseBias` to all of them and
    write it to :func:`auto_noise_path` (JSON, atomically)."""
    release_dir = Path(release_dir)
    network = read_nnw(nnw_path)
    tables = [offsets(t, band) for t in (
        inject_coadd(release_dir, tile, band, settings, network, settings.auto_noise_runs,
                     settings.auto_noise_region_px, settings.auto_noise_seed)
        for tile in tiles) if len(t)]
    if tables:
        faint = vstack(tables)
        faint = faint[~np.asarray(faint["bright"])]
        bias = fit_auto_noise(band, np.asarray(faint[f"snr_{band.lower()}"], float),
                              np.asarray(faint["d_auto"], float))
    else:
        bias = AutoNoiseBias(band, 0.0, math.nan, 0, applied=False,
                             reason="no artificial star was measured")
    payload = {**dataclasses.asdict(bias), "tiles": list(tiles),
               "runs": settings.auto_noise_runs, "region_px": settings.auto_noise_region_px}
    atomic_write_text(auto_noise_path(release_dir, band),
                      json.dumps(payload, indent=2, default=float) + "\n")
