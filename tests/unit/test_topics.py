"""Building and parsing topics (service.topics)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import topics
from service.topics import Kind, TopicError

names = st.from_regex(r"[A-Za-z0-9_.@-]{1,64}", fullmatch=True)
levels = st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True)
dotted = st.lists(levels, min_size=1, max_size=6).map(".".join)
request_ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)


@given(names, names, dotted)
def test_metric_round_trip(owner: str, vehicle: str, name: str) -> None:
    """A metric topic parses back to its owner, vehicle and dotted metric name."""
    p = topics.parse(topics.metric(owner, vehicle, name))
    assert (p.kind, p.owner, p.vehicle, p.name) == (Kind.METRIC, owner, vehicle, name)
    assert topics.is_metric(topics.metric(owner, vehicle, name))


@given(names, names, dotted)
def test_event_round_trip(owner: str, vehicle: str, name: str) -> None:
    """An event topic parses back to its dotted event name; the legacy topic to an empty one."""
    p = topics.parse(topics.event(owner, vehicle, name))
    assert (p.kind, p.owner, p.vehicle, p.name) == (Kind.EVENT, owner, vehicle, name)
    legacy = topics.parse(topics.legacy_event(owner, vehicle))
    assert (legacy.kind, legacy.name) == (Kind.EVENT, "")


@given(names, names, st.sampled_from(["info", "alert", "error"]), dotted)
def test_notify_round_trip(owner: str, vehicle: str, level: str, subtype: str) -> None:
    """A notification topic parses back to its dotted subtype."""
    p = topics.parse(topics.notify(owner, vehicle, level, subtype))
    assert (p.kind, p.owner, p.vehicle, p.name) == (Kind.NOTIFY, owner, vehicle, subtype)


def test_old_firmware_notify_subtype_parses_the_same() -> None:
    """`notify/info/charge.started` (firmware <= 3.3.004) parses like `charge/started`."""
    old = topics.parse("ovms/alice/car1/notify/info/charge.started")
    new = topics.parse("ovms/alice/car1/notify/info/charge/started")
    assert old.name == new.name == "charge.started"


@given(
    names,
    names,
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=-10 * 365 * 86400, max_value=0),
)
def test_grid_log_round_trip(owner: str, vehicle: str, entry_id: int, age: int) -> None:
    """A grid log topic parses back to its entry id and age."""
    p = topics.parse(topics.grid_log(owner, vehicle, entry_id, age))
    assert (p.kind, p.owner, p.vehicle, p.entry_id, p.age_s) == (
        Kind.GRID_LOG,
        owner,
        vehicle,
        entry_id,
        age,
    )


@given(names, names, request_ids)
def test_app_topics_round_trip(owner: str, vehicle: str, request_id: str) -> None:
    """Opt-in, push and decision topics parse back to their kinds and request id."""
    assert topics.parse(topics.optin(owner, vehicle)).kind == Kind.OPTIN
    assert topics.parse(topics.push(owner, vehicle)).kind == Kind.PUSH
    d = topics.parse(topics.decision(owner, vehicle, request_id))
    assert (d.kind, d.owner, d.vehicle, d.name) == (Kind.DECISION, owner, vehicle, request_id)


@given(names, names, request_ids)
def test_service_topics_are_not_inbound(owner: str, vehicle: str, request_id: str) -> None:
    """Topics only the service writes are refused as inbound topics."""
    for t in (
        topics.request(owner, vehicle, request_id),
        topics.status(owner, vehicle),
        topics.error(owner, vehicle),
    ):
        with pytest.raises(TopicError):
            topics.parse(t)


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_topic_error(text: str) -> None:
    """Any string either parses or raises TopicError."""
    try:
        topics.parse(text)
    except TopicError:
        pass


@given(
    st.lists(
        st.sampled_from(
            [
                "ovms",
                "a",
                "b",
                "metric",
                "event",
                "notify",
                "info",
                "data",
                "log",
                "grid",
                "1",
                "-1",
                "x",
                "",
                "+",
                "#",
                "chargeshare",
                "decision",
                "optin",
                "\x00",
            ]
        ),
        max_size=9,
    ).map("/".join)
)
def test_topic_shaped_text_raises_only_topic_error(text: str) -> None:
    """Topic-shaped strings built from real levels either parse or raise TopicError."""
    try:
        p = topics.parse(text)
    except TopicError:
        return
    assert topics.valid_name(p.owner) and topics.valid_name(p.vehicle)


@pytest.mark.parametrize(
    "topic",
    [
        "ovms/alice/car1/metric/v/+/state",
        "ovms/alice/car1/metric/#",
        "ovms/+/car1/metric/v/c/state",
        "ovms/alice/car1/event/vehicle/charge/#",
        "ovms/alice/car1/notify/info/+",
        "ovms/alice/car1/metric/v//state",
        "ovms/alice/car1/metric/",
        "ovms/alice/car1/metric",
        "ovms//car1/metric/v/c/state",
        "ovms/alice/car1/notify/info/",
        "ovms/alice/car1/event/",
        "ovms/alice/car1/metric/v/c/st\x00ate",
        "ovms/alice/car1/event/vehicle\x00/charge",
        "ovms/alice/car1/notify/info/charge\n/started",
        "ovms/alice/car1/metric/" + "v/" * 300 + "x",
        "ovms/" + "a" * 65 + "/car1/metric/v/c/state",
        "ovms/alice/car1/notify/data/log/grid/1",
        "ovms/alice/car1/notify/data/log/grid/1/5",
        "ovms/alice/car1/notify/data/log/grid/-1/0",
        "ovms/alice/car1/notify/data/log/grid/ 1/0",
        "ovms/alice/car1/notify/data/log/grid/1/+0",
        "ovms/alice/car1/notify/data/log/grid/1/1_0",
        "ovms/alice/car1/notify/data/trip/1/0",
        "ovms/alice/car1/chargeshare/decision/ABC",
        "ovms/alice/car1/chargeshare/decision/" + "a" * 31,
        "ovms/alice/car1/chargeshare/optin/extra",
        "ovms/alice/car1/client/x/command/1",
        "chargeshare/public/sessions/u/1/2",
        "",
        "ovms",
    ],
)
def test_bad_topics_rejected(topic: str) -> None:
    """Wildcards, empty levels, control characters, over-long and unknown topics are refused."""
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_topic_error_carries_topic_and_reason() -> None:
    """A TopicError names the topic and says why it was refused."""
    with pytest.raises(TopicError) as e:
        topics.parse("ovms/alice/car1/metric/v/+/x")
    assert e.value.topic == "ovms/alice/car1/metric/v/+/x"
    assert "wildcard" in e.value.reason


@pytest.mark.parametrize(
    ("geohash", "expected"),
    [("u10hb", "chargeshare/public/sessions/u/1/0"), ("gcp", "chargeshare/public/sessions/g/c/p")],
)
def test_public_session_topic(geohash: str, expected: str) -> None:
    """The public topic uses the first three geohash characters as levels."""
    assert topics.public_session(geohash) == expected


def test_public_session_needs_three_characters() -> None:
    """A geohash shorter than three characters is refused."""
    with pytest.raises(ValueError):
        topics.public_session("u1")
