"""Pixels of one exposure: sources through the true WCS and PSF, sky, noise and artifacts.

Photometric model (written to ``truth/zeropoints.parquet``). For a source of true AB magnitude
``m`` in the exposure's band and true colour ``c = mag_V - mag_I`` (AB), centred at 0-based row
``y`` of a CCD with ``ny`` rows, read by amplifier ``a``, the integrated flux in ADU is::

    ADU = 10 ** (-0.4 * (m - zp(y) - colour_term * c))
    zp(y) = zp_y0[a] + zp_slope[a] * y / ny

``zp_y0`` holds the band's 1-s AB zero point (``survey.Band.zp_1s_ab``, e-), the exposure time,
the gain (``- 2.5 log10 gain``), the site offset (``survey.Site.zp_offset_mag``), the cloud loss
(``-transparency_mag``) and the amplifier's offset; ``zp_slope`` is the gradient along Y
(|slope| <= ``amp_gradient_max_mag``). Offsets and gradients are an instrumental pattern of each
site's camera, common to all bands, plus a small departure per exposure (:func:`amp_zeropoints`).
The sky is flat (flat-fielded): its level uses the exposure zero point without the amplifier
terms.

PSF: Moffat, ``beta = cfg.moffat_beta``, FWHM = the exposure's seeing, sampled at pixel centres
(sums to the integral to better than 1e-4 for FWHM >= 3 px). Star stamps reach where the profile
drops below 0.05 ADU, at least 6 FWHM. Galaxies: Sersic profiles normalised on their stamp,
convolved with the PSF by FFT.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ks4release.camera import CCD
from ks4release.projection import gnomonic
from ks4release.simulate import artifacts
from ks4release.simulate.arguments import SimulationConfig
from ks4release.simulate.astrometry import (
    approx_wcs,
    sip_coefficient,
    true_wcs,
)
from ks4release.simulate.headers import (
    ccd_header,
    mask_primary_header,
    primary_header,
    wcs_cards,
)
from ks4release.simulate.plan import ExposurePlan, rng_for
from ks4release.simulate.sky import positions_at
from ks4release.survey import band, site

__all__ = ["render_exposure", "amp_zeropoints", "exposure_zeropoint_e", "sky_level_e",
           "moffat_alpha_px", "ccd_true_wcs"]

_STAMP_SIZES = np.array([8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256])
_STAR_FLOOR_ADU = 0.05
_CHUNK_PIXELS = 4_000_000


def moffat_alpha_px(fwhm_arcsec: float, beta: float, pixel_scale_arcsec: float) -> float:
    """Moffat core width alpha (px) for a FWHM (arcsec)."""
    fwhm_px = fwhm_arcsec / pixel_scale_arcsec
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def exposure_zeropoint_e(exposure: ExposurePlan) -> float:
    """AB magnitude giving 1 e- in this exposure, before amplifier terms."""
    b, s = band(exposure.band), site(exposure.site)
    return (b.zp_1s_ab + 2.5 * math.log10(exposure.exptime_s) + s.zp_offset_mag
            - exposure.transparency_mag)


def sky_level_e(exposure: ExposurePlan, pixel_scale_arcsec: float) -> float:
    """Sky per pixel in electrons."""
    return 10 ** (-0.4 * (exposure.sky_mag_arcsec2 - exposure_zeropoint_e(exposure))) * (
        pixel_scale_arcsec ** 2)


def amp_zeropoints(exposure: ExposurePlan, cfg: SimulationConfig) -> list[dict]:
    """The true zero-point model of every amplifier (one row each; see module docstring).

    The offsets and gradients are the site's instrumental pattern (:func:`_site_pattern`, the
    same in every band) plus this exposure's own departure, ``amp_jitter_mag`` RMS on each.
    """
    rng = rng_for(cfg.seed, "zp", exposure.stem)
    pattern = _site_pattern(exposure.site, cfg)
    gmax = cfg.amp_gradient_max_mag
    rows = []
    for ccd in cfg.camera.ccds:
        zp0 = exposure_zeropoint_e(exposure) - 2.5 * math.log10(ccd.gain_e_per_adu)
        for amp in ccd.amplifiers:
            offset, slope = pattern[(ccd.name, amp.index)]
            rows.append({
                "file": exposure.rel_path, "ccd": ccd.name, "amp": amp.index + 1,
                "x_start": amp.x_start, "x_stop": amp.x_stop, "ny": ccd.ny,
                "zp_y0": zp0 + offset + rng.normal(0.0, cfg.amp_jitter_mag),
                "zp_slope": float(np.clip(slope + rng.normal(0.0, cfg.amp_jitter_mag),
                                          -gmax, gmax)),
                "colour_term": site(exposure.site).colour_term, "colour": "V-I",
            })
    return rows


def _site_pattern(site_name: str, cfg: SimulationConfig) -> dict[tuple[str, int], tuple]:
    """(offset, gradient along Y) in mag of every (CCD, amplifier index) of one site's camera.

    A gradient per CCD (uniform within +-``amp_gradient_max_mag``) with 0.02 mag scatter
    between its amplifiers, and offsets of ``amp_offset_sigma_mag`` RMS.
    """
    rng = rng_for(cfg.seed, "zp-pattern", site_name)
    gmax = cfg.amp_gradient_max_mag
    out = {}
    for ccd in cfg.camera.ccds:
        grad = rng.uniform(-gmax, gmax)
        for amp in ccd.amplifiers:
            out[(ccd.name, amp.index)] = (rng.normal(0.0, cfg.amp_offset_sigma_mag),
                                          grad + rng.normal(0.0, 0.02))
    return out


def ccd_true_wcs(exposure: ExposurePlan, ccd: CCD, cfg: SimulationConfig) -> WCS:
    """The true TAN-SIP WCS of one CCD of this exposure."""
    return true_wcs(ccd, exposure.true_ra_deg, exposure.true_dec_deg, exposure.rotation_deg,
                    sip_coefficient(cfg.scale, cfg.distortion_scale))


def _on_chip(exposure: ExposurePlan, ccd: CCD, w: WCS, ra: np.ndarray, dec: np.ndarray,
             margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and true pixel positions (0-based) of sources within ``margin`` px of the chip."""
    scale_deg = abs(w.wcs.cd[1, 1])
    xi, eta = gnomonic(exposure.true_ra_deg, exposure.true_dec_deg, ra, dec)
    fx, fy = -xi / scale_deg - ccd.x0_px, eta / scale_deg - ccd.y0_px
    r = math.hypot(max(abs(ccd.x0_px), abs(ccd.x0_px + ccd.nx)),
                   max(abs(ccd.y0_px), abs(ccd.y0_px + ccd.ny)))
    slack = margin + 20.0 + abs(w.sip.a[3, 0]) * r ** 3 * 2.0 + r * 1e-3
    sel = np.flatnonzero((fx > -slack) & (fx < ccd.nx + slack) & (fy > -slack)
                         & (fy < ccd.ny + slack))
    if sel.size == 0:
        return sel, np.zeros(0), np.zeros(0)
    x, y = w.all_world2pix(ra[sel], dec[sel], 0, tolerance=1e-6, maxiter=50)
    keep = (x > -margin) & (x < ccd.nx + margin) & (y > -margin) & (y < ccd.ny + margin)
    return sel[keep], x[keep], y[keep]


