"""Privacy end to end: what a database dump and the public feed hold, retraction, erasure, keys."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service import app, handler, localstack, retention, settle, topics
from service.adapters import owners, partners
from service.config import Settings
from service.domain import privacy
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.e2e.test_scenarios import _pg_dump
from tests.integration.test_owner_rights import Driver
from tests.leaks import coordinate_leaks
from tests.mqttprobe import Probe

Make = Callable[[str, str], Probe]
Where = tuple[float, float]

STATION = steps.STATION  # `always`: the positive control, its place is public
HOME = steps.HOME  # never
NEAR_HOME = (HOME[0] + 30 / 111_320, HOME[1])
PLACE_B = (51.260130, 0.520310)  # not_once
PLACE_C = (51.341040, 0.350470)  # question expires
PLACE_D = (51.315020, 0.479030)  # once, later never: retracted


leaks = coordinate_leaks


# ---- the public side: an MQTT partner, a webhook receiver and the pull API ---------------------


@dataclass
class Hooks:
    """A webhook receiver on loopback that accepts everything."""

    events: list[dict[str, Any]] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.events.append(json.loads(body))
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"


@dataclass
class Public:
    svc: app.Service
    partner: Probe
    hooks: Hooks
    api: httpx.AsyncClient

    async def feed(self) -> list[dict[str, Any]]:
        """Return the whole pull feed from its start."""
        records: list[dict[str, Any]] = []
        since = None
        while True:
            params = {"limit": "1000", **({"since": since} if since else {})}
            page = (await self.api.get("/v1/sessions", params=params)).json()
            if not page["data"]:
                return records
            records += page["data"]
            since = page["next"]

    async def latest(self, session_id: str) -> dict[str, Any]:
        got: dict[str, Any] = (await self.api.get(f"/v1/sessions/{session_id}")).json()
        return got

    async def delivered(self, db: asyncpg.Connection) -> None:
        """Wait until every publication reached the webhook and the outbox is empty."""
        for _ in range(400):
            n = await db.fetchval("SELECT count(*) FROM publications")
            left = await db.fetchval("SELECT count(*) FROM outbox")
            if left == 0 and len(self.hooks.events) >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("outbox not drained")


@pytest.fixture
async def public(
    broker: BrokerHandle, database_url: str, partner: Probe, tmp_path: Path
) -> AsyncIterator[Public]:
    """The service with its API, a webhook partner, and an MQTT partner on chargeshare/public/#."""
    hooks = Hooks()
    hooks.server = await asyncio.start_server(hooks.serve, "127.0.0.1", 0)
    settings = service_settings(
        broker, database_url, api_port=localstack.free_port(), webhook_allow_http_loopback=True
    )
    conn = await asyncpg.connect(database_url)
    try:
        signup = replace(settings, broker_dir=tmp_path / "broker")
        (tmp_path / "broker").mkdir()
        creds = await partners.add(conn, signup, "acme", hooks.url)
    finally:
        await conn.close()
    async with app.running(settings) as svc:
        url = f"http://127.0.0.1:{settings.api_port}"
        headers = {"authorization": f"Bearer {creds.api_key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            yield Public(svc, partner, hooks, client)
    hooks.server.close()


# ---- a vehicle and its owner's app over the broker --------------------------------------------


async def until(db: asyncpg.Connection, sql: str, want: object, *args: object) -> None:
    got = None
    for _ in range(300):
        got = await db.fetchval(sql, *args)
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sql!r} gave {got!r}, wanted {want!r}")


@dataclass
class Owner:
    name: str
    car: Probe
    phone: Probe
    db: asyncpg.Connection
    vid: str = "ev1"
    asked: int = 0
    charges: int = 0

    async def plug_in(self, where: Where, *, asked: bool) -> str | None:
        """Start a charge; return the request id of the question it raised, if `asked`."""
        steps.plug_in(self.car, self.name, self.vid, where)
        self.charges += 1
        await until(self.db, "SELECT count(*) FROM sessions", self.charges)
        if not asked:
            return None
        self.asked += 1
        seen = await self.phone.wait_for(steps.question("share"), count=self.asked)
        return str(steps.body(seen[-1])["request_id"])

    async def answer(self, request_id: str | None, choice: str, **extra: object) -> None:
        assert request_id is not None
        steps.answer(self.phone, self.name, self.vid, request_id, choice, **extra)
        sql = "SELECT state FROM questions WHERE request_id = $1"
        await until(self.db, sql, "answered", request_id)

    async def done(self) -> None:
        steps.finish(self.car, self.name, self.vid)
        await until(self.db, "SELECT count(*) FROM sessions WHERE is_open", 0)
        steps.unplug(self.car, self.name, self.vid)
        await until(self.db, "SELECT phase FROM vehicles", "idle")

    async def charge(self, where: Where, choice: str | None, **extra: object) -> None:
        rid = await self.plug_in(where, asked=choice is not None)
        if choice is not None:
            await self.answer(rid, choice, **extra)
        await self.done()


