"""KS4 survey vocabulary: bands, sites, the dither pattern and the DR1 observing statistics.

Numbers quoted from the DR1 paper (``ks4-dr1-paper.txt``) are marked "DR1"; the others are
defaults of ours, documented in the README, where the paper does not state a value.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BANDS",
    "Band",
    "band",
    "SITES",
    "Site",
    "site",
    "DITHER_OFFSETS_ARCMIN",
    "EXPOSURES_PER_TILE_DR1",
    "EXPTIME_S",
    "REFERENCE_ZEROPOINT",
    "DR1_MJD_RANGE",
]

#: Every single-epoch exposure is scaled to this zero point (DR1).
REFERENCE_ZEROPOINT = 30.0
#: Typical exposure time in seconds (DR1).
EXPTIME_S = 120.0
#: First and last night of DR1 observations, MJD (2019-11-29 .. 2023-12-21).
DR1_MJD_RANGE = (58816.0, 60299.0)


@dataclass(frozen=True, kw_only=True)
class Band:
    """A KS4 photometric band.

    ``seeing_arcsec`` and ``depth_5sigma_ab`` are DR1's median co-add values; ``sky_mag_arcsec2``
    (dark-ish sky at the sites) and ``zp_1s_ab`` (AB magnitude giving 1 e-/s) are our defaults.
    """

    name: str
    wavelength_nm: float
    seeing_arcsec: float
    depth_5sigma_ab: float
    sky_mag_arcsec2: float
    zp_1s_ab: float
    gaia_xp_column: str


#: The four KS4 bands, blue to red.
BANDS: tuple[Band, ...] = (
    Band(name="B", wavelength_nm=440.0, seeing_arcsec=2.10, depth_5sigma_ab=22.72,
         sky_mag_arcsec2=22.3, zp_1s_ab=25.6, gaia_xp_column="b_jkc_mag"),
    Band(name="V", wavelength_nm=550.0, seeing_arcsec=2.03, depth_5sigma_ab=22.56,
         sky_mag_arcsec2=21.5, zp_1s_ab=25.9, gaia_xp_column="v_jkc_mag"),
    Band(name="R", wavelength_nm=650.0, seeing_arcsec=1.96, depth_5sigma_ab=22.75,
         sky_mag_arcsec2=20.9, zp_1s_ab=26.0, gaia_xp_column="r_jkc_mag"),
    Band(name="I", wavelength_nm=800.0, seeing_arcsec=1.93, depth_5sigma_ab=22.07,
         sky_mag_arcsec2=19.9, zp_1s_ab=25.6, gaia_xp_column="i_jkc_mag"),
)


def band(name: str) -> Band:
    """The band called ``name`` (B, V, R or I)."""
    for b in BANDS:
        if b.name == name:
            return b
    raise KeyError(f"unknown band {name!r}; KS4 bands are {', '.join(b.name for b in BANDS)}")


@dataclass(frozen=True, kw_only=True)
class Site:
    """A KMTNet site.

    ``dr1_exposures`` is the number of DR1 exposures taken there (DR1). ``zp_offset_mag`` and
    ``colour_term`` describe how its photometric system departs from the others, as the
    simulator injects it (0.2 mag between sites in DR1 before correction; terms are ours).
    """

    name: str
    longitude_deg: float
    latitude_deg: float
    dr1_exposures: int
    zp_offset_mag: float
    colour_term: float


#: The three KMTNet sites.
SITES: tuple[Site, ...] = (
    Site(name="CTIO", longitude_deg=-70.815, latitude_deg=-30.165, dr1_exposures=5570,
         zp_offset_mag=0.0, colour_term=0.02),
    Site(name="SSO", longitude_deg=149.062, latitude_deg=-31.273, dr1_exposures=3134,
         zp_offset_mag=-0.20, colour_term=-0.03),
    Site(name="SAAO", longitude_deg=20.811, latitude_deg=-32.376, dr1_exposures=8922,
         zp_offset_mag=-0.08, colour_term=0.04),
)


def site(name: str) -> Site:
    """The site called ``name`` (CTIO, SSO or SAAO)."""
    for s in SITES:
        if s.name == name:
            return s
    raise KeyError(f"unknown site {name!r}; KMTNet sites are {', '.join(s.name for s in SITES)}")


#: The four dither points, (dRA, dDec) in arcmin from the tile centre (DR1: 4' in RA, 7' in Dec).
DITHER_OFFSETS_ARCMIN: tuple[tuple[float, float], ...] = (
    (4.0, 7.0),
    (-4.0, 7.0),
    (-4.0, -7.0),
    (4.0, -7.0),
)

#: Fraction of DR1 tile-filter combinations with N exposures (DR1 Table 2).
EXPOSURES_PER_TILE_DR1: dict[int, float] = {
    4: 0.747, 5: 0.127, 6: 0.062, 7: 0.025, 8: 0.022, 9: 0.017,
}
