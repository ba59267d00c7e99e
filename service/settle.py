"""Judge settled metric changes into session transitions, and expire unanswered questions.

Metrics are QoS 0, unordered and may reach different replicas: a change of charge phase is judged
only once the vehicle's metrics have been quiet for `settle_s`, on the whole metric set, by
whichever replica claims the vehicle first (FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from service import places, sealing
from service.adapters import store
from service.config import Settings
from service.domain import detect, privacy, sessions
from service.effects import Ctx, clear_question, publish_status, run
from service.errors import TRANSIENT

log = structlog.get_logger("settle")

_STATUS = {
    detect.Change.COMPLETE: sessions.Status.COMPLETED,
    detect.Change.ABORT: sessions.Status.INTERRUPTED,
    detect.Change.OWNER_STOP: sessions.Status.STOPPED,
}


def position(secrets: Sequence[bytes], v: store.Vehicle) -> tuple[float, float] | None:
    """Return the vehicle's last complete position, or None."""
    if v.position_enc is None:
        return None
    opened = sealing.open_position(secrets, v.salt, v.position_enc)
    if opened is None or math.isnan(opened[0]) or math.isnan(opened[1]):
        return None
    return opened


async def start_session(
    ctx: Ctx,
    secrets: Sequence[bytes],
    at: datetime,
    where: tuple[float, float] | None,
    reading: detect.Reading,
    *,
    source: str,
    is_open: bool = True,
    ended: tuple[sessions.Status, datetime] | None = None,
) -> dict[str, object]:
    """Create a session, decide what it shares, and perform the effects; return its row."""
    v = ctx.vehicle
    place_id, standing = None, sessions.Standing.PENDING
    if where is not None and v.opted_in:
        try:
            place_id, standing = await places.find_or_add(ctx, secrets, *where)
        except ValueError as exc:  # no usable position (e.g. at a pole): nothing to share
            log.warning("position not usable for a place", vehicle=v.vehicle_id, error=str(exc))
            where = None
    state, effects = sessions.start(sessions.Started(v.opted_in and where is not None, standing))
    keep = state.share in (sessions.Share.ASKING, sessions.Share.SHARED)
    lat, lon = where if (keep and where is not None) else (None, None)
    row: dict[str, object] = {
        "id": uuid.uuid4(),
        "vehicle": v.pk,
        "location": place_id,
        "is_open": is_open and ended is None,
        "status": sessions.Status.CHARGING.value,
        "share": state.share.value,
        "source": source,
        "started_at": at,
        "ended_at": None,
        "latitude": lat,
        "longitude": lon,
        "region": privacy.geohash(lat, lon, 3) if lat is not None and lon is not None else None,
        "energy_kwh": reading.energy_kwh,
        "max_power_kw": reading.power_kw,
        "max_voltage": reading.voltage,
        "max_current": reading.current,
        "soc_start": reading.soc,
        "soc_end": reading.soc,
        "connector": reading.connector,
        "vehicle_type": reading.vehicle_type,
        "cause": None,
        "charge_point": None,
        "comment": None,
        "ocm_id": None,
        "version": 0,
        "updated_at": ctx.now,
    }
    await ctx.conn.execute(
        store.INSERT_SESSION,
        row["id"], v.pk, place_id, row["is_open"], row["status"], row["share"], source, at,
        None, lat, lon, row["region"], reading.energy_kwh, reading.soc, reading.soc,
        reading.connector, reading.vehicle_type, reading.power_kw, reading.voltage,
        reading.current,
    )  # fmt: skip
    await store.session_event(ctx.conn, row["id"], at, "start", source=source)
    effects = tuple(e for e in effects if not isinstance(e, sessions.EraseCoordinates))
    await run(ctx, row, state, effects)
    if ended is not None:
        await end_session(ctx, row, ended[0], ended[1], reading)
    return row


async def end_session(
    ctx: Ctx,
    row: dict[str, object],
    status: sessions.Status,
    at: datetime,
    reading: detect.Reading,
) -> None:
    """Close a session with this status and let the sharing core react."""
    asked = await ctx.conn.fetchval(store.ASKED_CAUSE, row["id"])
    before = store.session_state(row, asked)
    await ctx.conn.execute(
        store.CLOSE_SESSION, row["id"], status.value, at, reading.energy_kwh, reading.soc, ctx.now
    )
    row.update(is_open=False, status=status.value, ended_at=at)
    if reading.energy_kwh is not None:
        row["energy_kwh"] = reading.energy_kwh
    if reading.soc is not None:
        row["soc_end"] = reading.soc
    await store.session_event(ctx.conn, row["id"], at, "end", status=status.value)
    state, effects = sessions.apply(before, sessions.Ended(status), now=ctx.now)
    await run(ctx, row, state, effects)


