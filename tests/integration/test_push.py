"""Push notifications through the outbox to local FCM and APNs servers speaking the real protocols.

firebase-admin and aioapns run unmodified against the fakes of service.testing, which run on a
loop of their own in another thread, like remote servers would.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from service import errors, outbox, wire
from service.adapters import push, push_tokens
from service.config import Settings
from service.testing import fake_apns, fake_fcm, fake_push

TEXT = "You started charging at a new place. Share this charge?"


@dataclass
class Fakes:
    fcm: fake_fcm.FakeFcm
    apns: fake_apns.FakeApns
    bg: fake_push.Background
    settings: Settings


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Fakes]:
    """Fake FCM and APNs on loopback, and settings that point the service at them."""
    fcm = fake_fcm.FakeFcm()
    apns = fake_apns.FakeApns(tmp_path)
    with fake_push.serve_in_thread(fcm, apns) as bg:
        env = fake_push.settings_env(fcm, apns, tmp_path)
        env["CHARGESHARE_PUSH_TIMEOUT_S"] = "60"  # a held answer must not time out
        yield Fakes(fcm, apns, bg, Settings.from_env(env))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    yield p
    await p.close()


def deliverer(
    settings: Settings, pool: asyncpg.Pool, *, fcm: bool = True, apns: bool = True, **kw: Any
) -> push.PushDeliverer:
    """A deliverer whose platform pauses are short enough for a test."""
    f, a = push.senders(settings)
    kw.setdefault("pause_base_s", 0.05)
    kw.setdefault("pause_cap_s", 0.2)
    kw.setdefault("send_deadline_s", 120.0)
    return push.PushDeliverer(pool, f if fcm else None, a if apns else None, **kw)


@contextlib.asynccontextmanager
async def dispatching(pool: asyncpg.Pool, d: push.PushDeliverer, **kw: Any) -> AsyncIterator[None]:
    """Run an outbox dispatcher for push rows; cancel it on exit, like a stopped service."""
    kw = {"poll_s": 0.02, "backoff_base_s": 0.05, "backoff_cap_s": 0.2, "lease_s": 300.0, **kw}
    task = asyncio.create_task(outbox.Dispatcher(pool, d, **kw).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool | Awaitable[bool]]) -> None:
    """Wait until a condition holds (the test's timeout bounds the wait)."""
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.02)