@pytest.fixture
async def jo(owner: tuple[str, str], probe: Make, db: asyncpg.Connection) -> Owner:
    """An owner whose app listens to its ChargeShare topics, opted in without a nickname."""
    name, pw = owner
    o = Owner(name, probe(name, pw), probe(name, pw), db)
    o.phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    steps.opt_in(o.phone, name, o.vid, nickname=None)
    await o.phone.wait_for(steps.status(enabled=True))
    return o


# ---- tests ------------------------------------------------------------------------------------


async def test_dump_and_public_feed_hold_no_unshared_place(
    public: Public, jo: Owner, db: asyncpg.Connection, database_url: str
) -> None:
    """After never, not_once, expiry and retraction, no dump or feed holds those places."""
    await jo.charge(STATION, "always")
    await jo.charge(HOME, "never")
    await jo.charge(NEAR_HOME, None)  # the same place: `never` holds, nothing asked
    await jo.charge(PLACE_B, "not_once")
    await jo.charge(PLACE_D, "once", charge_point="7", comment="by the gate", ocm_id=4321)
    await jo.charge(PLACE_D, "never")  # retracts the session shared once here
    await jo.charge(STATION, None)  # `always`: shared without a question
    await jo.plug_in(PLACE_C, asked=True)
    await settle.expire_due(public.svc.pool, public.svc.settings, datetime.now(UTC) + timedelta(8))
    await until(db, "SELECT share FROM sessions WHERE is_open", "unshared")
    await jo.done()
    await public.partner.wait_for(steps.public("session.retracted"))
    await public.delivered(db)

    dump = await _pg_dump(database_url)
    feed = await public.feed()
    pulled = json.dumps(feed) + json.dumps([await public.latest(r["id"]) for r in feed])
    pushed = json.dumps(public.hooks.events)
    mqtt = "\n".join(m.payload.decode() for m in public.partner.messages())
    for where in (HOME, NEAR_HOME, PLACE_B, PLACE_C):
        for name, text in (("dump", dump), ("pull", pulled), ("webhooks", pushed), ("mqtt", mqtt)):
            assert leaks(text, where) == [], f"{where} in {name}"
    # PLACE_D was public until retracted: it stays only in what partners received back then.
    for name, text in (("dump", dump), ("pull", pulled)):
        assert leaks(text, PLACE_D) == [], f"retracted {PLACE_D} in {name}"
    # The check does find a shared place, in the feed and in the dump.
    assert leaks(pulled, STATION) and leaks(mqtt, STATION) and leaks(dump, STATION)

    # Unlinkable: nothing in the feed names the vehicle or its owner, or ties two sessions.
    salt = (await db.fetchval("SELECT salt FROM vehicles")).hex()
    handle = await db.fetchval("SELECT handle FROM vehicles")
    for text in (pulled, pushed, mqtt):
        for secret in (jo.name, jo.vid, handle, salt):
            assert secret not in text
    station = [r for r in feed if r["latitude"] == round(STATION[0], 5)]
    first, second = (max((r for r in station if r["id"] == i), key=lambda r: r["version"])
                     for i in dict.fromkeys(r["id"] for r in station))  # fmt: skip
    same = {k for k in first if first[k] == second[k]}
    assert same <= {"status", "cause", "contributor", "vehicle_type", "connector",
                    "ocm_connection_type_id", "latitude", "longitude", "station", "charge_point",
                    "energy_kwh", "max_power_kw", "max_voltage", "max_current", "soc_start",
                    "soc_end", "comment", "license", "version"}  # fmt: skip
    assert first["contributor"] == second["contributor"] == "anonymous"


async def test_never_retracts_on_mqtt_webhooks_and_pull(
    public: Public, jo: Owner, db: asyncpg.Connection
) -> None:
    """`never` where a session was shared `once` retracts it on MQTT, webhooks and the pull API."""
    await jo.charge(PLACE_D, "once", charge_point="7", comment="by the gate", ocm_id=4321)
    done = steps.body((await public.partner.wait_for(steps.public("session.completed")))[0])
    session_id = done["session"]["id"]  # type: ignore[index]
    await jo.charge(PLACE_D, "never")
    gone = steps.body((await public.partner.wait_for(steps.public("session.retracted")))[0])
    await public.delivered(db)
    hooked = [e for e in public.hooks.events if e["type"] == "session.retracted"]
    latest = await public.latest(session_id)
    feed = [r for r in await public.feed() if r["id"] == session_id]
    assert [r["version"] for r in feed] == [1, 2, 3]
    for rec in (gone["session"], hooked[0]["session"], latest, *feed):
        assert rec["id"] == session_id and rec["status"] == "retracted"
        for key in ("latitude", "longitude", "station", "charge_point", "comment"):
            assert rec[key] is None, key
    assert latest["version"] == 3 and len(hooked) == 1