def _fluxes_e(exposure: ExposurePlan, ccd: CCD, zp_rows: list[dict], mags: np.ndarray,
              colour: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integrated flux (e-) of each source from the amplifier zero-point model at (x, y)."""
    rows = [r for r in zp_rows if r["ccd"] == ccd.name]
    amp = np.clip(np.floor(x / rows[0]["x_stop"]).astype(int), 0, len(rows) - 1)
    zp0 = np.array([r["zp_y0"] for r in rows])[amp]
    slope = np.array([r["zp_slope"] for r in rows])[amp]
    zp = zp0 + slope * np.clip(y, 0, ccd.ny) / ccd.ny
    ct = rows[0]["colour_term"]
    return 10 ** (-0.4 * (mags - zp - ct * colour)) * ccd.gain_e_per_adu


def _stamp_half(radius: np.ndarray) -> np.ndarray:
    """Smallest stamp half-size of ``_STAMP_SIZES`` that covers ``radius`` (capped)."""
    idx = np.searchsorted(_STAMP_SIZES, np.minimum(radius, _STAMP_SIZES[-1]))
    return _STAMP_SIZES[np.minimum(idx, _STAMP_SIZES.size - 1)]


def _add_stamp(image: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add ``stamp`` with its pixel (n // 2, n // 2) on image pixel (ix, iy), clipped."""
    h = stamp.shape[0] // 2
    ny, nx = image.shape
    x0, y0 = ix - h, iy - h
    x1, y1 = x0 + stamp.shape[1], y0 + stamp.shape[0]
    if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
        return
    sx0, sy0 = max(0, -x0), max(0, -y0)
    sx1, sy1 = stamp.shape[1] - max(0, x1 - nx), stamp.shape[0] - max(0, y1 - ny)
    image[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] += stamp[sy0:sy1, sx0:sx1]


def _chunks(n: int, half: int) -> list[slice]:
    """Slices of at most ~4 million stamp pixels, to bound memory of vectorised stamps."""
    size = max(1, _CHUNK_PIXELS // (2 * half + 2) ** 2)
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _render_stars(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                  alpha: float, beta: float, fwhm_px: float) -> None:
    """Moffat stamps, vectorised per stamp size."""
    norm = flux * (beta - 1.0) / (math.pi * alpha**2)
    reach = alpha * np.sqrt(np.maximum((norm / _STAR_FLOOR_ADU) ** (1.0 / beta) - 1.0, 0.0))
    half = _stamp_half(np.maximum(reach, 6.0 * fwhm_px))
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    for h in np.unique(half):
        idx = np.flatnonzero(half == h)
        g = np.arange(-h, h + 1, dtype=float)
        for part in _chunks(idx.size, int(h)):
            k = idx[part]
            dx = g[None, None, :] - (x[k] - ix[k])[:, None, None]
            dy = g[None, :, None] - (y[k] - iy[k])[:, None, None]
            stamps = norm[k, None, None] * (1.0 + (dx**2 + dy**2) / alpha**2) ** (-beta)
            for j, s in zip(k, stamps):
                _add_stamp(image, s, int(ix[j]), int(iy[j]))


def _sersic_bn(n: np.ndarray) -> np.ndarray:
    """Ciotti & Bertin (1999) approximation of b_n."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)


def _psf_fft(half: int, alpha: float, beta: float) -> np.ndarray:
    """Real FFT of the PSF on a 2h x 2h stamp, centred for circular convolution."""
    g = np.arange(-half, half, dtype=float)
    psf = (1.0 + (g[None, :] ** 2 + g[:, None] ** 2) / alpha**2) ** (-beta)
    return np.fft.rfft2(np.fft.ifftshift(psf / psf.sum()))


def _render_galaxies(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                     shape: dict[str, np.ndarray], alpha: float, beta: float, fwhm_px: float,
                     pixel_scale: float, rotation_deg: float) -> None:
    """Sersic stamps normalised to ``flux``, FFT-convolved with the PSF, per stamp size.

    Stamps are 2h x 2h (h in 8, 12, 16, ..., sizes of the form 2^a 3^b for fast FFTs), centred
    on pixel (h, h).
    """
    re_px = shape["r_eff_arcsec"] / pixel_scale
    n = shape["sersic_n"]
    half = _stamp_half(np.minimum(re_px * np.where(n > 2, 8.0, 5.0) + 3.0 * fwhm_px, 96))
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    pa = np.radians(shape["pa_deg"] + rotation_deg)
    for h in np.unique(half):
        idx = np.flatnonzero(half == h)
        g = np.arange(-h, h, dtype=float)
        otf = _psf_fft(int(h), alpha, beta)
        for part in _chunks(idx.size, int(h)):
            k = idx[part]
            dx = g[None, None, :] - (x[k] - ix[k])[:, None, None]
            dy = g[None, :, None] - (y[k] - iy[k])[:, None, None]
            s, c = np.sin(pa[k])[:, None, None], np.cos(pa[k])[:, None, None]
            major = -dx * s + dy * c
            minor = dx * c + dy * s
            q = shape["axis_ratio"][k][:, None, None]
            rr = np.sqrt(major**2 + (minor / q) ** 2 + 0.0625) / re_px[k][:, None, None]
            nk = n[k][:, None, None]
            prof = np.exp(-_sersic_bn(nk) * rr ** (1.0 / nk))
            prof *= (flux[k] / prof.sum(axis=(1, 2)))[:, None, None]
            conv = np.fft.irfft2(np.fft.rfft2(prof) * otf[None], s=prof.shape[1:])
            for j, st in zip(k, conv):
                _add_stamp(image, st, int(ix[j]), int(iy[j]))


def _sources_image(exposure: ExposurePlan, ccd: CCD, sources: Table, ra: np.ndarray,
                   dec: np.ndarray, zp_rows: list[dict], cfg: SimulationConfig, w: WCS
                   ) -> np.ndarray:
    """Noiseless image (e-) of every star and galaxy on this CCD."""
    image = np.zeros(ccd.shape)
    pix = cfg.camera.pixel_scale_arcsec
    alpha = moffat_alpha_px(exposure.seeing_fwhm_arcsec, cfg.moffat_beta, pix)
    fwhm_px = exposure.seeing_fwhm_arcsec / pix
    idx, x, y = _on_chip(exposure, ccd, w, ra, dec, margin=200.0)
    mags = np.asarray(sources[f"mag_{exposure.band}"])[idx]
    colour = np.asarray(sources["mag_V"])[idx] - np.asarray(sources["mag_I"])[idx]
    flux = _fluxes_e(exposure, ccd, zp_rows, mags, colour, x, y)
    star = np.asarray(sources["type"])[idx] == "star"
    _render_stars(image, x[star], y[star], flux[star], alpha, cfg.moffat_beta, fwhm_px)
    gal = ~star
    shape = {c: np.asarray(sources[c], dtype=float)[idx][gal]
             for c in ("r_eff_arcsec", "sersic_n", "axis_ratio", "pa_deg")}
    _render_galaxies(image, x[gal], y[gal], flux[gal], shape, alpha, cfg.moffat_beta, fwhm_px,
                     pix, exposure.rotation_deg)
    return image


def _add_diffuse_light(light: np.ndarray, exposure: ExposurePlan, ccd: CCD,
                       cfg: SimulationConfig, sky_e: float, mask: np.ndarray) -> None:
    """Add sky, and the satellite trail and stray-light ring if this exposure has them (e-)."""
    light += sky_e
    if exposure.satellite:
        sigma = exposure.seeing_fwhm_arcsec / cfg.camera.pixel_scale_arcsec / 2.355
        trail = artifacts.SatelliteTrail(cfg.camera, rng_for(cfg.seed, "satellite", exposure.stem),
                                         sigma)
        light += artifacts.satellite_trail(ccd, trail, mask)
    if exposure.stray_light:
        ring = artifacts.StrayLightRing(cfg.camera, rng_for(cfg.seed, "stray", exposure.stem),
                                        sky_e)
        light += artifacts.stray_light(ccd, ring, mask)


def _detector(image_e: np.ndarray, exposure: ExposurePlan, ccd: CCD, cfg: SimulationConfig,
              rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Photon noise, cosmic rays, bleeding, crosstalk, defects, read noise; returns ADU.

    Works in place on ``image_e`` and in blocks of rows, so a full-size CCD needs few
    full-frame temporaries.
    """
    img = image_e
    for rows in _row_blocks(ccd.ny):
        img[rows] = rng.poisson(img[rows])
    area = ccd.nx * ccd.ny / (9232.0 * 9216.0)
    cr_idx, cr_e = artifacts.cosmic_rays(ccd.shape, rng, cfg.cosmic_rays_per_full_ccd * area
                                         * exposure.exptime_s / 120.0)
    np.add.at(img.ravel(), cr_idx, cr_e)
    mask.ravel()[cr_idx] |= np.uint8(artifacts.MaskBit.COSMIC_OR_XTALK)
    full_well = ccd.saturation_adu * ccd.gain_e_per_adu
    artifacts.bleed_trails(img, full_well, ccd.bleed_direction, mask)
    img += artifacts.crosstalk(ccd, img, full_well, cfg.crosstalk_coefficient, mask)
    defects = artifacts.bad_columns(ccd, rng_for(cfg.seed, "bad-columns", ccd.name),
                                    cfg.bad_columns_per_ccd)
    artifacts.apply_bad_columns(img, defects, mask)
    for rows in _row_blocks(ccd.ny):
        img[rows] += rng.normal(0.0, ccd.read_noise_e, (rows.stop - rows.start, ccd.nx))
    if cfg.dead_ccd == ccd.name:
        cols = artifacts.dead_amplifier(ccd, cfg.dead_amp, mask)
        img[:, cols] = rng.normal(0.0, ccd.read_noise_e, img[:, cols].shape)
    img /= ccd.gain_e_per_adu
    clipped = img >= ccd.saturation_adu
    not_bleed = (mask & np.uint8(artifacts.MaskBit.BLEED)) == 0
    mask[clipped & not_bleed] |= np.uint8(artifacts.MaskBit.SATURATED)
    np.minimum(img, ccd.saturation_adu, out=img)
    return img.astype(np.float32)


def _row_blocks(ny: int, size: int = 1024) -> list[slice]:
    """Blocks of rows for chunked random draws (fixed size: same numbers on every machine)."""
    return [slice(y, min(ny, y + size)) for y in range(0, ny, size)]


def render_ccd(exposure: ExposurePlan, ccd: CCD, sources: Table, cfg: SimulationConfig,
               zp_rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 ADU image, uint8 truth mask) of one CCD of one exposure."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [exposure.seed, cfg.camera.ccds.index(ccd)]))
    w = ccd_true_wcs(exposure, ccd, cfg)
    ra, dec = positions_at(sources, exposure.mjd)
    mask = np.zeros(ccd.shape, dtype=np.uint8)
    sky_e = sky_level_e(exposure, cfg.camera.pixel_scale_arcsec)
    image_e = _sources_image(exposure, ccd, sources, ra, dec, zp_rows, cfg, w)
    _add_diffuse_light(image_e, exposure, ccd, cfg, sky_e, mask)
    return _detector(image_e, exposure, ccd, cfg, rng, mask), mask


def render_exposure(exposure: ExposurePlan, sources: Table, cfg: SimulationConfig
                    ) -> tuple[fits.HDUList, fits.HDUList, list[dict]]:
    """One exposure in memory: (raw multi-extension FITS, truth masks, zero-point rows)."""
    zp_rows = amp_zeropoints(exposure, cfg)
    raw = fits.HDUList([fits.PrimaryHDU(header=primary_header(exposure, cfg.scale, cfg.seed))])
    truth = fits.HDUList([fits.PrimaryHDU(header=mask_primary_header(exposure, cfg.seed))])
    for ccd in cfg.camera.ccds:
        data, mask = render_ccd(exposure, ccd, sources, cfg, zp_rows)
        header = ccd_header(ccd, approx_wcs(ccd, exposure.ra_deg, exposure.dec_deg))
        raw.append(fits.ImageHDU(data=data, header=header))
        mhdr = fits.Header()
        mhdr["EXTNAME"] = (ccd.name, "CCD name")
        wcs_cards(ccd_true_wcs(exposure, ccd, cfg), mhdr)
        truth.append(fits.ImageHDU(data=mask, header=mhdr))
    return raw, truth, zp_rows
