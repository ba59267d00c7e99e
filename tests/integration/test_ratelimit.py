"""Per-owner rate limits on inbound MQTT: one noisy owner is dropped, the others go on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg
import pytest

from service import app, observability, ratelimit, topics
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.mqttprobe import Probe

EVENT = "ovms/{owner}/car/event/vehicle/charge/pilot"


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("owner_count", [1, 3])
def test_bucket_admits_the_burst_then_drops(owner_count: int) -> None:
    """Each owner gets `burst` messages at once, then one per 1/rate seconds; owners are apart."""
    clock = Clock()
    limiter = ratelimit.OwnerLimiter(rate=2.0, burst=3, notice_s=60.0, clock=clock)
    for n in range(owner_count):
        topic = EVENT.format(owner=f"o{n}")
        verdicts = [limiter.check(topic, retained=False) for _ in range(5)]
        assert verdicts == [ratelimit.Verdict.ADMIT] * 3 + [
            ratelimit.Verdict.DROP_AND_TELL,
            ratelimit.Verdict.DROP,
        ]
    clock.now += 0.5  # one token back at 2 per second
    assert limiter.check(EVENT.format(owner="o0"), retained=False) is ratelimit.Verdict.ADMIT
    assert limiter.check(EVENT.format(owner="o0"), retained=False) is ratelimit.Verdict.DROP


def test_owner_is_told_once_per_notice_window() -> None:
    """While an owner stays over its rate it hears about it once per notice window."""
    clock = Clock()
    limiter = ratelimit.OwnerLimiter(rate=0.001, burst=1, notice_s=60.0, clock=clock)
    topic = EVENT.format(owner="noisy")
    assert limiter.check(topic, retained=False) is ratelimit.Verdict.ADMIT
    told = [limiter.check(topic, retained=False) for _ in range(100)]
    assert told.count(ratelimit.Verdict.DROP_AND_TELL) == 1
    clock.now += 60.0
    assert limiter.check(topic, retained=False) is ratelimit.Verdict.DROP_AND_TELL
    assert limiter.dropped_before_notice("noisy") == 100


def test_retained_snapshots_are_not_charged() -> None:
    """Retained messages the broker replays on (re)subscribe cost the owner nothing."""
    limiter = ratelimit.OwnerLimiter(rate=0.001, burst=2, clock=Clock())
    topic = "ovms/big/car/metric/v/b/soc"
    assert all(limiter.check(topic, retained=True) is ratelimit.Verdict.ADMIT for _ in range(500))
    assert limiter.check(topic, retained=False) is ratelimit.Verdict.ADMIT
    assert limiter.check(topic, retained=False) is ratelimit.Verdict.ADMIT
    assert limiter.check(topic, retained=False) is ratelimit.Verdict.DROP_AND_TELL


def test_idle_owners_are_forgotten() -> None:
    """Buckets of owners that went quiet are swept, so memory follows active owners only."""
    clock = Clock()
    limiter = ratelimit.OwnerLimiter(rate=10.0, burst=10, notice_s=1.0, clock=clock)
    for n in range(50):
        limiter.check(EVENT.format(owner=f"o{n}"), retained=False)
    clock.now += ratelimit.SWEEP_S + 1
    limiter.check(EVENT.format(owner="late"), retained=False)
    assert list(limiter._buckets) == ["late"]


def test_topics_outside_owner_prefixes_are_not_charged() -> None:
    """A topic that names no owner passes to the handler, which rejects it."""
    limiter = ratelimit.OwnerLimiter(rate=0.001, burst=1, clock=Clock())
    assert all(limiter.check("x", retained=False) is ratelimit.Verdict.ADMIT for _ in range(5))


async def test_noisy_owner_is_dropped_and_told_while_others_are_served(
    broker: BrokerHandle,
    database_url: str,
    new_owner: Callable[[], tuple[str, str]],
    probe: Callable[[str, str], Probe],
    db: asyncpg.Connection,
) -> None:
    """Past its burst an owner's messages are dropped with one rate_limited error; others pass."""
    settings = service_settings(
        broker, database_url, owner_message_rate=0.001, owner_message_burst=5
    )
    noisy, noisy_pw = new_owner()
    quiet, quiet_pw = new_owner()
    car, phone = probe(noisy, noisy_pw), probe(noisy, noisy_pw)
    phone.subscribe(f"ovms/{noisy}/+/chargeshare/#")
    other = probe(quiet, quiet_pw)
    other.subscribe(f"ovms/{quiet}/+/chargeshare/#")
    before = observability.RATE_LIMITED._value.get()
    async with app.running(settings, api_enabled=False):
        for _ in range(20):
            car.publish(EVENT.format(owner=noisy), b"", qos=1)
        error = (await phone.wait_for(steps.error("rate_limited")))[0]
        body = json.loads(error.payload)
        assert body["topic"] == EVENT.format(owner=noisy)
        assert "messages per second" in body["error"]
        assert error.topic == topics.error(noisy, "car")

        # The quiet owner is served while the noisy one is over its rate.
        steps.opt_in(other, quiet, "car")
        await other.wait_for(steps.status(enabled=True))
        # The noisy owner's opt-in is dropped: it never becomes a vehicle row.
        steps.opt_in(phone, noisy, "car")
        await _until(lambda: observability.RATE_LIMITED._value.get() - before == 16)
        assert await db.fetchval("SELECT count(*) FROM vehicles WHERE owner = $1", noisy) == 0
        await _until_outbox_empty(db)
        assert len(phone.messages(steps.error("rate_limited"))) == 1
        assert phone.messages(steps.status()) == []


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def _until_outbox_empty(db: asyncpg.Connection) -> None:
    for _ in range(500):
        if await db.fetchval("SELECT count(*) FROM outbox") == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("outbox never drained")
