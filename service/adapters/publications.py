"""Published versions of sessions: stored once per (session, version), fanned out to webhooks."""

from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Any

import asyncpg

from service import outbox, wire
from service.adapters import partners

INSERT = """
INSERT INTO publications (session, version, event_type, record, happened_at)
VALUES ($1, $2, $3, $4::jsonb, $5)
ON CONFLICT (session, version) DO NOTHING
RETURNING event_type, record::text AS record, happened_at
"""
EXISTING = """
SELECT event_type, record::text AS record, happened_at
FROM publications WHERE session = $1 AND version = $2
"""

_shuffle = random.SystemRandom().shuffle


def public_event(event_type: str, record: dict[str, Any]) -> bytes:
    """Return the MQTT payload `{"type", "session"}` of one publication."""
    event = wire.PublicEvent.model_validate({"type": event_type, "session": record})
    return event.model_dump_json().encode()


def webhook_event(event_type: str, record: dict[str, Any], happened_at: datetime) -> bytes:
    """Return the webhook body `{"type", "session", "timestamp"}` of one publication."""
    event = wire.WebhookEvent.model_validate(
        {"type": event_type, "session": record, "timestamp": happened_at}
    )
    return event.model_dump_json().encode()


async def record(
    conn: asyncpg.Connection,
    *,
    session_id: str,
    version: int,
    event_type: str,
    record: dict[str, Any],
    happened_at: datetime,
) -> bytes:
    """Store a session version (first content wins), queue its webhooks, return its event."""
    canonical = wire.Record.model_validate(record).model_dump(mode="json")
    row = await conn.fetchrow(
        INSERT, session_id, version, event_type, json.dumps(canonical), happened_at
    )
    if row is None:
        # A re-delivery: the pair's content and its webhooks were settled by the first commit.
        row = await conn.fetchrow(EXISTING, session_id, version)
        return public_event(row["event_type"], json.loads(row["record"]))
    stored = json.loads(row["record"])
    body = webhook_event(row["event_type"], stored, row["happened_at"])
    ids = await partners.webhook_partner_ids(conn)
    _shuffle(ids)  # the first partner leased gets a head start: no partner always has it
    for partner_id in ids:
        await outbox.enqueue(
            conn,
            "webhook",
            body,
            target=partner_id,
            ordering_key=f"{partner_id}:{session_id}",
        )
    return public_event(row["event_type"], stored)
