"""Small writers of valid and deliberately broken exposure files for the tests.

``write_exposure(path)`` writes a valid KS4 exposure at camera scale 1/64 (four 144 x 144 px
CCDs) with a flat sky plus Gaussian noise and correct headers; keyword arguments change the
header or drop parts of it to make the broken variants. Every RNG is seeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ks4release.camera import Camera
from ks4release.survey import DITHER_OFFSETS_ARCMIN

__all__ = [
    "DELETE",
    "DEMO_SCALE",
    "amp_sections",
    "write_exposure",
    "write_garbage",
    "write_truncated",
]

#: Camera scale of the test exposures (144 x 144 px CCDs).
DEMO_SCALE = 1.0 / 64.0

#: Delete a keyword: pass as a value in ``primary``/``ccd_headers``.
DELETE = object()


def amp_sections(ranges, ny: int) -> list[str]:
    """IRAF sections ``[x1:x2,1:ny]`` for 0-based half-open column ``ranges``."""
    return [f"[{start + 1}:{stop},1:{ny}]" for start, stop in ranges]


def _apply(header: fits.Header, changes: Mapping[str, object]) -> None:
    for key, value in changes.items():
        if value is DELETE:
            del header[key]
        else:
            header[key] = value


def write_exposure(
    path: str | Path,
    *,
    tile: str = "0000.000-62",
    band: str = "B",
    site: str = "CTIO",
    dither: int = 1,
    mjd: float = 59000.25,
    exptime: float = 120.0,
    tile_ra: float = 0.0,
    tile_dec: float = -62.0,
    scale: float = DEMO_SCALE,
    sky_adu: float = 1000.0,
    noise_adu: float = 30.0,
    seed: int = 0,
    primary: Mapping[str, object] | None = None,
    ccd_headers: Mapping[str, Mapping[str, object]] | None = None,
    ccd_data: Mapping[str, np.ndarray] | None = None,
    drop_ccds: tuple[str, ...] = (),
) -> Path:
    """Write a valid exposure (or a variant of one) and return its path.

    ``primary`` and ``ccd_headers[name]`` override header keywords (``DELETE`` removes one),
    ``ccd_data[name]`` replaces a CCD's pixels, ``drop_ccds`` leaves extensions out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    camera = Camera.kmtnet(scale)
    d_ra, d_dec = DITHER_OFFSETS_ARCMIN[dither - 1] if 1 <= dither <= 4 else (0.0, 0.0)
    ra = (tile_ra + d_ra / 60.0 / np.cos(np.radians(tile_dec))) % 360.0
    dec = tile_dec + d_dec / 60.0
    hdr = fits.Header()
    hdr["TILE"] = tile
    hdr["FILTER"] = band
    hdr["EXPTIME"] = (exptime, "[s] exposure time")
    hdr["MJD-OBS"] = mjd
    hdr["DATE-OBS"] = _isot(mjd)
    hdr["OBSERVAT"] = site
    hdr["DITHER"] = dither
    hdr["RA"] = (ra, "[deg] nominal pointing")
    hdr["DEC"] = (dec, "[deg] nominal pointing")
    hdr["CAMSCALE"] = scale
    _apply(hdr, primary or {})
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.PrimaryHDU(header=hdr)]
    cd = camera.pixel_scale_arcsec / 3600.0
    for ccd in camera.ccds:
        if ccd.name in drop_ccds:
            continue
        if ccd_data and ccd.name in ccd_data:
            data = np.asarray(ccd_data[ccd.name], dtype=np.float32)
        else:
            data = (sky_adu + noise_adu * rng.standard_normal(ccd.shape)).astype(np.float32)
        h = fits.Header()
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        h["CRVAL1"], h["CRVAL2"] = ra, dec
        h["CRPIX1"], h["CRPIX2"] = 1.0 - ccd.x0_px, 1.0 - ccd.y0_px
        h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -cd, 0.0, 0.0, cd
        h["GAIN"] = (ccd.gain_e_per_adu, "[e-/ADU]")
        h["RDNOISE"] = (ccd.read_noise_e, "[e-]")
        h["SATURATE"] = (ccd.saturation_adu, "[ADU]")
        h["NAMPS"] = len(ccd.amplifiers)
        for i, sec in enumerate(
            amp_sections([(a.x_start, a.x_stop) for a in ccd.amplifiers], ccd.ny), start=1
        ):
            h[f"AMPSEC{i}"] = sec
        _apply(h, (ccd_headers or {}).get(ccd.name, {}))
        hdus.append(fits.ImageHDU(data=data, header=h, name=ccd.name))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_truncated(path: str | Path, **kwargs) -> Path:
    """A valid exposure cut short in the middle of its last extension's data."""
    path = write_exposure(path, **kwargs)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 40_000)
    return path


def write_garbage(path: str | Path) -> Path:
    """A file with a .fits name that holds no FITS at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a FITS file\n" * 200)
    return path


def _isot(mjd: float) -> str:
    return Time(mjd, format="mjd", scale="utc").isot


def grid_wcs(n: int) -> WCS:
    """A TAN co-add grid of n x n 0.4" pixels centred on (0, 0)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    wcs.wcs.cd = [[-0.4 / 3600, 0.0], [0.0, 0.4 / 3600]]
    return wcs


def rectangle_vertices(wcs: WCS, x0: float, y0: float, x1: float, y1: float,
                       per_side: int) -> list[list[float]]:
    """[ra, dec] vertices, ``per_side`` per side, of a pixel rectangle on the TAN grid ``wcs``
    (1-based pixels)."""
    t = np.arange(per_side) / per_side
    xs = np.concatenate([x0 + t * (x1 - x0), np.full(per_side, x1), x1 - t * (x1 - x0),
                         np.full(per_side, x0)])
    ys = np.concatenate([np.full(per_side, y0), y0 + t * (y1 - y0), np.full(per_side, y1),
                         y1 - t * (y1 - y0)])
    ra, dec = wcs.wcs_pix2world(xs, ys, 1)
    return np.column_stack([ra % 360.0, dec]).tolist()
