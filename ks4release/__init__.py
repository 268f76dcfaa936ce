"""ks4release: build, validate and publish a KS4-style survey data release.

The package is one import namespace over four folders of the repository:

* ``ks4release`` (this package): the shared vocabulary of a release (camera, survey, tile grid,
  configuration, input formats, the demo-survey simulator) and the orchestration on top of it
  (stages, engine, command line);
* ``ks4release.reduction``: exposures to per-tile catalogs;
* ``ks4release.publish``: per-tile results to archive-ready products;
* ``ks4release.validation``: products to evidence (metrics, figures, reports).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ks4release")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
