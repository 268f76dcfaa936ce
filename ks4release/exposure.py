"""The raw-exposure format: one multi-extension FITS file per exposure, read and validated.

Format (as a survey team hands exposures over, and as the demo simulator writes them):

Primary HDU (no data)
    ``TILE`` (grid tile name such as ``0000.000-62``, or a custom tile of the release),
    ``FILTER`` (B, V, R, I), ``EXPTIME`` (s), ``MJD-OBS``, ``DATE-OBS`` (ISO),
    ``OBSERVAT`` (CTIO, SSO, SAAO), ``DITHER`` (1-4), ``RA``/``DEC`` (nominal pointing, deg),
    optional ``CAMSCALE`` (camera scale factor of :meth:`ks4release.camera.Camera.kmtnet`,
    1.0 for real data and when absent).
Four image HDUs, ``EXTNAME`` KK, MM, NN, TT
    2-D data in ADU (bias and flat applied), of the camera's CCD shape at ``CAMSCALE``; an
    approximate celestial WCS (TAN; CD matrix or CDELT/PC); ``GAIN`` (e-/ADU), ``RDNOISE`` (e-),
    ``SATURATE`` (ADU), ``NAMPS`` (8) and ``AMPSEC1`` .. ``AMPSECn``: 1-based inclusive IRAF
    sections ``[x1:x2,y1:y2]`` of each amplifier, which must tile the columns ``1..nx`` and span
    the rows ``1..ny``.

:func:`read_exposure_header` validates all of this from the headers alone (the pixels are never
loaded); :func:`read_ccd` loads one CCD's pixels. Every violation raises
:class:`ks4release.errors.InputError` naming the file, the extension or keyword, and what was
expected.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ks4release.camera import CCD_NAMES, N_AMPLIFIERS, Camera
from ks4release.errors import InputError
from ks4release.grid import tile_by_name
from ks4release.survey import BANDS, SITES

__all__ = [
    "CcdInfo",
    "ExposureInfo",
    "read_exposure_header",
    "read_ccd",
    "parse_iraf_section",
    "parse_amp_sections",
]

logger = logging.getLogger(__name__)

_BAND_NAMES = tuple(b.name for b in BANDS)
_SITE_NAMES = tuple(s.name for s in SITES)
_N_DITHERS = 4
_SECTION = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")


@dataclass(frozen=True, kw_only=True)
class CcdInfo:
    """Header summary of one CCD extension.

    ``amplifiers[i]`` is the 0-based half-open column range ``(x_start, x_stop)`` of the
    amplifier described by ``AMPSEC{i+1}``; ``center_ra``/``center_dec`` (deg) is where the
    approximate WCS puts the chip centre.
    """

    name: str
    shape: tuple[int, int]
    gain: float
    read_noise: float
    saturation: float
    amplifiers: tuple[tuple[int, int], ...]
    center_ra: float
    center_dec: float


@dataclass(frozen=True, kw_only=True)
class ExposureInfo:
    """Validated header content of one exposure file (units: s, d, deg)."""

    path: Path
    tile: str
    band: str
    exptime: float
    mjd: float
    date_obs: str
    site: str
    dither: int
    ra: float
    dec: float
    camera_scale: float
    ccds: tuple[CcdInfo, ...]

    def ccd(self, name: str) -> CcdInfo:
        """The CCD called ``name`` (KK, MM, NN or TT)."""
        for info in self.ccds:
            if info.name == name:
                return info
        raise KeyError(f"unknown CCD {name!r}; the KMTNet CCDs are {', '.join(CCD_NAMES)}")


# --------------------------------------------------------------------------------------------
# Amplifier sections (pure, raise ValueError)


def parse_iraf_section(text: str) -> tuple[int, int, int, int]:
    """Parse ``'[x1:x2,y1:y2]'`` (1-based, inclusive) into ``(x1, x2, y1, y2)``."""
    match = _SECTION.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not an IRAF section '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(g) for g in match.groups())
    if not (1 <= x1 <= x2 and 1 <= y1 <= y2):
        raise ValueError(f"{text!r} is not an IRAF section with 1 <= x1 <= x2 and 1 <= y1 <= y2")
    return x1, x2, y1, y2


def parse_amp_sections(sections: Sequence[str], nx: int, ny: int) -> tuple[tuple[int, int], ...]:
    """Column ranges of the amplifiers from their IRAF sections.

    Each section must span all rows ``1..ny``; together, in any order, the sections must tile
    the columns ``1..nx`` without gap or overlap. Returns 0-based half-open ``(x_start, x_stop)``
    ranges in the order given.
    """
    ranges = []
    for i, text in enumerate(sections, start=1):
        try:
            x1, x2, y1, y2 = parse_iraf_section(text)
        except ValueError as exc:
            raise ValueError(f"AMPSEC{i}: {exc}") from None
        if (y1, y2) != (1, ny):
            raise ValueError(f"AMPSEC{i} = {text!r} spans rows {y1}:{y2} (expected 1:{ny})")
        ranges.append((x1 - 1, x2))
    if not ranges:
        raise ValueError("no amplifier sections")
    expected_start = 0
    for start, stop in sorted(ranges):
        if start != expected_start:
            kind = "overlap" if start < expected_start else "leave a gap"
            raise ValueError(
                f"amplifier sections {kind} at column {min(start, expected_start) + 1} "
                f"(expected sections that tile columns 1:{nx})"
            )
        expected_start = stop
    if expected_start != nx:
        raise ValueError(
            f"amplifier sections cover columns 1:{expected_start} (expected them to tile 1:{nx})"
        )
    return tuple(ranges)


# --------------------------------------------------------------------------------------------
# Header keywords


def _number(path, header, key: str, *, hdu: str | None, what: str, default=None) -> float:
    """A finite numeric keyword, or InputError naming file, extension and keyword."""
    where = f"extension {hdu!r}: " if hdu else ""
    if key not in header:
        if default is not None:
            return default
        raise InputError(path, f"{where}{key} is missing (expected {what})", hdu=hdu, key=key)
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InputError(
            path, f"{where}{key} = {value!r} is not a number (expected {what})", hdu=hdu, key=key
        )
    if not math.isfinite(float(value)):
        raise InputError(
            path, f"{where}{key} = {value!r} is not finite (expected {what})", hdu=hdu, key=key
        )
    return float(value)


def _string(path, header, key: str, *, what: str) -> str:
    """A non-empty string keyword of the primary header."""
    if key not in header:
        raise InputError(path, f"{key} is missing (expected {what})", key=key)
    value = header[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(path, f"{key} = {value!r} is not {what}", key=key)
    return value.strip()


def _check_range(path, key, value, low, high, what, *, hdu=None, high_open=False):
    bad = value < low or (value >= high if high_open else value > high)
    if bad:
        where = f"extension {hdu!r}: " if hdu else ""
        raise InputError(
            path, f"{where}{key} = {value!r} is out of range ({what})", hdu=hdu, key=key
        )


def _check_tile(path, tile: str, known_tiles: Collection[str] | None) -> None:
    if known_tiles is not None:
        if tile not in known_tiles:
            shown = ", ".join(sorted(known_tiles)[:10]) + (", ..." if len(known_tiles) > 10 else "")
            raise InputError(
                path, f"TILE {tile!r} is not a tile of this release (expected one of {shown})",
                key="TILE",
            )
        return
    try:
        tile_by_name(tile)
    except ValueError as exc:
        raise InputError(path, f"TILE: {exc}", key="TILE") from None


def _read_primary(path, header, known_tiles) -> dict:
    tile = _string(path, header, "TILE", what="a tile name such as '0000.000-62'")
    _check_tile(path, tile, known_tiles)
    band = _string(path, header, "FILTER", what="a KS4 band")
    if band not in _BAND_NAMES:
        raise InputError(
            path, f"FILTER {band!r} is not a KS4 band ({', '.join(_BAND_NAMES)})", key="FILTER"
        )
    site = _string(path, header, "OBSERVAT", what="a KMTNet site")
    if site not in _SITE_NAMES:
        raise InputError(
            path, f"OBSERVAT {site!r} is not a KMTNet site ({', '.join(_SITE_NAMES)})",
            key="OBSERVAT",
        )
    exptime = _number(path, header, "EXPTIME", hdu=None, what="exposure time in s")
    _check_range(path, "EXPTIME", exptime, 1e-6, math.inf, "expected > 0 s")
    mjd = _number(path, header, "MJD-OBS", hdu=None, what="MJD of the exposure start")
    date_obs = _string(path, header, "DATE-OBS", what="an ISO date such as '2021-03-04T05:06:07'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ERFA "dubious year" for simulated future dates
            Time(date_obs, format="fits", scale="utc")
    except ValueError:
        raise InputError(
            path, f"DATE-OBS {date_obs!r} is not an ISO date (expected e.g. '2021-03-04T05:06:07')",
            key="DATE-OBS",
        ) from None
    dither_value = header.get("DITHER")
    if isinstance(dither_value, bool) or not isinstance(dither_value, (int, np.integer)):
        raise InputError(
            path,
            f"DITHER = {dither_value!r} is missing or not an integer (expected 1 to {_N_DITHERS})"
            if "DITHER" in header else f"DITHER is missing (expected 1 to {_N_DITHERS})",
            key="DITHER",
        )
    _check_range(path, "DITHER", int(dither_value), 1, _N_DITHERS, f"expected 1 to {_N_DITHERS}")
    ra = _number(path, header, "RA", hdu=None, what="pointing right ascension in deg")
    _check_range(path, "RA", ra, 0.0, 360.0, "expected 0 <= RA < 360 deg", high_open=True)
    dec = _number(path, header, "DEC", hdu=None, what="pointing declination in deg")
    _check_range(path, "DEC", dec, -90.0, 90.0, "expected -90 <= DEC <= 90 deg")
    scale = _number(path, header, "CAMSCALE", hdu=None, what="camera scale factor", default=1.0)
    _check_range(path, "CAMSCALE", scale, 1e-9, 1.0, "expected 0 < CAMSCALE <= 1")
    return dict(tile=tile, band=band, site=site, exptime=exptime, mjd=mjd, date_obs=date_obs,
                dither=int(dither_value), ra=ra, dec=dec, camera_scale=scale)


def _read_ccd_header(path, name: str, hdu, camera: Camera, file_size: int) -> CcdInfo:
    header = hdu.header
    expected = camera.ccd(name).shape
    if header.get("NAXIS") != 2:
        raise InputError(
            path, f"extension {name!r}: NAXIS = {header.get('NAXIS')!r} (expected a 2-D image "
            f"of shape {expected[0]} x {expected[1]})", hdu=name, key="NAXIS",
        )
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    if shape != expected:
        raise InputError(
            path, f"extension {name!r}: data shape {shape[0]} x {shape[1]} (ny x nx) does not "
            f"match the camera at CAMSCALE {camera.scale:g} (expected {expected[0]} x "
            f"{expected[1]})", hdu=name, key="NAXIS",
        )
    n_bytes = shape[0] * shape[1] * abs(int(header["BITPIX"])) // 8
    compressed = isinstance(hdu, fits.CompImageHDU)  # tile-compressed data are smaller
    if not compressed and hdu.fileinfo()["datLoc"] + n_bytes > file_size:
        raise InputError(
            path, f"extension {name!r}: file is truncated ({file_size} bytes, the data of this "
            "extension end beyond)", hdu=name,
        )
    gain = _number(path, header, "GAIN", hdu=name, what="gain in e-/ADU")
    _check_range(path, "GAIN", gain, 1e-9, math.inf, "expected > 0 e-/ADU", hdu=name)
    read_noise = _number(path, header, "RDNOISE", hdu=name, what="read noise in e-")
    _check_range(path, "RDNOISE", read_noise, 0.0, math.inf, "expected >= 0 e-", hdu=name)
    saturation = _number(path, header, "SATURATE", hdu=name, what="saturation level in ADU")
    _check_range(path, "SATURATE", saturation, 1e-9, math.inf, "expected > 0 ADU", hdu=name)
    n_amps = _number(path, header, "NAMPS", hdu=name, what=f"number of amplifiers ({N_AMPLIFIERS})")
    if n_amps != N_AMPLIFIERS:
        raise InputError(
            path, f"extension {name!r}: NAMPS = {header['NAMPS']!r} (expected {N_AMPLIFIERS})",
            hdu=name, key="NAMPS",
        )
    sections = []
    for i in range(1, N_AMPLIFIERS + 1):
        key = f"AMPSEC{i}"
        if not isinstance(header.get(key), str):
            raise InputError(
                path, f"extension {name!r}: {key} is missing or not a string (expected an IRAF "
                "section '[x1:x2,y1:y2]')", hdu=name, key=key,
            )
        sections.append(header[key])
    try:
        amplifiers = parse_amp_sections(sections, nx=shape[1], ny=shape[0])
    except ValueError as exc:
        raise InputError(path, f"extension {name!r}: {exc}", hdu=name, key="AMPSEC") from None
    center_ra, center_dec = _wcs_center(path, name, header, shape)
    return CcdInfo(name=name, shape=shape, gain=gain, read_noise=read_noise,
                   saturation=saturation, amplifiers=amplifiers,
                   center_ra=center_ra, center_dec=center_dec)


def _wcs_center(
    path, name: str, header: fits.Header, shape: tuple[int, int]
) -> tuple[float, float]:
    """Sky position of the chip centre from the approximate WCS."""
    try:
        with warnings.catch_warnings():
            # FITSFixedWarning about DATE/MJD keywords etc. is noise for an approximate WCS.
            warnings.simplefilter("ignore")
            wcs = WCS(header, naxis=2)
        if not wcs.has_celestial:
            raise ValueError("no celestial axes (expected CTYPE1/2 'RA---TAN'/'DEC--TAN')")
        ra, dec = wcs.celestial.all_pix2world([(shape[1] - 1) / 2.0], [(shape[0] - 1) / 2.0], 0)
        ra, dec = float(ra[0]), float(dec[0])
        if not (math.isfinite(ra) and math.isfinite(dec)):
            raise ValueError("the chip centre maps to a non-finite position")
    except Exception as exc:  # astropy.wcs raises a zoo of types; all mean "unusable WCS"
        raise InputError(
            path, f"extension {name!r}: WCS cannot be used ({_one_line(exc)}); expected an "
            "approximate celestial TAN WCS", hdu=name, key="WCS",
        ) from None
    return ra % 360.0, dec


def _one_line(exc: Exception) -> str:
    """An exception's text with its whitespace (wcslib's newlines) collapsed."""
    return " ".join(str(exc).split())


def _open(path):
    """Open a FITS file lazily, memory-mapped; InputError if it is not FITS."""
    try:
        return fits.open(path, memmap=True, lazy_load_hdus=True)
    except FileNotFoundError:
        raise InputError(path, "file does not exist") from None
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from None


def _extensions(path, hdul) -> dict[str, fits.hdu.base.ExtensionHDU]:
    """The CCD image extensions by name; InputError for missing or duplicated ones."""
    found: dict[str, object] = {}
    try:
        for hdu in hdul[1:]:
            name = str(hdu.header.get("EXTNAME", "")).strip().upper()
            if name in CCD_NAMES:
                if name in found:
                    raise InputError(path, f"extension {name!r} appears twice", hdu=name)
                found[name] = hdu
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from None
    for name in CCD_NAMES:
        if name not in found:
            raise InputError(
                path, f"extension {name!r} is missing (expected {', '.join(CCD_NAMES)})", hdu=name
            )
    return found


def read_exposure_header(
    path: str | os.PathLike[str], known_tiles: Collection[str] | None = None
) -> ExposureInfo:
    """Read and validate the headers of one exposure file without loading its pixels.

    Parameters
    ----------
    path : path-like
        The multi-extension FITS exposure.
    known_tiles : collection of str, optional
        The release's tiles. When given, ``TILE`` must be one of them (custom tiles allowed);
        otherwise it must be a KS4 grid tile name.

    Raises
    ------
    ks4release.errors.InputError
        For anything that breaks the format described in this module's docstring.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _read_header_checked(path, known_tiles)
    for w in caught:
        logger.debug("%s: %s", path, w.message)
    return info


