"""Prometheus metrics, health and readiness of a running service, read over its HTTP port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import app, localstack, observability, outbox, topics
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.mqttprobe import Probe

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Return every sample of a /metrics page by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _scrape_until(http: httpx.AsyncClient, done: Callable[[Samples], bool]) -> Samples:
    samples: Samples = {}
    for _ in range(300):
        try:
            r = await http.get("/metrics")
        except httpx.ConnectError:  # the HTTP server is still starting
            await asyncio.sleep(0.05)
            continue
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        samples = parse(r.text)
        if done(samples):
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"metrics never matched; last: {sorted(samples)[:80]}")


async def test_metrics_count_messages_sessions_and_outbox(
    broker: BrokerHandle,
    database_url: str,
    owner: tuple[str, str],
    probe: Callable[[str, str], Probe],
    db: asyncpg.Connection,
) -> None:
    """After an opt-in, a bad message and a charge start, /metrics shows each of them."""
    port = localstack.free_port()
    settings = service_settings(broker, database_url, api_port=port, metrics_sample_s=0.05)
    name, password = owner
    car, phone = probe(name, password), probe(name, password)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    async with (
        app.running(settings, api_enabled=True),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        first = await _scrape_until(http, lambda s: True)
        steps.opt_in(phone, name, "car")
        await phone.wait_for(steps.status(enabled=True))
        phone.publish(topics.optin(name, "car"), b"{not json")
        await phone.wait_for(steps.error("invalid_payload"))
        steps.plug_in(car, name, "car", steps.STATION)
        await phone.wait_for(steps.question("share"))

        def ready(s: Samples) -> bool:
            return value(
                s, "chargeshare_sessions", status="charging", share="asking"
            ) == 1 and value(s, "chargeshare_messages_out_total", kind="request") > value(
                first, "chargeshare_messages_out_total", kind="request"
            )

        s = await _scrape_until(http, ready)
        for kind in ("optin", "metric"):
            assert value(s, "chargeshare_messages_in_total", kind=kind) > value(
                first, "chargeshare_messages_in_total", kind=kind
            ), kind
        for kind in ("status", "error", "request"):
            assert value(s, "chargeshare_messages_out_total", kind=kind) > value(
                first, "chargeshare_messages_out_total", kind=kind
            ), kind
        assert value(s, "chargeshare_messages_rejected_total", code="invalid_payload") > value(
            first, "chargeshare_messages_rejected_total", code="invalid_payload"
        )
        assert value(s, "chargeshare_deliveries_total", kind="mqtt") > 0
        for kind in observability.OUTBOX_KINDS:
            assert ("chargeshare_outbox_depth", (("kind", kind),)) in s
            assert ("chargeshare_outbox_oldest_seconds", (("kind", kind),)) in s
        assert ("chargeshare_replica_lag_seconds", ()) in s
        assert value(s, "chargeshare_message_handling_seconds_count") > 0

        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        openapi = (await http.get("/openapi.json")).json()
        assert "/metrics" not in openapi["paths"]  # an operator's endpoint, not the partner API


async def test_outbox_gauges_follow_the_table(database_url: str) -> None:
    """Sampling reports each kind's waiting rows and the oldest one's age, zero when empty."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await observability.sample_once(pool)
        assert observability.OUTBOX_DEPTH.labels("webhook")._value.get() == 0
        async with pool.acquire() as conn:
            for _ in range(3):
                await outbox.enqueue(conn, "webhook", b"{}", target=1)
            await conn.execute("UPDATE outbox SET created_at = now() - interval '1 hour'")
        await observability.sample_once(pool)
        assert observability.OUTBOX_DEPTH.labels("webhook")._value.get() == 3
        assert observability.OUTBOX_DEPTH.labels("push")._value.get() == 0
        assert observability.OUTBOX_OLDEST.labels("webhook")._value.get() >= 3600
    finally:
        await pool.close()


def _row(kind: str, topic: str | None = None) -> outbox.Row:
    return outbox.Row(1, kind, topic, b"", 1, False, None, None, 1, datetime.now(UTC))


@pytest.mark.parametrize(
    ("outcome", "counter", "labels"),
    [
        (outbox.Retry("503 from FCM"), "chargeshare_delivery_failures_total", ("push", "retry")),
        (
            outbox.Drop("token unregistered"),
            "chargeshare_delivery_failures_total",
            ("push", "drop"),
        ),
        (outbox.Done(), "chargeshare_deliveries_total", ("push",)),
    ],
)
def test_delivery_outcomes_are_counted(
    outcome: outbox.Outcome, counter: str, labels: tuple[str, ...]
) -> None:
    """A retried or dropped push counts as a failure of its kind; a delivered one as a delivery."""
    metric = (
        observability.DELIVERY_FAILURES
        if counter.startswith("chargeshare_delivery_failures")
        else observability.DELIVERED
    )
    before = metric.labels(*labels)._value.get()
    observability.delivered(_row("push"), outcome)
    assert metric.labels(*labels)._value.get() == before + 1


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("chargeshare/public/sessions/u/1/0", "public"),
        ("ovms/o/v/chargeshare/request/" + "a" * 32, "request"),
        ("ovms/o/v/chargeshare/status", "status"),
        ("ovms/o/v/chargeshare/error", "error"),
        ("ovms/o/v/metric/v/b/soc", "other"),
    ],
)
def test_published_topics_are_labelled_by_kind(topic: str, kind: str) -> None:
    """Each topic the service publishes is counted under its kind."""
    assert observability.outbound_kind(topic) == kind


async def test_replica_lag_is_the_oldest_message_in_flight() -> None:
    """The lag gauge reads the age of the oldest message being handled, and 0 when idle."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle() -> None:
        async with observability.inbound("ovms/o/v/chargeshare/optin"):
            started.set()
            await release.wait()

    task = asyncio.create_task(handle())
    await started.wait()
    assert len(observability._inflight) >= 1
    assert _lag() >= 0.0
    release.set()
    await task
    assert _lag() == 0.0


def _lag() -> float:
    return float(next(iter(observability.REPLICA_LAG.collect())).samples[0].value)


def test_metrics_page_is_prometheus_text() -> None:
    """The registry renders as Prometheus text with the service's metric families."""
    from prometheus_client import REGISTRY, generate_latest

    names = {f.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
    assert {
        "chargeshare_messages_in",
        "chargeshare_messages_out",
        "chargeshare_sessions",
        "chargeshare_outbox_depth",
        "chargeshare_delivery_failures",
        "chargeshare_replica_lag_seconds",
    } <= names
