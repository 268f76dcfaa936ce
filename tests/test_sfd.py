"""The SFD (1998) E(B-V) reader, on small maps in SFD's file format written by the tests."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from catalog_factories import write_sfd_maps

from ks4release.errors import InputError
from ks4release.sfd import SfdMap, SfdMapMissingWarning, ebmv_sfd


def _smooth(glon, glat):
    return 0.05 + 0.03 * np.cos(np.radians(glon)) * np.cos(np.radians(glat)) + 0.001 * glat


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    return write_sfd_maps(tmp_path_factory.mktemp("sfd"), _smooth, scale=64)


def test_test_maps_follow_sfds_lambert_projection(maps):
    # SFD's own definition (lambert_lb2xy): x = s*sqrt(1 - n sin b) cos l + x0,
    # y = -n s sqrt(1 - n sin b) sin l + y0, with s = LAM_SCAL and n = LAM_NSGP.
    for path in maps:
        header = fits.getheader(path)
        n, s = header["LAM_NSGP"], header["LAM_SCAL"]
        glon = np.array([5.0, 95.0, 200.0, 300.0])
        glat = n * np.array([10.0, 45.0, 80.0, 30.0])
        x, y = WCS(header).wcs_world2pix(glon, glat, 0)
        rho = s * np.sqrt(1 - n * np.sin(np.radians(glat)))
        np.testing.assert_allclose(x, rho * np.cos(np.radians(glon)) + header["CRPIX1"] - 1,
                                   atol=1e-6)
        np.testing.assert_allclose(y, -n * rho * np.sin(np.radians(glon)) + header["CRPIX2"] - 1,
                                   atol=1e-6)


def test_pixel_centres_give_pixel_values(maps):
    sfd = SfdMap(*maps)
    for path in maps:
        with fits.open(path) as hdul:
            data, wcs = hdul[0].data, WCS(hdul[0].header)
        iy, ix = np.array([64, 40, 90, 70]), np.array([64, 80, 50, 30])
        glon, glat = wcs.wcs_pix2world(ix, iy, 0)
        np.testing.assert_allclose(sfd.ebv(glon, glat), data[iy, ix], rtol=1e-6)


def test_interpolates_a_smooth_map(maps):
    rng = np.random.default_rng(5)
    glon = rng.uniform(0, 360, 200)
    glat = rng.uniform(-85, 85, 200)
    np.testing.assert_allclose(SfdMap(*maps).ebv(glon, glat), _smooth(glon, glat), atol=2e-3)


def test_hemispheres_come_from_their_files(tmp_path):
    north, south = write_sfd_maps(tmp_path, lambda glon, glat: np.where(glat >= 0, 0.1, 0.7),
                                  scale=16)
    values = SfdMap(north, south).ebv(np.array([10.0, 10.0]), np.array([30.0, -30.0]))
    np.testing.assert_allclose(values, [0.1, 0.7], rtol=1e-6)
    with pytest.raises(InputError, match="LAM_NSGP"):
        SfdMap(south, north)


def test_no_map_gives_null_with_a_warning():
    with pytest.warns(SfdMapMissingWarning, match="no SFD dust map"):
        values = ebmv_sfd(np.array([1.0, 2.0]), np.array([3.0, 4.0]), "", "")
    assert np.all(np.isnan(values))
    with pytest.raises(ValueError, match="both"):
        ebmv_sfd(np.array([1.0]), np.array([1.0]), "a.fits", "")