async def test_erase_anonymises_what_partners_hold(
    public: Public, jo: Owner, db: asyncpg.Connection, probe: Make, owner: tuple[str, str]
) -> None:
    """Erasing a nicknamed owner publishes `anonymous` versions and clears their retained topics."""
    steps.opt_in(jo.phone, jo.name, jo.vid, nickname="Jimbo")
    await jo.phone.wait_for(steps.status(handle="Jimbo"))
    await jo.charge(STATION, "once")
    await jo.plug_in(HOME, asked=True)  # an open question, retained for the owner's apps
    await public.partner.wait_for(steps.public("session.completed"))
    async with public.svc.pool.acquire() as conn, conn.transaction():
        now = datetime.now(UTC)
        got = await owners.erase(conn, public.svc.settings, jo.name, retract=False, now=now)
        await conn.execute("DELETE FROM owners WHERE name = $1", jo.name)
    assert (got.anonymised, got.retracted) == (1, 0)
    updated = steps.body((await public.partner.wait_for(steps.public("session.updated")))[0])
    assert updated["session"]["contributor"] == "anonymous"  # type: ignore[index]
    await public.delivered(db)
    assert public.hooks.events[-1]["session"]["contributor"] == "anonymous"
    feed = await public.feed()
    assert [r["version"] for r in feed] == [1, 2, 3]
    assert {r["contributor"] for r in feed} == {"anonymous"}
    # A new app of the owner finds nothing retained: no status, no question, no opt-in.
    late = probe(*owner)
    late.subscribe(f"ovms/{jo.name}/+/chargeshare/#")
    await asyncio.sleep(0.5)
    assert [m.topic for m in late.messages() if m.payload] == []
    assert await db.fetchval("SELECT count(*) FROM vehicles") == 0


def _moved(where: Where, north_m: float, east_m: float) -> Where:
    lat = where[0] + north_m / 111_320
    return lat, where[1] + east_m / (111_320 * math.cos(math.radians(lat)))


OLD_KEY = b"old-location-secret-0123456789"
NEW_KEY = b"new-location-secret-9876543210"


async def test_geofence_holds_across_a_key_rotation(
    database_url: str, db: asyncpg.Connection
) -> None:
    """After a key rotation fixes within the fence still find a place and farther ones do not."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        first = Settings(database_url=database_url, location_secret=OLD_KEY)
        car = Driver(handler.Handler(pool, first), pool, "rotor")
        await car.opt_in("R")
        await car.answer(await car.plug_in(HOME), "never")
        await car.finish_and_unplug()

        rotated = replace(first, location_secret=NEW_KEY, location_secret_previous=OLD_KEY)
        car.h = handler.Handler(pool, rotated)
        assert await car.plug_in(_moved(HOME, 0, 70)) is None  # found under the old key
        await car.finish_and_unplug()
        keys = {r["key_id"] for r in await db.fetch("SELECT key_id FROM location_cells")}
        assert keys == {privacy.key_id(NEW_KEY)}
        assert (
            await retention.purge(pool, rotated, datetime.now(UTC))
        ).places_under_previous_key == 0

        car.h = handler.Handler(pool, replace(rotated, location_secret_previous=None))
        for north, east in ((60, 0), (0, -70), (-50, 50)):
            assert await car.plug_in(_moved(HOME, north, east)) is None, (north, east)
            await car.finish_and_unplug()
        assert await car.plug_in(_moved(HOME, -200, 0)) is not None  # beyond the fence: asked
        assert await db.fetchval("SELECT count(*) FROM locations") == 2
    finally:
        await pool.close()


async def test_retention_deletes_old_unshared_history_only(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Past the retention period unshared sessions and idle places go; shared sessions stay."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        settings = Settings(
            database_url=database_url, location_secret=NEW_KEY, unshared_retention_days=30
        )
        car = Driver(handler.Handler(pool, settings), pool, "keeper")
        await car.opt_in("K")
        await car.answer(await car.plug_in(STATION), "always")
        await car.finish_and_unplug()
        await car.answer(await car.plug_in(PLACE_B), "not_once")
        await car.finish_and_unplug()
        await car.send(topics.optin("keeper", car.vid), '{"enabled": false}')
        assert await car.plug_in(PLACE_C) is None  # opted out: private
        await car.finish_and_unplug()
        now = datetime.now(UTC)

        assert await retention.purge(pool, settings, now) == retention.Purged()
        later = await retention.purge(pool, settings, now + timedelta(days=31))
        assert (later.sessions, later.places, later.stray_coordinates) == (2, 2, 0)
        rows = await db.fetch("SELECT share, location FROM sessions")
        assert [tuple(r) for r in rows] == [("shared", None)]
        assert await db.fetchval("SELECT count(*) FROM location_cells") == 0
        orphans = await db.fetchval(
            "SELECT (SELECT count(*) FROM questions) + (SELECT count(*) FROM session_events "
            "WHERE session NOT IN (SELECT id FROM sessions))"
        )
        assert orphans == 1  # the shared session's `always` answer, nothing of the others
        other_key = replace(settings, location_secret=OLD_KEY)
        await car.opt_in("K")
        await car.answer(await car.plug_in(HOME), "never")
        assert (await retention.purge(pool, other_key, now)).places_under_previous_key == 1
    finally:
        await pool.close()
