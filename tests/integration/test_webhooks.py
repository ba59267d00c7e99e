"""Webhooks from the outbox to real HTTP receivers on loopback, verified as a partner would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service import outbox
from service.adapters import partners, publications
from service.adapters.webhook_delivery import WebhookDeliverer, build
from service.config import Settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# ---- a partner's side, written from the Standard Webhooks spec -----------------------------------


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Verify a Standard Webhooks v1 signature independently of the service's code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = headers["webhook-id"].encode() + b"." + headers["webhook-timestamp"].encode()
    expected = hmac.new(key, content + b"." + body, hashlib.sha256).digest()
    for part in headers["webhook-signature"].split():
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(sig), expected):
            return True
    return False


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


Respond = Callable[[Received], Awaitable[int | tuple[int, dict[str, str]]]]


async def ok(_: Received) -> int:
    return 204


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server on loopback answering each request with `respond`."""

    respond: Respond = ok
    requests: list[Received] = field(default_factory=list)
    accepted: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                assert line.startswith(b"POST /hook "), line
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = Received(headers, body)
                self.requests.append(req)
                self.changed.set()
                answer = await self.respond(req)
                status, extra = answer if isinstance(answer, tuple) else (answer, {})
                if 200 <= status < 300:
                    self.accepted.append(req)
                    self.changed.set()
                head = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n{head}\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Wait until `check()` holds (the test's own timeout catches a hang)."""
        async with asyncio.timeout(60):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def receivers(*responds: Respond) -> AsyncIterator[list[Receiver]]:
    """Start receivers on loopback, stopped at the end."""
    started = [await Receiver(r).start() for r in responds]
    try:
        yield started
    finally:
        for r in started:
            await r.stop()


# ---- the service's side ------------------------------------------------------------------------


def settings_for(database_url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        database_url=database_url,
        location_secret=b"test-location-secret-32-bytes!!!",
        webhook_allow_http_loopback=True,
        broker_dir=tmp_path / "broker",
        **kw,
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=12)
    yield p
    await p.close()


def a_record(session: str, version: int, **kw: Any) -> dict[str, Any]:
    """A published record as the lead's handler builds it."""
    rec: dict[str, Any] = {
        "id": session,
        "version": version,
        "status": "charging",
        "cause": None,
        "contributor": "anonymous",
        "vehicle_type": "RT",
        "connector": "type2",
        "ocm_connection_type_id": 25,
        "latitude": 51.3023,
        "longitude": 0.40145,
        "station": None,
        "charge_point": None,
        "started_at": "2026-03-01T11:00:00Z",
        "ended_at": None,
        "energy_kwh": float(version),
        "max_power_kw": 7.2,
        "max_voltage": 231.0,
        "max_current": 32.0,
        "soc_start": 20.0,
        "soc_end": None,
        "comment": None,
        "updated_at": (T0 + timedelta(minutes=version)).isoformat(),
        "license": "CC0-1.0",
    }
    rec.update(kw)
    return rec


async def publish(pool: asyncpg.Pool, session: str, version: int, **kw: Any) -> bytes:
    """Record one version in its own transaction, as the handler does."""
    async with pool.acquire() as conn, conn.transaction():
        return await publications.record(
            conn,
            session_id=session,
            version=version,
            event_type="session.started" if version == 1 else "session.updated",
            record=a_record(session, version, **kw),
            happened_at=T0 + timedelta(minutes=version),
        )


async def add_partner(pool: asyncpg.Pool, settings: Settings, name: str, url: str | None) -> str:
    """Sign a partner up; return its webhook secret."""
    async with pool.acquire() as conn:
        creds = await partners.add(conn, settings, name, url)
    return creds.webhook_secret or ""


@contextlib.asynccontextmanager
async def dispatching(
    pool: asyncpg.Pool, settings: Settings, **kw: Any
) -> AsyncIterator[outbox.Dispatcher]:
    """Run the webhook dispatcher (short backoff) until the block ends."""
    kw = {"backoff_base_s": 0.02, "backoff_cap_s": 0.1, "poll_s": 0.02, **kw}
    async with build(settings, pool) as deliverer:
        d = outbox.Dispatcher(pool, deliverer, **kw)
        task = asyncio.create_task(d.run(), name="webhook-dispatcher")
        try:
            yield d
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)  # let the cancelled deliveries unwind


