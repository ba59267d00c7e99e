"""Two service replicas on one shared subscription detect every session exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg

from service import app
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.mqttprobe import Probe

VEHICLES = 12


async def _answer_all(phone: Probe, owner: str, stop: asyncio.Event) -> None:
    """Answer every share question `always` and every abort question `station_fault`."""
    done: set[str] = set()
    while not stop.is_set():
        for seen in phone.messages(
            lambda s: "/chargeshare/request/" in s.topic and bool(s.payload)
        ):
            q = json.loads(seen.payload)
            if q["request_id"] in done:
                continue
            done.add(q["request_id"])
            vid = seen.topic.split("/")[2]
            choice = "always" if q["kind"] == "share" else "station_fault"
            steps.answer(phone, owner, vid, q["request_id"], choice)
        await asyncio.sleep(0.05)


async def test_two_replicas_share_the_work_and_detect_each_session_once(
    broker: BrokerHandle,
    database_url: str,
    owner: tuple[str, str],
    probe: Callable[[str, str], Probe],
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """Every vehicle's charge is one session with its place, energy and result, published once."""
    name, pw = owner
    a = service_settings(broker, database_url)
    b = service_settings(
        broker, database_url, client_id=a.client_id + "-b", share_group=a.share_group
    )
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/request/+")
    stop = asyncio.Event()
    async with app.running(a, api_enabled=False) as one, app.running(b, api_enabled=False) as two:
        handled = {"one": 0, "two": 0}
        for label, svc in (("one", one), ("two", two)):
            real = svc.handler.handle

            async def counted(
                *args: object, _real: object = real, _label: str = label, **kw: object
            ) -> None:
                handled[_label] += 1
                await _real(*args, **kw)  # type: ignore[operator]

            svc.handler.handle = counted  # type: ignore[method-assign]
        answering = asyncio.create_task(_answer_all(phone, name, stop))
        expected = {}
        for i in range(VEHICLES):
            vid = f"car{i}"
            where = (round(51.30 + i * 0.01, 6), round(0.40 + i * 0.01, 6))
            steps.opt_in(phone, name, vid)
            steps.plug_in(car, name, vid, where)
            expected[vid] = (where, "interrupted" if i % 3 == 0 else "completed", 10.0 + i)
        await partner.wait_for(steps.public("session.started"), count=VEHICLES, timeout=30)
        for i in range(VEHICLES):
            vid = f"car{i}"
            steps.metrics(car, name, vid, {"v.c.kwh": str(10.0 + i)})
            if i % 3 == 0:
                abort = {"v.c.state": "stopped", "v.c.substate": "interrupted"}
                steps.metrics(car, name, vid, {**abort, "v.c.charging": "no"})
            else:
                steps.finish(car, name, vid, kwh=str(10.0 + i))
        n_interrupted = len([v for v in expected.values() if v[1] == "interrupted"])
        await partner.wait_for(steps.public("session.updated"), count=n_interrupted, timeout=30)
        await partner.wait_for(
            steps.public("session.completed"), count=VEHICLES - n_interrupted, timeout=30
        )
        stop.set()
        await answering
        assert handled["one"] > 0 and handled["two"] > 0, handled  # both replicas did work

    rows = await db.fetch(
        "SELECT v.vehicle_id, s.status, s.energy_kwh, s.latitude, s.longitude, s.cause"
        " FROM sessions s JOIN vehicles v ON v.id = s.vehicle WHERE v.owner = $1",
        name,
    )
    assert len(rows) == VEHICLES
    for r in rows:
        where, status, kwh = expected[r["vehicle_id"]]
        assert (r["status"], r["energy_kwh"]) == (status, kwh)
        assert (r["latitude"], r["longitude"]) == where
        assert r["cause"] == ("station_fault" if status == "interrupted" else None)
    started = partner.messages(steps.public("session.started"))
    ids = [json.loads(s.payload)["session"]["id"] for s in started]
    assert len(ids) == len(set(ids)) == VEHICLES
