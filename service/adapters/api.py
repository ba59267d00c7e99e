"""The partner pull API (DESIGN §4): FastAPI over the publications table.

The cursor follows commit order. Each publication row carries the id of the transaction that
inserted it (`xid`, xid8) and a sequence number. A page only shows rows whose transaction is older
than every transaction still running (`xid < pg_snapshot_xmin(pg_current_snapshot())`): all of
them have committed (or rolled back, leaving no row), and every row still to come gets an xid at
or above that horizon. Ordered by (xid, seq), the visible set therefore only ever grows at its
end, so following `next` yields every change exactly once with no gaps, whatever the writers do
concurrently. A transaction left open somewhere in the cluster holds the feed back until it ends.

`since` is either a cursor from `next`, or, on a first call, an RFC 3339 time with a zone
(`2026-01-31T12:00:00Z`): then this call and every call following its `next` return exactly
the changes whose `happened_at` (when the event happened) is at or after that time, in commit
order. Without `since` the feed starts at the first change ever published.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import fastapi
import structlog
from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from service import wire
from service.adapters import partners
from service.config import Settings

log = structlog.get_logger("api")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_MAX_SEQ = 2**63 - 1
_CURSOR_VERSION = "1"

LICENSE_URLS = {
    "CC0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "ODbL-1.0": "https://opendatacommons.org/licenses/odbl/1-0/",
}

HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())"
PAGE = """
SELECT xid, seq, record::text AS record
FROM publications
WHERE (xid, seq) > ($1::xid8, $2) AND xid < $3::xid8
  AND ($4::timestamptz IS NULL OR happened_at >= $4)
ORDER BY xid, seq
LIMIT $5
"""
LATEST = """
SELECT record::text FROM publications WHERE session = $1 ORDER BY version DESC LIMIT 1
"""


def license_url(license_id: str) -> str:
    """Return where a licence's text can be read."""
    return LICENSE_URLS.get(license_id, f"https://spdx.org/licenses/{license_id}.html")


# ---- cursors -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the commit-ordered feed: after (xid, seq), with an optional time filter."""

    xid: int = 0
    seq: int = 0
    min_time: datetime | None = None

    def encode(self) -> str:
        """Return the opaque string handed out as `next`."""
        micros = "" if self.min_time is None else str(_micros(self.min_time))
        raw = f"{_CURSOR_VERSION}:{self.xid}:{self.seq}:{micros}".encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _micros(t: datetime) -> int:
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class BadParameter(ValueError):
    """A query parameter that cannot be understood."""


def parse_since(since: str | None) -> Cursor:
    """Return the cursor a `since` value stands for; raise BadParameter if it is neither kind."""
    if since is None or since == "":
        return Cursor()
    if ":" in since:  # a time; cursors are base64url, which has no colon
        text = since.strip()
        if len(text) > 6 and text[-6] == " ":  # an unescaped '+' in the query became a space
            text = text[:-6] + "+" + text[-5:]
        try:
            t = datetime.fromisoformat(text)
        except ValueError:
            raise BadParameter(f"since: {since!r} is not an RFC 3339 time") from None
        if t.tzinfo is None:
            raise BadParameter(f"since: {since!r} has no time zone (add Z or an offset)")
        return Cursor(min_time=t.astimezone(UTC))
    try:
        raw = base64.urlsafe_b64decode(since + "=" * (-len(since) % 4)).decode()
        version, xid, seq, micros = raw.split(":")
        if version != _CURSOR_VERSION:
            raise ValueError(version)
        min_time = None
        if micros:
            min_time = datetime.fromtimestamp(int(micros) / 1_000_000, UTC)
        cursor = Cursor(int(xid), int(seq), min_time)
        if not 0 <= cursor.xid < 2**64 or not 0 <= cursor.seq <= _MAX_SEQ:
            raise ValueError(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        raise BadParameter(
            "since: neither a cursor returned as `next` nor an RFC 3339 time"
        ) from None
    return cursor


# ---- rate limit --------------------------------------------------------------------------------


class TokenBucket:
    """Per-partner token buckets: `rate` requests per second, bursts of `burst`."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, key: int) -> float:
        """Spend one token; return 0 if allowed, else the seconds until one is available."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0


# ---- response bodies ---------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str


class Page(BaseModel):
    data: list[wire.Record]
    next: str
    license: str


class LicenseBody(BaseModel):
    license: str
    url: str


class Health(BaseModel):
    status: str


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status, message, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "A bad parameter; `error` says which and why."},
    401: {"model": ErrorBody, "description": "Missing, unknown, disabled or revoked API key."},
    429: {"model": ErrorBody, "description": "Too many requests; see Retry-After."},
}