def _read_header_checked(path: Path, known_tiles) -> ExposureInfo:
    with _open(path) as hdul:
        try:
            primary = hdul[0].header
        except (OSError, ValueError, TypeError, IndexError) as exc:
            raise InputError(path, f"not a readable FITS file ({exc})") from None
        values = _read_primary(path, primary, known_tiles)
        camera = Camera.kmtnet(values["camera_scale"])
        file_size = os.path.getsize(path)
        extensions = _extensions(path, hdul)
        ccds = tuple(
            _read_ccd_header(path, name, extensions[name], camera, file_size) for name in CCD_NAMES
        )
    return ExposureInfo(path=path, ccds=ccds, **values)


def read_ccd(path: str | os.PathLike[str], ccd_name: str) -> tuple[np.ndarray, fits.Header]:
    """The pixels (float32, native byte order, a copy) and header of one CCD extension.

    Validates only what loading needs (readable file, extension present, 2-D data); call
    :func:`read_exposure_header` for the full format check.
    """
    if ccd_name not in CCD_NAMES:
        raise ValueError(f"unknown CCD {ccd_name!r}; the KMTNet CCDs are {', '.join(CCD_NAMES)}")
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _open(path) as hdul:
            hdu = _extensions(path, hdul)[ccd_name]
            try:
                raw = hdu.data
                data = None if raw is None else np.array(raw, dtype=np.float32)
            except (OSError, ValueError, TypeError) as exc:
                raise InputError(
                    path, f"extension {ccd_name!r}: data cannot be read ({exc})", hdu=ccd_name
                ) from None
            header = hdu.header.copy()
    for w in caught:
        logger.debug("%s: %s", path, w.message)
    if data is None or data.ndim != 2:
        raise InputError(
            path, f"extension {ccd_name!r}: no 2-D image data (expected a 2-D image)", hdu=ccd_name
        )
    return data, header
