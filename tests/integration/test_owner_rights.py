"""`chargeshare owner export` and `owner remove --erase [--retract]`, real database and broker."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from service import handler, settle, topics
from service.adapters import accounts, partners
from service.config import Settings
from tests.integration.clikit import Stack, cli
from tests.leaks import coordinate_leaks

STATION = (51.302300, 0.401450)
HOME = (51.284700, 0.452300)
ELSEWHERE = (51.331900, 0.512700)
TOKEN = "fcm-token-" + "q7Zr" * 10
SECRET = b"test-location-secret-0123456789"
OWNER_TABLES = (
    "vehicles", "locations", "location_cells", "sessions", "session_events", "questions",
    "push_tokens",
)  # fmt: skip


@dataclass
class Driver:
    """One vehicle's messages fed straight to the service's handler and judged at once."""

    h: handler.Handler
    pool: asyncpg.Pool
    owner: str
    vid: str = "ev1"

    async def send(self, topic: str, payload: str) -> None:
        await self.h.handle(topic, payload.encode())

    async def settle(self) -> None:
        later = datetime.now(UTC) + timedelta(seconds=60)
        await settle.judge_due(self.pool, self.h.settings, self.h.secrets, later)

    async def metrics(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            await self.send(topics.metric(self.owner, self.vid, name), value)
        await self.settle()

    async def opt_in(self, nickname: str | None) -> None:
        body = json.dumps({"enabled": True, "nickname": nickname})
        await self.send(topics.optin(self.owner, self.vid), body)

    async def plug_in(self, where: tuple[float, float]) -> str | None:
        """Start charging at `where`; return the request id of the question asked, if any."""
        await self.metrics({
            "v.p.latitude": f"{where[0]:.6f}", "v.p.longitude": f"{where[1]:.6f}",
            "v.type": "RT", "v.c.type": "type2", "v.b.soc": "20", "v.c.kwh": "0",
            "v.c.state": "charging", "v.c.charging": "yes",
        })  # fmt: skip
        async with self.pool.acquire() as conn:
            rid: str | None = await conn.fetchval(
                "SELECT q.request_id FROM questions q JOIN sessions s ON s.id = q.session "
                "WHERE s.is_open AND q.state = 'pending' AND q.kind = 'share'"
            )
        return rid

    async def answer(self, request_id: str | None, choice: str, **extra: object) -> None:
        assert request_id is not None
        topic = topics.decision(self.owner, self.vid, request_id)
        await self.send(topic, json.dumps({"choice": choice, **extra}))

    async def finish_and_unplug(self) -> None:
        await self.metrics({"v.c.kwh": "21.4", "v.b.soc": "80", "v.c.state": "done",
                            "v.c.charging": "no"})  # fmt: skip
        await self.metrics({"v.c.state": "", "v.c.charging": "no"})


def settings_with_secret(base: Settings) -> Settings:
    return replace(base, location_secret=SECRET, webhook_allow_http_loopback=True)


@dataclass
class World:
    stack: Stack
    settings: Settings
    pool: asyncpg.Pool
    car: Driver
    nickname: str
    request_ids: list[str]


@pytest.fixture
async def world(stack: Stack) -> AsyncIterator[World]:
    """An owner with a shared, a `never`, and an asked session, and a partner with a webhook."""
    settings = settings_with_secret(stack.settings())
    pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    name = f"erin{secrets.token_hex(3)}"
    nickname = f"Nick{secrets.token_hex(3)}"
    async with pool.acquire() as conn:
        await accounts.add_owner(conn, settings, name, "pw-" + secrets.token_hex(4))
        await partners.add(conn, settings, "acme", "http://127.0.0.1:9/hook")
    car = Driver(handler.Handler(pool, settings), pool, name)
    await car.opt_in(nickname)
    reg = {"app_id": "phone", "platform": "fcm", "token": TOKEN}
    await car.send(topics.push(name, car.vid), json.dumps(reg))
    asked = []
    rid = await car.plug_in(STATION)
    asked.append(rid)
    await car.answer(rid, "once", charge_point="3", comment="behind the library", ocm_id=1234)
    await car.finish_and_unplug()
    rid = await car.plug_in(HOME)
    asked.append(rid)
    await car.answer(rid, "never")
    await car.finish_and_unplug()
    asked.append(await car.plug_in(ELSEWHERE))  # left open: still asking
    yield World(stack, settings, pool, car, nickname, [r for r in asked if r])
    await pool.close()


async def table_texts(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Return every row of every table in the schema, as text."""
    tables = [
        r["table_name"]
        for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
    ]
    return {
        t: [r["t"] for r in await conn.fetch(f'SELECT t::text AS t FROM "{t}" t')] for t in tables
    }


