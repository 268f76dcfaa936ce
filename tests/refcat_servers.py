"""Loopback archive servers for the reference-catalog tests: a TAP service and a VizieR endpoint.

:class:`ArchiveServer` runs :mod:`http.server` in a thread on 127.0.0.1 (port chosen by the
system) and speaks enough of the real protocols for pyvo and astroquery to run unchanged:

* TAP (``/tap``): ``POST /tap/sync`` (REQUEST, LANG, QUERY, MAXREC form fields) answers a
  VOTable; ``POST /tap/async`` creates a UWS job and redirects (303) to ``/tap/async/<id>``;
  ``GET`` of the job gives its UWS document; ``POST .../phase`` with PHASE=RUN runs it;
  ``GET .../results/result`` returns the VOTable; ``DELETE`` removes the job. The ADQL is
  executed by SQLite (schemas ``gaiadr3`` and ``delve_dr2`` attached), so a query that is not
  valid SQL gets a real error document (``QUERY_STATUS`` ``ERROR``). More rows than MAXREC (or
  than ``max_rows``) are cut and marked ``QUERY_STATUS`` ``OVERFLOW``.
* VizieR (``POST /viz-bin/votable``): the text body astroquery sends (``-source=``, ``-out=``,
  ``-out.max=``, ``-c=``, ``-c.rd=``...) is parsed and the cone answered from the same data
  under VizieR's column names (``Source``, ``RA_ICRS``, ``Bmag``, ``BFlag``...).

Faults are switched on with attributes: ``fail_statuses`` (HTTP codes for the next requests),
``delay_s`` (answer late), ``malformed`` (cut the VOTable short), ``max_rows`` (server limit),
``async_polls`` (EXECUTING answers before COMPLETED). ``requests`` logs every request.
The server stops itself after ``lifetime_s`` even if a test forgets to (15 minutes: long
enough for a module-scoped server on a loaded machine, short enough to be bounded).
"""

from __future__ import annotations

import functools
import io
import re
import sqlite3
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

import healpy as hp
import numpy as np
from astropy.io.votable import from_table
from astropy.io.votable.tree import Info
from astropy.table import MaskedColumn, Table

# Column types of the archive tables (everything else is float64).
_INT_COLUMNS = {"source_id", "quick_object_id", *(f"{b}_jkc_flag" for b in "bvri"),
                *(f"extended_class_{b}" for b in "griz"), *(f"nepochs_{b}" for b in "griz")}
_UNITS = {"ra": "deg", "dec": "deg", "ra_error": "mas", "dec_error": "mas", "pmra": "mas/yr",
          "pmdec": "mas/yr", "parallax": "mas", "ref_epoch": "yr"}

_VIZIER_GAIA = {"Source": "source_id", "RA_ICRS": "ra", "DE_ICRS": "dec",
                "Gmag": "phot_g_mean_mag", "e_RA_ICRS": "ra_error", "e_DE_ICRS": "dec_error",
                "pmRA": "pmra", "pmDE": "pmdec", "Plx": "parallax", "BPmag": "phot_bp_mean_mag",
                "RPmag": "phot_rp_mean_mag"}
_VIZIER_XP = {"Source": "source_id", "RA_ICRS": "ra", "DE_ICRS": "dec",
              **{f"{b}mag": f"{b.lower()}_jkc_mag" for b in "BVRI"},
              **{f"{b}Flag": f"{b.lower()}_jkc_flag" for b in "BVRI"}}
_VIZIER_UNITS = {"RA_ICRS": "deg", "DE_ICRS": "deg", "e_RA_ICRS": "mas", "e_DE_ICRS": "mas",
                 "pmRA": "mas/yr", "pmDE": "mas/yr", "Plx": "mas",
                 **{k: "mag" for k in ("Gmag", "BPmag", "RPmag", "Bmag", "Vmag", "Rmag", "Imag")}}


@functools.lru_cache(maxsize=4)
def _sky(seed: int, n: int) -> dict[str, Table]:
    return _make_sky(seed, n)


def make_sky(seed: int = 7, n: int = 3000) -> dict[str, Table]:
    """Seeded synthetic archive tables (positions straddle RA 0); the truth of every test."""
    return {name: table.copy() for name, table in _sky(seed, n).items()}


