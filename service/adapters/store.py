"""SQL for vehicles, places, sessions and questions (raw asyncpg, `$n` parameters)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from service.domain import sessions

# ---- vehicles ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vehicle:
    pk: int
    owner: str
    vehicle_id: str
    salt: bytes
    opted_in: bool
    nickname: str | None
    handle: str
    metrics: dict[str, str]
    position_enc: bytes | None
    phase: str
    judge_at: datetime | None
    changed_at: datetime | None
    metrics_at: datetime | None  # when a live (not retained) metric last changed it

    @property
    def contributor(self) -> str:
        return self.nickname or "anonymous"


_VEHICLE_COLS = (
    "id, owner, vehicle_id, salt, opted_in, nickname, handle, metrics, position_enc, phase, "
    "judge_at, changed_at, metrics_at"
)
ENSURE_OWNER = "INSERT INTO owners (name) VALUES ($1) ON CONFLICT DO NOTHING"
INSERT_VEHICLE = """
INSERT INTO vehicles (owner, vehicle_id, salt, handle) VALUES ($1, $2, $3, $4)
ON CONFLICT (owner, vehicle_id) DO NOTHING
"""
LOCK_VEHICLE = (
    f"SELECT {_VEHICLE_COLS} FROM vehicles WHERE owner = $1 AND vehicle_id = $2 FOR UPDATE"
)
LOCK_VEHICLE_PK = f"SELECT {_VEHICLE_COLS} FROM vehicles WHERE id = $1 FOR UPDATE"
FIND_VEHICLE = f"SELECT {_VEHICLE_COLS} FROM vehicles WHERE owner = $1 AND vehicle_id = $2"


def _vehicle(r: asyncpg.Record) -> Vehicle:
    return Vehicle(
        pk=r["id"],
        owner=r["owner"],
        vehicle_id=r["vehicle_id"],
        salt=bytes(r["salt"]),
        opted_in=r["opted_in"],
        nickname=r["nickname"],
        handle=r["handle"],
        metrics=json.loads(r["metrics"]) if isinstance(r["metrics"], str) else dict(r["metrics"]),
        position_enc=bytes(r["position_enc"]) if r["position_enc"] is not None else None,
        phase=r["phase"],
        judge_at=r["judge_at"],
        changed_at=r["changed_at"],
        metrics_at=r["metrics_at"],
    )


async def lock_vehicle(conn: asyncpg.Connection, owner: str, vehicle_id: str) -> Vehicle:
    """Return the vehicle row locked for this transaction, creating owner and vehicle if new."""
    row = await conn.fetchrow(LOCK_VEHICLE, owner, vehicle_id)
    if row is None:
        await conn.execute(ENSURE_OWNER, owner)
        handle = "anon-" + secrets.token_hex(4)
        await conn.execute(INSERT_VEHICLE, owner, vehicle_id, secrets.token_bytes(16), handle)
        row = await conn.fetchrow(LOCK_VEHICLE, owner, vehicle_id)
    assert row is not None
    return _vehicle(row)


async def lock_vehicle_pk(conn: asyncpg.Connection, pk: int) -> Vehicle | None:
    row = await conn.fetchrow(LOCK_VEHICLE_PK, pk)
    return None if row is None else _vehicle(row)


async def find_vehicle(conn: asyncpg.Connection, owner: str, vehicle_id: str) -> Vehicle | None:
    row = await conn.fetchrow(FIND_VEHICLE, owner, vehicle_id)
    return None if row is None else _vehicle(row)


SAVE_METRICS = """
UPDATE vehicles SET metrics = $2::jsonb, position_enc = $3,
       metrics_at = CASE WHEN $7 THEN $4 ELSE metrics_at END, judge_at = $5, changed_at = $6
WHERE id = $1
"""


async def save_metrics(
    conn: asyncpg.Connection,
    pk: int,
    metrics: dict[str, str],
    position_enc: bytes | None,
    now: datetime,
    judge_at: datetime | None,
    changed_at: datetime | None,
    *,
    live: bool,
) -> None:
    await conn.execute(
        SAVE_METRICS, pk, json.dumps(metrics), position_enc, now, judge_at, changed_at, live
    )


SETTLED = "UPDATE vehicles SET phase = $2, judge_at = NULL, changed_at = NULL WHERE id = $1"
DROP_JUDGMENT = "UPDATE vehicles SET judge_at = NULL, changed_at = NULL WHERE id = $1"
DUE_VEHICLES = """
SELECT id FROM vehicles WHERE judge_at IS NOT NULL AND judge_at <= $1
ORDER BY judge_at LIMIT $2 FOR UPDATE SKIP LOCKED
"""
SET_OPTIN = "UPDATE vehicles SET opted_in = $2, nickname = $3, handle = $4 WHERE id = $1"

# ---- places ------------------------------------------------------------------------------------

FIND_PLACE = """
SELECT l.id, l.answer, c.key_id, c.cell_hash
FROM location_cells c JOIN locations l ON l.id = c.location
WHERE c.cell_hash = ANY($1::bytea[]) AND l.vehicle = $2
ORDER BY l.id LIMIT 1
"""
NEW_PLACE = "INSERT INTO locations (vehicle) VALUES ($1) RETURNING id"
ADD_CELL = """
INSERT INTO location_cells (cell_hash, key_id, location) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
"""
REKEY_CELLS = "DELETE FROM location_cells WHERE location = $1 AND key_id <> $2"
SET_STANDING = "UPDATE locations SET answer = $2, updated_at = $3 WHERE id = $1"

# ---- sessions ----------------------------------------------------------------------------------

SESSION_COLS = (
    "id, vehicle, location, is_open, status, share, source, started_at, ended_at, latitude, "
    "longitude, region, energy_kwh, max_power_kw, max_voltage, max_current, soc_start, soc_end, "
    "connector, vehicle_type, cause, charge_point, comment, ocm_id, version, updated_at"
)
OPEN_SESSION = f"SELECT {SESSION_COLS} FROM sessions WHERE vehicle = $1 AND is_open"
SESSION_BY_ID = f"SELECT {SESSION_COLS} FROM sessions WHERE id = $1 FOR UPDATE"
INSERT_SESSION = """
INSERT INTO sessions (id, vehicle, location, is_open, status, share, source, started_at,
                      ended_at, latitude, longitude, region, energy_kwh, soc_start, soc_end,
                      connector, vehicle_type, max_power_kw, max_voltage, max_current)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