async def test_export_shows_everything_stored_with_tokens_masked(world: World) -> None:
    """Export lists vehicle, places (coordinates only where shared), sessions, answers, pushes."""
    name = world.car.owner
    status, out, err = await cli(world.stack, "owner", "export", name, "--json")
    assert status == 0, err
    data = json.loads(out)
    assert data["owner"] == name
    [v] = data["vehicles"]
    assert (v["vehicle_id"], v["opted_in"], v["nickname"]) == ("ev1", True, world.nickname)
    assert v["last_position"] == "stored encrypted"
    places = {p["answer"]: p for p in v["places"]}
    assert len(v["places"]) == 3 and places["never"]["keyed_hashes"] == 1
    shared = [p for p in v["places"] if "latitude" in p]
    assert [(p["latitude"], p["longitude"]) for p in shared] == [STATION]
    assert [s["share"] for s in v["sessions"]] == ["shared", "unshared", "asking"]
    answers = [q["answer"] for s in v["sessions"] for q in s["questions"] if q["kind"] == "share"]
    assert answers == ["once", "never", None]
    assert [p["event_type"] for p in v["sessions"][0]["published"]] == [
        "session.started", "session.completed",
    ]  # fmt: skip
    assert v["sessions"][0]["comment"] == "behind the library"
    [reg] = v["push_registrations"]
    assert reg["app_id"] == "phone" and reg["token"] != TOKEN and TOKEN not in out
    assert coordinate_leaks(out, HOME) == []
    # Without --json the same data, indented for a person.
    status, pretty, _ = await cli(world.stack, "owner", "export", name)
    assert status == 0 and json.loads(pretty) == data


async def test_export_of_unknown_owner_fails(stack: Stack) -> None:
    """Exporting an owner that does not exist exits 1 with a one-line reason."""
    status, out, err = await cli(stack, "owner", "export", "nobody")
    assert (status, out) == (1, "") and "no owner named 'nobody'" in err