async def outbox_rows(pool: asyncpg.Pool) -> int:
    n: int = await pool.fetchval("SELECT count(*) FROM outbox WHERE kind = 'webhook'")
    return n


async def wait_outbox_empty(pool: asyncpg.Pool) -> None:
    async with asyncio.timeout(60):
        while True:  # the database has no event to wait on
            if not await outbox_rows(pool):
                break
            await asyncio.sleep(0.02)


# ---- tests -------------------------------------------------------------------------------------


async def test_event_is_delivered_signed_as_standard_webhooks(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A published event reaches the partner once, with a signature the spec's verifier accepts."""
    settings = settings_for(database_url, tmp_path)
    async with receivers(ok) as [rx]:
        secret = await add_partner(pool, settings, "acme", rx.url)
        session = str(uuid.uuid4())
        mqtt_bytes = await publish(pool, session, 1)
        async with dispatching(pool, settings):
            await rx.wait_for("one delivery", lambda: len(rx.accepted) == 1)
            await wait_outbox_empty(pool)
    got = rx.accepted[0]
    assert verify(secret, got.headers, got.body)
    assert not verify(secret, got.headers, got.body.replace(b"anonymous", b"anonymouS"))
    assert got.headers["webhook-id"] == f"msg_{session}_1"
    assert got.headers["content-type"] == "application/json"
    assert abs(int(got.headers["webhook-timestamp"]) - datetime.now(UTC).timestamp()) < 300
    event = got.event
    assert event["type"] == "session.started"
    assert event["timestamp"] == "2026-03-01T12:01:00Z"
    assert event["session"]["id"] == session and event["session"]["license"] == "CC0-1.0"
    public = json.loads(mqtt_bytes)
    assert set(public) == {"type", "session"} and public["session"] == event["session"]
    rows = await pool.fetch("SELECT attempt, status, error, webhook_id FROM deliveries")
    assert [tuple(r) for r in rows] == [(1, 204, None, f"msg_{session}_1")]


async def test_flaky_receiver_gets_each_event_once_in_version_order(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A receiver failing three times then succeeding gets every event once, versions in order."""
    failures = itertools.count()

    async def flaky(_: Received) -> int:
        return 500 if next(failures) < 3 else 200

    settings = settings_for(database_url, tmp_path)
    async with receivers(flaky) as [rx]:
        secret = await add_partner(pool, settings, "flaky", rx.url)
        s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
        for v in (1, 2, 3):
            await publish(pool, s1, v)
        await publish(pool, s2, 1)
        async with dispatching(pool, settings):
            await rx.wait_for("four events", lambda: len(rx.accepted) == 4)
            await wait_outbox_empty(pool)
    assert len(rx.requests) == 7
    ids = [r.headers["webhook-id"] for r in rx.accepted]
    assert sorted(ids) == sorted({f"msg_{s1}_1", f"msg_{s1}_2", f"msg_{s1}_3", f"msg_{s2}_1"})
    assert [i for i in ids if s1 in i] == [f"msg_{s1}_{v}" for v in (1, 2, 3)]
    assert all(verify(secret, r.headers, r.body) for r in rx.requests)
    # A retry keeps its webhook-id: the failed ids are among the delivered ones.
    assert {r.headers["webhook-id"] for r in rx.requests} == set(ids)
    failed = await pool.fetch("SELECT status, attempt FROM deliveries WHERE status = 500")
    assert len(failed) == 3
    async with pool.acquire() as conn:
        log = await partners.deliveries(conn, "flaky")
    assert Counter(d["outcome"] for d in log) == {"delivered": 4, "will retry": 3}


async def test_slow_and_dead_partners_do_not_delay_a_healthy_one(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """While a hanging and a refusing partner fail, a healthy one still gets every event."""
    release = asyncio.Event()

    async def hang(_: Received) -> int:
        await release.wait()
        return 200

    # The timeout is long, so a slot held by the hanging partner would not free itself in time.
    settings = settings_for(
        database_url, tmp_path, webhook_timeout_s=120.0, webhook_partner_inflight=2
    )
    async with receivers(hang, ok) as [slow, healthy]:
        gone = await Receiver().start()
        dead_url = gone.url
        await gone.stop()  # nothing listens there any more: connections are refused
        await add_partner(pool, settings, "slow", slow.url)
        await add_partner(pool, settings, "dead", dead_url)
        await add_partner(pool, settings, "healthy", healthy.url)
        sessions = [str(uuid.uuid4()) for _ in range(12)]
        for s in sessions:
            await publish(pool, s, 1)
        async with dispatching(pool, settings, concurrency=6):
            await healthy.wait_for("all events", lambda: len(healthy.accepted) == 12)
            # The slow partner was still holding its requests: it had at most its cap in flight.
            assert slow.accepted == [] and len(slow.requests) <= 2
            release.set()
            await slow.wait_for("all events", lambda: len(slow.accepted) == 12)
        dead_errors = await pool.fetchval(
            "SELECT count(*) FROM deliveries d JOIN partners p ON p.id = d.partner "
            "WHERE p.name = 'dead' AND d.status IS NULL AND d.error LIKE 'Connect%'"
        )
        assert dead_errors >= 1


async def test_410_disables_the_endpoint(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A 410 answer disables the partner's webhook, and later events are not queued for it."""

    async def gone(_: Received) -> int:
        return 410

    settings = settings_for(database_url, tmp_path)
    async with receivers(gone) as [rx]:
        await add_partner(pool, settings, "gone", rx.url)
        await publish(pool, str(uuid.uuid4()), 1)
        async with dispatching(pool, settings):
            await rx.wait_for("one attempt", lambda: len(rx.requests) == 1)
            await wait_outbox_empty(pool)
        row = await pool.fetchrow(
            "SELECT webhook_enabled, webhook_disabled_reason FROM partners WHERE name = 'gone'"
        )
        assert row["webhook_enabled"] is False and "410" in row["webhook_disabled_reason"]
        await publish(pool, str(uuid.uuid4()), 1)
        assert await outbox_rows(pool) == 0
    assert len(rx.requests) == 1


async def test_redirect_is_not_followed(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A 3xx answer is a failed attempt: the Location is never requested."""
    async with receivers(ok) as [target]:

        async def redirect(_: Received) -> tuple[int, dict[str, str]]:
            return 307, {"location": target.url}

        settings = settings_for(database_url, tmp_path)
        async with receivers(redirect) as [rx]:
            await add_partner(pool, settings, "redir", rx.url)
            await publish(pool, str(uuid.uuid4()), 1)
            async with dispatching(pool, settings):
                await rx.wait_for("two attempts", lambda: len(rx.requests) >= 2)
        assert target.requests == []
        assert await outbox_rows(pool) == 1
        statuses = {r["status"] for r in await pool.fetch("SELECT status FROM deliveries")}
        assert statuses == {307}


async def test_gives_up_after_the_maximum_age(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """An event still failing past webhook_max_age_s is dropped and logged as given up."""

    async def fail(_: Received) -> int:
        return 503

    settings = settings_for(database_url, tmp_path, webhook_max_age_s=0)
    async with receivers(fail) as [rx]:
        await add_partner(pool, settings, "down", rx.url)
        await publish(pool, str(uuid.uuid4()), 1)
        async with dispatching(pool, settings):
            await wait_outbox_empty(pool)
    assert len(rx.requests) == 1
    async with pool.acquire() as conn:
        [entry] = await partners.deliveries(conn, "down")
    assert entry["status"] == 503 and entry["outcome"] == "gave up"


async def test_no_answer_within_the_timeout_is_a_failed_attempt(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A receiver that never answers costs one timed-out attempt, then the event is retried."""
    release = asyncio.Event()

    async def hang(_: Received) -> int:
        await release.wait()
        return 200

    settings = settings_for(database_url, tmp_path, webhook_timeout_s=0.3)
    async with receivers(hang) as [rx]:
        await add_partner(pool, settings, "mute", rx.url)
        await publish(pool, str(uuid.uuid4()), 1)
        async with dispatching(pool, settings):
            await rx.wait_for("a retry", lambda: len(rx.requests) >= 2)
        release.set()
    errors = [r["error"] for r in await pool.fetch("SELECT error FROM deliveries")]
    assert errors and all(e.startswith("no answer within") for e in errors)


async def test_disabled_or_removed_partner_gets_nothing(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Rows queued before a partner is disabled or removed are dropped, not sent."""
    settings = settings_for(database_url, tmp_path)
    async with receivers(ok, ok) as [rx_off, rx_gone]:
        await add_partner(pool, settings, "off", rx_off.url)
        await add_partner(pool, settings, "gone", rx_gone.url)
        await publish(pool, str(uuid.uuid4()), 1)
        assert await outbox_rows(pool) == 2
        async with pool.acquire() as conn:
            await partners.disable(conn, settings, "off")
        await pool.execute("DELETE FROM partners WHERE name = 'gone'")  # bypass remove's cleanup
        async with dispatching(pool, settings):
            await wait_outbox_empty(pool)
    assert rx_off.requests == [] and rx_gone.requests == []


async def test_republishing_a_version_never_changes_it(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Recording a (session, version) again returns the first content and queues no webhook."""
    settings = settings_for(database_url, tmp_path)
    await add_partner(pool, settings, "acme", "https://partner.example/hook")
    session = str(uuid.uuid4())
    first = await publish(pool, session, 1)
    again = await publish(pool, session, 1, energy_kwh=99.0)
    assert again == first
    assert json.loads(again)["session"]["energy_kwh"] == 1.0
    assert await outbox_rows(pool) == 1


async def test_partner_order_is_fresh_and_uniform_per_event(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Each event queues its partners in a fresh random order: no partner is always first."""
    settings = settings_for(database_url, tmp_path)
    names = ["p1", "p2", "p3"]
    for n in names:
        await add_partner(pool, settings, n, f"https://{n}.example/hook")
    ids = {r["id"]: r["name"] for r in await pool.fetch("SELECT id, name FROM partners")}
    n_events = 300
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(n_events):
            s = str(uuid.uuid4())
            await publications.record(
                conn,
                session_id=s,
                version=1,
                event_type="session.started",
                record=a_record(s, 1),
                happened_at=T0,
            )
    rows = await pool.fetch("SELECT id, target, ordering_key FROM outbox ORDER BY id")
    orders: dict[str, list[str]] = {}
    for r in rows:  # the dispatcher leases in id order: this is the order partners are served
        orders.setdefault(r["ordering_key"].split(":", 1)[1], []).append(ids[r["target"]])
    assert len(orders) == n_events and all(sorted(o) == names for o in orders.values())
    firsts = Counter(o[0] for o in orders.values())
    perms = Counter(tuple(o) for o in orders.values())
    # Under a uniform shuffle each partner is first with p = 1/3: P(Bin(300, 1/3) < 50) =
    # 2.66e-11, so this fails by chance with probability < 3 * 2.66e-11 = 8e-11 (union bound).
    assert all(firsts[n] >= 50 for n in names), firsts
    # And each of the 6 orders shows up: P(one never appears) <= 6 * (5/6)**300 = 1.1e-23.
    assert len(perms) == 6, perms


def test_settings_keep_retrying_at_least_a_day() -> None:
    """By default a webhook is retried for at least 24 hours, with a 10 s timeout per attempt."""
    s = Settings()
    assert s.webhook_max_age_s >= 24 * 3600
    assert s.webhook_timeout_s == 10.0
    assert WebhookDeliverer.kind == "webhook"