def _make_sky(seed: int = 7, n: int = 3000, ra_range=(-1.5, 1.5),
             dec_range=(-62.0, -59.0)) -> dict[str, Table]:
    """Seeded synthetic archive tables (positions straddle RA 0); the truth of every test."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(*ra_range, n) % 360.0
    sin_dec = rng.uniform(np.sin(np.radians(dec_range[0])), np.sin(np.radians(dec_range[1])), n)
    dec = np.degrees(np.arcsin(sin_dec))
    level12 = hp.ang2pix(4096, ra, dec, nest=True, lonlat=True).astype(np.int64)
    source_id = level12 * 2**35 + np.arange(n, dtype=np.int64)
    g = rng.uniform(12.0, 20.5, n)
    pm_null = rng.random(n) < 0.1
    gaia = Table({
        "source_id": source_id, "ra": ra, "dec": dec,
        "phot_g_mean_mag": g,
        "ra_error": rng.uniform(0.01, 0.5, n), "dec_error": rng.uniform(0.01, 0.5, n),
        "pmra": np.where(pm_null, np.nan, rng.normal(0, 8, n)),
        "pmdec": np.where(pm_null, np.nan, rng.normal(0, 8, n)),
        "parallax": np.where(pm_null, np.nan, rng.uniform(0.05, 3, n)),
        "phot_bp_mean_mag": g + 0.4, "phot_rp_mean_mag": g - 0.5,
        "ref_epoch": np.full(n, 2016.0),
    })
    xp_rows = np.flatnonzero(g < 17.65)
    xp = Table({"source_id": source_id[xp_rows]})
    for k, b in enumerate("bvri"):
        xp[f"{b}_jkc_mag"] = g[xp_rows] + 0.6 - 0.3 * k
        xp[f"{b}_jkc_flux_error"] = rng.uniform(1e-19, 1e-18, xp_rows.size)
        flag = MaskedColumn(rng.integers(0, 2, xp_rows.size), mask=rng.random(xp_rows.size) < 0.05)
        xp[f"{b}_jkc_flag"] = flag
    m = 2 * n
    dra = rng.uniform(*ra_range, m) % 360.0
    ddec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(dec_range[0])),
                                            np.sin(np.radians(dec_range[1])), m)))
    delve = Table({"quick_object_id": np.arange(m, dtype=np.int64) + 10_000_000,
                   "ra": dra, "dec": ddec})
    for b in "griz":
        delve[f"mag_auto_{b}"] = rng.uniform(16, 24, m)
        delve[f"magerr_auto_{b}"] = rng.uniform(0.001, 0.2, m)
        delve[f"extended_class_{b}"] = rng.integers(0, 4, m)
        delve[f"nepochs_{b}"] = rng.integers(0, 6, m)
    return {"gaiadr3.gaia_source": gaia, "gaiadr3.synthetic_photometry_gspc": xp,
            "delve_dr2.objects": delve}


def _votable_bytes(table: Table, status: str, message: str = "") -> bytes:
    """The result VOTable with its QUERY_STATUS. Built without ``warnings.catch_warnings``:
    it saves and restores the process-wide filters, so from this handler thread it could undo
    a client's own ``catch_warnings`` in the test's thread (tap.py ignores pyvo's
    DALOverflowWarning that way; a CI run saw it raised under pytest's "error" filter). Nothing
    here warns: a warning would fail the request, in every run."""
    vot = from_table(table)
    resource = vot.resources[0]
    resource.type = "results"
    # the message as the element's content: the constructor keyword makes astropy warn (W48)
    info = Info(name="QUERY_STATUS", value=status)
    if message:
        info.content = message
    if status == "OVERFLOW":
        # DALI: the OVERFLOW INFO follows the table; pyvo takes the last status.
        resource.infos.append(Info(name="QUERY_STATUS", value="OK"))
        resource.infos.append(info)
    else:
        resource.infos.append(info)
    buffer = io.BytesIO()
    vot.to_xml(buffer)
    return buffer.getvalue()


def _error_votable(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        ' <RESOURCE type="results">\n'
        f'  <INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
        " </RESOURCE>\n</VOTABLE>\n"
    ).encode()


@dataclass
class _Job:
    job_id: str
    params: dict[str, str]
    phase: str = "PENDING"
    polls_left: int = 0
    result: bytes = b""
    error: str = ""


@dataclass
class ArchiveServer:
    """A TAP service and a VizieR endpoint on 127.0.0.1 serving :func:`make_sky` tables."""

    tables: dict[str, Table] = field(default_factory=make_sky)
    lifetime_s: float = 900.0
    fail_statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    malformed: bool = False
    max_rows: int = 0
    async_polls: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._job_counter = 0
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        for schema in sorted({name.split(".")[0] for name in self.tables}):
            self._db.execute(f"ATTACH DATABASE ':memory:' AS {schema}")
        for name, table in self.tables.items():
            cols = ", ".join(f"{c} {'INTEGER' if c in _INT_COLUMNS else 'REAL'}"
                             for c in table.colnames)
            self._db.execute(f"CREATE TABLE {name} ({cols})")
            columns = []
            for c in table.colnames:
                col = table[c]
                mask = np.asarray(getattr(col, "mask", np.zeros(len(col), bool)), dtype=bool)
                values = np.asarray(col).astype(np.int64 if c in _INT_COLUMNS else np.float64)
                if c not in _INT_COLUMNS:
                    mask = mask | np.isnan(values)
                columns.append([None if m else v for v, m in zip(values.tolist(), mask)])
            rows = list(zip(*columns))
            self._db.executemany(
                f"INSERT INTO {name} VALUES ({', '.join('?' * len(table.colnames))})", rows)
        self._httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def tap_url(self) -> str:
        return f"{self.base}/tap"

    @property
    def vizier_url(self) -> str:
        return self.base

    def stop(self) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ArchiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, prefix: str = "") -> int:
        """Requests logged so far whose path starts with ``prefix``."""
        return sum(1 for _, path in self.requests if path.startswith(prefix))

    # --- query execution ----------------------------------------------------------------

    def run_adql(self, query: str, maxrec: int) -> tuple[bytes, int]:
        """Run ``query``; return a VOTable (or error document) and the HTTP status."""
        sql = re.sub(r"^\s*SELECT\s+TOP\s+(\d+)\s+(.*)$", r"SELECT \2 LIMIT \1", query,
                     flags=re.IGNORECASE | re.DOTALL)
        try:
            with self._lock:
                cursor = self._db.execute(sql)
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
        except sqlite3.Error as exc:
            return _error_votable(f"Cannot parse or run the query: {exc}"), 400
        limit = min(x for x in (maxrec, self.max_rows or maxrec) if x > 0)
        status = "OVERFLOW" if len(rows) > limit else "OK"
        rows = rows[:limit]
        table = Table()
        for k, name in enumerate(names):
            values = [r[k] for r in rows]
            if name in _INT_COLUMNS:
                mask = [v is None for v in values]
                table[name] = MaskedColumn([0 if v is None else v for v in values],
                                           mask=mask, dtype=np.int64)
            else:
                table[name] = np.array([np.nan if v is None else v for v in values],
                                       dtype=np.float64)
            table[name].unit = _UNITS.get(name)
        return _votable_bytes(table, status), 200

    def run_vizier(self, body: str) -> bytes:
        params: dict[str, str] = {}
        for line in body.splitlines():
            key, _, value = line.partition("=")
            params[key.strip()] = value.strip()
        source = params.get("-source", "")
        if source == "I/355/gaiadr3":
            mapping, table = _VIZIER_GAIA, self.tables["gaiadr3.gaia_source"]
        elif source == "I/360/syntphot":
            mapping = _VIZIER_XP
            xp = self.tables["gaiadr3.synthetic_photometry_gspc"]
            gaia = self.tables["gaiadr3.gaia_source"]
            index = {int(s): k for k, s in enumerate(gaia["source_id"])}
            rows = [index[int(s)] for s in xp["source_id"]]
            table = xp.copy()
            table["ra"] = gaia["ra"][rows]
            table["dec"] = gaia["dec"][rows]
        else:
            return _error_votable(f"unknown catalogue {source!r}")
        match = re.match(r"^([0-9.]+)([+-][0-9.]+)$", params.get("-c", ""))
        radius_key = next((k for k in ("-c.rd", "-c.rm", "-c.rs") if k in params), None)
        if not match or radius_key is None:
            return _error_votable("a position (-c) and a radius (-c.r*) are required")
        scale = {"-c.rd": 1.0, "-c.rm": 1 / 60.0, "-c.rs": 1 / 3600.0}[radius_key]
        ra0, dec0, radius = float(match[1]), float(match[2]), float(params[radius_key]) * scale
        centre = hp.ang2vec(ra0, dec0, lonlat=True)
        vec = hp.ang2vec(np.asarray(table["ra"]), np.asarray(table["dec"]), lonlat=True)
        inside = vec @ centre >= np.cos(np.radians(radius))
        limit = int(params.get("-out.max", "50")) if params.get("-out.max") != "unlimited" \
            else len(table)
        selected = table[inside]
        status = "OVERFLOW" if len(selected) > limit else "OK"
        selected = selected[:limit]
        out_cols = [c for c in params.get("-out", "").split(",") if c] or list(mapping)
        out = Table()
        for col in out_cols:
            if col not in mapping:
                return _error_votable(f"unknown column {col!r} in {source}")
            out[col] = selected[mapping[col]]
            out[col].unit = _VIZIER_UNITS.get(col)
        out.meta = {}
        return _votable_bytes(out, status, "truncated result (maxtup=%d)" % limit
                              if status == "OVERFLOW" else "")

    # --- async jobs -----------------------------------------------------------------------

    def job_xml(self, job: _Job) -> bytes:
        results = ""
        if job.phase == "COMPLETED":
            results = (f'<uws:result id="result" xlink:href="{self.tap_url}/async/'
                       f'{job.job_id}/results/result"/>')
        error = ""
        if job.phase == "ERROR":
            error = (f'<uws:errorSummary type="fatal" hasDetail="false"><uws:message>'
                     f"{escape(job.error)}</uws:message></uws:errorSummary>")
        params = "".join(f'<uws:parameter id="{escape(k.lower())}">{escape(v)}</uws:parameter>'
                         for k, v in job.params.items())
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" '
            'xmlns:xlink="http://www.w3.org/1999/xlink" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1">'
            f"<uws:jobId>{job.job_id}</uws:jobId><uws:ownerId xsi:nil=\"true\"/>"
            f"<uws:phase>{job.phase}</uws:phase><uws:quote xsi:nil=\"true\"/>"
            "<uws:creationTime>2026-01-01T00:00:00Z</uws:creationTime>"
            "<uws:startTime xsi:nil=\"true\"/><uws:endTime xsi:nil=\"true\"/>"
            "<uws:executionDuration>0</uws:executionDuration>"
            "<uws:destruction>2026-02-01T00:00:00Z</uws:destruction>"
            f"<uws:parameters>{params}</uws:parameters>"
            f"<uws:results>{results}</uws:results>{error}</uws:job>"
        ).encode()


class _QuietServer(ThreadingHTTPServer):
    """Threads per request, which do not hold up shutdown; clients hanging up are not errors."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _form(body: bytes) -> dict[str, str]:
    parsed = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
    return {k.upper(): v[-1] for k, v in parsed.items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
    # delayed ACKs hold every answer back by 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    @property
    def app(self) -> ArchiveServer:
        return self.server.app  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/xml",
              location: str = "") -> None:
        try:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _fault(self) -> bool:
        """Apply a queued HTTP failure or delay; True when the request was answered."""
        app = self.app
        with app._lock:
            status = app.fail_statuses.pop(0) if app.fail_statuses else 0
        if status:
            self._send(status, b"<html>service unavailable</html>", "text/html")
            return True
        if app.delay_s:
            time.sleep(min(app.delay_s, 5.0))
        return False

    def _votable(self, body: bytes, status: int = 200) -> None:
        if self.app.malformed:
            body = body[: len(body) // 2]
        self._send(status, body, "application/x-votable+xml")

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = urllib.parse.urlparse(self.path).path
        self.app.requests.append(("GET", path))
        if self._fault():
            return
        match = re.match(r"^/tap/async/(\w+)(/results/result)?$", path)
        job = self.app._jobs.get(match[1]) if match else None
        if job is None:
            self._send(404, b"no such job", "text/plain")
            return
        if match[2]:
            self._votable(job.result)
            return
        if job.phase == "EXECUTING":
            if job.polls_left > 0:
                job.polls_left -= 1
            else:
                job.phase = "ERROR" if job.error else "COMPLETED"
        self._send(200, self.app.job_xml(job))

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlparse(self.path).path
        body = self._body()
        self.app.requests.append(("POST", path))
        if self._fault():
            return
        app = self.app
        if path == "/tap/sync":
            form = _form(body)
            votable, status = app.run_adql(form.get("QUERY", ""), int(form.get("MAXREC") or 0))
            self._votable(votable, status)
        elif path == "/tap/async":
            form = _form(body)
            with app._lock:
                app._job_counter += 1
                job_id = f"j{app._job_counter}"
                app._jobs[job_id] = _Job(job_id=job_id, params=form)
            self._send(303, location=f"{app.tap_url}/async/{job_id}")
        elif (match := re.match(r"^/tap/async/(\w+)/phase$", path)) and match[1] in app._jobs:
            job = app._jobs[match[1]]
            if _form(body).get("PHASE") == "RUN" and job.phase == "PENDING":
                votable, status = app.run_adql(job.params.get("QUERY", ""),
                                               int(job.params.get("MAXREC") or 0))
                if status >= 400:
                    job.error = re.sub(r"<[^>]+>", "", votable.decode()).strip()
                job.result = votable
                job.phase = "EXECUTING"
                job.polls_left = app.async_polls
            self._send(303, location=f"{app.tap_url}/async/{job.job_id}")
        elif path == "/viz-bin/votable":
            self._votable(app.run_vizier(body.decode()))
        else:
            self._send(404, b"not found", "text/plain")

    def do_DELETE(self) -> None:  # noqa: N802
        path = urllib.parse.urlparse(self.path).path
        self.app.requests.append(("DELETE", path))
        match = re.match(r"^/tap/async/(\w+)$", path)
        if match:
            self.app._jobs.pop(match[1], None)
        self._send(303, location=f"{self.app.tap_url}/async")
