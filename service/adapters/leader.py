"""One replica at a time consumes the metric stream: the holder of a Postgres advisory lock.

Mosquitto's shared subscriptions are round-robin, so with several consumers two metrics of one
vehicle can be handled by two replicas and an older value can commit last (docs/architecture.md).
The metric stream therefore has a single consumer: whichever replica holds the session-level
advisory lock of its share group subscribes its metrics link; the others wait. When the leader
dies, its database connection closes, the lock is free, and another replica takes over within
about a second; the broker's retained metrics bring it up to date. Events, grid logs and app
topics still go to every replica (they carry their own order or are idempotent).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import asyncpg
import structlog

from service.adapters.mqtt import Link
from service.config import Settings
from service.errors import TRANSIENT

log = structlog.get_logger("leader")

TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext('chargeshare metrics ' || $1))"
CHECK_S = 1.0  # how often the leader checks that its lock's connection is still there


async def hold_metrics(settings: Settings, make_link: Callable[[], Link]) -> None:
    """Consume the metric stream whenever this replica holds the lock; forever."""
    while True:
        conn: asyncpg.Connection | None = None
        link: Link | None = None
        try:
            conn = await asyncpg.connect(settings.database_url)
            if not await conn.fetchval(TRY_LOCK, settings.share_group):
                await conn.close()
                conn = None
                await asyncio.sleep(CHECK_S * random.uniform(0.8, 1.2))
                continue
            log.info("metrics consumer: this replica", client_id=settings.client_id)
            link = make_link()
            await link.connect()
            while True:  # the lock lives as long as this connection
                await asyncio.sleep(CHECK_S)
                await conn.fetchval("SELECT 1")
        except (*TRANSIENT, asyncpg.PostgresError) as exc:
            log.warning("metrics consumer: lock lost; stepping down", error=str(exc))
            await asyncio.sleep(CHECK_S)
        finally:
            if link is not None:
                await link.disconnect()
            if conn is not None:
                conn.terminate()
