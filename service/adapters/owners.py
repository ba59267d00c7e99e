"""An owner's rights: export everything stored about them; erase it and anonymise what was public.

Export reads every table that holds rows of the owner's vehicles. Erase runs inside
`accounts.remove_owner`'s transaction (its `before_delete` hook), before the owner row goes and
its vehicles, places, sessions, questions and push registrations cascade with it:

- every session that was published gets one more version: `session.updated` with contributor
  `anonymous`, or `session.retracted` (with `--retract`, and always for a session still charging,
  whose end could never be published); `retracted` versions keep no place (migration 004);
- every stored version of those sessions, and every copy still queued for MQTT or a webhook, has
  its contributor rewritten to `anonymous`: the one change to published content besides
  retraction, because erasure is a legal duty (docs/privacy.md);
- queued pushes and MQTT messages for the owner are dropped, and the retained status, open
  questions and opt-in under `ovms/<owner>/` are cleared on the broker.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg

from service import effects, errors, topics
from service.adapters import accounts, store
from service.config import Settings
from service.domain import sessions

OWNER = "SELECT name, created_at FROM owners WHERE name = $1"
VEHICLES = """
SELECT id, vehicle_id, opted_in, nickname, handle, metrics,
       position_enc IS NOT NULL AS has_position, phase, metrics_at, created_at
FROM vehicles WHERE owner = $1 ORDER BY id
"""
PLACES = """
SELECT l.id, l.answer, l.created_at, l.updated_at,
       (SELECT count(*) FROM location_cells c WHERE c.location = l.id) AS keyed_hashes,
       shared.latitude, shared.longitude
FROM locations l
LEFT JOIN LATERAL (
    SELECT s.latitude, s.longitude FROM sessions s
    WHERE s.location = l.id AND s.share = 'shared' AND s.latitude IS NOT NULL
    ORDER BY s.started_at DESC LIMIT 1) shared ON true
WHERE l.vehicle = $1 ORDER BY l.id
"""
SESSIONS = f"""
SELECT {store.SESSION_COLS}, created_at FROM sessions WHERE vehicle = $1 ORDER BY started_at, id
"""
EVENTS = "SELECT at, event, detail FROM session_events WHERE session = $1 ORDER BY id"
QUESTIONS = """
SELECT request_id, kind, state, answer, answered_at, created_at, expires_at
FROM questions WHERE session = $1 ORDER BY created_at, request_id
"""
PUSH = """
SELECT app_id, platform, token, sandbox, active, created_at, updated_at
FROM push_tokens WHERE vehicle = $1 ORDER BY id
"""
PUBLISHED = """
SELECT version, event_type, happened_at, record FROM publications
WHERE session = $1 ORDER BY version
"""

LOCK_VEHICLES = "SELECT id FROM vehicles WHERE owner = $1 ORDER BY id FOR UPDATE"
PUBLISHED_SESSIONS = f"""
SELECT {store.SESSION_COLS} FROM sessions WHERE vehicle = $1 AND version > 0
ORDER BY started_at, id FOR UPDATE
"""
PENDING_QUESTIONS = "SELECT request_id FROM questions WHERE vehicle = $1 AND state = 'pending'"
DROP_OWNER_OUTBOX = """
DELETE FROM outbox
WHERE (kind = 'mqtt' AND left(topic, length($1)) = $1)
   OR (kind = 'push' AND target IN (SELECT id FROM push_tokens WHERE vehicle = ANY($2::bigint[])))
"""
ANONYMOUS = '"anonymous"'
ANONYMISE_PUBLISHED = """
UPDATE publications SET record = jsonb_set(record, '{contributor}', $2::jsonb)
WHERE session = ANY($1::uuid[]) AND record ->> 'contributor' IS DISTINCT FROM 'anonymous'
"""
# Queued public events carry ordering key 'session:<id>' (MQTT) or '<partner id>:<id>' (webhook).
ANONYMISE_QUEUED = """
UPDATE outbox
SET payload = convert_to(
    jsonb_set(convert_from(payload, 'UTF8')::jsonb, '{session,contributor}', $2::jsonb)::text,
    'UTF8')
WHERE kind IN ('mqtt', 'webhook') AND length(payload) > 0
  AND split_part(ordering_key, ':', 2) = ANY($1::text[])
