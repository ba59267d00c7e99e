"""The push token registry (one row per app of a vehicle) and the push rows of the outbox.

Modelled on what the OVMS server keeps per app: owner and vehicle (through `vehicle`), app id,
push type (`platform`), key type (`sandbox`), key value (`token`) and `active`. A token that FCM
or APNs reports dead is made inactive, not deleted, so the owner's export still shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from service import wire

KIND = "push"
TEXT_MAX = 240  # both platforms show about two lines; a longer text is cut

UPSERT = """
INSERT INTO push_tokens (vehicle, app_id, platform, token, sandbox, active)
VALUES ($1, $2, $3, $4, $5, true)
ON CONFLICT (vehicle, app_id) DO UPDATE
SET platform = excluded.platform, token = excluded.token, sandbox = excluded.sandbox,
    active = true, updated_at = now()
"""
# A reinstalled app may come back under a new app id with the same token: push it once, not twice.
RETIRE_DUPLICATES = """
UPDATE push_tokens SET active = false, updated_at = now()
WHERE vehicle = $1 AND platform = $2 AND token = $3 AND app_id <> $4 AND active
"""
UNREGISTER = """
UPDATE push_tokens SET active = false, updated_at = now()
WHERE vehicle = $1 AND app_id = $2 AND active
"""
ENQUEUE_QUESTION = """
INSERT INTO outbox (kind, payload, target)
SELECT $2, $3, t.id FROM push_tokens t WHERE t.vehicle = $1 AND t.active
ORDER BY t.id
"""
# What the deliverer needs for one row: the token as it is now, and whether the question is open.
LOAD_FOR_DELIVERY = """
SELECT t.platform, t.token, t.sandbox, t.active,
       q.state AS question_state, q.expires_at <= now() AS question_expired
FROM push_tokens t
LEFT JOIN questions q ON q.request_id = $2 AND q.vehicle = t.vehicle
WHERE t.id = $1
"""
# Only the token that was refused: the app may have registered a fresh one meanwhile.
DEACTIVATE = """
UPDATE push_tokens SET active = false, updated_at = now()
WHERE id = $1 AND token = $2 AND active
"""
LIST = """
SELECT id, app_id, platform, token, sandbox, active, created_at, updated_at
FROM push_tokens WHERE vehicle = $1 ORDER BY id
"""


@dataclass(frozen=True, slots=True)
class Registration:
    id: int
    app_id: str
    platform: str
    token: str
    sandbox: bool
    active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Target:
    """One token as the deliverer finds it, with the state of the question it is to announce."""

    platform: str
    token: str
    sandbox: bool
    active: bool
    question_state: str | None  # None: no such question (deleted with its vehicle or session)
    question_expired: bool


async def register(conn: asyncpg.Connection, vehicle_pk: int, reg: wire.PushRegistration) -> None:
    """Record, replace or (token None) deactivate the push token of one app of a vehicle."""
    if reg.token is None:
        await conn.execute(UNREGISTER, vehicle_pk, reg.app_id)
        return
    await conn.execute(UPSERT, vehicle_pk, reg.app_id, reg.platform, reg.token, reg.sandbox)
    await conn.execute(RETIRE_DUPLICATES, vehicle_pk, reg.platform, reg.token, reg.app_id)


def payload(request_id: str, kind: str, text: str) -> bytes:
    """Encode the outbox payload of a push announcing one question."""
    body = {"request_id": request_id, "kind": kind, "text": text[:TEXT_MAX]}
    return json.dumps(body, separators=(",", ":")).encode()


async def enqueue_question(
    conn: asyncpg.Connection, vehicle_pk: int, request_id: str, kind: str, text: str
) -> int:
    """Queue one push per active token of the vehicle, in the caller's transaction; count them."""
    status: str = await conn.execute(
        ENQUEUE_QUESTION, vehicle_pk, KIND, payload(request_id, kind, text)
    )
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <n>"


async def load_target(conn: asyncpg.Connection, token_id: int, request_id: str) -> Target | None:
    """Return the token behind an outbox row and its question's state, or None if it is gone."""
    r = await conn.fetchrow(LOAD_FOR_DELIVERY, token_id, request_id)
    if r is None:
        return None
    return Target(
        platform=r["platform"],
        token=r["token"],
        sandbox=r["sandbox"],
        active=r["active"],
        question_state=r["question_state"],
        question_expired=bool(r["question_expired"]),
    )


async def deactivate(conn: asyncpg.Connection, token_id: int, token: str) -> bool:
    """Mark a token dead if it is still the one registered; say whether it was."""
    status: str = await conn.execute(DEACTIVATE, token_id, token)
    return status != "UPDATE 0"


async def registrations(conn: asyncpg.Connection, vehicle_pk: int) -> list[Registration]:
    """List every push registration of a vehicle, active or not."""
    return [Registration(**dict(r)) for r in await conn.fetch(LIST, vehicle_pk)]