"""
TRACK = """
UPDATE sessions SET energy_kwh = coalesce($2, energy_kwh),
       max_power_kw = greatest(max_power_kw, $3), max_voltage = greatest(max_voltage, $4),
       max_current = greatest(max_current, $5), soc_end = coalesce($6, soc_end),
       soc_start = coalesce(soc_start, $6), connector = coalesce(connector, $7)
WHERE vehicle = $1 AND is_open
"""
CLOSE_SESSION = """
UPDATE sessions SET is_open = false, status = $2, ended_at = $3,
       energy_kwh = coalesce($4, energy_kwh), soc_end = coalesce($5, soc_end), updated_at = $6
WHERE id = $1
"""
SET_SHARE = """
UPDATE sessions SET share = $2, cause = $3, updated_at = $4 WHERE id = $1
"""
ERASE_COORDS = "UPDATE sessions SET latitude = NULL, longitude = NULL, region = $2 WHERE id = $1"
BUMP_VERSION = (
    "UPDATE sessions SET version = version + 1, updated_at = $2 WHERE id = $1 RETURNING *"
)
SET_EXTRAS = """
UPDATE sessions SET charge_point = coalesce($2, charge_point), comment = coalesce($3, comment),
       ocm_id = coalesce($4, ocm_id) WHERE id = $1
"""
SESSIONS_AT_PLACE = f"""
SELECT {SESSION_COLS} FROM sessions WHERE location = $1 AND id <> $2 FOR UPDATE
"""
SESSION_EVENT = "INSERT INTO session_events (session, at, event, detail) VALUES ($1, $2, $3, $4)"


async def session_event(
    conn: asyncpg.Connection, session_id: Any, at: datetime, event: str, **detail: Any
) -> None:
    await conn.execute(SESSION_EVENT, session_id, at, event, json.dumps(detail, default=str))


def session_state(r: asyncpg.Record | dict[str, Any], asked_cause: bool) -> sessions.State:
    return sessions.State(
        status=sessions.Status(r["status"]),
        share=sessions.Share(r["share"]),
        cause=r["cause"],
        asked_cause=asked_cause,
    )


# ---- questions ---------------------------------------------------------------------------------

INSERT_QUESTION = """
INSERT INTO questions (request_id, session, vehicle, kind, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
QUESTION = """
SELECT q.request_id, q.session, q.vehicle, q.kind, q.state, q.answer, q.expires_at
FROM questions q WHERE q.request_id = $1 FOR UPDATE
"""
ANSWER_QUESTION = """
UPDATE questions SET state = 'answered', answer = $2, answered_at = $3 WHERE request_id = $1
"""
CLOSE_QUESTIONS = """
UPDATE questions SET state = $3 WHERE session = $1 AND kind = $2 AND state = 'pending'
RETURNING request_id
"""
ASKED_CAUSE = "SELECT EXISTS (SELECT 1 FROM questions WHERE session = $1 AND kind = 'abort_reason')"
PENDING_COUNT = "SELECT count(*) FROM questions WHERE vehicle = $1 AND state = 'pending'"
# Not locked here: the expiry locks the vehicle first, then the question (LOCK_QUESTION), in the
# same order as a decision does, so an answer racing its expiry cannot deadlock with it.
DUE_QUESTIONS = """
SELECT request_id, session, vehicle, kind FROM questions
WHERE state = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2
"""
LOCK_PENDING_QUESTION = """
SELECT request_id FROM questions WHERE request_id = $1 AND state = 'pending' FOR UPDATE
"""
EXPIRE_QUESTION = "UPDATE questions SET state = 'expired' WHERE request_id = $1"
PENDING_FOR_VEHICLE = """
SELECT DISTINCT session FROM questions WHERE vehicle = $1 AND state = 'pending' AND kind = 'share'
"""
