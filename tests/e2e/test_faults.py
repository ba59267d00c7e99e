"""Faults under load: a replica killed, the broker and Postgres restarted, a partner down.

Real processes throughout: Mosquitto and a Postgres cluster of this test's own, two
`chargeshare serve` replicas on one shared subscription, a fleet of simulated vehicles playing
brief stories, the owner's app answering every question, a partner listening on MQTT with a
persistent session and receiving signed webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.console import Console
from structlog.testing import capture_logs

from firmware_sim.app import OwnerApp, Policy
from firmware_sim.fleet import Fleet
from firmware_sim.partner import PartnerListener
from service import handler, outbox, settle
from service.adapters import schema
from service.config import Settings
from service.errors import TRANSIENT
from tests.e2e import faultkit

VEHICLES = 200
SPEED = 0.2  # one firmware tick of 10 s every 2 s
# Every brief story, pauses included: a pause that spans the broker restart resumes right after
# the vehicle reconnects; with one metrics consumer at a time (service/adapters/leader.py) its
# re-sent metrics and the resume cannot be applied out of order by two replicas.
MIX = {"brief-completed": 3, "brief-interrupted": 2, "brief-paused": 2, "brief-owner-stop": 2}
START_SPREAD_S = 30.0  # firmware seconds over which the first plug-ins are spread
ENERGY_TOLERANCE_KWH = 0.3  # about two ticks of the fastest charger: a lost metric is no error
QUIET_TIMEOUT_S = 90.0

FAULT_LINES = {
    "database": (
        "database unavailable; message not acked yet",
        "settle round failed; will retry",
        "outbox lease failed; will retry",
        "outbox update failed",
    ),
}


@dataclass
class Timeline:
    """When each fault happened, for the explanation file."""

    started: float
    marks: list[tuple[float, str]]

    def mark(self, what: str) -> None:
        self.marks.append((time.monotonic() - self.started, what))

    def text(self) -> str:
        return "\n".join(f"  t={t:6.1f} s  {what}" for t, what in self.marks)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the database may be restarting
        await asyncio.sleep(0.5)
    return False


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def _count(url: str, query: str, *args: Any) -> int:
    rows = await _fetch(url, query, *args)
    return int(rows[0][0])


async def _inject_faults(s: faultkit.Stack, rx: faultkit.WebhookReceiver, when: Timeline) -> None:
    """Kill replica A and restart it, restart the broker, restart Postgres, take the hooks down."""
    a = s.replicas["a"]
    await asyncio.sleep(8)
    when.mark("kill -9 replica a")
    a.kill()
    await asyncio.sleep(3)
    when.mark("restart replica a")
    await asyncio.to_thread(a.start)
    when.mark("replica a healthy")
    await asyncio.sleep(4)
    when.mark("broker stopping")
    await asyncio.to_thread(s.restart_broker)
    when.mark("broker restarted")
    # Vehicles retry their connection after 10 s: let their re-sent metrics settle first.
    await asyncio.sleep(14)
    when.mark("postgres restarting")
    await asyncio.to_thread(s.restart_postgres)
    when.mark("postgres restarted")
    await asyncio.sleep(3)
    when.mark("webhook receiver down")
    await asyncio.to_thread(rx.down)
    await asyncio.sleep(10)
    await asyncio.to_thread(rx.up)
    when.mark("webhook receiver up")


def _grouped_hooks(
    rx: faultkit.WebhookReceiver, secret: str
) -> tuple[dict[tuple[str, int], list[bytes]], list[str]]:
    by_pair: dict[tuple[str, int], list[bytes]] = defaultdict(list)
    problems = []
    for h in rx.received():
        if not faultkit.verify(secret, h.headers, h.body):
            problems.append(f"webhook {h.headers.get('webhook-id')}: signature does not verify")
            continue
        session = json.loads(h.body)["session"]
        pair = (session["id"], int(session["version"]))
        if h.headers["webhook-id"] != f"msg_{pair[0]}_{pair[1]}":
            problems.append(f"webhook {h.headers['webhook-id']} carries {pair}")
        by_pair[pair].append(h.body)
    return by_pair, problems


def _grouped_mqtt(listener: PartnerListener) -> dict[tuple[str, int], list[str]]:
    by_pair: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in listener.events:
        event = json.loads(r.raw)
        by_pair[(event["session"]["id"], int(event["session"]["version"]))].append(r.raw)
    return by_pair


def _delivery_problems(
    pubs: list[asyncpg.Record],
    mqtt: dict[tuple[str, int], list[str]],
    hooks: dict[tuple[str, int], list[bytes]],
) -> list[str]:
    problems = []
    published = set()
    for p in pubs:
        pair = (str(p["session"]), int(p["version"]))
        published.add(pair)
        record = json.loads(p["record"])
        got = mqtt.get(pair, [])
        if not got:
            problems.append(f"{pair} {p['event_type']}: never reached the MQTT partner")
        elif len(set(got)) > 1:
            problems.append(f"{pair}: MQTT copies differ: {sorted(set(got))}")
        elif (event := json.loads(got[0]))["session"] != record or event["type"] != p["event_type"]:
            problems.append(f"{pair}: MQTT content {got[0]} is not the publication {record}")
        bodies = hooks.get(pair, [])
        if not bodies:
            problems.append(f"{pair} {p['event_type']}: never reached the webhook receiver")
        elif len(set(bodies)) > 1:
            problems.append(f"{pair}: webhook copies differ: {sorted(set(bodies))!r}")
        elif (hook := json.loads(bodies[0]))["session"] != record or hook["type"] != p[
            "event_type"
        ]:
            problems.append(f"{pair}: webhook content {bodies[0]!r} is not the publication")
    for pair in set(mqtt) - published:
        problems.append(f"{pair}: reached the MQTT partner but is not in publications")
    for pair in set(hooks) - published:
        problems.append(f"{pair}: reached the webhook receiver but is not in publications")
    return problems


def _log_problems(s: faultkit.Stack) -> list[str]:
    problems = []
    a, b = s.replicas["a"], s.replicas["b"]
    runs = [r for r in a.records() if r.get("event") == "service running"]
    if len(runs) != 2:
        problems.append(f"replica a logged 'service running' {len(runs)} times, not 2")
    for r in (a, b):
        events = [rec.get("event", "") for rec in r.records()]
        if r.proc is None or r.proc.poll() is not None:
            problems.append(f"replica {r.name} is not running at the end (see {r.log})")
        lost = [i for i, e in enumerate(events) if e == "broker connection lost; reconnecting"]
        if not lost:
            problems.append(f"replica {r.name} never logged losing the broker")
        elif "broker connected" not in events[lost[-1] :]:
            problems.append(f"replica {r.name} never logged reconnecting to the broker")
    every = [rec for r in (a, b) for rec in r.records()]
    if not any(rec.get("event") in FAULT_LINES["database"] for rec in every):
        problems.append("no replica logged the database being unavailable")
    if not any(rec.get("event") == "webhook attempt" and rec.get("error") for rec in every):
        problems.append("no replica logged a failed webhook attempt")
    return problems


async def _session_problems(url: str, owner: str, fleet: Fleet) -> tuple[list[str], dict[str, str]]:
    rows = await _fetch(
        url,
        "SELECT v.vehicle_id, s.id, s.status, s.energy_kwh, s.started_at, s.share, s.is_open"
        " FROM sessions s JOIN vehicles v ON v.id = s.vehicle WHERE v.owner = $1"
        " ORDER BY s.started_at",
        owner,
    )
    got: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in rows:
        got[r["vehicle_id"]].append(r)
    problems, differing = [], {}
    for car in fleet.cars:
        vid = car.module.vehicle_id
        charges = car.module.charges
        want = [(c.outcome, round(c.energy_kwh, 2)) for c in charges]
        have = [(r["status"], round(r["energy_kwh"] or 0.0, 2)) for r in got.get(vid, [])]
        same = len(want) == len(have) and all(
            w[0] == h[0] and abs(w[1] - h[1]) <= ENERGY_TOLERANCE_KWH
            for w, h in zip(want, have, strict=True)
        )
        if not same:
            problems.append(f"{vid} ({car.story}): expected {want}, database has {have}")
            differing[vid] = car.story
    return problems, differing


async def _explain(
    path: Path, url: str, owner: str, fleet: Fleet, differing: dict[str, str], when: Timeline
) -> None:
    lines = ["fault timeline (seconds after the fleet started):", when.text(), ""]
    by_vid = {c.module.vehicle_id: c for c in fleet.cars}
    for vid, story in sorted(differing.items()):
        car = by_vid[vid]
        lines.append(f"== {vid}: story {story}")
        for c in car.module.charges:
            lines.append(
                f"  expected: {c.outcome} started {c.started:.1f} ended {c.ended} "
                f"energy {c.energy_kwh:.3f} kWh pauses {c.pauses}"
            )
        try:
            events = await _fetch(
                url,
                "SELECT s.id, e.at, e.event, e.detail::text AS detail FROM session_events e"
                " JOIN sessions s ON s.id = e.session JOIN vehicles v ON v.id = s.vehicle"
                " WHERE v.owner = $1 AND v.vehicle_id = $2 ORDER BY e.id",
                owner,
                vid,
            )
            vehicle = await _fetch(
                url,
                "SELECT phase, judge_at, metrics::text AS metrics, metrics_at FROM vehicles"
                " WHERE owner = $1 AND vehicle_id = $2",
                owner,
                vid,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            lines.append(f"  (database unreadable: {exc})")
            continue
        for e in events:
            lines.append(
                f"  session_event {e['id']} {e['at'].isoformat()} {e['event']} {e['detail']}"
            )
        for v in vehicle:
            lines.append(
                f"  vehicle: phase {v['phase']} judge_at {v['judge_at']} at {v['metrics_at']}"
            )
            lines.append(f"  metrics: {v['metrics']}")
    await asyncio.to_thread(path.write_text, "\n".join(lines) + "\n")


@pytest.mark.timeout(400)
async def test_faults_in_one_fleet_run(tmp_path: Path) -> None:
    """Through a replica kill, broker and Postgres restarts and a partner outage, none is lost."""
    with faultkit.stack(tmp_path) as s:
        owner, pw = f"fleet{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        s.cli("owner", "add", owner, "--password", pw)
        rx = faultkit.WebhookReceiver()
        rx.up()
        try:
            await _run(s, rx, owner, pw, tmp_path)
        finally:
            rx.down()


async def _run(
    s: faultkit.Stack, rx: faultkit.WebhookReceiver, owner: str, pw: str, tmp_path: Path
) -> None:
    partner = s.cli("partner", "add", "faultpartner", "--webhook", rx.url)
    rate = {
        "CHARGESHARE_OWNER_MESSAGE_RATE": "100000",
        "CHARGESHARE_OWNER_MESSAGE_BURST": "1000000",
    }
    a, b = s.add_replica("a", **rate), s.add_replica("b", **rate)
    a.start(wait=False)
    b.start(wait=False)
    await asyncio.to_thread(a.wait_healthy)
    await asyncio.to_thread(b.wait_healthy)
    url, port = s.database_url, s.broker.port

    listener = PartnerListener(
        partner["mqtt_username"], partner["mqtt_password"], port=port, client_id="faults-partner"
    )
    listener.connect()
    app = OwnerApp(
        owner, pw, port=port, client_id="faults-app", answer=Policy("always", "station_fault")
    )
    app.connect()
    fleet = Fleet(
        owner, pw, "127.0.0.1", port, vehicles=VEHICLES, speed=SPEED, mix=MIX,
        prefix="FLT", seed=11, start_spread_s=START_SPREAD_S,
    )  # fmt: skip
    try:
        for car in fleet.cars:
            app.opt_in(car.module.vehicle_id)
        opted = "SELECT count(*) FROM vehicles WHERE owner = $1 AND opted_in"
        assert await _until(lambda: _eq(_count(url, opted, owner), VEHICLES), 60)

        when = Timeline(time.monotonic(), [])
        running = asyncio.create_task(
            asyncio.to_thread(fleet.run, Console(file=io.StringIO()), max_seconds=240)
        )
        await _inject_faults(s, rx, when)
        stats = await running
        when.mark(f"fleet done: {stats.finished} of {stats.vehicles} vehicles finished")

        async def quiet() -> bool:
            n = await _count(
                url,
                "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM questions"
                " WHERE state = 'pending') + (SELECT count(*) FROM vehicles WHERE judge_at"
                " IS NOT NULL) + (SELECT count(*) FROM sessions WHERE is_open)",
            )
            return n == 0

        settled = await _until(quiet, QUIET_TIMEOUT_S)
        when.mark(f"quiet: {settled}")
        await asyncio.sleep(1.0)  # the last PUBACKed publishes reach the partner's socket
    finally:
        app.close()
        listener.close()

    problems: list[str] = []
    if stats.finished != VEHICLES:
        problems.append(f"only {stats.finished} of {VEHICLES} vehicles finished their story")
    if not settled:
        problems.append("the service never became quiet (outbox, questions, judgments, open)")
    session_problems, differing = await _session_problems(url, owner, fleet)
    problems += session_problems
    questions = await _fetch(url, "SELECT state, count(*) AS n FROM questions GROUP BY state")
    states = {q["state"]: q["n"] for q in questions}
    if set(states) - {"answered"}:
        problems.append(f"questions not all answered: {states}")
    pubs = await _fetch(
        url, "SELECT session, version, event_type, record::text AS record FROM publications"
    )
    hooks, hook_problems = _grouped_hooks(rx, partner["webhook_secret"])
    problems += hook_problems
    problems += _delivery_problems(pubs, _grouped_mqtt(listener), hooks)
    problems += _log_problems(s)

    explain = tmp_path / "explain.txt"
    if problems:
        await _explain(explain, url, owner, fleet, differing, when)
        with explain.open("a") as f:
            f.write("\nall problems:\n" + "\n".join(problems) + "\n")
    logs = ", ".join(str(r.log) for r in s.replicas.values())
    assert not problems, (
        f"{len(problems)} problem(s), first: {problems[:5]}; explanation in {explain}; logs: {logs}"
    )
    assert len(pubs) > VEHICLES  # every vehicle shared at least one version


async def _eq(value: Awaitable[int], want: int) -> bool:
    return await value == want


class _Sent:
    """An outbox deliverer that only remembers what it was given."""

    kind = "mqtt"

    def __init__(self) -> None:
        self.ids: set[int] = set()

    async def deliver(self, row: outbox.Row) -> outbox.Outcome:
        self.ids.add(row.id)
        return outbox.Done()


async def test_handler_and_outbox_ride_out_a_postgres_restart() -> None:
    """Messages handled and outbox rows sent while Postgres restarts all land; none is dropped."""
    with faultkit.cluster() as db:
        url = db.url()
        conn = await asyncpg.connect(url)
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()
        settings = Settings(database_url=url, location_secret=b"fault-test-secret-0123456789")
        pool = await asyncpg.create_pool(url, min_size=12, max_size=12)
        sent = _Sent()
        dispatcher = outbox.Dispatcher(pool, sent, poll_s=0.02)
        dispatching = asyncio.create_task(dispatcher.run())
        h = handler.Handler(pool, settings)
        restarted = asyncio.Event()
        last: dict[str, str] = {}
        enqueued: list[int] = []

        async def vehicle(vid: str) -> None:
            n = 0
            while not restarted.is_set() or n < 5:
                n += 1
                value = f"{n * 0.5:g}"
                await h.handle(f"ovms/faulty/{vid}/metric/v/c/kwh", value.encode())
                last[vid] = value

        async def enqueue() -> None:
            while not restarted.is_set() or len(enqueued) < 5:
                try:
                    async with pool.acquire() as c:
                        enqueued.append(await outbox.enqueue(c, "mqtt", b"x", topic="t/x"))
                except (*TRANSIENT, asyncpg.PostgresError):
                    await asyncio.sleep(0.1)
                dispatcher.wake()
                await asyncio.sleep(0.01)

        try:
            with capture_logs() as logs:
                work = [asyncio.create_task(vehicle(f"V{i}")) for i in range(40)]
                work.append(asyncio.create_task(enqueue()))
                await asyncio.sleep(1.0)
                await asyncio.to_thread(faultkit.restart_postgres, db)
                restarted.set()
                await asyncio.gather(*work)
                assert await _until(lambda: _has(sent.ids, enqueued), 60)
            assert not dispatching.done(), "the outbox dispatcher stopped"
            stored = await _fetch(
                url, "SELECT vehicle_id, metrics ->> 'v.c.kwh' AS kwh FROM vehicles"
            )
            assert {r["vehicle_id"]: r["kwh"] for r in stored} == last
            failed = [e for e in logs if e["log_level"] in ("error", "critical")]
            assert not failed, failed[:3]
            assert any(e["event"] == "database unavailable; message not acked yet" for e in logs)
        finally:
            dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatching
            await pool.close()


async def _has(got: set[int], want: list[int]) -> bool:
    return set(want) <= got


async def test_a_spread_out_stop_burst_is_judged_on_its_last_phase_metric(
    database_url: str,
) -> None:
    """A stop whose state, charging flag and substate trickle in is judged once all are in."""
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    now = [t0]
    settings = Settings(
        database_url=database_url, location_secret=b"fault-test-secret-0123456789", settle_s=0.5
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        h = handler.Handler(pool, settings, clock=lambda: now[0])

        async def metric(name: str, value: str, at_s: float) -> None:
            now[0] = t0 + timedelta(seconds=at_s)
            await h.handle(f"ovms/burst/CAR1/metric/{name.replace('.', '/')}", value.encode())

        async def judge(at_s: float) -> int:
            return await settle.judge_due(pool, settings, h.secrets, t0 + timedelta(seconds=at_s))

        await metric("v.c.charging", "yes", 0)
        await metric("v.c.state", "charging", 0)
        assert await judge(1) == 1  # the charge starts
        await metric("v.c.state", "stopped", 10)
        await metric("v.c.charging", "no", 10.4)
        assert await judge(10.6) == 0  # the burst is still coming in
        await metric("v.c.substate", "onrequest", 10.8)
        assert await judge(11.0) == 0
        assert await judge(11.4) == 1
        status = await pool.fetchval("SELECT status FROM sessions")
        assert status == "stopped"
    finally:
        await pool.close()


async def test_metrics_of_one_vehicle_arriving_together_apply_in_order(database_url: str) -> None:
    """Many metrics of one vehicle handled at once are all applied, the last one winning."""
    settings = Settings(database_url=database_url, location_secret=b"fault-test-secret-0123456789")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        h = handler.Handler(pool, settings)
        topic = "ovms/burst/CAR{}/metric/v/c/kwh"
        await asyncio.gather(
            *(h.handle(topic.format(n % 3), f"{n}".encode()) for n in range(1, 301))
        )
        stored = await pool.fetch("SELECT vehicle_id, metrics ->> 'v.c.kwh' AS kwh FROM vehicles")
        assert {r["vehicle_id"]: r["kwh"] for r in stored} == {
            "CAR0": "300",
            "CAR1": "298",
            "CAR2": "299",
        }
    finally:
        await pool.close()
