"""VizieR through astroquery: Gaia DR3 (``I/355/gaiadr3``) and Gaia XP synthetic photometry
(``I/360/syntphot``), renamed onto the archive (TAP) column names of the catalog formats.

:func:`vizier_query` runs one cone search with astroquery's :class:`~astroquery.vizier.VizierClass`
(the request it builds, the POST to ``/viz-bin/votable``), parses the VOTable itself so that a
truncated answer (``QUERY_STATUS`` ``OVERFLOW``, or as many rows as ``-out.max``) raises
:class:`~ks4release.refcat.exceptions.RefcatOverflowError` instead of passing unnoticed, and
renames the columns with :data:`VIZIER_TABLES`.

The server is given as a base URL (``https://vizier.cds.unistra.fr``), so that a mirror, or a
test server on ``http://127.0.0.1:<port>``, can be used; astroquery itself only takes a host
name and always speaks HTTPS, which :class:`_VizierClient` generalises.

DELVE DR2 is not in VizieR; use TAP (Astro Data Lab) or local files for it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import requests
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import votable
from astropy.io.votable.exceptions import VOWarning
from astropy.table import Table
from astroquery.vizier import VizierClass

from ks4release.refcat._net import with_retries
from ks4release.refcat.exceptions import RefcatOverflowError, RefcatServiceError
from ks4release.refcat.formats import REFCAT_FORMATS
from ks4release.refcat.tap import QueryLimits

__all__ = ["VizierTable", "VIZIER_TABLES", "DEFAULT_VIZIER_URL", "vizier_query"]

#: The CDS VizieR server.
DEFAULT_VIZIER_URL = "https://vizier.cds.unistra.fr"


@dataclass(frozen=True, kw_only=True)
class VizierTable:
    """A VizieR table and how its columns map onto a catalog format.

    ``columns`` pairs each VizieR column name with the canonical (archive) name; ``constants``
    adds columns VizieR does not carry (Gaia DR3's ``ref_epoch`` is 2016.0 for every source).
    """

    catalog: str
    vizier_table: str
    columns: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        fmt = REFCAT_FORMATS[self.catalog]
        known = {c.name for c in fmt.columns}
        mapped = {name for _, name in self.columns} | {name for name, _ in self.constants}
        unknown = mapped - known
        if unknown:
            raise ValueError(f"{self.vizier_table}: {sorted(unknown)} not in {self.catalog}")
        missing = set(fmt.required) - mapped
        if missing:
            raise ValueError(f"{self.vizier_table} lacks required {sorted(missing)}")


#: VizieR tables by catalog. Column names as VizieR publishes them (``Source``, ``RA_ICRS``, ...;
#: positions at epoch 2016.0).
VIZIER_TABLES: dict[str, VizierTable] = {
    "gaia_dr3": VizierTable(
        catalog="gaia_dr3", vizier_table="I/355/gaiadr3",
        columns=(("Source", "source_id"), ("RA_ICRS", "ra"), ("DE_ICRS", "dec"),
                 ("Gmag", "phot_g_mean_mag"), ("e_RA_ICRS", "ra_error"),
                 ("e_DE_ICRS", "dec_error"), ("pmRA", "pmra"), ("pmDE", "pmdec"),
                 ("Plx", "parallax"), ("BPmag", "phot_bp_mean_mag"),
                 ("RPmag", "phot_rp_mean_mag")),
        constants=(("ref_epoch", 2016.0),),
    ),
    "gaia_xp": VizierTable(
        catalog="gaia_xp", vizier_table="I/360/syntphot",
        columns=(("Source", "source_id"), ("RA_ICRS", "ra"), ("DE_ICRS", "dec"),
                 *((f"{b}mag", f"{b.lower()}_jkc_mag") for b in "BVRI"),
                 *((f"{b}Flag", f"{b.lower()}_jkc_flag") for b in "BVRI")),
    ),
}


class _VizierClient(VizierClass):
    """astroquery's VizieR client, pointed at a base URL rather than an HTTPS host name."""

    def __init__(self, *, base_url: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._base_url = base_url.rstrip("/")

    def _server_to_url(self, return_type: str = "votable") -> str:
        if "://" not in self._base_url:  # a bare host name, as astroquery expects
            return super()._server_to_url(return_type)
        return f"{self._base_url}/viz-bin/{return_type}"


def _statuses(tree) -> list[tuple[str, str]]:
    infos = list(tree.infos)
    for resource in tree.resources:
        infos.extend(resource.infos)
        for table in resource.tables:
            infos.extend(table.infos)
    return [(str(i.value).upper(), str(i.content or "")) for i in infos
            if str(i.name).upper() == "QUERY_STATUS"]


def _empty(spec: VizierTable) -> Table:
    fmt = REFCAT_FORMATS[spec.catalog]
    dtypes = {"f": np.float64, "i": np.int64, "U": str}
    return Table({viz: np.zeros(0, dtype=dtypes[fmt.column(name).kind])
                  for viz, name in spec.columns})


def vizier_query(server_url: str, catalog: str, cone: tuple[float, float, float], *,
                 limits: QueryLimits) -> Table:
    """Every row of ``catalog``'s VizieR table within ``cone`` = (ra, dec, radius) degrees.

    Returns a Table with the canonical column names (units from VizieR); raises
    :class:`RefcatOverflowError` when the answer is truncated and :class:`RefcatServiceError`
    (naming the server and the request) for any other failure, after the retries for
    timeouts, connection failures and HTTP 5xx.
    """
    try:
        spec = VIZIER_TABLES[catalog]
    except KeyError:
        raise ValueError(f"{catalog!r} is not available from VizieR (known: "
                         f"{', '.join(VIZIER_TABLES)}); use TAP or a local file") from None
    ra, dec, radius = (float(v) for v in cone)
    client = _VizierClient(base_url=server_url, columns=[viz for viz, _ in spec.columns],
                           row_limit=limits.row_limit, timeout=limits.timeout_s)
    centre = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    args = dict(radius=radius * u.deg, catalog=spec.vizier_table, frame="icrs")
    payload = client.query_region_async(centre, get_query_payload=True, **args)
    service = client._server_to_url()
    query = " ".join(payload.splitlines())

    def attempt() -> requests.Response:
        response = client.query_region_async(centre, cache=False, **args)
        if response.status_code >= 500 or response.status_code == 429:
            raise _Transient(f"HTTP {response.status_code}")
        return response

    try:
        response = with_retries(attempt, retries=limits.retries, backoff_s=limits.backoff_s,
                                retryable=_transient, what=f"VizieR query to {service}")
    except (_Transient, requests.Timeout, requests.ConnectionError) as exc:
        attempts = limits.retries + 1
        reason = (f"no answer within the timeout of {limits.timeout_s:g} s"
                  if isinstance(exc, requests.Timeout) else " ".join(str(exc).split())[:200])
        raise RefcatServiceError(f"{reason} (gave up after {attempts} attempt"
                                 f"{'s' if attempts > 1 else ''})", service=service,
                                 query=query) from exc
    except requests.RequestException as exc:
        raise RefcatServiceError(" ".join(str(exc).split())[:300], service=service,
                                 query=query) from exc
    if response.status_code >= 400:
        raise RefcatServiceError(f"HTTP {response.status_code} ({response.text[:200]!r})",
                                 service=service, query=query)
    try:
        with warnings.catch_warnings():
            # VizieR's VOTables trip astropy's pedantic schema checks (W-codes); the content
            # is checked below.
            warnings.simplefilter("ignore", VOWarning)
            tree = votable.parse(io.BytesIO(response.content), verify="ignore")
            tables = [t for t in tree.iter_tables()]
            raw = (tables[0].to_table(use_names_over_ids=True) if tables else _empty(spec))
    except Exception as exc:  # astropy raises many types for malformed XML
        raise RefcatServiceError(
            f"malformed VOTable in the response ({' '.join(str(exc).split())[:300]})",
            service=service, query=query) from exc
    statuses = _statuses(tree)
    errors = [msg or value for value, msg in statuses if value == "ERROR"]
    if errors:
        raise RefcatServiceError(f"query rejected: {errors[0]}", service=service, query=query)
    overflow = any(value == "OVERFLOW" for value, _ in statuses)
    if overflow or len(raw) >= limits.row_limit:
        raise RefcatOverflowError(
            f"result truncated at {len(raw)} rows (row limit {limits.row_limit}"
            f"{', QUERY_STATUS OVERFLOW' if overflow else ''})", service=service, query=query)
    missing = [viz for viz, _ in spec.columns if viz not in raw.colnames]
    if missing:
        raise RefcatServiceError(f"answer lacks the column(s) {', '.join(missing)}",
                                 service=service, query=query)
    out = Table()
    for viz, name in spec.columns:
        out[name] = raw[viz]
    for name, value in spec.constants:
        out[name] = np.full(len(out), value)
    return out


class _Transient(Exception):
    """Internal: an HTTP status worth retrying."""


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (_Transient, requests.Timeout, requests.ConnectionError))
