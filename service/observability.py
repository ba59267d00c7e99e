"""Prometheus metrics of one replica, the functions that record them, and the `/metrics` route.

Counters and the lag gauge describe this replica; the database gauges (sessions, outbox) are the
same on every replica, refreshed by `sample` every `metrics_sample_s`: aggregate them with max().
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import fastapi
import prometheus_client
import structlog
from starlette.requests import Request
from starlette.responses import Response

from service import outbox, topics

log = structlog.get_logger("metrics")

MESSAGES_IN = prometheus_client.Counter(
    "chargeshare_messages_in", "Inbound MQTT messages by topic kind.", ["kind"]
)
MESSAGES_OUT = prometheus_client.Counter(
    "chargeshare_messages_out", "MQTT messages published (PUBACK received) by topic kind.", ["kind"]
)
REJECTED = prometheus_client.Counter(
    "chargeshare_messages_rejected", "Inbound messages rejected, by error code.", ["code"]
)
RATE_LIMITED = prometheus_client.Counter(
    "chargeshare_messages_rate_limited",
    "Inbound messages dropped because their owner sent more than its rate.",
)
HANDLING = prometheus_client.Histogram(
    "chargeshare_message_handling_seconds",
    "From receipt of an inbound message to its commit (the PUBACK follows).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
REPLICA_LAG = prometheus_client.Gauge(
    "chargeshare_replica_lag_seconds",
    "Age of the oldest inbound message this replica has received and not yet committed.",
)
DELIVERED = prometheus_client.Counter(
    "chargeshare_deliveries", "Outbox rows delivered, by kind (mqtt, push, webhook).", ["kind"]
)
DELIVERY_FAILURES = prometheus_client.Counter(
    "chargeshare_delivery_failures",
    "Failed outbox deliveries by kind (mqtt, push, webhook) and outcome (retry, drop).",
    ["kind", "outcome"],
)
SESSIONS = prometheus_client.Gauge(
    "chargeshare_sessions", "Sessions in the database by status and sharing state.",
    ["status", "share"],
)  # fmt: skip
OUTBOX_DEPTH = prometheus_client.Gauge(
    "chargeshare_outbox_depth", "Rows waiting in the outbox, by kind.", ["kind"]
)
OUTBOX_OLDEST = prometheus_client.Gauge(
    "chargeshare_outbox_oldest_seconds", "Age of the oldest row waiting in the outbox, by kind.",
    ["kind"],
)  # fmt: skip

OUTBOX_KINDS = ("mqtt", "push", "webhook")

# Insertion order is arrival order, so the first entry is the oldest message in flight.
_inflight: dict[int, float] = {}
_ids = itertools.count()


def _lag() -> float:
    for arrived in _inflight.values():
        return max(0.0, time.monotonic() - arrived)
    return 0.0


REPLICA_LAG.set_function(_lag)


def inbound_kind(topic: str) -> str:
    """Return the metric label of an inbound topic: its kind, or `invalid`."""
    try:
        return topics.parse(topic).kind.value
    except topics.TopicError:
        return "invalid"


def outbound_kind(topic: str | None) -> str:
    """Return the metric label of a topic the service publishes."""
    if topic is None:
        return "other"
    if topic.startswith(topics.PUBLIC_ROOT + "/"):
        return "public"
    parts = topic.split("/")
    if len(parts) >= 5 and parts[0] == topics.ROOT and parts[3] == "chargeshare":
        if parts[4] in ("request", "status", "error"):
            return parts[4]
    return "other"


@asynccontextmanager
async def inbound(topic: str) -> AsyncIterator[None]:
    """Count an inbound message and track it as in flight until the block ends."""
    MESSAGES_IN.labels(inbound_kind(topic)).inc()
    key = next(_ids)
    start = time.monotonic()
    _inflight[key] = start
    try:
        yield
    finally:
        del _inflight[key]
        HANDLING.observe(time.monotonic() - start)


def rejected(code: str) -> None:
    """Count one rejected inbound message."""
    REJECTED.labels(code).inc()


def delivered(row: outbox.Row, outcome: outbox.Outcome) -> None:
    """Count the outcome of one outbox delivery attempt."""
    if isinstance(outcome, outbox.Done):
        DELIVERED.labels(row.kind).inc()
        if row.kind == "mqtt":
            MESSAGES_OUT.labels(outbound_kind(row.topic)).inc()
    elif isinstance(outcome, outbox.Retry):
        DELIVERY_FAILURES.labels(row.kind, "retry").inc()
    else:
        DELIVERY_FAILURES.labels(row.kind, "drop").inc()


SESSION_COUNTS = "SELECT status, share, count(*) AS n FROM sessions GROUP BY status, share"
OUTBOX_STATS = """
SELECT kind, count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS oldest
FROM outbox GROUP BY kind
"""


async def sample_once(pool: asyncpg.Pool) -> None:
    """Refresh the database gauges (sessions by status, outbox depth and age)."""
    async with pool.acquire() as conn:
        sessions = await conn.fetch(SESSION_COUNTS)
        stats = {r["kind"]: r for r in await conn.fetch(OUTBOX_STATS)}
    seen = {(r["status"], r["share"]): int(r["n"]) for r in sessions}
    # A combination that disappeared reads 0 rather than keeping its last value.
    for labels in list(SESSIONS._metrics):
        if labels not in seen:
            SESSIONS.labels(*labels).set(0)
    for (status, share), n in seen.items():
        SESSIONS.labels(status, share).set(n)
    for kind in OUTBOX_KINDS:
        row = stats.get(kind)
        OUTBOX_DEPTH.labels(kind).set(int(row["n"]) if row else 0)
        OUTBOX_OLDEST.labels(kind).set(float(row["oldest"]) if row else 0.0)


async def sample(pool: asyncpg.Pool, every_s: float) -> None:
    """Refresh the database gauges every `every_s` seconds until cancelled (0 = never)."""
    if every_s <= 0:
        return
    while True:
        try:
            await sample_once(pool)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("metrics sampling failed", error=str(exc))
        await asyncio.sleep(every_s)


async def metrics_endpoint(request: Request) -> Response:
    """Serve every metric in the Prometheus text format."""
    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)


def with_metrics(app: fastapi.FastAPI) -> fastapi.FastAPI:
    """Add GET /metrics to the HTTP app and return it."""
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return app
