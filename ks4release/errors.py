"""The exceptions of ks4release: one base class and three kinds of failure.

* :class:`InputError`: a file handed to the suite (exposure, reference catalog, intermediate
  product) is unreadable or breaks its documented format. The message names the file, what is
  wrong and what was expected, e.g.
  ``raw/0000.000-62/B/x.fits: extension 'NN' is missing (expected KK, MM, NN, TT)``.
* :class:`ConfigError`: the release configuration is wrong (``release.toml: engine.workrs: ...``).
* :class:`StageError`: a pipeline task failed; carries the stage, tile, band and file it was
  working on so that the engine can report every failed task at the end of a run.

Everything else (bad arguments to a function) stays a plain ``ValueError``/``TypeError``.
All classes pickle with their context, so they survive the trip back from a Dask worker.
"""

from __future__ import annotations

import os

__all__ = ["Ks4ReleaseError", "InputError", "ConfigError", "StageError"]


class Ks4ReleaseError(Exception):
    """Base class of every exception raised on purpose by ks4release."""


class InputError(Ks4ReleaseError):
    """An input file is unreadable or does not follow its format.

    Parameters
    ----------
    path : str or os.PathLike
        The offending file, as the user named it.
    message : str
        What is wrong and what was expected, without the file name (it is prepended), e.g.
        ``"extension 'KK': GAIN is missing (expected gain in e-/ADU)"``.
    hdu, key, column : str, optional
        Machine-readable context: the FITS extension, header keyword or table column at fault.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        *,
        hdu: str | None = None,
        key: str | None = None,
        column: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.message = message
        self.hdu = hdu
        self.key = key
        self.column = column
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):  # keep keyword context through pickling (Dask workers)
        return (_rebuild, (type(self), (self.path, self.message), {
            "hdu": self.hdu, "key": self.key, "column": self.column}))


class ConfigError(Ks4ReleaseError):
    """The release configuration is invalid: ``f"{path}: {key}: {message}"``.

    The caller composes ``message`` (including any "did you mean" hint).
    """

    def __init__(self, path: str | os.PathLike[str], key: str, message: str) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.message = message
        super().__init__(f"{self.path}: {key}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.key, self.message))


class StageError(Ks4ReleaseError):
    """A pipeline task failed; the message is prefixed with its context.

    ``str(StageError("no stars matched", stage="astrometry", tile="0000.000-62", band="B"))``
    is ``"astrometry [tile 0000.000-62, band B]: no stars matched"``.
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        tile: str | None = None,
        band: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.message = message
        self.stage = stage
        self.tile = tile
        self.band = band
        self.path = None if path is None else os.fspath(path)
        context = ", ".join(
            f"{label} {value}"
            for label, value in (("tile", tile), ("band", band), ("file", self.path))
            if value is not None
        )
        prefix = stage or "stage"
        super().__init__(f"{prefix} [{context}]: {message}" if context else f"{prefix}: {message}")

    def __reduce__(self):
        return (_rebuild, (type(self), (self.message,), {
            "stage": self.stage, "tile": self.tile, "band": self.band, "path": self.path}))


def _rebuild(cls, args, kwargs):
    """Unpickling helper for exceptions with keyword-only context."""
    return cls(*args, **kwargs)