async def judge(ctx: Ctx, secrets: Sequence[bytes]) -> None:
    """Turn one vehicle's settled phase change into a session transition."""
    v = ctx.vehicle
    current = detect.phase_of(v.metrics)
    previous = detect.Phase(v.phase)
    found = await ctx.conn.fetchrow(store.OPEN_SESSION, v.pk)
    row = dict(found) if found is not None else None
    change = detect.change(previous, current, row is not None)
    at = v.changed_at or ctx.now
    reading = detect.reading(v.metrics)
    bound = log.bind(owner=v.owner, vehicle=v.vehicle_id, change=change.value)
    if change is detect.Change.START:
        made = await start_session(
            ctx, secrets, at, position(secrets, v), reading, source="metrics"
        )
        bound.info("charge started", session=str(made["id"]), share=made["share"])
    elif change in _STATUS and row is not None:
        await end_session(ctx, row, _STATUS[change], at, reading)
        bound.info("charge ended", session=str(row["id"]), status=_STATUS[change].value)
    elif change in (detect.Change.PAUSE, detect.Change.RESUME) and row is not None:
        await store.session_event(ctx.conn, row["id"], at, change.value)
        bound.info("charge " + change.value, session=str(row["id"]))
    await ctx.conn.execute(store.SETTLED, v.pk, current.value)
    if ctx.status_dirty:
        await publish_status(ctx)


async def judge_due(
    pool: asyncpg.Pool, settings: Settings, secrets: Sequence[bytes], now: datetime
) -> int:
    """Judge every vehicle whose settle time has passed; return how many."""
    async with pool.acquire() as conn, conn.transaction():
        due = await conn.fetch(store.DUE_VEHICLES, now, 50)
        for r in due:
            try:
                async with conn.transaction():  # a savepoint: one vehicle's bug spares the rest
                    v = await store.lock_vehicle_pk(conn, r["id"])
                    if v is not None:
                        await judge(Ctx(conn, settings, now, v), secrets)
            except TRANSIENT:
                raise
            except Exception:
                log.exception("judgment failed; change dropped", vehicle_pk=r["id"])
                await conn.execute(store.DROP_JUDGMENT, r["id"])
    return len(due)


async def expire_due(pool: asyncpg.Pool, settings: Settings, now: datetime) -> int:
    """Expire unanswered questions whose time is up; return how many."""
    async with pool.acquire() as conn, conn.transaction():
        due = await conn.fetch(store.DUE_QUESTIONS, now, 100)
        for q in due:
            try:
                async with conn.transaction():
                    await _expire(conn, settings, now, q)
            except TRANSIENT:
                raise
            except Exception:
                # Expire it all the same, and never keep an unshared place's coordinates.
                log.exception("expiry failed", request_id=q["request_id"])
                await conn.execute(store.EXPIRE_QUESTION, q["request_id"])
                if q["kind"] == "share":
                    await conn.execute(store.ERASE_COORDS, q["session"], None)
                    await conn.execute(store.SET_SHARE, q["session"], "unshared", None, now)
    return len(due)


async def _expire(conn: asyncpg.Connection, settings: Settings, now: datetime, q: Any) -> None:
    v = await store.lock_vehicle_pk(conn, q["vehicle"])
    if v is None or await conn.fetchrow(store.LOCK_PENDING_QUESTION, q["request_id"]) is None:
        return  # gone, answered meanwhile, or expired by another replica
    ctx = Ctx(conn, settings, now, v)
    await conn.execute(store.EXPIRE_QUESTION, q["request_id"])
    await clear_question(ctx, q["request_id"])
    if q["kind"] == "share":
        row = dict(await conn.fetchrow(store.SESSION_BY_ID, q["session"]))
        asked = await conn.fetchval(store.ASKED_CAUSE, row["id"])
        state, effects = sessions.apply(
            store.session_state(row, asked), sessions.QuestionExpired(), now=now
        )
        await run(ctx, row, state, effects)
    await publish_status(ctx)
    log.info("question expired", request_id=q["request_id"], kind=q["kind"])


class Loop:
    """Run judgments and expiries until cancelled; `wake()` hurries the next round."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        secrets: Sequence[bytes],
        clock: Callable[[], datetime],
        on_output: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.secrets = secrets
        self.clock = clock
        self.on_output = on_output
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        poll = max(0.05, min(0.25, self.settings.settle_s / 2))
        while True:
            try:
                n = await judge_due(self.pool, self.settings, self.secrets, self.clock())
                n += await expire_due(self.pool, self.settings, self.clock())
                if n:
                    self.on_output()
                    continue
            except (*TRANSIENT, asyncpg.PostgresError) as exc:
                log.warning("settle round failed; will retry", error=str(exc))
                await asyncio.sleep(1.0)
            self._wake.clear()
            # Not asyncio.wait_for: on 3.11 it can swallow a cancel that lands as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await self._wake.wait()
