"""Charge scenarios through the real broker, service and database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg

from service import app, topics
from tests.e2e import steps
from tests.e2e.steps import HOME, STATION
from tests.leaks import coordinate_leaks
from tests.mqttprobe import Probe

Make = Callable[[str, str], Probe]


async def _settled(db: asyncpg.Connection, sql: str, want: object, timeout: float = 10.0) -> None:
    """Wait until a query returns `want` (the service works asynchronously)."""
    got = None
    for _ in range(int(timeout / 0.05)):
        got = await db.fetchval(sql)
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sql!r} gave {got!r}, wanted {want!r}")


async def test_opted_out_vehicle_is_never_asked_or_published(
    service: app.Service,
    owner: tuple[str, str],
    probe: Make,
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """A vehicle that never opted in charges: no question, nothing public, no place stored."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    steps.plug_in(car, name, "ev1", STATION)
    await _settled(db, "SELECT count(*) FROM sessions", 1)
    steps.finish(car, name, "ev1")
    await _settled(db, "SELECT status FROM sessions", "completed")
    await asyncio.sleep(0.5)
    assert partner.messages() == []
    assert phone.messages(steps.question("share")) == []
    assert await db.fetchval("SELECT count(*) FROM locations") == 0
    row = await db.fetchrow("SELECT share, latitude FROM sessions")
    assert tuple(row) == ("private", None)


async def test_home_never_is_not_stored_and_still_matches(
    service: app.Service,
    owner: tuple[str, str],
    probe: Make,
    partner: Probe,
    db: asyncpg.Connection,
    postgres: object,
    database_url: str,
) -> None:
    """`never` at home: no coordinate in a pg_dump, 30 m away matches, 500 m away asks again."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    steps.opt_in(phone, name, "ev1")
    steps.plug_in(car, name, "ev1", HOME)
    q = steps.body((await phone.wait_for(steps.question("share")))[0])
    steps.answer(phone, name, "ev1", str(q["request_id"]), "never")
    await _settled(db, "SELECT answer FROM locations", "never")
    steps.finish(car, name, "ev1")
    steps.unplug(car, name, "ev1")
    await _settled(db, "SELECT status FROM sessions", "completed")

    # 30 m north of home: the same place, already `never`: no question, nothing stored.
    near = (HOME[0] + 30 / 111_320, HOME[1])
    steps.plug_in(car, name, "ev1", near)
    await _settled(db, "SELECT count(*) FROM sessions", 2)
    await _settled(db, "SELECT count(*) FROM locations", 1)
    steps.finish(car, name, "ev1")
    steps.unplug(car, name, "ev1")
    await _settled(db, "SELECT count(*) FROM sessions WHERE status = 'completed'", 2)
    assert len(phone.messages(steps.question("share"))) == 1

    # 500 m east: a new place, so a new question.
    far = (HOME[0] + 350 / 111_320, HOME[1] + 350 / (111_320 * 0.6255))
    steps.plug_in(car, name, "ev1", far)
    await phone.wait_for(steps.question("share"), count=2)
    assert await db.fetchval("SELECT count(*) FROM locations") == 2
    assert partner.messages() == []

    dump = await _pg_dump(database_url)
    assert coordinate_leaks(dump, HOME) == []
    assert coordinate_leaks(dump, near) == []
    assert coordinate_leaks(dump, far) != []  # the open question's place is there: the check works


async def _pg_dump(url: str) -> str:
    from service import localstack

    exe = localstack.pg_bindir() / "pg_dump"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "--no-owner", url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode()


async def test_pauses_are_one_session(
    service: app.Service,
    owner: tuple[str, str],
    probe: Make,
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """timerwait, powerwait and heating inside one plug-in stitch into one published session."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    steps.opt_in(phone, name, "ev1")
    steps.plug_in(car, name, "ev1", STATION)
    q = steps.body((await phone.wait_for(steps.question("share")))[0])
    steps.answer(phone, name, "ev1", str(q["request_id"]), "always")
    await partner.wait_for(steps.public("session.started"))
    for pause in ("timerwait", "heating"):
        sub = "timerwait" if pause == "timerwait" else ""
        steps.metrics(car, name, "ev1", {"v.c.state": pause, "v.c.substate": sub,
                                         "v.c.charging": "no"})  # fmt: skip
        await asyncio.sleep(0.5)
        steps.metrics(car, name, "ev1", {"v.c.state": "charging", "v.c.substate": "",
                                         "v.c.charging": "yes"})  # fmt: skip
        await asyncio.sleep(0.5)
    steps.metrics(car, name, "ev1", {"v.c.substate": "powerwait", "v.c.charging": "no",
                                     "v.c.state": "stopped"})  # fmt: skip
    await asyncio.sleep(0.5)
    steps.metrics(car, name, "ev1", {"v.c.substate": "", "v.c.state": "charging",
                                     "v.c.charging": "yes"})  # fmt: skip
    await asyncio.sleep(0.5)
    steps.finish(car, name, "ev1")
    done = steps.body((await partner.wait_for(steps.public("session.completed")))[0])
    assert await db.fetchval("SELECT count(*) FROM sessions") == 1
    events = [r["event"] for r in await db.fetch("SELECT event FROM session_events ORDER BY id")]
    assert events.count("pause") == 3 and events.count("resume") == 3
    assert done["session"]["energy_kwh"] == 21.4  # type: ignore[index]
    assert len(partner.messages(steps.public("session.started"))) == 1


