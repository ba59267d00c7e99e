"""Deliver webhook outbox rows to partners: signed POSTs, one attempt per lease, each logged.

The outbox dispatcher gives the retries (backoff with jitter), the per-session order (ordering
key `<partner>:<session>`) and the independence of partners. This deliverer adds a cap on the
deliveries in flight to one partner, so that a slow partner holds a few of the dispatcher's
slots, never all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import httpx
import structlog

from service import outbox, webhooks
from service.adapters import partners
from service.config import Settings

log = structlog.get_logger("webhooks")

MAX_RETRY_AFTER_S = 3600.0


def _retry_after(value: str | None) -> float | None:
    """Return a Retry-After header given in seconds, bounded; None for dates or junk."""
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


class WebhookDeliverer:
    """Send webhook rows: `target` is the partner id, `payload` the signed body."""

    kind = "webhook"

    def __init__(self, pool: asyncpg.Pool, settings: Settings, client: httpx.AsyncClient) -> None:
        self.pool = pool
        self.settings = settings
        self.client = client
        self._masters = [
            m for m in (settings.location_secret, settings.location_secret_previous) if m
        ]
        self._inflight: Counter[int] = Counter()

    async def deliver(self, row: outbox.Row) -> outbox.Outcome:
        """Make one attempt at one row."""
        if row.target is None:
            return outbox.Drop("webhook row without a partner")
        try:
            session = json.loads(row.payload)["session"]
            msg_id = webhooks.message_id(str(session["id"]), int(session["version"]))
        except (ValueError, KeyError, TypeError):
            return outbox.Drop("webhook payload is not an event")
        async with self.pool.acquire() as conn:
            target = await partners.webhook_target(conn, row.target)
        if target is None:
            return outbox.Drop("partner removed, disabled or without a webhook")
        if self._inflight[target.id] >= self.settings.webhook_partner_inflight:
            return outbox.Retry("partner busy", after_s=random.uniform(1.0, 3.0))
        self._inflight[target.id] += 1
        try:
            return await self._attempt(row, target, msg_id)
        finally:
            self._inflight[target.id] -= 1
            if self._inflight[target.id] <= 0:
                del self._inflight[target.id]

    async def _attempt(
        self, row: outbox.Row, target: partners.WebhookTarget, msg_id: str
    ) -> outbox.Outcome:
        secret = webhooks.unseal(target.sealed_secret, masters=self._masters, partner=target.name)
        timestamp = int(time.time())
        headers = webhooks.headers(secret, msg_id, timestamp, row.payload)
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            # One deadline for the whole exchange: httpx's timeout is per read, not in total.
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                async with self.client.stream(
                    "POST",
                    target.url,
                    content=row.payload,
                    headers=headers,
                    timeout=self.settings.webhook_timeout_s,
                    follow_redirects=False,
                ) as response:
                    status = response.status_code
                    retry_after = _retry_after(response.headers.get("retry-after"))
        except TimeoutError:
            error = f"no answer within {self.settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

        outcome: outbox.Outcome
        if status is not None and 200 <= status < 300:
            outcome = outbox.Done()
        elif status == 410:
            outcome = outbox.Drop("endpoint gone (410): webhook disabled")
        else:
            reason = error or f"HTTP {status}"
            age = (datetime.now(UTC) - row.created_at).total_seconds()
            if age >= self.settings.webhook_max_age_s:
                outcome = outbox.Drop(f"gave up after {age:.0f} s: {reason}")
                error = f"gave up: {reason}"
            else:
                outcome = outbox.Retry(
                    reason, after_s=retry_after if status in (429, 503) else None
                )
                error = error or f"HTTP {status}"

        async with self.pool.acquire() as conn, conn.transaction():
            await partners.record_delivery(
                conn,
                partner_id=target.id,
                outbox_id=row.id,
                webhook_id=msg_id,
                status=status,
                error=error,
            )
            if status == 410:
                await partners.disable_webhook(conn, target.id, f"HTTP 410 at {msg_id}")
        log.info(
            "webhook attempt",
            partner=target.name,
            webhook_id=msg_id,
            outbox_id=row.id,
            status=status,
            error=error,
            outcome=type(outcome).__name__,
        )
        return outcome


@contextlib.asynccontextmanager
async def build(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[WebhookDeliverer]:
    """Open the HTTP client of webhook deliveries and yield the deliverer."""
    async with httpx.AsyncClient(
        follow_redirects=False,
        timeout=settings.webhook_timeout_s,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        headers={"user-agent": "ChargeShare-Webhooks/1"},
        trust_env=False,  # partner URLs are reached directly, never through an env proxy
    ) as client:
        yield WebhookDeliverer(pool, settings, client)
