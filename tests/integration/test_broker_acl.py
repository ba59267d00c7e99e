"""The broker's access rules of DESIGN §1, checked against the real Mosquitto under MQTT 5."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.conftest import SERVICE_PASSWORD, SERVICE_USER, BrokerHandle

NOT_AUTHORIZED = 0x87  # PUBACK and CONNACK reason code 135
WAIT_S = 10.0  # liveness guard only: every wait below ends on a broker reply


class Client:
    """One MQTT 5 connection that records its CONNACK, PUBACKs and received messages."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.connack: int | None = None
        self.pubacks: dict[int, int] = {}
        self.subacks: set[int] = set()
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acl-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._c.username_pw_set(username, password)
        self._c.on_connect = self._on_connect
        self._c.on_publish = self._on_publish
        self._c.on_subscribe = self._on_subscribe
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()
        self._wait(lambda: self.connack is not None)

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.connack = rc.value
            self._cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc.value
            self._cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._cond:
            self.subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def _wait(self, done: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(done, WAIT_S), "the broker did not answer"

    @property
    def connected(self) -> bool:
        return self.connack == 0

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        mid = self._c.publish(topic, payload, qos=1).mid
        self._wait(lambda: mid in self.pubacks)
        return self.pubacks[mid]

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        _, mid = self._c.subscribe(topic, qos=1)
        assert mid is not None
        self._wait(lambda: mid in self.subacks)

    def wait_for(self, topic: str) -> list[tuple[str, bytes]]:
        """Wait until a message on `topic` arrived; return everything received so far."""
        self._wait(lambda: any(t == topic for t, _ in self.messages))
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def connect(broker: BrokerHandle) -> Iterator[Callable[[str | None, str | None], Client]]:
    """Open MQTT 5 connections to the test broker; close them after the test."""
    opened: list[Client] = []

    def make(username: str | None, password: str | None) -> Client:
        client = Client(broker.port, username, password)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


Connect = Callable[[str | None, str | None], Client]


def accepted(reason: int) -> bool:
    """Tell whether a PUBACK reason code is a success (0x10 = accepted, nobody subscribed)."""
    return reason < 0x80


def request_id() -> str:
    return secrets.token_hex(16)


def test_owner_cannot_publish_outside_own_prefix(
    connect: Connect, owner: tuple[str, str], new_owner: Callable[[], tuple[str, str]]
) -> None:
    """An owner's QoS 1 publish outside ovms/<own name>/ is refused with PUBACK 0x87."""
    other, _ = new_owner()
    me = connect(*owner)
    assert accepted(me.publish(f"ovms/{owner[0]}/car/metric/v/b/soc"))
    for topic in (
        f"ovms/{other}/car/metric/v/b/soc",
        f"ovms/{owner[0]}x/car/metric/v/b/soc",
        "chargeshare/public/sessions/u/1/0",
        "anything/else",
    ):
        assert me.publish(topic) == NOT_AUTHORIZED, topic


def test_owner_cannot_write_service_topics(connect: Connect, owner: tuple[str, str]) -> None:
    """An owner cannot publish the question, status and error topics the service writes."""
    name = owner[0]
    me = connect(*owner)
    assert accepted(me.publish(f"ovms/{name}/car/chargeshare/optin"))
    assert accepted(me.publish(f"ovms/{name}/car/chargeshare/decision/{request_id()}"))
    for topic in (
        f"ovms/{name}/car/chargeshare/request/{request_id()}",
        f"ovms/{name}/car/chargeshare/status",
        f"ovms/{name}/car/chargeshare/error",
    ):
        assert me.publish(topic) == NOT_AUTHORIZED, topic


def test_owner_does_not_receive_other_owners_messages(
    connect: Connect, owner: tuple[str, str], new_owner: Callable[[], tuple[str, str]]
) -> None:
    """An owner subscribed to another owner's prefix receives none of its messages."""
    other = new_owner()
    me = connect(*owner)
    me.subscribe(f"ovms/{other[0]}/#")
    me.subscribe(f"ovms/{owner[0]}/#")
    them = connect(*other)
    assert accepted(them.publish(f"ovms/{other[0]}/car/metric/v/c/state", b"charging"))
    # The other owner's message was routed before its PUBACK, so it would arrive before this one.
    marker = f"ovms/{owner[0]}/car/metric/v/b/soc"
    assert accepted(me.publish(marker, b"50"))
    assert me.wait_for(marker) == [(marker, b"50")]


def test_partner_reads_public_topics_and_writes_nothing(
    connect: Connect, broker: BrokerHandle, owner: tuple[str, str]
) -> None:
    """A partner receives chargeshare/public/# from the service and may publish nowhere."""
    name = f"partner-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    broker.add_partner(name, password)
    partner = connect(name, password)
    partner.subscribe("#")
    service = connect(SERVICE_USER, SERVICE_PASSWORD)
    private = f"ovms/{owner[0]}/car/chargeshare/status"
    public = "chargeshare/public/sessions/u/1/0"
    assert accepted(service.publish(private, b"{}"))
    assert accepted(service.publish(public, b"{}"))
    assert partner.wait_for(public) == [(public, b"{}")]
    assert partner.publish(public) == NOT_AUTHORIZED
    assert partner.publish(f"ovms/{owner[0]}/car/metric/v/b/soc") == NOT_AUTHORIZED


def test_service_reads_and_writes_everything(connect: Connect, owner: tuple[str, str]) -> None:
    """The service account receives every owner's messages and may publish any topic."""
    name = owner[0]
    service = connect(SERVICE_USER, SERVICE_PASSWORD)
    service.subscribe("#")
    me = connect(*owner)
    me.subscribe(f"ovms/{name}/+/chargeshare/request/+")
    metric = f"ovms/{name}/car/metric/v/c/charging"
    question = f"ovms/{name}/car/chargeshare/request/{request_id()}"
    public = "chargeshare/public/sessions/u/1/0"
    assert accepted(me.publish(metric, b"yes"))
    assert accepted(service.publish(question, b"{}"))
    assert accepted(service.publish(public, b"{}"))
    got = service.wait_for(public)
    assert {metric, question, public} <= {t for t, _ in got}
    assert me.wait_for(question) == [(question, b"{}")]


def test_wrong_password_is_refused(connect: Connect, owner: tuple[str, str]) -> None:
    """A login with a wrong password gets CONNACK 135 (not authorized)."""
    client = connect(owner[0], owner[1] + "x")
    assert client.connack == NOT_AUTHORIZED
    assert not client.connected


def test_anonymous_login_is_refused(connect: Connect) -> None:
    """A client without username and password is refused with CONNACK 135."""
    client = connect(None, None)
    assert client.connack == NOT_AUTHORIZED
    assert not client.connected
