"""The service's MQTT links (gmqtt, MQTT 5): inbound shared subscriptions and outbox publishing.

Two connections per replica:
- `<client id>`: persistent session (clean start off, session expiry), QoS 1 shared
  subscriptions for events, grid logs and app topics; each message is acked only after the
  handler returns (after the commit). It also publishes the outbox (QoS 1, awaiting PUBACK).
- `<client id>-metrics`: no session, the QoS 0 metric stream. A persistent session would keep
  collecting metrics while the replica is down and replay them stale and out of order.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import gmqtt
import structlog
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.storage import PersistentStorage

from service import observability, outbox, topics
from service.config import Settings

log = structlog.get_logger("mqtt")

OnMessage = Callable[[str, bytes, bool, datetime | None], Awaitable[None]]


class _AckStorage(PersistentStorage):  # type: ignore[misc]
    """gmqtt's in-flight store, also resolving one future per message id on PUBACK."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: dict[int, asyncio.Future[None]] = {}

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        fut = self.waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class KeyedLocks:
    """One FIFO lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Link:
    """One gmqtt connection that reconnects with growing, jittered delays and logs each loss."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        filters: tuple[str, ...],
        qos: int,
        on_message: OnMessage,
        *,
        persistent: bool,
        concurrency: int = 64,
        ordered: bool = True,
    ) -> None:
        self.settings = settings
        self.name = client_id
        self.filters = filters
        self.qos = qos
        self.on_message = on_message
        self.storage = _AckStorage()
        kwargs: dict[str, Any] = {"receive_maximum": concurrency}
        if persistent:
            kwargs["session_expiry_interval"] = settings.session_expiry_s
        self.client = gmqtt.Client(
            client_id,
            clean_session=not persistent,
            optimistic_acknowledgement=False,
            persistent_storage=self.storage,
            **kwargs,
        )
        self.client.set_auth_credentials(settings.mqtt_username, settings.mqtt_password or None)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": 0.5})
        self.subscribed_at: datetime | None = None
        self._closing = False  # disconnect() was called: a loss from now on is ours
        self.connected = asyncio.Event()
        self.ordered = ordered
        self._slots = asyncio.Semaphore(concurrency)
        self._order = KeyedLocks()

    async def connect(self) -> None:
        context: ssl.SSLContext | bool = False
        if self.settings.mqtt_tls_ca:
            context = ssl.create_default_context(cafile=self.settings.mqtt_tls_ca)
        delay = 0.5
        while True:
            try:
                await self.client.connect(
                    self.settings.mqtt_host,
                    self.settings.mqtt_port,
                    ssl=context,
                    version=MQTTv50,
                    keepalive=30,
                )
                return
            except (OSError, gmqtt.mqtt.handler.MQTTConnectError) as exc:
                log.warning(
                    "broker unreachable; retrying",
                    link=self.name,
                    error=str(exc),
                    retry_in_s=round(delay, 1),
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)

    async def disconnect(self) -> None:
        self._closing = True
        self.client.stop_reconnect()
        if self.client.is_connected:
            await self.client.disconnect()

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, props: Any) -> None:
        log.info("broker connected", link=self.name, session_present=bool(flags))
        self.client.reconnect_delay = 0.5
        self.subscribed_at = datetime.now(UTC)
        subs = [
            gmqtt.Subscription(f"$share/{self.settings.share_group}/{f}", qos=self.qos)
            for f in self.filters
        ]
        self.client.subscribe(subs)
        self.connected.set()

    def _on_disconnect(self, client: gmqtt.Client, packet: Any, exc: Any = None) -> None:
        self.connected.clear()
        if self._closing:
            log.info("broker link closed", link=self.name)
            return
        delay = min(30.0, max(0.5, float(self.client.reconnect_delay)) * 2)
        self.client.reconnect_delay = delay * random.uniform(0.8, 1.2)
        log.warning(
            "broker connection lost; reconnecting",
            link=self.name,
            retry_in_s=round(self.client.reconnect_delay, 1),
        )

    async def _on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, props: dict[str, Any]
    ) -> int:
        retained = bool(props.get("retain"))
        if not self.ordered:
            # QoS 0 metrics: the handler keeps each vehicle's arrival order itself (and applies
            # what queues up in one transaction), so nothing may wait here before it is called.
            async with observability.inbound(topic):
                await self.on_message(topic, payload, retained, self.subscribed_at)
            return 0
        # One vehicle's messages are handled in arrival order; different vehicles in parallel.
        async with (
            observability.inbound(topic),
            self._order.hold("/".join(topic.split("/", 3)[:3])),
            self._slots,
        ):
            await self.on_message(topic, payload, retained, self.subscribed_at)
        return 0  # PUBACK / PUBREC with success, after the commit

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1/2), or raise TimeoutError."""
        message = gmqtt.Message(topic, payload, qos=qos, retain=retain)
        # gmqtt's publish() hides the message id; this is its body, keeping the id to await.
        mid, package = self.client._connection.publish(message)
        if qos == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.storage.waiters[mid] = fut
        self.storage.push_message(mid, package)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            # The outbox sends it again (and newer rows after it): a copy left here would be
            # replayed on reconnect and could bring back an older retained message.
            self.storage.remove_message_by_mid(mid)
            raise
        finally:
            self.storage.waiters.pop(mid, None)


class MqttDeliverer:
    """Outbox deliverer for kind 'mqtt': publish QoS 1 and wait for the broker's PUBACK."""

    kind = "mqtt"

    def __init__(self, link: Link, timeout_s: float = 10.0) -> None:
        self.link = link
        self.timeout_s = timeout_s

    async def deliver(self, row: outbox.Row) -> outbox.Outcome:
        if not self.link.client.is_connected or row.topic is None:
            return outbox.Retry("broker not connected", after_s=1.0)
        try:
            await self.link.publish(row.topic, row.payload, row.qos, row.retain, self.timeout_s)
        except (TimeoutError, OSError, AttributeError, OverflowError) as exc:
            # OverflowError: gmqtt ran out of message ids (more in flight than it may have).
            return outbox.Retry(f"publish not acknowledged: {exc!r}", after_s=1.0)
        return outbox.Done()


def metrics_link(settings: Settings, on_message: OnMessage) -> Link:
    """Return the (unconnected) session-less link of the QoS 0 metric stream."""
    return Link(
        settings,
        settings.client_id + "-metrics",
        topics.METRIC_FILTERS,
        0,
        on_message,
        persistent=False,
        concurrency=256,
        ordered=False,
    )


@asynccontextmanager
async def events_link(settings: Settings, on_message: OnMessage) -> AsyncIterator[Link]:
    """Open the persistent events link (events, grid logs, app topics, outbox); close it."""
    events = Link(
        settings, settings.client_id, topics.EVENT_FILTERS, 1, on_message, persistent=True
    )
    await events.connect()
    try:
        yield events
    finally:
        await events.disconnect()
