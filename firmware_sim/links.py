"""How a simulated module's messages leave it: a paho-mqtt link, or a recorder for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode


class ModuleError(Exception):
    """The module could not reach or was refused by the broker."""

    def __init__(self, vehicle_id: str, reason: str) -> None:
        self.vehicle_id = vehicle_id
        self.reason = reason
        super().__init__(f"module {vehicle_id}: {reason}")


# ---- links: how messages leave the module ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publish as the module made it."""

    topic: str
    payload: str
    qos: int
    retain: bool


class Link(Protocol):
    """The module's connection to a broker."""

    def start(self, on_up: Callable[[], None], on_down: Callable[[], None]) -> None: ...

    def publish(self, topic: str, payload: str, qos: int, retain: bool) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def stop(self, *, abrupt: bool) -> None: ...


class Recorder:
    """A link that records every publish in order; always up while started (tests, dry runs)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._on_down: Callable[[], None] | None = None

    def start(self, on_up: Callable[[], None], on_down: Callable[[], None]) -> None:
        self._on_down = on_down
        on_up()

    def publish(self, topic: str, payload: str, qos: int, retain: bool) -> None:
        self.messages.append(Message(topic, payload, qos, retain))

    def flush(self, timeout: float) -> bool:
        return True

    def stop(self, *, abrupt: bool) -> None:
        if self._on_down is not None:
            self._on_down()


class PahoLink:
    """A paho-mqtt 3.1.1 connection set up the way the firmware sets up its own."""

    def __init__(
        self,
        client_id: str,
        username: str,
        password: str,
        host: str,
        port: int,
        *,
        will: Message,
        tls_ca: str | None = None,
        keepalive: int = 60,
        threaded: bool = True,
    ) -> None:
        self.host, self.port, self.keepalive, self.threaded = host, port, keepalive, threaded
        self._settings = (client_id, username, password, will, tls_ca)
        self.refused: str | None = None
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self._lock = threading.Lock()
        self._on_up: Callable[[], None] = lambda: None
        self._on_down: Callable[[], None] = lambda: None
        self._started = False
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        client_id, username, password, will, tls_ca = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(username, password)
        client.will_set(will.topic, will.payload, will.qos, will.retain)
        if tls_ca:
            client.tls_set(ca_certs=tls_ca)
        # Bounded so a vehicle that cannot connect does not spin (firmware: 20-60 s).
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        return client

    def _connected(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            # Firmware: any refusal but "server unavailable" stops retrying until reconfigured.
            self.refused = str(rc)
            client.disconnect()
            if self.threaded:
                threading.Thread(target=client.loop_stop, daemon=True).start()
            self._on_down()
            return
        self._on_up()

    def _disconnected(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self._on_down()

    def start(self, on_up: Callable[[], None], on_down: Callable[[], None]) -> None:
        self._on_up, self._on_down, self.refused = on_up, on_down, None
        if self._started and self.threaded:
            # The broker keeps the session; a fresh client avoids paho leaking its socket pair
            # when loop_start() runs a second time.
            self.client = self._new_client()
        self._started = True
        if self.threaded:
            self.client.connect_async(self.host, self.port, self.keepalive)
            self.client.loop_start()
        else:
            # An external loop (fleet) reads the socket and delivers the CONNACK.
            self.client.connect(self.host, self.port, self.keepalive)

    def publish(self, topic: str, payload: str, qos: int, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        if self.threaded:
            with self._lock:
                self._infos.append(info)

    def flush(self, timeout: float) -> bool:
        """Wait until everything published so far left (QoS 0) or was acknowledged (QoS 1/2)."""
        if not self.threaded:
            return True
        deadline = time.monotonic() + timeout
        with self._lock:
            infos, self._infos = self._infos, []
        ok = True
        for info in infos:
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                continue  # not sent (connection lost meanwhile): QoS 0 is gone, QoS 1/2 resent
            while not info.is_published():
                left = deadline - time.monotonic()
                if left <= 0 or not self.client.is_connected():
                    ok = False
                    break
                info.wait_for_publish(min(left, 0.1))
            if not ok:
                with self._lock:
                    self._infos[:0] = [i for i in infos if not i.is_published()]
                return False
        return ok

    def stop(self, *, abrupt: bool) -> None:
        """Close the connection; abrupt closes the socket without DISCONNECT, so the will fires."""
        if abrupt:
            sock = self.client.socket()
            if self.threaded:
                self.client.loop_stop()
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._on_down()
            return
        self.client.disconnect()
        if self.threaded:
            self.client.loop_stop()
