"""Ingest: the first stage of ``ks4release build dr1``.

For every raw exposure, validate its format (:func:`ks4release.exposure.read_exposure_header`)
and run a cheap pixel sanity check per CCD (enough finite pixels, not all zero); record header
values and per-CCD statistics (median, robust sigma = 1.4826 MAD, fraction of pixels at or above
``SATURATE``) in a JSON summary. Then, per tile and band, merge the summaries into an inventory
sorted by MJD that the later stages read instead of reopening every exposure.

Output layout::

    <release>/work/ingest/<exposure stem>.json        one summary per exposure
    <release>/work/<tile>/<band>/inventory.ecsv       one inventory per tile and band

Both are written atomically (temporary sibling, then ``os.replace``). Bad input raises
:class:`ks4release.errors.InputError` naming the file; the engine isolates failures per task.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from ks4release import __version__
from ks4release.atomic import atomic_path, atomic_write_text
from ks4release.camera import CCD_NAMES
from ks4release.errors import InputError
from ks4release.exposure import ExposureInfo, read_exposure_header

__all__ = [
    "SUMMARY_SCHEMA",
    "MIN_FINITE_FRACTION",
    "CcdStats",
    "ccd_stats",
    "check_ccd_stats",
    "exposure_summary",
    "inventory_table",
    "ingest_exposure",
    "write_inventory",
]

#: Identifies the JSON summary layout; bump when keys change.
SUMMARY_SCHEMA = "ks4release.ingest.summary/1"
#: A CCD with a smaller fraction of finite pixels is rejected (our default; DR1 states none).
MIN_FINITE_FRACTION = 0.5
#: At most this many pixels per CCD enter the median and MAD (a regular subsample).
_MAX_STAT_PIXELS = 1_000_000
#: Rows per block when scanning a CCD (keeps memory flat on full-size chips).
_BLOCK_ROWS = 512
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True, kw_only=True)
class CcdStats:
    """Pixel statistics of one CCD, in ADU; fractions over all pixels."""

    name: str
    median_adu: float
    sigma_adu: float
    finite_fraction: float
    zero_fraction: float
    saturated_fraction: float


def ccd_stats(name: str, data, saturation: float) -> CcdStats:
    """Statistics of a 2-D array (ndarray or FITS memmap), scanned in blocks of rows.

    The fractions use every pixel; the median and the robust sigma (1.4826 x MAD) use a
    regular subsample of at most ~1e6 finite pixels.
    """
    ny, nx = data.shape
    step = max(1, int(np.ceil(np.sqrt(ny * nx / _MAX_STAT_PIXELS))))
    n_finite = n_zero = n_sat = 0
    sample = []
    for y0 in range(0, ny, _BLOCK_ROWS):
        block = np.asarray(data[y0:y0 + _BLOCK_ROWS], dtype=np.float32)
        finite = np.isfinite(block)
        n_finite += int(finite.sum())
        n_zero += int((block == 0).sum())
        n_sat += int((block >= saturation).sum())
        rows = np.arange(y0, y0 + block.shape[0]) % step == 0
        sub = block[rows, ::step]
        sample.append(sub[np.isfinite(sub)])
    values = np.concatenate(sample) if sample else np.empty(0, np.float32)
    if values.size:
        median = float(np.median(values))
        sigma = float(_MAD_TO_SIGMA * np.median(np.abs(values - median)))
    else:
        median = sigma = float("nan")
    n = ny * nx
    return CcdStats(name=name, median_adu=median, sigma_adu=sigma, finite_fraction=n_finite / n,
                    zero_fraction=n_zero / n, saturated_fraction=n_sat / n)


def check_ccd_stats(path, stats: CcdStats, *, min_finite_fraction: float = MIN_FINITE_FRACTION):
    """Raise InputError if a CCD has too few finite pixels or is all zero."""
    if stats.finite_fraction < min_finite_fraction:
        raise InputError(
            path, f"extension {stats.name!r}: only {stats.finite_fraction:.1%} of the pixels are "
            f"finite (expected at least {min_finite_fraction:.0%})", hdu=stats.name,
        )
    if stats.zero_fraction >= stats.finite_fraction:
        raise InputError(
            path, f"extension {stats.name!r}: all pixels are zero (expected data in ADU "
            "after bias and flat)", hdu=stats.name,
        )


def exposure_summary(info: ExposureInfo, stats: Mapping[str, CcdStats], *, size_bytes: int) -> dict:
    """The JSON-ready summary of one exposure (pure)."""
    ccds = []
    for ccd in info.ccds:
        s = stats[ccd.name]
        ccds.append({
            "name": ccd.name,
            "shape": list(ccd.shape),
            "gain_e_per_adu": ccd.gain,
            "read_noise_e": ccd.read_noise,
            "saturation_adu": ccd.saturation,
            "amplifier_columns": [list(r) for r in ccd.amplifiers],
            "center_ra_deg": ccd.center_ra,
            "center_dec_deg": ccd.center_dec,
            **{k: v for k, v in asdict(s).items() if k != "name"},
        })
    return {
        "schema": SUMMARY_SCHEMA,
        "ks4release_version": __version__,
        "file": str(info.path),
        "size_bytes": size_bytes,
        "tile": info.tile,
        "band": info.band,
        "exptime_s": info.exptime,
        "mjd": info.mjd,
        "date_obs": info.date_obs,
        "site": info.site,
        "dither": info.dither,
        "ra_deg": info.ra,
        "dec_deg": info.dec,
        "camera_scale": info.camera_scale,
        "ccds": ccds,
    }


def ingest_exposure(
    path: Path,
    out_json: Path,
    known_tiles: list[str] | None,
    *,
    min_finite_fraction: float = MIN_FINITE_FRACTION,
) -> None:
    """Validate one exposure and write its JSON summary to ``out_json`` (atomically).

    ``known_tiles`` are the release's tiles (``None``: any KS4 grid tile). Raises
    :class:`~ks4release.errors.InputError` naming ``path`` for any bad input.
    """
    path = Path(path)
    info = read_exposure_header(path, known_tiles)
    stats = {}
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            for ccd in info.ccds:
                s = ccd_stats(ccd.name, hdul[ccd.name].data, ccd.saturation)
                check_ccd_stats(path, s, min_finite_fraction=min_finite_fraction)
                stats[ccd.name] = s
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(path, f"pixel data cannot be read ({exc})") from None
    summary = exposure_summary(info, stats, size_bytes=path.stat().st_size)
    atomic_write_text(Path(out_json), json.dumps(summary, indent=1, allow_nan=False) + "\n")


def _load_summary(path: Path) -> dict:
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable ingest summary ({exc})") from None
    if not isinstance(summary, dict) or summary.get("schema") != SUMMARY_SCHEMA:
        raise InputError(path, f"not an ingest summary (expected schema {SUMMARY_SCHEMA!r})",
                         key="schema")
    return summary


def inventory_table(tile: str, band: str, summaries: list[dict]) -> Table:
    """The inventory of one tile and band from exposure summaries, sorted by MJD (pure)."""
    for s in summaries:
        if (s["tile"], s["band"]) != (tile, band):
            raise InputError(
                s["file"], f"exposure belongs to tile {s['tile']} band {s['band']} "
                f"(expected tile {tile} band {band})", key="TILE",
            )
    rows = sorted(summaries, key=lambda s: (s["mjd"], s["file"]))

    def per_ccd(key: str, name: str) -> list[float]:
        return [next(c[key] for c in s["ccds"] if c["name"] == name) for s in rows]

    table = Table(meta={"tile": tile, "band": band, "schema": "ks4release.ingest.inventory/1"})
    table["file"] = np.array([s["file"] for s in rows], dtype=str)
    table["mjd"] = np.array([s["mjd"] for s in rows], dtype=np.float64) * u.d
    table["date_obs"] = np.array([s["date_obs"] for s in rows], dtype=str)
    table["site"] = np.array([s["site"] for s in rows], dtype=str)
    table["dither"] = np.array([s["dither"] for s in rows], dtype=np.int16)
    table["exptime"] = np.array([s["exptime_s"] for s in rows], dtype=np.float64) * u.s
    for name in CCD_NAMES:
        table[f"sky_{name.lower()}"] = np.array(per_ccd("median_adu", name)) * u.adu
    for name in CCD_NAMES:
        table[f"noise_{name.lower()}"] = np.array(per_ccd("sigma_adu", name)) * u.adu
    descriptions = {
        "file": "Raw exposure file", "mjd": "MJD of the exposure start (MJD-OBS)",
        "date_obs": "DATE-OBS", "site": "KMTNet site (OBSERVAT)", "dither": "Dither point 1-4",
        "exptime": "Exposure time",
    }
    for name in CCD_NAMES:
        descriptions[f"sky_{name.lower()}"] = f"Median pixel value of CCD {name}"
        descriptions[f"noise_{name.lower()}"] = f"Robust sigma (1.4826 MAD) of CCD {name}"
    for col, text in descriptions.items():
        table[col].description = text
    return table


def write_inventory(tile: str, band: str, summaries: list[Path], out_path: Path) -> None:
    """Merge the JSON summaries of one tile and band into an ECSV inventory (atomically)."""
    table = inventory_table(tile, band, [_load_summary(p) for p in summaries])
    with atomic_path(Path(out_path)) as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)
