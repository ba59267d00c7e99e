"""Nothing is lost between commit and publish, and re-delivery never changes what was published."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from service import app, handler, settle, topics
from service.adapters import publications
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.mqttprobe import Probe


async def test_outbox_written_while_down_is_published_after_restart(
    broker: BrokerHandle,
    database_url: str,
    owner: tuple[str, str],
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """Output committed by a process that died before publishing goes out when one starts."""
    name, _ = owner
    settings = service_settings(broker, database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        # The "crashed" process: it handled messages and committed, but never published.
        h = handler.Handler(pool, settings)
        vid = "ev1"
        await h.handle(topics.optin(name, vid), b'{"enabled": true, "nickname": "N"}')
        for metric, value in [("v.p.latitude", "51.302300"), ("v.p.longitude", "0.401450"),
                              ("v.c.type", "ccs"), ("v.c.state", "charging"),
                              ("v.c.charging", "yes")]:  # fmt: skip
            await h.handle(topics.metric(name, vid, metric), value.encode())
        later = datetime.now(UTC) + timedelta(seconds=5)
        await settle.judge_due(pool, settings, h.secrets, later)
        request_id = await db.fetchval("SELECT request_id FROM questions")
        await h.handle(topics.decision(name, vid, request_id), b'{"choice": "always"}')
        public = "SELECT count(*) FROM outbox WHERE topic LIKE 'chargeshare/public/%'"
        assert await db.fetchval(public) == 1  # session.started, committed but never sent
    finally:
        await pool.close()
    assert partner.messages() == []

    async with app.running(settings, api_enabled=False):
        started = (await partner.wait_for(steps.public("session.started")))[0]
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM outbox WHERE kind = 'mqtt'") == 0:
                break
            await asyncio.sleep(0.05)
    record = json.loads(started.payload)["session"]
    assert record["contributor"] == "N" and record["connector"] == "ccs"
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE kind = 'mqtt'") == 0


async def test_republishing_a_version_keeps_its_first_content(db: asyncpg.Connection) -> None:
    """Storing (session, version) again with other content returns the content stored first."""
    record = {
        "id": "6f1c2b8e-3f5a-4b7e-9c1d-2a3b4c5d6e7f", "version": 1, "status": "charging",
        "cause": None, "contributor": "anonymous", "vehicle_type": "RT", "connector": "type2",
        "ocm_connection_type_id": 25, "latitude": 51.3023, "longitude": 0.40145,
        "station": None, "charge_point": None, "started_at": "2026-12-07T10:00:00Z",
        "ended_at": None, "energy_kwh": 1.0, "max_power_kw": 7.2, "max_voltage": 231.0,
        "max_current": 32.0, "soc_start": 20.0, "soc_end": 21.0, "comment": None,
        "updated_at": "2026-12-07T10:00:00Z", "license": "CC0-1.0",
    }  # fmt: skip
    now = datetime.now(UTC)
    first = await publications.record(
        db, session_id=record["id"], version=1, event_type="session.started",  # type: ignore[arg-type]
        record=record, happened_at=now,
    )  # fmt: skip
    changed = dict(record, energy_kwh=99.0)
    again = await publications.record(
        db, session_id=record["id"], version=1, event_type="session.started",  # type: ignore[arg-type]
        record=changed, happened_at=now,
    )  # fmt: skip
    assert again == first
    assert json.loads(first)["session"]["energy_kwh"] == 1.0


async def test_metrics_in_any_order_give_the_right_place_and_result(
    service: app.Service,
    owner: tuple[str, str],
    probe: Callable[[str, str], Probe],
    db: asyncpg.Connection,
) -> None:
    """A start whose position arrives after the charging flag still records the new place."""
    name, pw = owner
    car = probe(name, pw)
    steps.opt_in(car, name, "ev1")
    rng = random.Random(7)
    steps.metrics(car, name, "ev1", {"v.p.latitude": "48.100000", "v.p.longitude": "11.500000"})
    await asyncio.sleep(0.5)
    burst = [("v.c.state", "charging"), ("v.c.charging", "yes"), ("v.c.type", "ccs"),
             ("v.p.latitude", "51.302300"), ("v.p.longitude", "0.401450")]  # fmt: skip
    rng.shuffle(burst)
    burst.sort(key=lambda kv: kv[0].startswith("v.p"), reverse=False)  # position last
    for metric, value in burst:
        steps.metrics(car, name, "ev1", {metric: value})
    end = [("v.c.kwh", "9.5"), ("v.c.state", "done"), ("v.c.charging", "no")]
    await asyncio.sleep(1.0)
    for metric, value in reversed(end):
        steps.metrics(car, name, "ev1", {metric: value})
    for _ in range(200):
        row = await db.fetchrow("SELECT status, energy_kwh, latitude, longitude FROM sessions")
        if row is not None and row["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert row is not None and (row["status"], row["energy_kwh"]) == ("completed", 9.5)
    assert (row["latitude"], row["longitude"]) == (51.3023, 0.40145)
    assert await db.fetchval("SELECT count(*) FROM sessions") == 1
