"""The partner pull API served by uvicorn on loopback over a real database."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from service import localstack
from service.adapters import api, partners, publications
from service.config import Settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def a_record(session: str, version: int) -> dict[str, Any]:
    """A published record as the lead's handler builds it."""
    return {
        "id": session,
        "version": version,
        "status": "charging" if version == 1 else "completed",
        "cause": None,
        "contributor": "Jimbo",
        "vehicle_type": "RT",
        "connector": "type2",
        "ocm_connection_type_id": 25,
        "latitude": 51.3023,
        "longitude": 0.40145,
        "station": {"ocm_id": 1234, "title": "Town hall"},
        "charge_point": "3",
        "started_at": "2026-03-01T11:00:00Z",
        "ended_at": None if version == 1 else "2026-03-01T12:30:00Z",
        "energy_kwh": 21.4,
        "max_power_kw": 7.2,
        "max_voltage": 231.0,
        "max_current": 32.0,
        "soc_start": 20.0,
        "soc_end": 80.0,
        "comment": None,
        "updated_at": "2026-03-01T12:30:00Z",
        "license": "CC0-1.0",
    }


async def publish(
    conn: asyncpg.Connection, session: str, version: int, happened_at: datetime = T0
) -> None:
    """Record one version inside the caller's transaction, as the handler does."""
    await publications.record(
        conn,
        session_id=session,
        version=version,
        event_type="session.started" if version == 1 else "session.completed",
        record=a_record(session, version),
        happened_at=happened_at,
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=12)
    yield p
    await p.close()


