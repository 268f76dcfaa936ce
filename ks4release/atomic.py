"""Atomic writes and release-directory path checks.

Every product of a release is written under a temporary sibling name and renamed onto its final
name only when complete, so that nothing half-written ever looks finished: a build killed in the
middle leaves at most temporary files (``.<name>.tmp-<pid>-<rand><suffix>``), which the engine
removes before it reruns the task that owns the folder.

The temporary name keeps the final file's suffixes (``.a.fits.tmp-12-0f3a9c1e.fits``) because
some writers pick the format from the extension (astropy ``Table.write``) or append one
(``numpy.save``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "ReleasePathError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_temporaries",
    "ensure_inside",
    "is_temporary_name",
    "temporary_sibling",
]

#: A temporary name made by :func:`temporary_sibling`: ``.<name>.tmp-<pid>-<8 hex>[<suffix>]``.
_TEMP_RE = re.compile(r"\..+\.(?:tmp|old)-\d+-[0-9a-f]{8}(?:\..*)?", re.DOTALL)


class ReleasePathError(ValueError):
    """A path that should lie inside the release directory resolves outside it."""


def ensure_inside(path: os.PathLike[str] | str, root: os.PathLike[str] | str, *,
                  what: str = "path") -> Path:
    """Return ``path`` resolved (relative paths taken from ``root``); refuse one outside ``root``.

    Parameters
    ----------
    path : path-like
        The path to check; a relative path is relative to ``root``.
    root : path-like
        The release directory.
    what : str
        Words naming the path in the error message, e.g. ``"output of task coadd/T1/B"``.

    Raises
    ------
    ReleasePathError
        When the resolved path (symbolic links and ``..`` followed) is not inside ``root``.
    """
    root_resolved = Path(root).resolve()
    resolved = (root_resolved / Path(path)).resolve()
    if resolved != root_resolved and not resolved.is_relative_to(root_resolved):
        raise ReleasePathError(
            f"{what} {os.fspath(path)!r} resolves to {resolved}, outside the release directory "
            f"{root_resolved}"
        )
    return resolved


def temporary_sibling(final: os.PathLike[str] | str, kind: str = "tmp") -> Path:
    """A fresh temporary name beside ``final``, keeping its suffixes (see module docstring)."""
    final = Path(final)
    suffix = "".join(final.suffixes) if not final.name.startswith(".") else ""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temporary_name(name: str) -> bool:
    """True when ``name`` is a temporary name made by :func:`temporary_sibling`."""
    return _TEMP_RE.fullmatch(name) is not None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: os.PathLike[str] | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` when the block succeeds.

    The caller writes a file (or builds a directory) at the yielded path. On normal exit it is
    renamed onto ``final`` with :func:`os.replace` (atomic on POSIX for files; a directory that
    already exists at ``final`` is first moved aside and then removed). On an exception the
    temporary file or directory is removed and the exception propagates; ``final`` is untouched.
    The parent folder of ``final`` is created when missing.

    Raises
    ------
    FileNotFoundError
        When the block exits normally without having created anything at the yielded path.

    Examples
    --------
    >>> with atomic_path(release / "images" / "t_B_coadd.fits") as tmp:  # doctest: +SKIP
    ...     hdul.writeto(tmp)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
            old = temporary_sibling(final, kind="old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(final: os.PathLike[str] | str, data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically (temporary sibling, fsync, rename); return it."""
    final = Path(final)
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return final


def atomic_write_text(final: os.PathLike[str] | str, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(final, text.encode(encoding))


def clean_stale_temporaries(folders: Iterable[os.PathLike[str] | str]) -> list[Path]:
    """Remove leftover temporary files and folders (see :func:`is_temporary_name`) in ``folders``.

    Only the folders themselves are scanned, not their subfolders. Missing folders are ignored.
    Call this only when no writer is active in those folders. Returns the removed paths.
    """
    removed: list[Path] = []
    for folder in sorted({Path(f) for f in folders}):
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if is_temporary_name(entry.name):
                path = Path(entry.path)
                _remove(path)
                removed.append(path)
    return removed