class Vehicle:
    """A vehicle with registered apps, in the test's database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pk = 0
        self.token_ids: dict[str, int] = {}

    async def create(self, apps: list[tuple[str, str, bool]]) -> Vehicle:
        """Insert owner and vehicle; register (platform, token, sandbox) apps."""
        async with self.pool.acquire() as c:
            owner = f"owner-{secrets.token_hex(3)}"
            await c.execute("INSERT INTO owners (name) VALUES ($1)", owner)
            self.pk = await c.fetchval(
                "INSERT INTO vehicles (owner, vehicle_id, salt, handle) VALUES ($1, $2, $3, $4)"
                " RETURNING id",
                owner,
                "car",
                secrets.token_bytes(16),
                "anon-test",
            )
            for i, (platform, token, sandbox) in enumerate(apps):
                r = wire.PushRegistration(
                    app_id=f"app-{i}",
                    platform=platform,  # type: ignore[arg-type]
                    token=token,
                    sandbox=sandbox,
                )
                await push_tokens.register(c, self.pk, r)
            for reg in await push_tokens.registrations(c, self.pk):
                self.token_ids[reg.token] = reg.id
        return self

    async def ask(self, text: str = TEXT) -> str:
        """Create a pending question and queue its pushes in one transaction, like the handler."""
        request_id = f"req-{secrets.token_hex(4)}"
        async with self.pool.acquire() as c, c.transaction():
            session = await c.fetchval(
                "INSERT INTO sessions (id, vehicle, is_open, status, share, source, started_at,"
                " ended_at) VALUES ($1, $2, false, 'completed', 'asking', 'metrics',"
                " now() - interval '1 hour', now()) RETURNING id",
                uuid.uuid4(),
                self.pk,
            )
            await c.execute(
                "INSERT INTO questions (request_id, session, vehicle, kind, created_at, expires_at)"
                " VALUES ($1, $2, $3, 'share', now(), now() + interval '7 days')",
                request_id,
                session,
                self.pk,
            )
            await push_tokens.enqueue_question(c, self.pk, request_id, "share", text)
        return request_id

    async def active(self) -> dict[str, bool]:
        async with self.pool.acquire() as c:
            return {r.token: r.active for r in await push_tokens.registrations(c, self.pk)}


async def outbox_empty(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = 0 FROM outbox"))


def apns_token() -> str:
    return fake_apns.new_token()


async def test_question_pushes_reach_fcm_and_apns(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """A new question reaches every app of the vehicle, on FCM and on both APNs environments."""
    prod, sandbox = apns_token(), apns_token()
    car = await Vehicle(pool).create(
        [("fcm", "fcm-token-1", False), ("apns", prod, False), ("apns", sandbox, True)]
    )
    d = push.build(fakes.settings, pool)
    assert d is not None
    async with d, dispatching(pool, d):
        request_id = await car.ask()
        await until(lambda: outbox_empty(pool))

    [f] = fakes.fcm.received
    assert (f.token, f.status) == ("fcm-token-1", 200)
    assert f.message["notification"] == {"title": "ChargeShare", "body": TEXT}
    assert f.message["data"] == {"request_id": request_id, "kind": "share"}
    assert f.message["android"]["notification"]["tag"] == request_id
    assert f.message["apns"]["headers"]["apns-collapse-id"] == request_id
    assert sorted(r.token for r in fakes.apns.delivered()) == sorted([prod, sandbox])
    for r in fakes.apns.received:
        assert r.headers["apns-topic"] == fakes.apns.topic
        assert r.headers["apns-push-type"] == "alert"
        assert r.headers["apns-collapse-id"] == request_id
        assert r.payload == {
            "aps": {"alert": {"title": "ChargeShare", "body": TEXT}, "sound": "default"},
            "request_id": request_id,
            "kind": "share",
        }
    assert all((await car.active()).values())


async def test_dead_tokens_are_deactivated(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """Tokens FCM or APNs call dead are deactivated and get no further pushes; live ones stay."""
    gone_apns, bad_apns = apns_token(), apns_token()
    fakes.fcm.dead.add("fcm-gone")
    fakes.fcm.invalid.add("fcm-invalid")
    fakes.apns.dead.add(gone_apns)
    fakes.apns.bad.add(bad_apns)
    car = await Vehicle(pool).create(
        [
            ("fcm", "fcm-gone", False),
            ("fcm", "fcm-invalid", False),
            ("apns", gone_apns, False),
            ("apns", bad_apns, False),
            ("fcm", "fcm-live", False),
        ]
    )
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        await car.ask()
        await until(lambda: outbox_empty(pool))
        assert await car.active() == {
            "fcm-gone": False,
            "fcm-invalid": False,
            gone_apns: False,
            bad_apns: False,
            "fcm-live": True,
        }
        await car.ask()
        await until(lambda: outbox_empty(pool))
    tokens = Counter([r.token for r in fakes.fcm.received] + [r.token for r in fakes.apns.received])
    assert tokens == {"fcm-gone": 1, "fcm-invalid": 1, gone_apns: 1, bad_apns: 1, "fcm-live": 2}


async def test_transient_errors_are_retried_until_delivered(
    fakes: Fakes, pool: asyncpg.Pool
) -> None:
    """FCM quota and server errors and APNs 429/500/503 are retried until the push goes through."""
    token = apns_token()
    fakes.fcm.retry_after_s = 0
    fakes.fcm.script["fcm-flaky"] = ["QUOTA_EXCEEDED", "INTERNAL", "QUOTA_EXCEEDED"]
    fakes.apns.script[token] = [429, 500, 503]
    car = await Vehicle(pool).create([("fcm", "fcm-flaky", False), ("apns", token, False)])
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        await car.ask()
        await until(lambda: outbox_empty(pool))
    assert [r.status for r in fakes.fcm.received] == [429, 500, 429, 200]
    assert [r.status for r in fakes.apns.received] == [429, 500, 503, 200]
    assert all((await car.active()).values())


async def test_fcm_retry_after_sets_the_next_attempt(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """An FCM QUOTA_EXCEEDED answer with Retry-After reschedules the push that much later."""
    fakes.fcm.retry_after_s = 120
    fakes.fcm.script["fcm-busy"] = ["QUOTA_EXCEEDED"]
    car = await Vehicle(pool).create([("fcm", "fcm-busy", False)])
    await car.ask()
    [leased] = await pool.fetch(outbox.LEASE, "push", 10, 30.0)
    async with deliverer(fakes.settings, pool) as d:
        outcome = await d.deliver(outbox.Row(**dict(leased)))
    assert isinstance(outcome, outbox.Retry)
    assert outcome.after_s == 120.0
    assert "QuotaExceeded" in outcome.reason


async def test_platform_down_does_not_hold_up_the_other(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """While APNs refuses connections FCM pushes still go out; APNs ones follow once it is back."""
    apns_tokens = [apns_token() for _ in range(3)]
    car = await Vehicle(pool).create(
        [
            *(("apns", t, False) for t in apns_tokens),
            ("fcm", "fcm-a", False),
            ("fcm", "fcm-b", False),
        ]
    )
    fakes.bg.run(fakes.apns.stop())
    async with (
        deliverer(fakes.settings, pool, platform_inflight=1) as d,
        dispatching(pool, d, concurrency=2),
    ):
        await car.ask()
        await until(lambda: len(fakes.fcm.delivered()) == 2)
        waiting = await pool.fetch("SELECT target, last_error FROM outbox")
        assert {r["target"] for r in waiting} == {car.token_ids[t] for t in apns_tokens}
        await until(lambda: all_failed_once(pool, len(apns_tokens)))
        fakes.bg.run(fakes.apns.start())
        await until(lambda: outbox_empty(pool))
    assert Counter(r.token for r in fakes.apns.received) == dict.fromkeys(apns_tokens, 1)
    assert all((await car.active()).values())


async def all_failed_once(pool: asyncpg.Pool, n: int) -> bool:
    rows = await pool.fetch("SELECT last_error FROM outbox WHERE last_error LIKE 'apns%'")
    return len(rows) == n


async def test_hanging_platform_does_not_hold_up_the_other(
    fakes: Fakes, pool: asyncpg.Pool
) -> None:
    """While APNs accepts requests but never answers, FCM pushes queued after them still go out."""
    apns_tokens = [apns_token() for _ in range(3)]
    car = await Vehicle(pool).create(
        [
            *(("apns", t, False) for t in apns_tokens),
            ("fcm", "fcm-a", False),
            ("fcm", "fcm-b", False),
        ]
    )
    fakes.apns.hold()
    async with (
        deliverer(fakes.settings, pool, platform_inflight=1) as d,
        dispatching(pool, d, concurrency=2),
    ):
        await car.ask()
        await until(lambda: len(fakes.fcm.delivered()) == 2)
        assert fakes.apns.delivered() == []
        fakes.apns.release()
        await until(lambda: outbox_empty(pool))
    assert Counter(r.token for r in fakes.apns.delivered()) == dict.fromkeys(apns_tokens, 1)


async def test_hanging_fcm_token_endpoint_holds_up_nothing_else(
    fakes: Fakes, pool: asyncpg.Pool
) -> None:
    """While FCM's OAuth token request hangs, APNs pushes still go out: the loop never blocks."""
    token = apns_token()
    car = await Vehicle(pool).create([("fcm", "fcm-a", False), ("apns", token, False)])
    fakes.fcm.hold()
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        await car.ask()
        await until(lambda: len(fakes.apns.delivered()) == 1)
        assert fakes.fcm.token_requests == 0
        fakes.fcm.release()
        await until(lambda: outbox_empty(pool))
    assert [r.token for r in fakes.fcm.delivered()] == ["fcm-a"]
    assert fakes.fcm.token_requests == 1


