"""A scripted owner app: opts in, reads retained questions and answers them by a policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from service import topics, wire

# Given a vehicle and a question, return the answer to send, or None to leave it unanswered.
Answerer = Callable[[str, wire.Question], wire.Decision | None]
SeenKind = Literal["question", "cleared", "status", "error", "answered", "invalid", "connected"]


@dataclass(frozen=True, slots=True)
class Seen:
    """One thing the app saw or did, in order."""

    at: float
    kind: SeenKind
    vehicle: str
    request_id: str = ""
    question: wire.Question | None = None
    status: wire.Status | None = None
    error: wire.Error | None = None
    decision: wire.Decision | None = None
    raw: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """Answer every share question with `answer` and every abort question with `abort_reason`."""

    answer: str | None = "always"
    abort_reason: str | None = "station_fault"
    charge_point: str | None = None
    comment: str | None = None

    def __call__(self, vehicle: str, question: wire.Question) -> wire.Decision | None:
        choice = self.answer if question.kind == "share" else self.abort_reason
        if choice is None:
            return None
        if question.kind == "share" and choice in ("always", "once"):
            return wire.Decision(
                choice=choice, charge_point=self.charge_point, comment=self.comment
            )
        return wire.Decision(choice=choice)


@dataclass
class _Log:
    entries: list[Seen] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class OwnerApp:
    """The owner's phone app, as far as MQTT goes (DESIGN §3)."""

    def __init__(
        self,
        owner: str,
        password: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        vehicle: str = "",
        client_id: str | None = None,
        answer: Answerer | None = None,
        tls_ca: str | None = None,
        mqtt5: bool = False,
    ) -> None:
        self.owner, self.vehicle = owner, vehicle
        self.answerer: Answerer | None = answer
        self.host, self.port = host, port
        self._log = _Log()
        self._answered: set[str] = set()  # request ids answered on the current connection
        self._connected = threading.Event()
        self._settings = (client_id or f"{vehicle or owner}-app", password, tls_ca, mqtt5)
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        cid, password, tls_ca, mqtt5 = self._settings
        if mqtt5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=cid,
                clean_session=True,
                protocol=mqtt.MQTTv311,
            )
        client.username_pw_set(self.owner, password)
        if tls_ca:
            client.tls_set(ca_certs=tls_ca)
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # ---- connection ----------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe to questions, status and errors of all the owner's vehicles."""
        self._connected.clear()
        self.client.connect_async(self.host, self.port, 60)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise ConnectionError(f"app {self.owner}: no connection to {self.host}:{self.port}")

    def close(self) -> None:
        """Disconnect cleanly."""
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def reconnect(self, timeout: float = 10.0) -> None:
        """Drop the connection and connect again (retained questions come back)."""
        self.close()
        self.client = self._new_client()  # paho leaks its socket pair on a second loop_start()
        self.connect(timeout)

    def __enter__(self) -> OwnerApp:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            return
        self._answered.clear()  # a question still retained after reconnect is answered again
        any_vehicle = "+"
        client.subscribe(
            [
                (topics.request(self.owner, any_vehicle, "+"), 1),
                (topics.status(self.owner, any_vehicle), 1),
                (topics.error(self.owner, any_vehicle), 1),
            ]
        )
        self._record(Seen(time.time(), "connected", self.vehicle))
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self._connected.clear()

    # ---- what the app sends --------------------------------------------------------------

    def _send(self, topic: str, payload: str, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def opt_in(
        self, vehicle: str | None = None, *, nickname: str | None = None, enabled: bool = True
    ) -> None:
        """Publish the vehicle's sharing choice (QoS 1, retained)."""
        v = vehicle or self.vehicle
        body = wire.OptIn(enabled=enabled, nickname=nickname).model_dump_json()
        self._send(topics.optin(self.owner, v), body, retain=True)

    def register_push(
        self,
        app_id: str,
        platform: Literal["fcm", "apns"],
        token: str | None,
        *,
        vehicle: str | None = None,
        sandbox: bool = False,
    ) -> None:
        """Register (or with token None, unregister) this phone's push token."""
        v = vehicle or self.vehicle
        body = wire.PushRegistration(app_id=app_id, platform=platform, token=token, sandbox=sandbox)
        self._send(topics.push(self.owner, v), body.model_dump_json())

    def decide(self, vehicle: str, request_id: str, decision: wire.Decision) -> None:
        """Answer one question."""
        self._send(
            topics.decision(self.owner, vehicle, request_id),
            decision.model_dump_json(exclude_none=True),
        )
        self._record(Seen(time.time(), "answered", vehicle, request_id, decision=decision))

    # ---- what the app receives -----------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5 or parts[1] != self.owner:
            return
        vehicle = parts[2]
        raw = msg.payload.decode("utf-8", "replace")
        now = time.time()
        if len(parts) == 6 and msg.topic == topics.request(self.owner, vehicle, parts[5]):
            self._question(vehicle, parts[5], raw, now)
        elif msg.topic == topics.status(self.owner, vehicle):
            self._parsed(vehicle, raw, now, "status")
        elif msg.topic == topics.error(self.owner, vehicle):
            self._parsed(vehicle, raw, now, "error")

    def _parsed(self, vehicle: str, raw: str, now: float, kind: Literal["status", "error"]) -> None:
        try:
            if kind == "status":
                self._record(
                    Seen(now, kind, vehicle, status=wire.Status.model_validate_json(raw), raw=raw)
                )
            else:
                self._record(
                    Seen(now, kind, vehicle, error=wire.Error.model_validate_json(raw), raw=raw)
                )
        except ValidationError:
            self._record(Seen(now, "invalid", vehicle, raw=raw))

    def _question(self, vehicle: str, request_id: str, raw: str, now: float) -> None:
        if not raw:
            self._record(Seen(now, "cleared", vehicle, request_id))
            return
        try:
            question = wire.Question.model_validate_json(raw)
        except ValidationError:
            self._record(Seen(now, "invalid", vehicle, request_id, raw=raw))
            return
        self._record(Seen(now, "question", vehicle, request_id, question=question, raw=raw))
        if self.answerer is None or request_id in self._answered:
            return
        decision = self.answerer(vehicle, question)
        if decision is None:
            return
        self._answered.add(request_id)
        # Not from this callback thread's own wait: publish and let the network loop send it.
        self.client.publish(
            topics.decision(self.owner, vehicle, request_id),
            decision.model_dump_json(exclude_none=True),
            qos=1,
        )
        self._record(Seen(now, "answered", vehicle, request_id, decision=decision))

    # ---- the log -------------------------------------------------------------------------

    def _record(self, seen: Seen) -> None:
        with self._log.changed:
            self._log.entries.append(seen)
            self._log.changed.notify_all()

    @property
    def log(self) -> list[Seen]:
        """Return a copy of everything seen so far."""
        with self._log.changed:
            return list(self._log.entries)

    def wait_for(
        self, match: Callable[[Seen], bool], timeout: float = 10.0, *, since: int = 0
    ) -> Seen | None:
        """Wait for a log entry (at index `since` or later) that matches; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._log.changed:
            while True:
                for seen in self._log.entries[since:]:
                    if match(seen):
                        return seen
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._log.changed.wait(left)

    def questions(self, kind: str | None = None) -> list[Seen]:
        """Return the questions seen, optionally of one kind."""
        return [
            s
            for s in self.log
            if s.kind == "question"
            and s.question is not None
            and (kind is None or s.question.kind == kind)
        ]