async def test_owner_stop_and_answer_after_completion(
    service: app.Service,
    owner: tuple[str, str],
    probe: Make,
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """Answered `once` after the owner stopped the charge: published completed, user cause."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    steps.opt_in(phone, name, "ev1", nickname=None)
    steps.plug_in(car, name, "ev1", STATION)
    q = steps.body((await phone.wait_for(steps.question("share")))[0])
    stop = {"v.c.kwh": "5", "v.c.state": "stopped", "v.c.substate": "onrequest"}
    steps.metrics(car, name, "ev1", {**stop, "v.c.charging": "no"})
    await _settled(db, "SELECT status FROM sessions", "stopped")
    assert partner.messages() == []
    steps.answer(phone, name, "ev1", str(q["request_id"]), "once", charge_point="3")
    done = steps.body((await partner.wait_for(steps.public("session.completed")))[0])
    record = done["session"]
    assert record["cause"] == "user_interrupted"  # type: ignore[index]
    assert record["contributor"] == "anonymous"  # type: ignore[index]
    assert record["charge_point"] == "3"  # type: ignore[index]
    assert partner.messages(steps.public("session.started")) == []
    # The question is cleared for every app: an empty retained message on its topic.
    await phone.wait_for(lambda s: s.topic.endswith(str(q["request_id"])) and s.payload == b"")


def _grid(state: str, substate: str, kwh: float, secs: int, where: tuple[float, float]) -> str:
    fields = [""] * 45
    fields[0], fields[1], fields[2] = "1", f"{where[0]:.6f}", f"{where[1]:.6f}"
    fields[5], fields[6], fields[7], fields[8] = "type2", state, substate, "standard"
    fields[19], fields[20], fields[27], fields[44] = str(secs), str(kwh), "55", "12345"
    return "*-LOG-Grid,2,3600," + ",".join(fields)


async def test_late_grid_log_is_placed_in_time_without_duplicates(
    service: app.Service,
    owner: tuple[str, str],
    probe: Make,
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """Grid records three hours late make one session at the right time, even when resent."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    steps.opt_in(phone, name, "ev1")
    age_start, age_end = -3 * 3600, -3 * 3600 + 1800
    start = _grid("charging", "", 0.0, 0, STATION)
    end = _grid("done", "", 14.2, 1800, STATION)
    for entry, (rec, age) in enumerate([(start, age_start), (end, age_end)] * 2, start=1):
        car.publish(topics.grid_log(name, "ev1", entry, age), rec, qos=2)
    await _settled(db, "SELECT count(*) FROM sessions WHERE status = 'completed'", 1)
    await asyncio.sleep(0.5)
    row = await db.fetchrow(
        "SELECT count(*) OVER () AS n, started_at, ended_at, energy_kwh, source,"
        " extract(epoch FROM now() - started_at) AS ago FROM sessions"
    )
    assert row["n"] == 1 and row["source"] == "gridlog" and row["energy_kwh"] == 14.2
    assert 3 * 3600 - 60 < row["ago"] < 3 * 3600 + 60
    assert abs((row["ended_at"] - row["started_at"]).total_seconds() - 1800) < 5


async def test_grid_log_and_metrics_of_one_charge_make_one_session(
    service: app.Service, owner: tuple[str, str], probe: Make, db: asyncpg.Connection
) -> None:
    """A charge reported by both the metric stream and grid records is one session."""
    name, pw = owner
    car = probe(name, pw)
    steps.plug_in(car, name, "ev1", STATION)
    car.publish(topics.grid_log(name, "ev1", 1, 0), _grid("charging", "", 0, 0, STATION), qos=2)
    await _settled(db, "SELECT count(*) FROM sessions", 1)
    await asyncio.sleep(0.5)
    steps.finish(car, name, "ev1")
    car.publish(topics.grid_log(name, "ev1", 2, 0), _grid("done", "", 21.4, 600, STATION), qos=2)
    await _settled(db, "SELECT count(*) FROM sessions WHERE status = 'completed'", 1)
    await asyncio.sleep(0.5)
    assert await db.fetchval("SELECT count(*) FROM sessions") == 1


async def test_bad_messages_get_clear_errors_and_do_not_stop_the_service(
    service: app.Service, owner: tuple[str, str], probe: Make, db: asyncpg.Connection
) -> None:
    """Malformed payloads, unknown requests, wrong choices and repeats are each answered."""
    name, pw = owner
    car, phone = probe(name, pw), probe(name, pw)
    phone.subscribe(f"ovms/{name}/+/chargeshare/error")
    rid = "0" * 32
    phone.publish(topics.optin(name, "ev1"), b"{not json")
    await phone.wait_for(steps.error("invalid_payload"))
    phone.publish(topics.decision(name, "ghost", rid), '{"choice": "always"}')
    await phone.wait_for(steps.error("unknown_vehicle"))
    phone.publish(topics.push(name, "ev1"), '{"app_id": "a", "platform": "pager", "token": "t"}')
    await phone.wait_for(steps.error("invalid_payload"), count=2)
    phone.publish(f"ovms/{name}/ev1/chargeshare/decision/not-an-id", '{"choice": "always"}')
    await phone.wait_for(steps.error("invalid_topic"))
    car.publish(topics.metric(name, "ev1", "v.c.charging"), "maybe", qos=0)
    await phone.wait_for(steps.error("invalid_payload"), count=3)

    # A real question, then a wrong choice, an unknown request, the answer, and a repeat.
    steps.opt_in(phone, name, "ev1")
    phone.subscribe(f"ovms/{name}/+/chargeshare/request/+")
    steps.plug_in(car, name, "ev1", STATION)
    q = steps.body((await phone.wait_for(steps.question("share")))[0])
    request_id = str(q["request_id"])
    steps.answer(phone, name, "ev1", request_id, "station_fault")
    await phone.wait_for(steps.error("invalid_choice"))
    steps.answer(phone, name, "ev1", rid, "always")
    await phone.wait_for(steps.error("unknown_request"))
    steps.answer(phone, name, "ev1", request_id, "once")
    steps.answer(phone, name, "ev1", request_id, "always")
    err = steps.body((await phone.wait_for(steps.error("already_answered")))[0])
    assert err["topic"] == topics.decision(name, "ev1", request_id)
    assert await db.fetchval("SELECT answer FROM questions") == "once"
    # Still working: the charge completes and the question count drops to zero.
    steps.finish(car, name, "ev1")
    await _settled(db, "SELECT status FROM sessions", "completed")


async def test_questions_are_retained_until_answered_and_expire(
    broker: object,
    database_url: str,
    owner: tuple[str, str],
    probe: Make,
    db: asyncpg.Connection,
) -> None:
    """An app connecting later gets the open question; after expiry it is cleared and unshared."""
    from tests.e2e.conftest import service_settings

    name, pw = owner
    settings = service_settings(broker, database_url, question_ttl_s=2)  # type: ignore[arg-type]
    async with app.running(settings, api_enabled=False):
        car, phone = probe(name, pw), probe(name, pw)
        steps.opt_in(phone, name, "ev1")
        steps.plug_in(car, name, "ev1", STATION)
        await _settled(db, "SELECT count(*) FROM questions WHERE state = 'pending'", 1)
        late = probe(name, pw)
        late.subscribe(f"ovms/{name}/+/chargeshare/request/+")
        q = steps.body((await late.wait_for(steps.question("share")))[0])
        await late.wait_for(lambda s: s.payload == b"" and s.topic.endswith(str(q["request_id"])))
        await _settled(db, "SELECT share FROM sessions", "unshared")
        assert await db.fetchval("SELECT state FROM questions") == "expired"
        assert await db.fetchval("SELECT latitude FROM sessions") is None
        later = probe(name, pw)
        later.subscribe(f"ovms/{name}/+/chargeshare/request/+")
        await asyncio.sleep(0.5)
        assert later.messages(steps.question("share")) == []
        later.subscribe(f"ovms/{name}/+/chargeshare/status")
        status = json.loads(
            (await later.wait_for(lambda s: s.topic.endswith("/status")))[-1].payload
        )
        assert status == {"enabled": True, "handle": "Jimbo", "pending": 0}
