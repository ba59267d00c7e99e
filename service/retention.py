"""Delete what the service no longer needs to keep (docs/privacy.md, "How long").

- Sessions that were never published (`private`, `unshared`) are deleted, with their questions and
  events, `unshared_retention_days` after they ended.
- A place where the vehicle has not started a charge for that long is deleted with its keyed
  hashes: its standing answer lapses, and a place still hashed under a previous key goes too, so a
  key rotation ends even for places never visited again.
- Push registrations that the app or the platform retired that long ago are deleted.
- A safety net: coordinates found on a session that is neither asking nor shared are erased.

Coordinates of a session whose question is unanswered are erased when the question expires
(`question_ttl_s`, service/settle.py), not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import structlog

from service.config import Settings
from service.domain import privacy
from service.errors import TRANSIENT

log = structlog.get_logger("retention")

BATCH = 1000

DELETE_UNSHARED = """
DELETE FROM sessions WHERE id IN (
    SELECT id FROM sessions
    WHERE share IN ('private', 'unshared') AND NOT is_open AND version = 0 AND ended_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
# A place's last use is its newest session, or its last answer (updated_at, set at creation too).
DELETE_IDLE_PLACES = """
DELETE FROM locations WHERE id IN (
    SELECT l.id FROM locations l
    WHERE l.updated_at < $1
      AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.location = l.id
                      AND (s.started_at >= $1 OR s.is_open OR s.share = 'asking'))
    LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
DELETE_RETIRED_TOKENS = """
DELETE FROM push_tokens WHERE id IN (
    SELECT id FROM push_tokens WHERE NOT active AND updated_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
ERASE_STRAY_COORDS = """
UPDATE sessions SET latitude = NULL, longitude = NULL,
       region = CASE WHEN version > 0 THEN region END
WHERE latitude IS NOT NULL AND share NOT IN ('asking', 'shared')
"""
PREVIOUS_KEY_CELLS = "SELECT count(DISTINCT location) FROM location_cells WHERE key_id <> $1"


@dataclass(frozen=True, slots=True)
class Purged:
    """What one purge removed, and how many places still wait for re-keying."""

    sessions: int = 0
    places: int = 0
    push_tokens: int = 0
    stray_coordinates: int = 0
    places_under_previous_key: int = 0


def _count(status: str) -> int:
    """Return the row count of an asyncpg command status such as 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])


async def _drain(pool: asyncpg.Pool, sql: str, cutoff: datetime) -> int:
    """Run a batched delete until it deletes nothing; return the total."""
    total = 0
    while True:
        async with pool.acquire() as conn:
            n = _count(await conn.execute(sql, cutoff, BATCH))
        total += n
        if n < BATCH:
            return total


async def purge(pool: asyncpg.Pool, settings: Settings, now: datetime) -> Purged:
    """Delete history older than the retention period as of `now`; return what went."""
    cutoff = now - timedelta(days=settings.unshared_retention_days)
    async with pool.acquire() as conn:
        stray = _count(await conn.execute(ERASE_STRAY_COORDS))
    if stray:
        log.error("coordinates found on unshared sessions; erased", sessions=stray)
    sessions = await _drain(pool, DELETE_UNSHARED, cutoff)
    places = await _drain(pool, DELETE_IDLE_PLACES, cutoff)
    tokens = await _drain(pool, DELETE_RETIRED_TOKENS, cutoff)
    pending = 0
    if settings.location_secret:
        async with pool.acquire() as conn:
            current = privacy.key_id(settings.location_secret)
            pending = int(await conn.fetchval(PREVIOUS_KEY_CELLS, current))
    return Purged(sessions, places, tokens, stray, pending)


async def loop(
    pool: asyncpg.Pool,
    settings: Settings,
    clock: Callable[[], datetime],
    every_s: float = 3600.0,
) -> None:
    """Purge at start and then every `every_s` seconds, until cancelled."""
    while True:
        try:
            done = await purge(pool, settings, clock())
            log.info(
                "retention purge",
                sessions=done.sessions,
                places=done.places,
                push_tokens=done.push_tokens,
                places_under_previous_key=done.places_under_previous_key,
            )
        except (*TRANSIENT, asyncpg.PostgresError) as exc:
            log.warning("retention purge failed; will retry", error=str(exc))
        await asyncio.sleep(every_s)
