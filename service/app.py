"""Open every resource in one AsyncExitStack and run the long-running loops in one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog
import uvicorn

from service import handler, observability, outbox, ratelimit, retention, settle
from service.adapters import api, leader, mqtt, push, schema, webhook_delivery
from service.config import Settings

log = structlog.get_logger("app")


async def connect_pool(settings: Settings) -> asyncpg.Pool:
    """Create the connection pool, waiting for the database with growing delays."""
    delay = 0.5
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                settings.database_url, min_size=2, max_size=12
            )
            return pool
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("database unreachable; retrying", error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


class _Api(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield  # the service handles signals itself; uvicorn must not re-raise them


@dataclass
class Service:
    """The running parts, for tests and the CLI."""

    settings: Settings
    pool: asyncpg.Pool
    handler: handler.Handler
    events: mqtt.Link


@contextlib.asynccontextmanager
async def running(settings: Settings, *, api_enabled: bool = True) -> AsyncIterator[Service]:
    """Run the whole service until the context exits."""
    secrets = settings.location_keys()
    async with contextlib.AsyncExitStack() as stack:
        pool = await connect_pool(settings)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await schema.migrate(conn)
        loops = asyncio.TaskGroup()
        wakers: list[outbox.Dispatcher] = []

        def wake() -> None:
            judge.wake()
            for d in wakers:
                d.wake()

        judge = settle.Loop(pool, settings, secrets, handler.utcnow, wake)
        h = handler.Handler(pool, settings, wake=wake)

        async def on_message(
            topic: str, payload: bytes, retained: bool, since: datetime | None
        ) -> None:
            await h.handle(topic, payload, retained=retained, since=since)

        limited = ratelimit.guard(
            ratelimit.OwnerLimiter.from_settings(settings), on_message, h.reject
        )
        events = await stack.enter_async_context(mqtt.events_link(settings, limited))
        wakers.append(outbox.Dispatcher(pool, mqtt.MqttDeliverer(events), concurrency=64))
        pusher = push.build(settings, pool)
        if pusher is not None:
            await stack.enter_async_context(pusher)  # closes the FCM and APNs clients
            wakers.append(outbox.Dispatcher(pool, pusher))
        hooks = await stack.enter_async_context(webhook_delivery.build(settings, pool))
        # Each partner holds at most `webhook_partner_inflight` slots; many slow partners need many.
        wakers.append(outbox.Dispatcher(pool, hooks, concurrency=64, backoff_cap_s=3600.0))
        await stack.enter_async_context(loops)
        tasks = [
            loops.create_task(
                leader.hold_metrics(settings, lambda: mqtt.metrics_link(settings, limited)),
                name="metrics-consumer",
            ),
            loops.create_task(judge.run(), name="settle"),
            loops.create_task(retention.loop(pool, settings, handler.utcnow), name="retention"),
            loops.create_task(
                observability.sample(pool, settings.metrics_sample_s), name="metrics"
            ),
        ]
        tasks += [loops.create_task(d.run(), name=f"outbox-{d.deliverer.kind}") for d in wakers]
        server = None
        if api_enabled:
            config = uvicorn.Config(
                observability.with_metrics(api.create_app(settings, pool)),
                host=settings.api_host,
                port=settings.api_port,
                log_config=None,
                access_log=False,
            )
            server = _Api(config)
            loops.create_task(server.serve(), name="api")
        log.info("service running", client_id=settings.client_id, push=pusher is not None)
        try:
            yield Service(settings, pool, h, events)
        finally:
            if server is not None:
                server.should_exit = True  # uvicorn finishes its requests, then its task ends
            for task in tasks:
                task.cancel()


async def serve(settings: Settings) -> None:
    """Run until cancelled (SIGTERM / SIGINT)."""
    async with running(settings):
        await asyncio.Event().wait()