# ---- authentication ----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="The API key from `chargeshare partner add`.")


async def _partner(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> int:
    """Return the id of the partner whose key came with the request, within its rate."""
    settings: Settings = request.app.state.settings
    pool: asyncpg.Pool = request.app.state.pool
    limiter: TokenBucket = request.app.state.limiter
    unauthorized = {"www-authenticate": "Bearer"}
    if creds is None:
        raise _error(401, "missing header Authorization: Bearer <api key>", unauthorized)
    async with pool.acquire() as conn:
        partner_id = await partners.authenticate(conn, creds.credentials)
    if partner_id is None:
        raise _error(401, "unknown, disabled or revoked API key", unauthorized)
    wait = limiter.take(partner_id)
    if wait > 0:
        raise _error(
            429,
            f"rate limit of {settings.api_rate_per_s:g} requests/s exceeded",
            {"retry-after": str(max(1, math.ceil(wait)))},
        )
    return partner_id


PartnerId = Annotated[int, Depends(_partner)]


# ---- the app -----------------------------------------------------------------------------------


def create_app(settings: Settings, pool: asyncpg.Pool) -> fastapi.FastAPI:
    """Build the partner API over this pool."""
    app = fastapi.FastAPI(
        title="ChargeShare partner API",
        version="1",
        description=(
            "Shared public EV charging sessions, openly licensed "
            f"({settings.license}). See DESIGN.md §4 for the record format."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.limiter = TokenBucket(settings.api_rate_per_s, settings.api_burst)
    link = f'<{license_url(settings.license)}>; rel="license"'.encode()

    @app.get("/v1/sessions", responses=_ERRORS)
    async def list_sessions(
        _: PartnerId,
        since: Annotated[
            str | None,
            Query(max_length=200, description="A `next` cursor, or an RFC 3339 time at first."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    ) -> Page:
        """Return the changes after `since` in commit order, and the cursor to continue from."""
        try:
            cursor = parse_since(since)
        except BadParameter as exc:
            raise _error(400, str(exc)) from None
        async with pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                horizon = int(await conn.fetchval(HORIZON))
                rows = await conn.fetch(
                    PAGE, cursor.xid, cursor.seq, horizon, cursor.min_time, limit
                )
        data = [wire.Record.model_validate_json(r["record"]) for r in rows]
        after = (cursor.xid, cursor.seq)
        if rows:
            after = (int(rows[-1]["xid"]), rows[-1]["seq"])
        if len(rows) < limit:
            # Every row below the horizon has been seen: skip to it, so polls stay cheap.
            after = max(after, (horizon - 1, _MAX_SEQ))
        next_cursor = Cursor(after[0], after[1], cursor.min_time)
        return Page(data=data, next=next_cursor.encode(), license=settings.license)

    @app.get(
        "/v1/sessions/{session_id}",
        responses={**_ERRORS, 404: {"model": ErrorBody, "description": "No such session."}},
    )
    async def get_session(_: PartnerId, session_id: uuid.UUID) -> wire.Record:
        """Return the latest published version of one session."""
        async with pool.acquire() as conn:
            text = await conn.fetchval(LATEST, session_id)
        if text is None:
            raise _error(404, f"no published session {session_id}")
        return wire.Record.model_validate_json(text)

    @app.get("/v1/license")
    async def get_license() -> LicenseBody:
        """Return the licence of every record served here."""
        return LicenseBody(license=settings.license, url=license_url(settings.license))

    @app.get("/healthz")
    async def healthz() -> Health:
        """Answer while the process runs."""
        return Health(status="ok")

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> Health:
        """Answer 200 only if the database does."""
        try:
            async with pool.acquire(timeout=2.0) as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            raise _error(503, "database unavailable") from None
        return Health(status="ok")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        reasons = []
        for e in exc.errors():
            where = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "header")]
            reasons.append(f"{'.'.join(where) or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(reasons) or "bad request"}, 400)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error in the API", path=request.url.path, error=repr(exc))
        return JSONResponse({"error": "database unavailable, try again"}, 503)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(asyncpg.PostgresError, database_error)
    app.add_exception_handler(asyncpg.InterfaceError, database_error)
    app.add_exception_handler(OSError, database_error)
    app.add_middleware(_LicenseLink, link=link)
    return app


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _LicenseLink:
    """Add `Link: <licence URL>; rel="license"` to every HTTP response."""

    def __init__(self, app: ASGIApp, link: bytes) -> None:
        self.app = app
        self.link = link

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_link(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"link", self.link)]
            await send(message)

        await self.app(scope, receive, send_with_link)
