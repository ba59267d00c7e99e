"""A small paho client for tests: publish as someone, collect what arrives, wait for a match."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

_ids = itertools.count(1)


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Probe:
    """One MQTT 5 connection that records every message it receives."""

    def __init__(self, port: int, username: str, password: str, *, client_id: str = "") -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{next(_ids)}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("probe could not connect")
            time.sleep(0.01)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.seen.append(Seen(msg.topic, msg.payload, bool(msg.retain), msg.qos))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        if not self._subscribed.wait(5):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(5)

    def messages(self, match: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if match(s)]

    async def wait_for(
        self, match: Callable[[Seen], bool], timeout: float = 10.0, count: int = 1
    ) -> list[Seen]:
        """Wait until `count` received messages satisfy `match`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(match)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {count} message(s); saw "
                    + repr([(s.topic, s.payload[:200]) for s in self.messages()][-20:])
                )
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