async def _erase_leaves_nothing(world: World, *flags: str) -> dict[str, list[str]]:
    """Erase the owner; check table by table that nothing identifies them; return the tables."""
    name, nickname = world.car.owner, world.nickname
    async with world.pool.acquire() as conn:
        before = {t: len(rows) for t, rows in (await table_texts(conn)).items()}
        sessions = [str(r["id"]) for r in await conn.fetch("SELECT id FROM sessions ORDER BY 1")]
        private = await conn.fetch("SELECT id FROM sessions WHERE version = 0")
        salt = (await conn.fetchval("SELECT salt FROM vehicles")).hex()
    assert all(before[t] > 0 for t in OWNER_TABLES), before
    status, out, err = await cli(world.stack, "owner", "remove", name, "--erase", *flags, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["name"] == name and result["erased"] is True
    needles = [name, nickname, TOKEN, salt, *world.request_ids, *(str(r["id"]) for r in private)]
    places = (HOME, ELSEWHERE)
    async with world.pool.acquire() as conn:
        tables = await table_texts(conn)
        clears = await conn.fetch("SELECT topic, payload, retain FROM outbox WHERE kind = 'mqtt'")
    for table in (*OWNER_TABLES, "owners"):
        assert tables[table] == [], table
    for table, rows in tables.items():
        for text in rows:
            if table == "outbox" and f"ovms/{name}/" in text:
                continue  # a retained message being cleared on the broker: checked below
            hits = [n for n in needles if n in text]
            hits += [leak for place in places for leak in coordinate_leaks(text, place)]
            assert hits == [], f"{table}: {hits} in {text[:300]}"
    owner_rows = [c for c in clears if c["topic"].startswith(f"ovms/{name}/")]
    assert owner_rows and all(c["payload"] == b"" and c["retain"] for c in owner_rows)
    cleared = {c["topic"] for c in owner_rows}
    assert topics.status(name, "ev1") in cleared and topics.optin(name, "ev1") in cleared
    assert topics.request(name, "ev1", world.request_ids[-1]) in cleared
    assert sessions  # the published session stays public, anonymised: checked by the callers
    return tables


async def test_erase_deletes_everything_and_anonymises_what_was_published(world: World) -> None:
    """--erase leaves no row of the owner, and every published version reads `anonymous`."""
    await _erase_leaves_nothing(world)
    async with world.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT version, event_type, record::text AS r FROM publications ORDER BY version"
        )
        queued = await conn.fetch(
            "SELECT payload FROM outbox WHERE kind IN ('webhook', 'mqtt') AND length(payload) > 0"
        )
    assert [(r["version"], r["event_type"]) for r in rows] == [
        (1, "session.started"), (2, "session.completed"), (3, "session.updated"),
    ]  # fmt: skip
    for r in rows:
        rec = json.loads(r["r"])
        assert rec["contributor"] == "anonymous"
        assert (rec["latitude"], rec["longitude"]) == (51.3023, 0.40145)  # still shared
    assert len(queued) == 6  # three versions, each to MQTT and to the webhook
    assert all(json.loads(q["payload"])["session"]["contributor"] == "anonymous" for q in queued)


async def test_erase_with_retract_retracts_every_version(world: World) -> None:
    """--erase --retract: the published session is retracted; no stored version keeps its place."""
    await _erase_leaves_nothing(world, "--retract")
    async with world.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT version, event_type, record::text AS r FROM publications ORDER BY version"
        )
        queued = await conn.fetch(
            "SELECT payload FROM outbox WHERE kind IN ('webhook', 'mqtt') AND length(payload) > 0"
        )
        dump = "\n".join(r for rows_ in (await table_texts(conn)).values() for r in rows_)
    assert rows[-1]["event_type"] == "session.retracted" and len(rows) == 3
    bodies = [json.loads(r["r"]) for r in rows]
    bodies += [json.loads(q["payload"])["session"] for q in queued]
    for rec in bodies:
        assert rec["status"] == "retracted" and rec["contributor"] == "anonymous"
        assert rec["latitude"] is rec["longitude"] is rec["station"] is None
        assert rec["charge_point"] is rec["comment"] is None
    assert coordinate_leaks(dump, STATION) == []
    assert "behind the library" not in dump


async def test_retract_without_erase_is_refused(world: World) -> None:
    """`--retract` alone exits 1 and changes nothing."""
    status, out, err = await cli(world.stack, "owner", "remove", world.car.owner, "--retract")
    assert (status, out) == (1, "") and "--erase" in err
    async with world.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM vehicles") == 1


async def test_plain_remove_keeps_publications_as_published(world: World) -> None:
    """Without --erase the account and its rows go, but what was published stays unchanged."""
    status, out, err = await cli(world.stack, "owner", "remove", world.car.owner, "--json")
    assert status == 0, err
    assert json.loads(out) == {"name": world.car.owner, "removed": True, "erased": False}
    async with world.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sessions") == 0
        contributors = await conn.fetch("SELECT record ->> 'contributor' AS c FROM publications")
    assert [r["c"] for r in contributors] == [world.nickname] * 2
