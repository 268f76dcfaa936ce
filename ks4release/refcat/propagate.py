"""Proper-motion propagation of Gaia positions from their reference epoch to another epoch.

DR1 matched against Gaia DR3 positions at epoch 2016.0 without correcting for proper motion.
The reference catalogs stay at that epoch by default (``[refcat] propagate_to_epoch = 0.0``);
the astrometry stage moves them to each exposure's epoch (``[astrometry]
propagate_proper_motion``). Setting an epoch (Julian year, e.g. 2021.5 for the middle of the DR1
observations) moves every source with a proper motion along its space motion with astropy
(:meth:`~astropy.coordinates.SkyCoord.apply_space_motion`); the parallax sets the distance where
it is positive, a far distance is assumed otherwise. Sources without a proper motion keep their
positions. The original positions are kept as ``ra_gaia``/``dec_gaia`` and ``meta["epoch"]``
records the epoch of ``ra``/``dec``. :func:`epoch_position_error` gives the error the epoch
difference adds to each position.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from astropy import units as u
from astropy.coordinates import Distance, SkyCoord
from astropy.table import MaskedColumn, Table
from astropy.time import Time
from erfa import ErfaWarning

__all__ = ["GAIA_DR3_EPOCH", "column_values", "epoch_position_error", "propagate_positions"]

#: Reference epoch of Gaia DR3 positions (Julian year).
GAIA_DR3_EPOCH = 2016.0
# Distance assumed for sources without a usable parallax (far enough to ignore parallax).
_FAR_PC = 1.0e6


def column_values(table: Table, name: str, fill: float) -> np.ndarray:
    """A column as float64: NaN where masked, ``fill`` everywhere when the column is absent."""
    if name not in table.colnames:
        return np.full(len(table), fill)
    col = table[name]
    data = col.filled(np.nan) if isinstance(col, MaskedColumn) else np.asarray(col)
    return np.asarray(data, dtype=np.float64)


def propagate_positions(table: Table, epoch: float) -> Table:
    """A copy of ``table`` with ``ra``/``dec`` moved to ``epoch`` (Julian year).

    ``table`` needs ``ra`` and ``dec`` and may have ``pmra``, ``pmdec``, ``parallax`` and
    ``ref_epoch`` (default 2016.0) in the units of the Gaia format.
    """
    if not (math.isfinite(epoch) and 1900.0 <= epoch <= 2100.0):
        raise ValueError(f"epoch must be a Julian year in [1900, 2100], got {epoch}")
    out = table.copy()
    out["ra_gaia"] = out["ra"].copy()
    out["dec_gaia"] = out["dec"].copy()
    pmra = column_values(out, "pmra", np.nan)
    pmdec = column_values(out, "pmdec", np.nan)
    moving = np.isfinite(pmra) & np.isfinite(pmdec)
    ra = column_values(out, "ra", np.nan)
    dec = column_values(out, "dec", np.nan)
    if moving.any():
        plx = column_values(out, "parallax", np.nan)[moving]
        distance = np.where(np.isfinite(plx) & (plx > 0), 1000.0 / np.where(plx > 0, plx, 1.0),
                            _FAR_PC)
        ref = column_values(out, "ref_epoch", GAIA_DR3_EPOCH)[moving]
        ref = np.where(np.isfinite(ref), ref, GAIA_DR3_EPOCH)
        coords = SkyCoord(
            ra=ra[moving] * u.deg, dec=dec[moving] * u.deg,
            pm_ra_cosdec=pmra[moving] * u.mas / u.yr, pm_dec=pmdec[moving] * u.mas / u.yr,
            distance=Distance(distance * u.pc), obstime=Time(ref, format="jyear", scale="tcb"),
            frame="icrs",
        )
        with warnings.catch_warnings():
            # ERFA warns about "dubious year" for epochs beyond its leap-second table; the
            # propagation itself does not depend on UTC.
            warnings.simplefilter("ignore", ErfaWarning)
            moved = coords.apply_space_motion(new_obstime=Time(epoch, format="jyear",
                                                               scale="tcb"))
        ra[moving] = moved.ra.deg
        dec[moving] = moved.dec.deg
    out["ra"] = ra * u.deg
    out["dec"] = dec * u.deg
    out["ra"].description = table["ra"].description
    out["dec"].description = table["dec"].description
    out.meta["epoch"] = float(epoch)
    return out


def epoch_position_error(table: Table, epoch: float, *, propagated: bool) -> np.ndarray:
    """Per-axis position error (mas) that the epoch difference adds to each source.

    ``propagated``: the positions were moved to ``epoch``, so the proper-motion errors
    (``pmra_error``, ``pmdec_error``; none when absent) grow with the time since ``ref_epoch``.
    Otherwise the motion itself was ignored: the source has moved by ``|pm| * dt``, counted as
    an error (``/ sqrt(2)`` per axis) so that fast stars weigh less in a fit. Sources without a
    proper motion get 0.
    """
    dt = np.abs(epoch - np.nan_to_num(column_values(table, "ref_epoch", GAIA_DR3_EPOCH),
                                      nan=GAIA_DR3_EPOCH))
    if propagated:
        e_ra = column_values(table, "pmra_error", 0.0)
        e_dec = column_values(table, "pmdec_error", 0.0)
    else:
        e_ra = column_values(table, "pmra", 0.0)
        e_dec = column_values(table, "pmdec", 0.0)
    rate = np.hypot(np.nan_to_num(e_ra), np.nan_to_num(e_dec)) / math.sqrt(2.0)
    return rate * dt
