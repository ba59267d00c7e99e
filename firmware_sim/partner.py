"""A partner's MQTT subscriber: collects the public session events of DESIGN §4."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from service import topics, wire

PUBLIC_FILTER = topics.PUBLIC_ROOT + "/#"


@dataclass(frozen=True, slots=True)
class Received:
    """One public event and the topic it came on."""

    at: float
    topic: str
    event: wire.PublicEvent | None  # None if the payload did not parse
    raw: str


class PartnerListener:
    """Subscribe to `chargeshare/public/#` at QoS 1 with a persistent session and keep events."""

    def __init__(
        self,
        username: str,
        password: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        client_id: str | None = None,
        tls_ca: str | None = None,
        topic_filter: str = PUBLIC_FILTER,
    ) -> None:
        self.host, self.port, self.topic_filter = host, port, topic_filter
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username}-listener",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._events: list[Received] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; wait for the SUBACK."""
        self._subscribed.clear()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect_async(self.host, self.port, 60)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise ConnectionError(f"partner: no subscription at {self.host}:{self.port}")

    def close(self) -> None:
        """Disconnect cleanly (the broker keeps the session and queues events)."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> PartnerListener:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if not getattr(rc, "is_failure", False):
            client.subscribe(self.topic_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        raw = msg.payload.decode("utf-8", "replace")
        try:
            event: wire.PublicEvent | None = wire.PublicEvent.model_validate_json(raw)
        except ValidationError:
            event = None
        with self._changed:
            self._events.append(Received(time.time(), msg.topic, event, raw))
            self._changed.notify_all()

    @property
    def events(self) -> list[Received]:
        """Return a copy of every event received so far."""
        with self._changed:
            return list(self._events)

    def wait_for(
        self, match: Callable[[Received], bool], timeout: float = 10.0, *, since: int = 0
    ) -> Received | None:
        """Wait for an event (at index `since` or later) that matches; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for received in self._events[since:]:
                    if match(received):
                        return received
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
