"""The simulated module, owner app and partner listener against the project's real broker."""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from rich.console import Console

from firmware_sim import scenarios
from firmware_sim.app import OwnerApp, Policy
from firmware_sim.fleet import Fleet
from firmware_sim.module import Module, SimClock
from firmware_sim.partner import PartnerListener
from service import topics, wire
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER, BrokerHandle

WAIT = 10.0


@dataclass(frozen=True)
class Got:
    topic: str
    payload: str
    qos: int
    retain: bool


class Watcher:
    """The service account's view of the broker: every message with its QoS and retain flag."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[Got] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"watch-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(SERVICE_USER, SERVICE_PASSWORD)
        subscribed = threading.Event()
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(
            topic_filter, options=SubscribeOptions(qos=2, retainAsPublished=True)
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(WAIT)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(Got(msg.topic, msg.payload.decode(), msg.qos, bool(msg.retain)))
            self.cond.notify_all()

    def wait(self, match: Callable[[Got], bool], timeout: float = WAIT) -> Got:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for got in self.messages:
                    if match(got):
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "message not seen; saw:\n" + "\n".join(map(str, self.messages))
                    )
                self.cond.wait(left)

    def topic(self, topic: str, payload: str | None = None) -> Got:
        return self.wait(lambda g: g.topic == topic and (payload is None or g.payload == payload))

    def publish(self, topic: str, payload: str, *, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch(broker: BrokerHandle, owner: tuple[str, str]) -> Iterator[Watcher]:
    """The service account subscribed to everything under this test's owner."""
    w = Watcher(broker.port, f"ovms/{owner[0]}/#")
    yield w
    w.close()


@pytest.fixture
def module(broker: BrokerHandle, owner: tuple[str, str]) -> Iterator[Module]:
    """A connected module of this test's owner."""
    m = Module(owner[0], "SIM1", owner[1], "127.0.0.1", broker.port)
    m.connect()
    yield m
    m.disconnect()


