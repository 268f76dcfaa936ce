"""Errors of the reference-catalog layer; each names the service and the query, or the cell."""

from __future__ import annotations

from ks4release.errors import Ks4ReleaseError

__all__ = [
    "RefcatError",
    "RefcatServiceError",
    "RefcatOverflowError",
    "RefcatOfflineError",
]


class RefcatError(Ks4ReleaseError):
    """Base class of reference-catalog failures."""


class RefcatServiceError(RefcatError):
    """A TAP or VizieR request failed, or returned something unusable.

    ``str(error)`` is ``"<service>: <message>\\n  query: <query>"``; ``service`` is the base URL
    of the service and ``query`` the ADQL (TAP) or request text (VizieR).
    """

    def __init__(self, message: str, *, service: str, query: str = "") -> None:
        self.message = message
        self.service = service
        self.query = query
        text = f"{service}: {message}"
        if query:
            text += f"\n  query: {query}"
        super().__init__(text)

    def __reduce__(self):
        return (_rebuild, (type(self), (self.message,),
                           {"service": self.service, "query": self.query}))


class RefcatOverflowError(RefcatServiceError):
    """A result was truncated by a row limit (QUERY_STATUS OVERFLOW, or as many rows as the
    limit) and could not be split into smaller queries."""


class RefcatOfflineError(RefcatError):
    """Offline mode needs a cache cell that is missing or corrupt."""


def _rebuild(cls, args, kwargs):
    return cls(*args, **kwargs)