@dataclass
class Api:
    """A running API, a client for it, and a way to sign partners up."""

    settings: Settings
    pool: asyncpg.Pool
    client: httpx.AsyncClient

    async def partner(self, name: str) -> str:
        """Sign a partner up; return its API key."""
        async with self.pool.acquire() as conn:
            creds = await partners.add(conn, self.settings, name)
        return creds.api_key

    async def get(self, path: str, key: str | None = None, **params: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self.client.get(path, headers=headers, params=params)


StartApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start_api(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> AsyncIterator[StartApi]:
    """Serve the API with uvicorn on a free loopback port, with these setting overrides."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None], httpx.AsyncClient]] = []

    async def start(**overrides: Any) -> Api:
        settings = Settings(
            database_url=database_url,
            broker_dir=tmp_path / "broker",
            **{"api_rate_per_s": 1000.0, "api_burst": 1000, **overrides},
        )
        port = localstack.free_port()
        config = uvicorn.Config(
            api.create_app(settings, pool), host="127.0.0.1", port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(30):
            while True:  # uvicorn offers a flag, not an event
                if server.started:
                    break
                await asyncio.sleep(0.01)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False)
        servers.append((server, task, client))
        return Api(settings, pool, client)

    yield start
    for server, task, client in servers:
        await client.aclose()
        server.should_exit = True
        await task


async def follow(a: Api, key: str, since: str | None, limit: int = 100) -> tuple[list[Any], str]:
    """Follow `next` from `since` until an empty page; return the records and the last cursor."""
    records: list[Any] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        if since is not None:
            params["since"] = since
        r = await a.get("/v1/sessions", key, **params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["next"], str) and body["license"] == "CC0-1.0"
        records += body["data"]
        since = body["next"]
        if not body["data"]:
            return records, since


# ---- unauthenticated endpoints -----------------------------------------------------------------


async def test_health_license_and_openapi_need_no_key(start_api: StartApi) -> None:
    """/healthz, /readyz, /v1/license and /openapi.json answer without a key."""
    a = await start_api()
    assert (await a.get("/healthz")).json() == {"status": "ok"}
    assert (await a.get("/readyz")).status_code == 200
    lic = await a.get("/v1/license")
    assert lic.json() == {
        "license": "CC0-1.0",
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
    }
    assert 'rel="license"' in lic.headers["link"]
    spec = (await a.get("/openapi.json")).json()
    assert {"/v1/sessions", "/v1/sessions/{session_id}", "/v1/license", "/healthz"} <= set(
        spec["paths"]
    )
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "400" in spec["paths"]["/v1/sessions"]["get"]["responses"]


async def test_readyz_fails_when_the_database_does_not_answer(
    start_api: StartApi, pool: asyncpg.Pool
) -> None:
    """/readyz is 503 once the database is unreachable, while /healthz stays 200."""
    a = await start_api()
    await pool.close()
    r = await a.get("/readyz")
    assert r.status_code == 503 and "error" in r.json()
    assert (await a.get("/healthz")).status_code == 200


async def test_configured_license_appears_everywhere(start_api: StartApi) -> None:
    """A different licence setting is what /v1/license, pages and the Link header show."""
    a = await start_api(license="ODbL-1.0")
    key = await a.partner("acme")
    page = await a.get("/v1/sessions", key)
    assert page.json()["license"] == "ODbL-1.0", page.text
    assert "opendatacommons.org" in page.headers["link"]
    assert (await a.get("/v1/license")).json()["license"] == "ODbL-1.0"
    row = await a.pool.fetchrow("SELECT license, license_accepted_at FROM partners")
    assert row["license"] == "ODbL-1.0" and row["license_accepted_at"] is not None


# ---- authentication and validation -------------------------------------------------------------


async def test_every_authentication_failure_is_401(start_api: StartApi) -> None:
    """Missing, malformed, unknown, disabled and rotated-out keys are refused with 401."""
    a = await start_api()
    key = await a.partner("acme")
    off_key = await a.partner("off")
    async with a.pool.acquire() as conn:
        await partners.disable(conn, a.settings, "off")
    rotated = await a.partner("rot")
    async with a.pool.acquire() as conn:
        new_key = await partners.rotate_key(conn, "rot")
    assert (await a.get("/v1/sessions", key)).status_code == 200
    assert (await a.get("/v1/sessions", new_key)).status_code == 200
    cases = {
        "missing": {},
        "basic scheme": {"authorization": "Basic YWNtZTpwdw=="},
        "bearer only": {"authorization": "Bearer"},
        "not a key": {"authorization": "Bearer hello"},
        "unknown key": {"authorization": f"Bearer {key[:-4]}AAAA"},
        "same prefix": {"authorization": f"Bearer {key[:11]}{'x' * 40}"},
        "disabled": {"authorization": f"Bearer {off_key}"},
        "rotated out": {"authorization": f"Bearer {rotated}"},
    }
    for what, headers in cases.items():
        r = await a.client.get("/v1/sessions", headers=headers)
        assert r.status_code == 401, what
        assert r.headers["www-authenticate"] == "Bearer", what
        assert set(r.json()) == {"error"}, what
    sid = uuid.uuid4()
    assert (await a.client.get(f"/v1/sessions/{sid}")).status_code == 401


async def test_old_key_works_until_its_grace_period_ends(start_api: StartApi) -> None:
    """After rotate-key with a grace period both keys work; once it ends the old one is 401."""
    a = await start_api()
    old = await a.partner("acme")
    async with a.pool.acquire() as conn:
        new = await partners.rotate_key(conn, "acme", grace_s=3600)
    assert (await a.get("/v1/sessions", old)).status_code == 200
    assert (await a.get("/v1/sessions", new)).status_code == 200
    await a.pool.execute("UPDATE partners SET api_key_previous_until = now() - interval '1 s'")
    assert (await a.get("/v1/sessions", old)).status_code == 401
    assert (await a.get("/v1/sessions", new)).status_code == 200


@pytest.mark.parametrize(
    ("path", "params", "mentions"),
    [
        ("/v1/sessions", {"limit": "0"}, "limit"),
        ("/v1/sessions", {"limit": "1001"}, "limit"),
        ("/v1/sessions", {"limit": "ten"}, "limit"),
        ("/v1/sessions", {"since": "garbage"}, "since"),
        ("/v1/sessions", {"since": "MTo1OjE"}, "since"),  # a cursor with a field missing
        ("/v1/sessions", {"since": "2026-03-01T12:00:00"}, "time zone"),
        ("/v1/sessions", {"since": "2026-13-01T12:00:00Z"}, "RFC 3339"),
        ("/v1/sessions", {"since": "x" * 201}, "since"),
        ("/v1/sessions/not-a-uuid", {}, "session_id"),
    ],
)
async def test_bad_parameters_are_400_with_a_reason(
    start_api: StartApi, path: str, params: dict[str, str], mentions: str
) -> None:
    """Each bad parameter gives 400 and an error naming what is wrong."""
    a = await start_api()
    key = await a.partner("acme")
    r = await a.get(path, key, **params)
    assert r.status_code == 400
    body = r.json()
    assert set(body) == {"error"} and mentions in body["error"]


async def test_unknown_session_and_route_are_404(start_api: StartApi) -> None:
    """An unknown session id or path gives 404 with an error."""
    a = await start_api()
    key = await a.partner("acme")
    r = await a.get(f"/v1/sessions/{uuid.uuid4()}", key)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = await a.get("/v2/nothing", key)
    assert r.status_code == 404 and set(r.json()) == {"error"}


async def test_rate_limit_answers_429_with_retry_after(start_api: StartApi) -> None:
    """Past its burst a key gets 429 with Retry-After; another partner's key is unaffected."""
    a = await start_api(api_rate_per_s=0.01, api_burst=3)
    key, other = await a.partner("greedy"), await a.partner("calm")
    assert [(await a.get("/v1/sessions", key)).status_code for _ in range(3)] == [200] * 3
    r = await a.get("/v1/sessions", key)
    assert r.status_code == 429 and "error" in r.json()
    assert int(r.headers["retry-after"]) >= 1
    assert (await a.get("/v1/sessions", other)).status_code == 200


def test_token_bucket_refills_at_the_rate() -> None:
    """A bucket allows `burst` at once, then one request per 1/rate seconds."""
    now = [0.0]
    bucket = api.TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take(1), bucket.take(1)] == [0.0, 0.0]
    assert bucket.take(1) == pytest.approx(0.5)
    assert bucket.take(2) == 0.0
    now[0] = 0.5
    assert bucket.take(1) == 0.0


# ---- the feed ----------------------------------------------------------------------------------


async def test_pages_follow_commit_order_and_latest_version(start_api: StartApi) -> None:
    """Pages list every change once in commit order; /v1/sessions/{id} gives the latest version."""
    a = await start_api()
    key = await a.partner("acme")
    s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
    for s, v in [(s1, 1), (s2, 1), (s1, 2)]:
        async with a.pool.acquire() as conn, conn.transaction():
            await publish(conn, s, v)
    records, cursor = await follow(a, key, None, limit=2)
    assert [(r["id"], r["version"]) for r in records] == [(s1, 1), (s2, 1), (s1, 2)]
    assert records[0] == {**a_record(s1, 1), "station": {"ocm_id": 1234, "title": "Town hall"}}
    latest = await a.get(f"/v1/sessions/{s1}", key)
    assert latest.json()["version"] == 2 and latest.json()["license"] == "CC0-1.0"
    # Polling again from the last cursor yields nothing, then exactly the new change.
    again = await a.get("/v1/sessions", key, since=cursor)
    assert again.json()["data"] == [] and again.json()["next"] == cursor
    async with a.pool.acquire() as conn, conn.transaction():
        await publish(conn, s2, 2)
    newer, _ = await follow(a, key, cursor)
    assert [(r["id"], r["version"]) for r in newer] == [(s2, 2)]


async def test_since_time_filters_this_and_every_following_page(start_api: StartApi) -> None:
    """`since` as a time yields exactly the changes that happened at or after it, page by page."""
    a = await start_api()
    key = await a.partner("acme")
    made = []
    for i in range(6):
        s = str(uuid.uuid4())
        async with a.pool.acquire() as conn, conn.transaction():
            await publish(conn, s, 1, happened_at=T0 + timedelta(hours=i % 3))
        made.append((s, i % 3))
    records, _ = await follow(a, key, "2026-03-01T13:00:00Z", limit=1)
    assert [r["id"] for r in records] == [s for s, h in made if h >= 1]
    # An unescaped '+' arrives as a space: still read as the offset.
    records, _ = await follow(a, key, "2026-03-01T15:00:00 02:00", limit=1)
    assert [r["id"] for r in records] == [s for s, h in made if h >= 1]


async def test_a_change_is_served_only_once_older_transactions_end(start_api: StartApi) -> None:
    """A change committed while an older transaction still runs waits behind it: no gap."""
    a = await start_api()
    key = await a.partner("acme")
    early, late = str(uuid.uuid4()), str(uuid.uuid4())
    slow = await a.pool.acquire()
    tx = slow.transaction()
    await tx.start()
    await publish(slow, early, 1)  # takes its transaction id first, commits last
    async with a.pool.acquire() as conn, conn.transaction():
        await publish(conn, late, 1)
    records, cursor = await follow(a, key, None)
    assert records == []
    await tx.commit()
    await a.pool.release(slow)
    records, _ = await follow(a, key, cursor)
    assert [r["id"] for r in records] == [early, late]


async def test_following_next_during_concurrent_writes_misses_nothing(start_api: StartApi) -> None:
    """Readers following `next` while writers commit out of order see every change exactly once."""
    a = await start_api()
    key = await a.partner("acme")
    writers, per_writer = 5, 30
    rng = random.Random(7)
    done = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(per_writer):
            async with a.pool.acquire() as conn, conn.transaction():
                await publish(conn, str(uuid.uuid4()), 1)
                # Hold the transaction a little: commits then land out of xid order.
                await asyncio.sleep(rng.random() * 0.01)
                if i % 3 == 0:
                    await publish(conn, str(uuid.uuid4()), 1)

    async def reader() -> list[tuple[str, int]]:
        seen: list[tuple[str, int]] = []
        since: str | None = None
        while True:
            finished = done.is_set()
            params = {"limit": 7} if since is None else {"limit": 7, "since": since}
            body = (await a.get("/v1/sessions", key, **params)).json()
            seen += [(r["id"], r["version"]) for r in body["data"]]
            since = body["next"]
            if finished and not body["data"]:
                return seen

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    results = await asyncio.gather(*readers)
    stored = {
        (str(r["session"]), r["version"])
        for r in await a.pool.fetch("SELECT session, version FROM publications")
    }
    assert len(stored) == writers * (per_writer + per_writer // 3)
    for seen in results:
        assert len(seen) == len(set(seen)) and set(seen) == stored
    # Commit order is the order served: both readers saw the same sequence.
    assert results[0] == results[1]


def test_cursor_round_trips_and_rejects_other_versions() -> None:
    """A cursor decodes to what it encodes, with or without a time filter."""
    c = api.Cursor(12345, 678, T0)
    assert api.parse_since(c.encode()) == c
    assert api.parse_since(api.Cursor(9, 1).encode()) == api.Cursor(9, 1)
    assert api.parse_since(None) == api.Cursor()
    assert api.parse_since("2026-03-01T12:00:00+00:00") == api.Cursor(min_time=T0)
    with pytest.raises(api.BadParameter):
        api.parse_since("Mjo1OjE6")  # "2:5:1:" — a version this service does not write
