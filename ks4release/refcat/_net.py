"""HTTP plumbing shared by the TAP and VizieR clients: a session with a default timeout, and
retries with exponential back-off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import requests

from ks4release import __version__

__all__ = ["TimeoutSession", "with_retries"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


class TimeoutSession(requests.Session):
    """A :class:`requests.Session` that applies ``timeout_s`` to every request without one.

    pyvo's synchronous queries take no timeout argument; they use the session they are given,
    so this is how a TAP query gets one.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = float(timeout_s)
        self.headers["User-Agent"] = f"ks4release/{__version__} ({self.headers['User-Agent']})"

    def request(self, method, url, *args, **kwargs):  # noqa: D102 (requests' signature)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        return super().request(method, url, *args, **kwargs)


def with_retries(call: Callable[[], T], *, retries: int, backoff_s: float,
                 retryable: Callable[[BaseException], bool], what: str) -> T:
    """Run ``call``; on an exception that ``retryable`` accepts, wait and try again.

    Attempt ``k`` (0-based) is followed by a pause of ``backoff_s * 2**k`` seconds; after
    ``retries`` retries the last exception propagates. Other exceptions propagate at once.
    """
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if attempt >= retries or not retryable(exc):
                raise
            delay = backoff_s * 2**attempt
            _log.warning("%s failed (%s); retry %d of %d in %.1f s", what,
                         " ".join(str(exc).split())[:200], attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1
