"""Reduction core: single-epoch exposures to per-tile, per-band products and catalogs."""
