"""The outbox: everything that leaves the process is a row first, sent after the commit.

A dispatcher per kind (mqtt, push, webhook) leases due rows (`available_at` moves past the
lease), hands each to its Deliverer in its own task, then deletes the row (Done or Drop) or
reschedules it with exponential backoff and jitter (Retry). Rows sharing an `ordering_key` go out
one at a time in id order; rows with different keys never wait for each other. A replica that
dies mid-delivery leaves a lease that simply runs out: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg
import structlog

from service import observability
from service.errors import TRANSIENT

log = structlog.get_logger("outbox")


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    kind: str
    topic: str | None
    payload: bytes
    qos: int
    retain: bool
    target: int | None
    ordering_key: str | None
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Done:
    """Delivered: delete the row."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Not delivered yet: try again after `after_s`, or after the backoff when None."""

    reason: str
    after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Drop:
    """Never deliverable (dead token, gone endpoint): delete the row."""

    reason: str


Outcome = Done | Retry | Drop


class Deliverer(Protocol):
    """Sends one kind of outbox row."""

    kind: str

    async def deliver(self, row: Row) -> Outcome: ...


ENQUEUE = """
INSERT INTO outbox (kind, topic, payload, qos, retain, target, ordering_key, available_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()))
RETURNING id
"""


async def enqueue(
    conn: asyncpg.Connection,
    kind: str,
    payload: bytes,
    *,
    topic: str | None = None,
    qos: int = 1,
    retain: bool = False,
    target: int | None = None,
    ordering_key: str | None = None,
    available_at: datetime | None = None,
) -> int:
    """Add one row to the outbox inside the caller's transaction; return its id."""
    row_id: int = await conn.fetchval(
        ENQUEUE, kind, topic, payload, qos, retain, target, ordering_key, available_at
    )
    return row_id


# Claim due rows whose ordering key has no earlier row still waiting (leased rows count).
LEASE = """
WITH due AS (
    SELECT o.id FROM outbox o
    WHERE o.kind = $1 AND o.available_at <= now()
      AND (o.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM outbox p
            WHERE p.ordering_key = o.ordering_key AND p.kind = o.kind AND p.id < o.id))
    ORDER BY o.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox o SET available_at = now() + make_interval(secs => $3), attempts = o.attempts + 1
FROM due WHERE o.id = due.id
RETURNING o.id, o.kind, o.topic, o.payload, o.qos, o.retain, o.target, o.ordering_key,
          o.attempts, o.created_at
"""
DELETE = "DELETE FROM outbox WHERE id = $1"
RESCHEDULE = """
UPDATE outbox SET available_at = now() + make_interval(secs => $2), last_error = $3 WHERE id = $1
"""
DEPTH = "SELECT kind, count(*) AS n FROM outbox GROUP BY kind"


def backoff(attempts: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter for the given attempt number (1-based)."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


class Dispatcher:
    """Deliver the due rows of one kind, concurrently, until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        deliverer: Deliverer,
        *,
        concurrency: int = 32,
        lease_s: float = 30.0,
        poll_s: float = 0.05,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 600.0,
    ) -> None:
        self.pool = pool
        self.deliverer = deliverer
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Look for due rows now (called after a commit that enqueued some)."""
        self._wake.set()

    async def run(self) -> None:
        """Lease and deliver forever."""
        kind = self.deliverer.kind
        try:
            while True:
                free = self.concurrency - len(self._inflight)
                rows = []
                if free > 0:
                    try:
                        async with self.pool.acquire() as conn:
                            rows = await conn.fetch(LEASE, kind, free, self.lease_s)
                    except (*TRANSIENT, asyncpg.PostgresError) as exc:
                        log.warning("outbox lease failed; will retry", kind=kind, error=str(exc))
                        await asyncio.sleep(1.0)
                for r in rows:
                    task = asyncio.create_task(self._one(Row(**dict(r))), name=f"{kind}-{r['id']}")
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                if len(rows) == free and free > 0:
                    continue  # more may be due
                self._wake.clear()
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the event
                # is set, and the loop would then never stop.
                try:
                    async with asyncio.timeout(self.poll_s if rows else 0.5):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for t in self._inflight:
                t.cancel()

    async def _one(self, row: Row) -> None:
        try:
            outcome = await self.deliverer.deliver(row)
        except Exception as exc:  # a deliverer bug must not lose the row or stop the loop
            log.exception("deliverer raised; will retry", kind=row.kind, outbox_id=row.id)
            outcome = Retry(f"{type(exc).__name__}: {exc}")
        observability.delivered(row, outcome)
        try:
            async with self.pool.acquire() as conn:
                if isinstance(outcome, Retry):
                    delay = outcome.after_s
                    if delay is None:
                        delay = backoff(row.attempts, self.backoff_base_s, self.backoff_cap_s)
                    await conn.execute(RESCHEDULE, row.id, delay, outcome.reason[:500])
                    log.info(
                        "delivery failed; will retry",
                        kind=row.kind,
                        outbox_id=row.id,
                        attempt=row.attempts,
                        retry_in_s=round(delay, 2),
                        reason=outcome.reason,
                    )
                else:
                    await conn.execute(DELETE, row.id)
                    if isinstance(outcome, Drop):
                        log.warning(
                            "delivery dropped",
                            kind=row.kind,
                            outbox_id=row.id,
                            reason=outcome.reason,
                        )
        except (*TRANSIENT, asyncpg.PostgresError) as exc:
            # The lease runs out and the row is delivered again: at least once.
            log.warning("outbox update failed", kind=row.kind, outbox_id=row.id, error=str(exc))
        self._wake.set()
