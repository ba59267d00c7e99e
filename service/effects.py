"""Perform the sharing core's effects in the caller's transaction; output goes to the outbox."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from service import outbox, records, topics, wire
from service.adapters import publications, push_tokens, store
from service.config import Settings
from service.domain import sessions

log = structlog.get_logger("effects")


@dataclass
class Ctx:
    """What one handled message or judgment works with."""

    conn: asyncpg.Connection
    settings: Settings
    now: datetime
    vehicle: store.Vehicle
    status_dirty: bool = False
    asked: dict[str, str] = field(default_factory=dict)  # kind -> request id just created


async def mqtt_out(
    ctx: Ctx, topic: str, payload: bytes, *, retain: bool = False, key: str | None = None
) -> None:
    """Queue one MQTT publish (QoS 1) for after the commit."""
    await outbox.enqueue(
        ctx.conn, "mqtt", payload, topic=topic, qos=1, retain=retain, ordering_key=key or topic
    )


async def publish_status(ctx: Ctx) -> None:
    """Queue the vehicle's retained status (opt-in, handle, pending questions)."""
    v = ctx.vehicle
    pending = await ctx.conn.fetchval(store.PENDING_COUNT, v.pk)
    status = wire.Status(enabled=v.opted_in, handle=v.nickname or v.handle, pending=pending)
    topic = topics.status(v.owner, v.vehicle_id)
    await mqtt_out(ctx, topic, status.model_dump_json().encode(), retain=True)


async def clear_question(ctx: Ctx, request_id: str) -> None:
    """Queue the empty retained message that removes a question from the owner's apps."""
    v = ctx.vehicle
    await mqtt_out(ctx, topics.request(v.owner, v.vehicle_id, request_id), b"", retain=True)
    ctx.status_dirty = True


async def run(
    ctx: Ctx,
    row: dict[str, Any],
    state: sessions.State,
    effects: tuple[sessions.Effect, ...],
) -> None:
    """Store the new share state of session `row`, then perform its effects in order."""
    sid = row["id"]
    await ctx.conn.execute(store.SET_SHARE, sid, state.share.value, state.cause, ctx.now)
    row.update(share=state.share.value, cause=state.cause)
    for effect in effects:
        log.info(
            "effect",
            effect=type(effect).__name__,
            session=str(sid),
            vehicle=ctx.vehicle.vehicle_id,
            owner=ctx.vehicle.owner,
        )
        match effect:
            case sessions.Publish(event_type=event_type):
                await _publish(ctx, row, event_type)
            case sessions.Retract():
                await _publish(ctx, row, "session.retracted")
            case sessions.EraseCoordinates():
                # Keep only the coarse region of a published session: its retraction goes there.
                region = row["region"] if row.get("version", 0) > 0 else None
                await ctx.conn.execute(store.ERASE_COORDS, sid, region)
                row.update(latitude=None, longitude=None, region=region)
            case sessions.AskOwner(kind=kind):
                await _ask(ctx, row, kind)
            case sessions.Push(kind=kind):
                request_id = ctx.asked[kind]
                await push_tokens.enqueue_question(
                    ctx.conn, ctx.vehicle.pk, request_id, kind, records.PUSH_TEXT[kind]
                )
            case sessions.Withdraw(kind=kind):
                for r in await ctx.conn.fetch(store.CLOSE_QUESTIONS, sid, kind, "withdrawn"):
                    await clear_question(ctx, r["request_id"])
            case sessions.SetStanding(answer=answer):
                await _set_standing(ctx, row, answer)
    await store.session_event(ctx.conn, sid, ctx.now, "share", share=state.share.value)


async def _publish(ctx: Ctx, row: dict[str, Any], event_type: str) -> None:
    bumped = await ctx.conn.fetchrow(store.BUMP_VERSION, row["id"], ctx.now)
    row.update(version=bumped["version"], updated_at=bumped["updated_at"])
    rec = records.record(
        row,
        version=bumped["version"],
        contributor=ctx.vehicle.contributor,
        license=ctx.settings.license,
        updated_at=ctx.now,
    )
    body = await publications.record(
        ctx.conn,
        session_id=str(row["id"]),
        version=rec.version,
        event_type=event_type,
        record=rec.model_dump(mode="json"),
        happened_at=ctx.now,
    )
    region = row["region"]
    if region is None:
        log.error("shared session has no region; not published on MQTT", session=str(row["id"]))
        return
    await mqtt_out(ctx, topics.public_session(region), body, key=f"session:{row['id']}")


async def _ask(ctx: Ctx, row: dict[str, Any], kind: str) -> None:
    v = ctx.vehicle
    request_id = uuid.uuid4().hex
    expires = ctx.now + timedelta(seconds=ctx.settings.question_ttl_s)
    await ctx.conn.execute(
        store.INSERT_QUESTION, request_id, row["id"], v.pk, kind, ctx.now, expires
    )
    q = records.question(
        row, request_id=request_id, kind=kind, created_at=ctx.now, expires_at=expires
    )
    topic = topics.request(v.owner, v.vehicle_id, request_id)
    await mqtt_out(ctx, topic, q.model_dump_json().encode(), retain=True)
    ctx.asked[kind] = request_id
    ctx.status_dirty = True


async def _set_standing(ctx: Ctx, row: dict[str, Any], answer: sessions.Standing) -> None:
    place = row["location"]
    if place is None:
        return
    await ctx.conn.execute(store.SET_STANDING, place, answer.value, ctx.now)
    if answer is not sessions.Standing.NEVER:
        return
    # `never` reaches back: earlier sessions here are retracted, open questions withdrawn.
    for other in await ctx.conn.fetch(store.SESSIONS_AT_PLACE, place, row["id"]):
        o = dict(other)
        asked = await ctx.conn.fetchval(store.ASKED_CAUSE, o["id"])
        state, effects = sessions.apply(
            store.session_state(o, asked), sessions.PlaceNever(), now=ctx.now
        )
        if effects:
            await run(ctx, o, state, effects)