"""


def mask_token(token: str) -> str:
    """Return a push token with all but its first and last four characters hidden."""
    if len(token) <= 12:
        return "*" * len(token)
    return f"{token[:4]}…{token[-4:]}"


# jsonb columns arrive as text.
_JSON_COLUMNS = frozenset({"metrics", "detail", "record"})


def _plain(key: str, value: Any) -> Any:
    """Return a JSON-ready form of a database value."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if key in _JSON_COLUMNS and isinstance(value, str):
        return json.loads(value)
    return value


def _row(r: Mapping[str, Any], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: _plain(k, v) for k, v in r.items() if k not in drop}


async def export(conn: asyncpg.Connection, name: str) -> dict[str, Any]:
    """Return everything stored about an owner; raise NotFound if there is no such owner."""
    owner = await conn.fetchrow(OWNER, name)
    if owner is None:
        raise errors.NotFound("owner", name)
    vehicles = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for v in await conn.fetch(VEHICLES, name):
            out = _row(v, drop=("id", "has_position"))
            out["last_position"] = "stored encrypted" if v["has_position"] else None
            out["places"] = [
                _row(p, drop=() if p["latitude"] is not None else ("latitude", "longitude"))
                for p in await conn.fetch(PLACES, v["id"])
            ]
            history = []
            for s in await conn.fetch(SESSIONS, v["id"]):
                item = _row(s, drop=("vehicle",))
                item["events"] = [_row(e) for e in await conn.fetch(EVENTS, s["id"])]
                item["questions"] = [_row(q) for q in await conn.fetch(QUESTIONS, s["id"])]
                item["published"] = [_row(p) for p in await conn.fetch(PUBLISHED, s["id"])]
                history.append(item)
            out["sessions"] = history
            registrations = []
            for t in await conn.fetch(PUSH, v["id"]):
                reg = _row(t)
                reg["token"] = mask_token(t["token"])
                registrations.append(reg)
            out["push_registrations"] = registrations
            vehicles.append(out)
    created = _plain("created_at", owner["created_at"])
    return {"owner": name, "created_at": created, "vehicles": vehicles}


@dataclasses.dataclass
class Erased:
    """What an erasure changed in public."""

    anonymised: int = 0
    retracted: int = 0


async def erase(
    conn: asyncpg.Connection,
    settings: Settings,
    name: str,
    *,
    retract: bool,
    now: datetime,
) -> Erased:
    """Anonymise or retract an owner's published sessions and drop their queued output.

    Runs inside the caller's transaction, before the owner's rows are deleted.
    """
    done = Erased()
    pks = [r["id"] for r in await conn.fetch(LOCK_VEHICLES, name)]
    touched: list[uuid.UUID] = []
    await conn.execute(DROP_OWNER_OUTBOX, f"{topics.ROOT}/{name}/", pks)
    for pk in pks:
        v = await store.lock_vehicle_pk(conn, pk)
        if v is None:
            continue
        ctx = effects.Ctx(conn, settings, now, dataclasses.replace(v, nickname=None))
        for r in await conn.fetch(PUBLISHED_SESSIONS, pk):
            row = dict(r)
            asked = await conn.fetchval(store.ASKED_CAUSE, row["id"])
            state = store.session_state(row, asked)
            work: tuple[sessions.Effect, ...]
            if retract or row["is_open"] or state.share is sessions.Share.RETRACTED:
                state = dataclasses.replace(state, share=sessions.Share.RETRACTED)
                work = (sessions.Retract(),)
                done.retracted += 1
            else:
                work = (sessions.Publish("session.updated"),)
                done.anonymised += 1
            await effects.run(ctx, row, state, work)
            touched.append(row["id"])
        for q in await conn.fetch(PENDING_QUESTIONS, pk):
            await effects.mqtt_out(
                ctx, topics.request(name, v.vehicle_id, q["request_id"]), b"", retain=True
            )
        await effects.mqtt_out(ctx, topics.status(name, v.vehicle_id), b"", retain=True)
        await effects.mqtt_out(ctx, topics.optin(name, v.vehicle_id), b"", retain=True)
    if touched:
        await conn.execute(ANONYMISE_PUBLISHED, touched, ANONYMOUS)
        await conn.execute(ANONYMISE_QUEUED, [str(t) for t in touched], ANONYMOUS)
    return done


def eraser(
    settings: Settings, *, retract: bool, now: datetime, into: Erased
) -> accounts.BeforeDelete:
    """Return a `remove_owner` hook that erases the owner and adds what it did to `into`."""

    async def hook(conn: asyncpg.Connection, name: str) -> None:
        got = await erase(conn, settings, name, retract=retract, now=now)
        into.anonymised += got.anonymised
        into.retracted += got.retracted

    return hook
