"""The RFC's story end to end: vehicle → broker → service → Postgres → partner topic."""

from __future__ import annotations

import json
from collections.abc import Callable

import asyncpg

from service import app, topics
from tests.e2e.steps import STATION, metrics, plug_in, public
from tests.e2e.steps import question as questions
from tests.mqttprobe import Probe


async def test_jimbo_story(
    service: app.Service,
    owner: tuple[str, str],
    probe: Callable[[str, str], Probe],
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """Opt in, new place, answer always, breaker trips, abort reason: the partner sees it all."""
    name, password = owner
    vid = "jimbo-rt"
    car = probe(name, password)
    phone = probe(name, password)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    phone.publish(topics.optin(name, vid), json.dumps({"enabled": True, "nickname": "Jimbo"}),
                  retain=True)  # fmt: skip
    await phone.wait_for(lambda s: s.topic.endswith("/status") and b'"enabled":true' in s.payload)

    plug_in(car, name, vid, STATION)
    asked = (await phone.wait_for(questions("share")))[0]
    question = json.loads(asked.payload)
    assert question["session"]["latitude"] == STATION[0]
    phone.publish(topics.decision(name, vid, question["request_id"]), '{"choice": "always"}')

    started = (await partner.wait_for(public("session.started")))[0]
    record = json.loads(started.payload)["session"]
    assert record["contributor"] == "Jimbo"
    assert record["license"] == "CC0-1.0"
    assert record["connector"] == "type2"
    assert started.topic == "chargeshare/public/sessions/u/1/0"
    assert vid not in started.payload.decode() and name not in started.payload.decode()

    metrics(car, name, vid, {"v.c.kwh": "11.5", "v.b.soc": "48"})
    metrics(car, name, vid, {"v.c.state": "stopped", "v.c.substate": "interrupted",
                              "v.c.charging": "no"})  # fmt: skip
    interrupted = (await partner.wait_for(public("session.interrupted")))[0]
    rec = json.loads(interrupted.payload)["session"]
    assert rec["status"] == "interrupted" and rec["energy_kwh"] == 11.5
    assert rec["version"] > record["version"]

    abort_q = json.loads((await phone.wait_for(questions("abort_reason")))[0].payload)
    phone.publish(topics.decision(name, vid, abort_q["request_id"]), '{"choice": "station_fault"}')
    updated = (await partner.wait_for(public("session.updated")))[0]
    assert json.loads(updated.payload)["session"]["cause"] == "station_fault"

    rows = await db.fetch("SELECT status, share, cause FROM sessions")
    assert [tuple(r) for r in rows] == [("interrupted", "shared", "station_fault")]
