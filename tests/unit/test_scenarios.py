"""The emulated module's formatting and the scripted stories, recorded without a broker."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from firmware_sim import scenarios
from firmware_sim.module import (
    GridRecord,
    Message,
    Module,
    Recorder,
    SimClock,
    format_metric,
    grid_log_text,
)
from service import topics


def recorded(**kwargs: object) -> tuple[Module, Recorder]:
    rec = Recorder()
    m = Module("jimbo", "JIMBO1", "pw", link=rec, **kwargs)  # type: ignore[arg-type]
    m.connect()
    return m, rec


def after(rec: Recorder, start: int) -> list[Message]:
    return rec.messages[start:]


def short(msg: Message) -> str:
    return msg.topic.removeprefix(topics.prefix("jimbo", "JIMBO1"))


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("v.c.charging", True, "yes"),
        ("v.c.charging", False, "no"),
        ("v.c.time", 3600, "3600"),
        ("v.b.soc", 96.3, "96.3"),
        ("v.c.kwh", 2.69690001, "2.6969"),
        ("v.c.power", 7.0, "7"),
        ("v.c.kwh.grid.total", 1834.2567, "1834.26"),
        ("v.c.voltage", 0.0, "0"),
        ("v.p.latitude", 51.3023, "51.302300"),
        ("v.p.longitude", 0.40145, "0.401450"),
        ("v.c.state", "charging", "charging"),
        ("m.time.utc", datetime(2024, 11, 11, 18, 19, 21, tzinfo=UTC), "2024-11-11 18:19:21 UTC"),
        ("v.t.pressure", (2.4, 2.45, 2.5, 2.5), "2.4,2.45,2.5,2.5"),
    ],
)
def test_metric_values_are_formatted_like_the_firmware(name: str, value: object, text: str) -> None:
    """Metric payloads are plain strings: yes/no, up to 6 significant digits, 6-decimal lat/lon."""
    assert format_metric(name, value) == text  # type: ignore[arg-type]


def test_grid_log_v2_has_45_fields_and_v1_has_44() -> None:
    """A version 2 grid record carries 45 data fields (odometer last); version 1 carries 44."""
    values = {"v.p.gpslock": True, "v.p.latitude": 51.3023, "v.p.odometer": 23816.4}
    v2 = grid_log_text(values, charge_time_s=60, version=2, storetime_days=1)
    v1 = grid_log_text(values, charge_time_s=60, version=1, storetime_days=1)
    assert v2.startswith("*-LOG-Grid,2,86400,1,51.302300,")
    assert len(v2.split(",")) == 3 + 45
    assert v2.split(",")[-1] == "23816.4"
    assert v1.startswith("*-LOG-Grid,1,86400,")
    assert len(v1.split(",")) == 3 + 44


def test_grid_log_strings_are_mp_encoded() -> None:
    """Commas and newlines in text fields become ';' and CR so the CSV stays one line."""
    text = grid_log_text({"v.p.location": "Car park, level 2\nbay 4"}, charge_time_s=0)
    assert "Car park; level 2\rbay 4" in text
    assert "\n" not in text


def test_plug_in_sends_position_before_charge_metrics_then_events_and_notification() -> None:
    """plug_in publishes the position first, then the charge metrics, a start event and info."""
    m, rec = recorded()
    start = len(rec.messages)
    m.plug_in(51.3023, 0.40145, "type2")
    names = [short(x) for x in after(rec, start)]
    assert names.index("metric/v/p/latitude") < names.index("metric/v/c/type")
    assert names.index("metric/v/p/gpslock") < names.index("metric/v/c/state")
    assert "event/vehicle/charge/start" in names
    assert "notify/info/charge/started" in names
    texts = {short(x): x.payload for x in after(rec, start)}
    assert texts["metric/v/c/state"] == "charging"
    assert texts["metric/v/c/charging"] == "yes"
    assert texts["event"] in {"vehicle.charge.start", "notify.info.charge.started"}


def test_abort_sends_stopped_interrupted_and_an_alert() -> None:
    """abort sets state stopped, substate interrupted, charging no and raises an alert."""
    m, rec = recorded()
    m.plug_in(51.3023, 0.40145)
    m.tick(60)
    start = len(rec.messages)
    m.abort()
    got = {short(x): x for x in after(rec, start)}
    assert got["metric/v/c/state"].payload == "stopped"
    assert got["metric/v/c/substate"].payload == "interrupted"
    assert got["metric/v/c/charging"].payload == "no"
    assert got["notify/alert/charge/stopped"].qos == 1
    assert "event/vehicle/charge/stop" in got
    assert "metric/v/c/timestamp" in got


def test_stop_by_owner_is_an_info_notification() -> None:
    """A stop on request (substate onrequest) is reported as info, not alert."""
    m, rec = recorded()
    m.plug_in(51.3023, 0.40145)
    start = len(rec.messages)
    m.stop_by_owner()
    names = [short(x) for x in after(rec, start)]
    assert "notify/info/charge/stopped" in names
    assert "notify/alert/charge/stopped" not in names


def test_legacy_notification_keeps_dots_and_encodes_the_body() -> None:
    """The <= 3.3.004 form publishes notify/info/charge.started with an mp_encoded body."""
    m, rec = recorded(legacy_notify=True)
    start = len(rec.messages)
    m.notify("info", "charge.started", "a,b\nc")
    msg = next(x for x in after(rec, start) if short(x).startswith("notify/"))
    assert short(msg) == "notify/info/charge.started"
    assert msg.payload == "a;b\rc"


def test_tick_grows_energy_soc_and_charge_time() -> None:
    """While charging, each tick adds energy, SOC and charge time."""
    m, _ = recorded()
    m.plug_in(51.3023, 0.40145, current=32.0)
    soc = m.number("v.b.soc")
    for _ in range(36):
        m.tick(10)
    assert m.number("v.c.time") == 360
    assert 0.6 < m.number("v.c.kwh") < 0.8  # 7.4 kW input for 6 min at 92 %
    assert m.number("v.c.kwh.grid") > m.number("v.c.kwh")
    assert m.number("v.b.soc") > soc


def test_grid_logs_wait_offline_and_carry_their_age() -> None:
    """Records made offline are sent on reconnect with minus their age, entry ids from 1."""
    clock = SimClock(1_700_000_000.0)
    m, rec = recorded(grid_log=True, clock=clock)
    m.go_offline()
    m.plug_in(51.3023, 0.40145)
    m.tick(600)
    m.finish()
    assert m.queued >= 2
    clock.advance(3 * 3600)
    start = len(rec.messages)
    m.go_online()
    grids = [topics.parse(x.topic) for x in after(rec, start) if "/data/log/grid/" in x.topic]
    assert [g.entry_id for g in grids] == [1, 2]
    assert grids[0].age_s == -(3 * 3600 + 600)
    assert grids[1].age_s == -(3 * 3600)
    assert m.queued == 0


def test_events_are_lost_while_offline_but_notifications_wait() -> None:
    """Offline, events are dropped (QoS 0) while notifications are queued for the link."""
    m, rec = recorded()
    m.go_offline()
    start = len(rec.messages)
    m.event("vehicle.charge.start")
    m.notify("info", "charge.started", "x")
    assert after(rec, start) == []
    m.go_online()
    names = [short(x) for x in after(rec, start)]
    assert "notify/info/charge/started" in names
    assert "event/vehicle/charge/start" not in names


@pytest.mark.parametrize(
    ("story", "statuses"),
    [
        ("jimbo", ["interrupted"]),
        ("home", ["completed"]),
        ("interrupted", ["interrupted"]),
        ("paused", ["completed"]),
        ("late-gridlog", ["completed"]),
        ("completed", ["completed"]),
        ("owner-stop", ["stopped"]),
    ],
)
def test_each_story_ends_with_the_expected_sessions(story: str, statuses: list[str]) -> None:
    """Every story at speed 0 yields the sessions it promises, each with energy and a place."""
    m, rec = recorded()
    expected = scenarios.run(story, m, speed=0)
    assert [s.status for s in expected.sessions] == statuses
    assert all(s.energy_kwh > 0 for s in expected.sessions)
    assert expected.owner == "jimbo" and expected.vehicle == "JIMBO1"
    for msg in rec.messages:
        topics.parse(msg.topic)  # every topic is one the service accepts


def test_paused_story_is_one_plug_in_with_three_pauses() -> None:
    """The paused story goes charging, pauses, charging again and done, in one plug-in."""
    m, rec = recorded()
    scenarios.run("paused", m, speed=0)
    states = [x.payload for x in rec.messages if short(x) == "metric/v/c/state"]
    assert states[-8:] == [
        "charging",
        "timerwait",
        "charging",
        "stopped",
        "charging",
        "heating",
        "charging",
        "done",
    ]
    plug_ins = [x for x in rec.messages if short(x) == "event/vehicle/charge/prepare"]
    assert len(plug_ins) == 1
    assert len(m.charges) == 1 and m.charges[0].pauses == ["timerwait", "powerwait", "heating"]


def test_late_gridlog_story_sends_records_hours_old() -> None:
    """The late-gridlog story's records all arrive at least three hours after they were made."""
    m, rec = recorded()
    expected = scenarios.run("late-gridlog", m, speed=0)
    grids = [topics.parse(x.topic) for x in rec.messages if "/data/log/grid/" in x.topic]
    assert len(grids) >= 2
    assert all(g.age_s <= -scenarios.LATE_BY_S for g in grids)
    assert expected.sessions[0].via == "grid_log"
    assert expected.sessions[0].started_at.timestamp() < datetime.now(UTC).timestamp() - 3 * 3600


def test_run_sleeps_speed_times_each_wait() -> None:
    """run() sleeps the firmware's waits scaled by speed, and not at all at speed 0."""
    slept: list[float] = []
    m, _ = recorded()
    scenarios.run("owner-stop", m, speed=0, sleep=slept.append)
    assert slept == []
    m2, _ = recorded()
    scenarios.run("owner-stop", m2, speed=0.01, sleep=slept.append)
    assert slept and all(s == pytest.approx(w) for s, w in zip(slept, [0.3, 0.1], strict=False))


def test_grid_record_fields_skip_the_header() -> None:
    """GridRecord.fields returns only the data fields after type, version and storetime."""
    rec = GridRecord(1, 0.0, "*-LOG-Grid,2,86400,a,b")
    assert rec.fields == ["a", "b"]
