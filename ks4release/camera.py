"""The KMTNet camera: four CCDs, eight amplifiers each, and the gaps between them.

The geometry follows the KS4 team's focal-plane models (``kmtnet_global*.ahead``): four
9232 x 9216 px CCDs around the optical axis, about 500 px apart in X and 1000 px in Y, each read
out by eight amplifiers that split the chip into vertical strips. The chip order of the ``.ahead``
files (chip 1 to 4) is taken as KK, MM, NN, TT; KK sits at +X +Y of the optical axis, MM at -X +Y,
NN at -X -Y and TT at +X -Y (pixel axes; +X is west, +Y is north for an unrotated camera).

A ``scale`` factor shrinks chips and gaps together for demonstrations while the pixel scale stays
real, so that every per-pixel algorithm sees realistic seeing, noise and source sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FULL_CCD_SHAPE",
    "N_AMPLIFIERS",
    "PIXEL_SCALE_ARCSEC",
    "COADD_PIXEL_SCALE_ARCSEC",
    "CCD_NAMES",
    "Amplifier",
    "CCD",
    "Camera",
]

#: Full-size CCD shape as (ny, nx), NumPy order.
FULL_CCD_SHAPE = (9216, 9232)
#: Amplifiers per CCD (vertical strips along X).
N_AMPLIFIERS = 8
#: Native pixel scale of the raw CCDs (CD ~ 1.097e-4 deg/px in the .ahead models).
PIXEL_SCALE_ARCSEC = 1.097e-4 * 3600.0
#: Pixel scale of the DR1 co-adds.
COADD_PIXEL_SCALE_ARCSEC = 0.4
#: Chip names in the order of the .ahead focal-plane models.
CCD_NAMES = ("KK", "MM", "NN", "TT")

# Full-size gaps between the chips, in pixels (from the .ahead CRPIX values).
_GAP_X_PX = 500
_GAP_Y_PX = 1000
# Quadrant of each chip: sign of X and Y of its centre relative to the optical axis.
_QUADRANT = {"KK": (1, 1), "MM": (-1, 1), "NN": (-1, -1), "TT": (1, -1)}
# Per-chip electronics. DR1 quotes saturation at 44,000-55,000 ADU "depending on chip" and bleed
# directions that "vary by chip"; the individual values are not published, these are our defaults.
_SATURATION_ADU = {"KK": 55000.0, "MM": 48000.0, "NN": 44000.0, "TT": 51000.0}
_BLEED_DIRECTION = {"KK": 1, "MM": -1, "NN": 1, "TT": -1}
_GAIN_E_PER_ADU = {"KK": 1.00, "MM": 1.05, "NN": 0.95, "TT": 1.10}
_READ_NOISE_E = {"KK": 9.0, "MM": 10.0, "NN": 11.0, "TT": 9.5}


@dataclass(frozen=True, kw_only=True)
class Amplifier:
    """One readout amplifier: a vertical strip of columns ``x_start <= x < x_stop`` (0-based)."""

    index: int
    x_start: int
    x_stop: int

    @property
    def width(self) -> int:
        """Number of columns read out by this amplifier."""
        return self.x_stop - self.x_start


@dataclass(frozen=True, kw_only=True)
class CCD:
    """One CCD of the mosaic.

    ``x0_px`` and ``y0_px`` place the chip's pixel (0, 0) in focal-plane pixels relative to the
    optical axis, so a pixel (x, y) of this chip lies at focal-plane (x0_px + x, y0_px + y).
    """

    name: str
    nx: int
    ny: int
    x0_px: float
    y0_px: float
    saturation_adu: float
    bleed_direction: int
    gain_e_per_adu: float
    read_noise_e: float
    amplifiers: tuple[Amplifier, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape as (ny, nx), NumPy order."""
        return (self.ny, self.nx)

    def amplifier_of_column(self, x: int) -> Amplifier:
        """The amplifier that reads column ``x`` (0-based)."""
        for amp in self.amplifiers:
            if amp.x_start <= x < amp.x_stop:
                return amp
        raise ValueError(f"column {x} is outside CCD {self.name} (0..{self.nx - 1})")


@dataclass(frozen=True, kw_only=True)
class Camera:
    """The four-CCD KMTNet mosaic, optionally shrunk by ``scale`` (chips and gaps together)."""

    scale: float
    pixel_scale_arcsec: float
    ccds: tuple[CCD, ...]

    @classmethod
    def kmtnet(cls, scale: float = 1.0) -> Camera:
        """The KMTNet camera at ``scale`` (1.0 = full size, 0.0625 = the demo default)."""
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"camera scale must be in (0, 1], got {scale}")
        amp_width = max(8, round(FULL_CCD_SHAPE[1] / N_AMPLIFIERS * scale))
        nx = amp_width * N_AMPLIFIERS
        ny = max(64, round(FULL_CCD_SHAPE[0] * scale))
        gap_x = round(_GAP_X_PX * scale)
        gap_y = round(_GAP_Y_PX * scale)
        amps = tuple(
            Amplifier(index=i, x_start=i * amp_width, x_stop=(i + 1) * amp_width)
            for i in range(N_AMPLIFIERS)
        )
        ccds = []
        for name in CCD_NAMES:
            sx, sy = _QUADRANT[name]
            x0 = gap_x / 2 if sx > 0 else -gap_x / 2 - nx
            y0 = gap_y / 2 if sy > 0 else -gap_y / 2 - ny
            ccds.append(
                CCD(
                    name=name,
                    nx=nx,
                    ny=ny,
                    x0_px=x0,
                    y0_px=y0,
                    saturation_adu=_SATURATION_ADU[name],
                    bleed_direction=_BLEED_DIRECTION[name],
                    gain_e_per_adu=_GAIN_E_PER_ADU[name],
                    read_noise_e=_READ_NOISE_E[name],
                    amplifiers=amps,
                )
            )
        return cls(scale=scale, pixel_scale_arcsec=PIXEL_SCALE_ARCSEC, ccds=tuple(ccds))

    def ccd(self, name: str) -> CCD:
        """The CCD called ``name`` (KK, MM, NN or TT)."""
        for ccd in self.ccds:
            if ccd.name == name:
                return ccd
        raise KeyError(f"unknown CCD {name!r}; the KMTNet CCDs are {', '.join(CCD_NAMES)}")

    @property
    def field_size_px(self) -> tuple[float, float]:
        """Extent of the whole mosaic (width, height) in pixels, gaps included."""
        xs = [c.x0_px for c in self.ccds] + [c.x0_px + c.nx for c in self.ccds]
        ys = [c.y0_px for c in self.ccds] + [c.y0_px + c.ny for c in self.ccds]
        return (max(xs) - min(xs), max(ys) - min(ys))

    @property
    def field_size_deg(self) -> tuple[float, float]:
        """Extent of the mosaic (width, height) in degrees on the sky."""
        w, h = self.field_size_px
        return (w * self.pixel_scale_arcsec / 3600.0, h * self.pixel_scale_arcsec / 3600.0)