def test_module_connects_with_connected_yes_and_all_metrics(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """On connect the module publishes s.v3.connected=yes and its metrics, retained at QoS 0."""
    got = watch.topic(topics.metric(owner[0], "SIM1", "s.v3.connected"), "yes")
    assert (got.qos, got.retain) == (0, True)
    soc = watch.topic(topics.metric(owner[0], "SIM1", "v.b.soc"))
    assert (soc.payload, soc.qos, soc.retain) == ("35", 0, True)


def test_metrics_are_published_as_firmware_strings(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """set() publishes changed metrics retained at QoS 0 as yes/no, %g floats, 6-decimal lat/lon."""
    module.set(v_p_latitude=51.3023, v_p_longitude=0.40145, v_c_charging=True, v_c_kwh=2.69690001)
    module.set_metrics({"v.b.soc": 96.3, "v.c.state": "charging"})
    module.wait_published()

    def t(name: str) -> str:
        return topics.metric(owner[0], "SIM1", name)

    for name, text in [
        ("v.p.latitude", "51.302300"),
        ("v.p.longitude", "0.401450"),
        ("v.c.charging", "yes"),
        ("v.c.kwh", "2.6969"),
        ("v.b.soc", "96.3"),
        ("v.c.state", "charging"),
    ]:
        got = watch.topic(t(name), text)
        assert (got.qos, got.retain) == (0, True)


def test_unchanged_metrics_are_not_published_again(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """Setting a metric to its current value publishes nothing."""
    assert module.set(v_b_soc=35.0) == []
    assert module.set(v_b_soc=36.0) == ["v.b.soc"]


def test_will_fires_on_abrupt_disconnect(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """An abrupt link loss makes the broker publish the will metric/s/v3/connected=no, retained."""
    m = Module(owner[0], "SIM2", owner[1], "127.0.0.1", broker.port)
    m.connect()
    topic = topics.metric(owner[0], "SIM2", "s.v3.connected")
    watch.topic(topic, "yes")
    m.go_offline(abrupt=True)
    got = watch.topic(topic, "no")
    assert (got.qos, got.retain) == (0, True)
    late = Watcher(broker.port, topic)  # a new subscriber gets the retained "no"
    try:
        assert late.topic(topic, "no").retain
    finally:
        late.close()


def test_events_go_out_in_both_forms(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """An event appears on event/<a>/<b> with an empty payload and on legacy event with its name."""
    module.event("vehicle.charge.start")
    per_event = watch.topic(topics.event(owner[0], "SIM1", "vehicle.charge.start"))
    legacy = watch.topic(topics.legacy_event(owner[0], "SIM1"), "vehicle.charge.start")
    assert (per_event.payload, per_event.qos, per_event.retain) == ("", 0, False)
    assert (legacy.qos, legacy.retain) == (0, False)


def test_notifications_are_qos1_not_retained(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """Notifications go out at QoS 1, not retained, in the current and the legacy dotted form."""
    module.notify("alert", "charge.stopped", "Stopped\nSOC: 40%")
    module.notify("info", "charge.started", "a,b", legacy=True)
    alert = watch.topic(topics.notify(owner[0], "SIM1", "alert", "charge.stopped"))
    assert (alert.payload, alert.qos, alert.retain) == ("Stopped\nSOC: 40%", 1, False)
    legacy = watch.topic(topics.prefix(owner[0], "SIM1") + "notify/info/charge.started")
    assert (legacy.payload, legacy.qos) == ("a;b", 1)


def test_grid_log_is_qos2_with_45_fields(
    watch: Watcher, module: Module, owner: tuple[str, str]
) -> None:
    """A grid log record goes to notify/data/log/grid/<id>/<age> at QoS 2 with 45 CSV fields."""
    module.plug_in(51.3023, 0.40145, "type2")
    record = module.grid_log()
    got = watch.wait(lambda g: "/notify/data/log/grid/" in g.topic)
    parsed = topics.parse(got.topic)
    assert parsed.kind is topics.Kind.GRID_LOG
    assert (parsed.entry_id, parsed.age_s) == (record.entry_id, 0)
    assert (got.qos, got.retain) == (2, False)
    fields = got.payload.split(",")
    assert fields[:3] == ["*-LOG-Grid", "2", str(365 * 86400)]
    assert len(fields) - 3 == 45
    assert fields[3:6] == ["1", "51.302300", "0.401450"]
    assert fields[9] == "charging"


def test_grid_logs_made_offline_arrive_hours_late(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """Records made while offline are sent after reconnect with a large negative age."""
    clock = SimClock(time.time() - 4 * 3600)
    m = Module(owner[0], "SIM3", owner[1], "127.0.0.1", broker.port, grid_log=True, clock=clock)
    m.connect()
    m.go_offline(abrupt=True)
    m.plug_in(51.3023, 0.40145)
    m.tick(1800)
    m.finish()
    clock.set(time.time())
    m.go_online()
    try:
        m.wait_published()
        first = watch.wait(lambda g: g.topic.endswith("/grid/1/" + g.topic.rsplit("/", 1)[-1]))
        second = watch.wait(lambda g: "/notify/data/log/grid/2/" in g.topic)
        assert topics.parse(first.topic).age_s <= -4 * 3600 + 5
        assert topics.parse(second.topic).age_s <= -3.5 * 3600 + 5
        assert first.qos == 2 and ",charging," in first.payload and ",done," in second.payload
    finally:
        m.disconnect()


def test_a_story_reaches_the_broker_in_order(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """The owner-stop story at speed 0 ends in stopped/onrequest with an info notification."""
    m = Module(owner[0], "SIM4", owner[1], "127.0.0.1", broker.port)
    m.connect()
    try:
        expected = scenarios.run("owner-stop", m, speed=0)
    finally:
        m.disconnect()
    assert [s.status for s in expected.sessions] == ["stopped"]
    watch.topic(topics.notify(owner[0], "SIM4", "info", "charge.stopped"))
    states = [
        g.payload for g in watch.messages if g.topic == topics.metric(owner[0], "SIM4", "v.c.state")
    ]
    assert states[-2:] == ["charging", "stopped"]
    assert watch.topic(topics.metric(owner[0], "SIM4", "v.c.substate"), "onrequest")


def _question(request_id: str, kind: str = "share") -> str:
    now = datetime.now(UTC)
    q = wire.Question(
        request_id=request_id,
        kind=kind,  # type: ignore[arg-type]
        session=wire.QuestionSession(
            id="s1",
            started_at=now,
            ended_at=None,
            latitude=51.3023,
            longitude=0.40145,
            energy_kwh=None,
            connector="type2",
        ),
        station=None,
        choices=list(wire.SHARE_CHOICES if kind == "share" else wire.ABORT_CHOICES),
        created_at=now,
        expires_at=now + timedelta(days=7),
    )
    return q.model_dump_json()


def test_app_opts_in_retained(broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]) -> None:
    """The app publishes its opt-in as a retained QoS 1 OptIn payload."""
    with OwnerApp(owner[0], owner[1], "127.0.0.1", broker.port, vehicle="SIM5") as app:
        app.opt_in(nickname="Jimbo")
    got = watch.topic(topics.optin(owner[0], "SIM5"))
    assert (got.qos, got.retain) == (1, True)
    assert wire.OptIn.model_validate_json(got.payload) == wire.OptIn(enabled=True, nickname="Jimbo")


def test_app_answers_a_retained_question_and_again_after_reconnect(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """A retained question is answered by policy, answered again after reconnect, and clears."""
    rid = secrets.token_hex(16)
    watch.publish(topics.request(owner[0], "SIM6", rid), _question(rid), retain=True)
    decision_topic = topics.decision(owner[0], "SIM6", rid)
    app = OwnerApp(
        owner[0], owner[1], "127.0.0.1", broker.port, vehicle="SIM6", answer=Policy("always")
    )
    app.connect()
    try:
        got = watch.topic(decision_topic)
        assert json.loads(got.payload) == {"choice": "always"}
        assert got.qos == 1
        app.reconnect()
        watch.wait(lambda g: len([m for m in watch.messages if m.topic == decision_topic]) >= 2)
        watch.publish(topics.request(owner[0], "SIM6", rid), "", retain=True)
        assert app.wait_for(lambda s: s.kind == "cleared" and s.request_id == rid, WAIT)
        questions = app.questions("share")
        assert len(questions) == 2 and questions[0].request_id == rid
    finally:
        app.close()


def test_app_answers_abort_questions_with_the_abort_reason(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """An abort_reason question gets the policy's abort reason."""
    rid = secrets.token_hex(16)
    policy = Policy("always", abort_reason="station_fault")
    with OwnerApp(owner[0], owner[1], "127.0.0.1", broker.port, answer=policy) as app:
        watch.publish(
            topics.request(owner[0], "SIM7", rid), _question(rid, "abort_reason"), retain=True
        )
        got = watch.topic(topics.decision(owner[0], "SIM7", rid))
        assert wire.Decision.model_validate_json(got.payload).choice == "station_fault"
        assert app.wait_for(lambda s: s.kind == "answered" and s.vehicle == "SIM7")


def test_app_logs_status_and_errors(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """Status and error messages from the service are parsed into the app's log."""
    with OwnerApp(owner[0], owner[1], "127.0.0.1", broker.port, vehicle="SIM8") as app:
        status = wire.Status(enabled=True, handle="Jimbo", pending=1)
        watch.publish(topics.status(owner[0], "SIM8"), status.model_dump_json(), retain=True)
        err = wire.Error(topic="x", error="bad", code="invalid_payload")
        watch.publish(topics.error(owner[0], "SIM8"), err.model_dump_json())
        seen_status = app.wait_for(lambda s: s.kind == "status")
        seen_error = app.wait_for(lambda s: s.kind == "error")
    assert seen_status is not None and seen_status.status == status
    assert seen_error is not None and seen_error.error is not None
    assert seen_error.error.code == "invalid_payload"


def test_partner_listener_collects_public_events(broker: BrokerHandle) -> None:
    """The partner listener receives and parses events published on chargeshare/public/#."""
    name, password = f"partner{secrets.token_hex(3)}", secrets.token_urlsafe(10)
    broker.add_partner(name, password)
    now = datetime.now(UTC)
    record = wire.Record(
        id="0b6f7b1e-1111-4c4c-9c9c-000000000001",
        version=1,
        status="charging",
        cause=None,
        contributor="Jimbo",
        vehicle_type="RT",
        connector="type2",
        ocm_connection_type_id=25,
        latitude=51.3023,
        longitude=0.40145,
        station=None,
        charge_point=None,
        started_at=now,
        ended_at=None,
        energy_kwh=None,
        max_power_kw=None,
        max_voltage=None,
        max_current=None,
        soc_start=None,
        soc_end=None,
        comment=None,
        updated_at=now,
        license="CC0-1.0",
    )
    event = wire.PublicEvent(type="session.started", session=record)
    service = Watcher(broker.port, "chargeshare/none")
    try:
        with PartnerListener(name, password, "127.0.0.1", broker.port) as partner:
            service.publish(topics.public_session("u10"), event.model_dump_json())
            got = partner.wait_for(lambda r: r.event is not None)
        assert got is not None and got.event is not None
        assert got.topic == "chargeshare/public/sessions/u/1/0"
        assert got.event.type == "session.started" and got.event.session.contributor == "Jimbo"
    finally:
        service.close()


def test_fleet_runs_every_vehicle_to_the_end(
    broker: BrokerHandle, watch: Watcher, owner: tuple[str, str]
) -> None:
    """A fleet connects each vehicle with its own id and plays its story to the final state."""
    f = Fleet(
        owner[0], owner[1], "127.0.0.1", broker.port, vehicles=5, speed=0,
        mix={"owner-stop": 1}, prefix="FLT", seed=3,
    )  # fmt: skip
    stats = f.run(Console(file=io.StringIO()))
    assert (stats.finished, stats.stopped) == (5, 5)
    for i in range(1, 6):
        vid = f"FLT{i:05d}"
        watch.topic(topics.metric(owner[0], vid, "s.v3.connected"), "yes")
        watch.topic(topics.metric(owner[0], vid, "v.c.substate"), "onrequest")
        watch.topic(topics.notify(owner[0], vid, "info", "charge.stopped"))
