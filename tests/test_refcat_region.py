"""Regions and their HEALPix cells; the ADQL built for a cell (hypothesis properties)."""

from __future__ import annotations

import math
import re
import sqlite3

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mocpy import MOC

from ks4release.camera import Camera
from ks4release.grid import tile_by_name
from ks4release.refcat import (
    TAP_TABLES,
    Region,
    build_cell_query,
    cell_bounds,
    cell_of,
)
from ks4release.refcat.adql import format_number

_PROPERTY = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
ra_st = st.floats(0.0, 360.0, allow_nan=False, exclude_max=True)
dec_st = st.floats(-90.0, 90.0, allow_nan=False)
order_st = st.integers(0, 9)


def _offsets(rng, n, radius_deg):
    """Points uniformly inside a cap of ``radius_deg`` about the north pole, plus its rim."""
    r = math.radians(radius_deg)
    angle = np.concatenate([r * np.sqrt(rng.uniform(0, 1, n)), np.full(n // 4, r)])
    phi = rng.uniform(0, 2 * math.pi, angle.size)
    s = np.sin(angle)
    return np.column_stack([s * np.cos(phi), s * np.sin(phi), np.cos(angle)])


def _rotate_to(vecs, ra_deg, dec_deg):
    """Rotate vectors around the pole onto (ra, dec)."""
    theta = math.radians(90.0 - dec_deg)
    phi = math.radians(ra_deg)
    ry = np.array([[math.cos(theta), 0, math.sin(theta)], [0, 1, 0],
                   [-math.sin(theta), 0, math.cos(theta)]])
    rz = np.array([[math.cos(phi), -math.sin(phi), 0], [math.sin(phi), math.cos(phi), 0],
                   [0, 0, 1]])
    return vecs @ (rz @ ry).T


@_PROPERTY
@given(ra=ra_st, dec=dec_st, radius=st.floats(1e-4, 5.0), order=order_st,
       seed=st.integers(0, 2**16))
def test_cone_cells_cover_every_point(ra, dec, radius, order, seed):
    region = Region.cone(ra, dec, radius)
    cells = set(region.cells(order).tolist())
    vec = _rotate_to(_offsets(np.random.default_rng(seed), 400, radius * (1 - 1e-7)), ra, dec)
    pra, pdec = hp.vec2ang(vec, lonlat=True)
    assert region.contains(pra, pdec).all()
    assert set(cell_of(pra, pdec, order).tolist()) <= cells


@_PROPERTY
@given(ra=ra_st, dec=st.floats(-89.0, 89.0), half_w=st.floats(0.01, 3.0),
       half_h=st.floats(0.01, 3.0), order=order_st, seed=st.integers(0, 2**16))
def test_box_cells_cover_every_point(ra, dec, half_w, half_h, order, seed):
    region = Region.box(ra, dec, half_w, half_h)
    cells = set(region.cells(order).tolist())
    rng = np.random.default_rng(seed)
    # Random points, and points on the edges (shrunk by 1e-9 against rounding).
    w, h = half_w * (1 - 1e-9), half_h * (1 - 1e-9)
    xi = np.concatenate([rng.uniform(-w, w, 300), [w, -w] * 25, rng.uniform(-w, w, 50)])
    eta = np.concatenate([rng.uniform(-h, h, 300), rng.uniform(-h, h, 50), [h, -h] * 25])
    pra, pdec = region._from_tangent(xi, eta)
    assert region.contains(pra, pdec).all()
    assert set(cell_of(pra, pdec, order).tolist()) <= cells


@_PROPERTY
@given(ra=ra_st, dec=st.floats(-85.0, 85.0), radius=st.floats(0.05, 2.0),
       depth=st.integers(4, 10), order=order_st, seed=st.integers(0, 2**16))
def test_moc_cells_cover_every_point(ra, dec, radius, depth, order, seed):
    moc = MOC.from_cone(lon=ra * u.deg, lat=dec * u.deg, radius=radius * u.deg,
                        max_depth=depth)
    region = Region.from_moc(moc)
    cells = set(region.cells(order).tolist())
    vec = _rotate_to(_offsets(np.random.default_rng(seed), 300, radius * 1.5), ra, dec)
    pra, pdec = hp.vec2ang(vec, lonlat=True)
    inside = region.contains(pra, pdec)
    assert set(cell_of(pra[inside], pdec[inside], order).tolist()) <= cells


@_PROPERTY
@given(ra=ra_st, dec=dec_st, order=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_cell_bounds_hold_the_cell(ra, dec, order, seed):
    cell = int(cell_of(ra, dec, order))
    bounds = cell_bounds(cell, order)
    # Points of the cell: a fine grid of its sub-cells' centres and boundaries.
    fine = order + 3
    subcells = np.arange(cell * 64, cell * 64 + 64)
    vec = np.concatenate([hp.boundaries(2**fine, int(p), step=2, nest=True).T
                          for p in subcells[np.random.default_rng(seed).integers(0, 64, 16)]])
    pra, pdec = hp.vec2ang(vec, lonlat=True)
    cra, cdec = hp.pix2ang(2**fine, subcells, nest=True, lonlat=True)
    pra, pdec = np.concatenate([pra, cra]), np.concatenate([pdec, cdec])
    assert ((pdec >= bounds.dec_min) & (pdec <= bounds.dec_max)).all()
    in_ra = np.zeros(pra.size, bool)
    for lo, hi in bounds.ra_ranges:
        in_ra |= (pra >= lo) & (pra <= hi)
    assert in_ra.all()
    # The cone used for VizieR holds the box too.
    cra0, cdec0, radius = bounds.cone()
    assert Region.cone(cra0, cdec0, radius).contains(pra, pdec).all()


_TOKEN = re.compile(r"\s*(?:(?P<num>-?\d+\.\d+)|(?P<name>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)"
                    r"|(?P<kw>SELECT|FROM|WHERE|AS|AND|OR|BETWEEN|JOIN|ON)|(?P<punct>[(),=]))",
                    re.IGNORECASE)


def _tokens(query: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        assert m, f"unexpected text at {pos}: {query[pos:pos + 30]!r}"
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _schema() -> sqlite3.Connection:
    """Empty archive tables, to check that the ADQL parses and names real columns."""
    db = sqlite3.connect(":memory:")
    db.execute("ATTACH DATABASE ':memory:' AS gaiadr3")
    db.execute("ATTACH DATABASE ':memory:' AS delve_dr2")
    from ks4release.refcat import REFCAT_FORMATS

    for name, fmt in REFCAT_FORMATS.items():
        cols = [c.name for c in fmt.columns]
        if name == "gaia_xp":
            cols = [c for c in cols if c not in ("ra", "dec")]
        db.execute(f"CREATE TABLE {fmt.archive_table} ({', '.join(cols)})")
    return db


_DB = _schema()
_KEYWORDS = {"select", "from", "where", "as", "and", "or", "between", "join", "on"}


@_PROPERTY
@given(catalog=st.sampled_from(sorted(TAP_TABLES)), ra=ra_st, dec=dec_st,
       order=st.integers(0, 12))
def test_adql_parses_and_has_only_numeric_literals(catalog, ra, dec, order):
    query = build_cell_query(catalog, cell_bounds(int(cell_of(ra, dec, order)), order))
    assert "'" not in query and '"' not in query and ";" not in query and "--" not in query
    names = {q for _, q in TAP_TABLES[catalog].select} | {c for c, _ in TAP_TABLES[catalog].select}
    fixed = names | {"gaiadr3.gaia_source", "gaiadr3.synthetic_photometry_gspc",
                     "delve_dr2.objects", "g", "xp", "o", "g.ra", "g.dec", "o.ra", "o.dec",
                     "g.source_id", "xp.source_id"}
    for kind, text in _tokens(query):
        if kind == "name" and text.lower() not in _KEYWORDS:
            assert text in fixed, text
        if kind == "num":
            assert math.isfinite(float(text))
    # A real SQL engine accepts it (the loopback TAP server runs these queries on SQLite).
    _DB.execute(query).fetchall()


def test_adql_rejects_non_numbers():
    with pytest.raises(TypeError):
        format_number("1; DROP TABLE x")
    with pytest.raises(ValueError):
        format_number(float("nan"))
    with pytest.raises(ValueError):
        build_cell_query("2mass", cell_bounds(0, 0))


def test_region_from_tile_uses_camera_footprint_and_margin():
    tile = tile_by_name("0376.321-70")
    camera = Camera.kmtnet(1.0)
    region = Region.from_tile(tile, camera, margin_deg=0.2)
    width, height = camera.field_size_deg
    assert region.half_width_deg == pytest.approx(width / 2 + 0.2)
    assert region.half_height_deg == pytest.approx(height / 2 + 0.2)
    # Centre inside, a point 3 deg north outside.
    assert region.contains([tile.ra_deg], [tile.dec_deg])[0]
    assert not region.contains([tile.ra_deg], [tile.dec_deg + 3.0])[0]
    assert "0376.321-70" in region.describe()


def test_bad_regions_are_refused():
    with pytest.raises(ValueError, match="radius_deg"):
        Region.cone(10, 10, 0)
    with pytest.raises(ValueError, match="dec"):
        Region.cone(10, 95, 1)
    with pytest.raises(ValueError, match="order"):
        Region.cone(10, 10, 1).cells(13)