async def test_answered_question_gets_no_stale_push(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """An owner who answers before the push goes out gets no push for that question."""
    car = await Vehicle(pool).create([("fcm", "fcm-a", False), ("apns", apns_token(), False)])
    request_id = await car.ask()
    await pool.execute(
        "UPDATE questions SET state = 'answered', answer = 'once', answered_at = now()"
        " WHERE request_id = $1",
        request_id,
    )
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        await until(lambda: outbox_empty(pool))
    assert fakes.fcm.received == []
    assert fakes.apns.received == []
    assert all((await car.active()).values())


async def test_unconfigured_platform_drops_its_pushes(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """With only FCM configured, pushes to APNs apps are dropped and their tokens kept."""
    token = apns_token()
    car = await Vehicle(pool).create([("fcm", "fcm-a", False), ("apns", token, False)])
    async with deliverer(fakes.settings, pool, apns=False) as d, dispatching(pool, d):
        await car.ask()
        await until(lambda: outbox_empty(pool))
    assert [r.token for r in fakes.fcm.delivered()] == ["fcm-a"]
    assert fakes.apns.received == []
    assert (await car.active())[token] is True


async def test_restart_sends_each_pending_push_once(fakes: Fakes, pool: asyncpg.Pool) -> None:
    """Pushes queued while the service is down go out once after a restart; sent ones not again."""
    apns = apns_token()
    car = await Vehicle(pool).create([("fcm", "fcm-a", False), ("apns", apns, False)])
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        first = await car.ask()
        await until(lambda: outbox_empty(pool))
    second = await car.ask()  # the service is down: these wait in the outbox
    third = await car.ask()
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 4
    async with deliverer(fakes.settings, pool) as d, dispatching(pool, d):
        await until(lambda: outbox_empty(pool))
    fcm_seen = Counter(r.message["data"]["request_id"] for r in fakes.fcm.received)
    apns_seen = Counter(r.payload["request_id"] for r in fakes.apns.received)
    assert fcm_seen == apns_seen == {first: 1, second: 1, third: 1}
    assert all(r.delivered for r in fakes.fcm.received)
    assert all(r.delivered for r in fakes.apns.received)


async def test_push_cut_off_in_flight_is_resent_under_one_collapse_id(
    fakes: Fakes, pool: asyncpg.Pool
) -> None:
    """A push cut off by a crash before its answer is sent again, as the same notification."""
    apns = [apns_token(), apns_token()]
    car = await Vehicle(pool).create([("apns", t, False) for t in apns] + [("fcm", "fcm-a", False)])
    fakes.apns.hold()
    d = deliverer(fakes.settings, pool)
    async with dispatching(pool, d):
        request_id = await car.ask()
        await until(lambda: len(fakes.apns.received) == 2)
        await until(lambda: pool.fetchval("SELECT count(*) = 2 FROM outbox"))  # FCM's row done
    await d.aclose()  # the crash: connections drop with the APNs answers still held
    await until(lambda: fakes.apns.connections == 0)
    fakes.apns.release()
    await pool.execute("UPDATE outbox SET available_at = now()")  # the dead replica's lease ends
    async with deliverer(fakes.settings, pool) as d2, dispatching(pool, d2):
        await until(lambda: outbox_empty(pool))
    assert [r.token for r in fakes.fcm.received] == ["fcm-a"]  # finished before: not repeated
    for token in apns:
        seen = [r for r in fakes.apns.received if r.token == token]
        assert [r.status for r in seen] == [None, 200]
        assert {r.headers["apns-collapse-id"] for r in seen} == {request_id}


async def test_without_credentials_push_is_off(pool: asyncpg.Pool) -> None:
    """With no FCM or APNs credentials there is no deliverer, and one log line says push is off."""
    with capture_logs() as logs:
        assert push.build(Settings(), pool) is None
    assert [e["event"] for e in logs] == ["push notifications off: no FCM or APNs credentials"]


def test_half_an_apns_setup_is_a_config_error(tmp_path: Path) -> None:
    """APNs settings with the key id missing are refused, naming what is missing."""
    key = tmp_path / "key.p8"
    key.write_text(fake_apns.make_key())
    s = Settings(apns_key_file=str(key), apns_team_id="T", apns_topic="org.example")
    with pytest.raises(errors.ConfigError) as err:
        push.senders(s)
    assert err.value.setting == "CHARGESHARE_APNS_KEY_ID"
