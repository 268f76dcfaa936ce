"""TAP queries through pyvo: sync or async (UWS), with a row limit, timeouts and retries.

:func:`tap_query` runs one ADQL query and returns the result table with the archive's column
names, or raises :class:`~ks4release.refcat.exceptions.RefcatServiceError` naming the service
and the query. A truncated result is never returned: a ``QUERY_STATUS`` of ``OVERFLOW`` in the
VOTable, or as many rows as the row limit, raises
:class:`~ks4release.refcat.exceptions.RefcatOverflowError` (the fetch layer then splits the
cell into smaller queries).

* Synchronous queries POST to ``<url>/sync``; asynchronous ones create a UWS job at
  ``<url>/async``, start it, poll its phase with back-off until ``async_timeout_s``, fetch
  ``results/result`` and delete the job.
* Every HTTP request has a timeout (``timeout_s``). Connection failures, timeouts, HTTP 5xx and
  429 are retried ``retries`` times, waiting ``backoff_s * 2**k`` between attempts. A query the
  service rejects (``QUERY_STATUS`` ``ERROR``) or a malformed VOTable is not retried.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import requests
from astropy.table import Table
from pyvo.dal import AsyncTAPJob, TAPService
from pyvo.dal.exceptions import (
    DALFormatError,
    DALOverflowWarning,
    DALQueryError,
    DALServiceError,
)

from ks4release.refcat._net import TimeoutSession, with_retries
from ks4release.refcat.exceptions import RefcatOverflowError, RefcatServiceError

__all__ = ["QueryLimits", "tap_query"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class QueryLimits:
    """Limits of one archive query.

    ``row_limit`` is sent as MAXREC (TAP) or ``-out.max`` (VizieR); ``timeout_s`` applies to
    every HTTP request; ``async_timeout_s`` bounds the wait for an async job.
    """

    row_limit: int = 1_000_000
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 2.0
    async_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.row_limit < 1:
            raise ValueError(f"row_limit must be >= 1, got {self.row_limit}")
        if not self.timeout_s > 0 or not self.async_timeout_s > 0:
            raise ValueError("timeouts must be > 0")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")


class _Retryable(Exception):
    """Internal: a transient failure worth another attempt (wraps the original)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _describe_service_error(exc: DALServiceError, timeout_s: float) -> tuple[str, bool]:
    """Message and retry decision for a pyvo service error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, requests.Timeout):
        return f"no answer within the timeout of {timeout_s:g} s", True
    if isinstance(cause, requests.ConnectionError):
        return f"cannot connect ({' '.join(str(cause).split())[:200]})", True
    code = getattr(exc, "code", None)
    reason = " ".join(str(exc.reason or exc).split())[:300]
    if code is None:
        return f"service error ({reason})", True
    return f"HTTP {code} ({reason})", code >= 500 or code == 429


def _status(result) -> tuple[str, str]:
    status = getattr(result, "status", None) or ("OK", "")
    return str(status[0] or "OK").upper(), str(status[1] or "")


def _run_once(url: str, query: str, limits: QueryLimits, use_async: bool,
              session: requests.Session):
    """One attempt; transient failures become :class:`_Retryable`."""
    try:
        with warnings.catch_warnings():
            # Truncation is detected below from QUERY_STATUS and the row count, and raised as an
            # error; pyvo's warning about it would only repeat that.
            warnings.simplefilter("ignore", DALOverflowWarning)
            if use_async:
                return _run_async(url, query, limits, session)
            service = TAPService(url, session=session)
            return service.run_sync(query, maxrec=limits.row_limit)
    except DALServiceError as exc:
        message, retry = _describe_service_error(exc, limits.timeout_s)
        if retry:
            raise _Retryable(message) from exc
        raise RefcatServiceError(message, service=url, query=query) from exc
    except DALFormatError as exc:
        # pyvo's sync path reports a failed HTTP request as a format error; its cause says so.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, requests.Timeout):
            raise _Retryable(f"no answer within the timeout of {limits.timeout_s:g} s") from exc
        if isinstance(cause, requests.ConnectionError):
            raise _Retryable(f"cannot connect ({' '.join(str(cause).split())[:200]})") from exc
        raise
    except requests.Timeout as exc:
        raise _Retryable(f"no answer within the timeout of {limits.timeout_s:g} s") from exc
    except requests.ConnectionError as exc:
        raise _Retryable(f"cannot connect ({' '.join(str(exc).split())[:200]})") from exc


def _run_async(url: str, query: str, limits: QueryLimits, session: requests.Session):
    job = AsyncTAPJob.create(url, query, maxrec=limits.row_limit, session=session)
    try:
        job.run()
        deadline = time.monotonic() + limits.async_timeout_s
        pause = 0.1
        while True:
            phase = job.phase
            if phase in ("COMPLETED", "ERROR", "ABORTED"):
                break
            if time.monotonic() > deadline:
                try:
                    job.abort()
                except DALServiceError as exc:  # the timeout below is the error that matters
                    _log.warning("could not abort async job %s: %s", job.url, exc)
                raise RefcatServiceError(
                    f"async job {job.url} did not finish within {limits.async_timeout_s:g} s "
                    f"(last phase {phase})", service=url, query=query)
            time.sleep(pause)
            pause = min(pause * 1.5, 10.0)
        job.raise_if_error()
        try:
            return job.fetch_result()
        except (DALServiceError, DALQueryError, requests.RequestException):
            raise
        except Exception as exc:  # the VOTable parser raises several types for broken XML
            raise DALFormatError(exc, job.result_uri) from exc
    finally:
        try:
            job.delete()
        except (DALServiceError, requests.RequestException):  # deletion is best effort
            _log.info("could not delete async job at %s", url)


def tap_query(url: str, query: str, *, limits: QueryLimits, use_async: bool = False,
              session: requests.Session | None = None) -> Table:
    """Run ``query`` on the TAP service at ``url``; return every row, or raise.

    Parameters
    ----------
    url : str
        TAP base URL (``https://gea.esac.esa.int/tap-server/tap``).
    query : str
        ADQL, from :func:`~ks4release.refcat.adql.build_cell_query`.
    limits : QueryLimits
        Row limit, timeouts, retries.
    use_async : bool
        Run an async (UWS) job instead of a sync query (large regions).
    session : requests.Session, optional
        Session to use; by default one that applies ``limits.timeout_s`` to every request.

    Raises
    ------
    RefcatOverflowError
        The result was truncated at the row limit.
    RefcatServiceError
        The service failed, timed out (after the retries), rejected the query, or answered with
        something that is not a valid VOTable.
    """
    url = url.rstrip("/")
    own_session = session is None
    session = session or TimeoutSession(limits.timeout_s)
    try:
        result = with_retries(
            lambda: _run_once(url, query, limits, use_async, session),
            retries=limits.retries, backoff_s=limits.backoff_s,
            retryable=lambda exc: isinstance(exc, _Retryable), what=f"TAP query to {url}",
        )
    except _Retryable as exc:
        attempts = limits.retries + 1
        raise RefcatServiceError(
            f"{exc.message} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})",
            service=url, query=query) from exc.__cause__
    except DALQueryError as exc:
        raise RefcatServiceError(
            f"query rejected: {' '.join(str(exc.reason or exc).split())}", service=url,
            query=query) from exc
    except DALFormatError as exc:
        raise RefcatServiceError(
            f"malformed VOTable in the response ({' '.join(str(exc).split())[:300]})",
            service=url, query=query) from exc
    finally:
        if own_session:
            session.close()
    try:
        with warnings.catch_warnings():
            # pyvo may repeat its truncation warning when the result is read; the truncation
            # is raised below as RefcatOverflowError
            warnings.simplefilter("ignore", DALOverflowWarning)
            status, message = _status(result)
            table = result.to_table()
    except Exception as exc:  # astropy raises several types for inconsistent VOTables
        raise RefcatServiceError(
            f"malformed VOTable in the response ({' '.join(str(exc).split())[:300]})",
            service=url, query=query) from exc
    if status == "OVERFLOW" or len(table) >= limits.row_limit:
        raise RefcatOverflowError(
            f"result truncated at {len(table)} rows (row limit {limits.row_limit}, "
            f"QUERY_STATUS {status}{': ' + message if message else ''})",
            service=url, query=query)
    if status != "OK":
        raise RefcatServiceError(f"unexpected QUERY_STATUS {status} ({message})",
                                 service=url, query=query)
    return table
