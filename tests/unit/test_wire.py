"""Wire payloads (service.wire): strict inbound models, RFC 3339 outbound times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from service import wire


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        (wire.OptIn, {"enabled": True, "nickname": "Jimbo"}),
        (wire.OptIn, {"enabled": False, "nickname": None}),
        (wire.OptIn, {"enabled": True}),
        (
            wire.PushRegistration,
            {"app_id": "a1", "platform": "fcm", "token": "t", "sandbox": False},
        ),
        (wire.PushRegistration, {"app_id": "a1", "platform": "apns", "token": None}),
        (wire.Decision, {"choice": "once"}),
        (
            wire.Decision,
            {"choice": "always", "charge_point": "3", "comment": "by the gate", "ocm_id": 1234},
        ),
    ],
)
def test_valid_inbound_payloads_parse(model: type[BaseModel], payload: dict[str, Any]) -> None:
    """The payloads of DESIGN §3 parse from JSON."""
    parsed = model.model_validate_json(json.dumps(payload))
    assert parsed.model_dump(exclude_unset=True) == payload


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        # extra fields
        (wire.OptIn, {"enabled": True, "admin": True}),
        (wire.PushRegistration, {"app_id": "a", "platform": "fcm", "token": "t", "x": 1}),
        (wire.Decision, {"choice": "once", "session": "s"}),
        # wrong types, including ones lax parsing would coerce
        (wire.OptIn, {"enabled": "yes"}),
        (wire.OptIn, {"enabled": 1}),
        (wire.OptIn, {"enabled": True, "nickname": 7}),
        (wire.PushRegistration, {"app_id": 5, "platform": "fcm", "token": "t"}),
        (wire.PushRegistration, {"app_id": "a", "platform": "sms", "token": "t"}),
        (wire.PushRegistration, {"app_id": "a", "platform": "fcm", "token": "t", "sandbox": "no"}),
        (wire.Decision, {"choice": ["once"]}),
        (wire.Decision, {"choice": "once", "ocm_id": "12"}),
        (wire.Decision, {"choice": "once", "ocm_id": 12.5}),
        (wire.Decision, {"choice": "once", "ocm_id": 0}),
        # missing fields
        (wire.OptIn, {}),
        (wire.PushRegistration, {"app_id": "a", "platform": "fcm"}),
        (wire.Decision, {}),
        # over-long or bad strings
        (wire.OptIn, {"enabled": True, "nickname": "x" * 41}),
        (wire.OptIn, {"enabled": True, "nickname": ""}),
        (wire.OptIn, {"enabled": True, "nickname": "Jim\nbo"}),
        (wire.OptIn, {"enabled": True, "nickname": "Jimbo\n"}),
        (wire.PushRegistration, {"app_id": "a" * 129, "platform": "fcm", "token": "t"}),
        (wire.PushRegistration, {"app_id": "", "platform": "fcm", "token": "t"}),
        (wire.PushRegistration, {"app_id": "a", "platform": "fcm", "token": "t" * 4097}),
        (wire.Decision, {"choice": "x" * 41}),
        (wire.Decision, {"choice": "once", "charge_point": "3" * 201}),
        (wire.Decision, {"choice": "once", "comment": "c" * 1001}),
    ],
)
def test_bad_inbound_payloads_rejected(model: type[BaseModel], payload: dict[str, Any]) -> None:
    """Extra fields, wrong types, missing fields and over-long strings are refused."""
    with pytest.raises(ValidationError):
        model.model_validate_json(json.dumps(payload))


@pytest.mark.parametrize("raw", ["", "[]", "null", "{", '"enabled"', "{'enabled': true}"])
def test_non_object_json_rejected(raw: str) -> None:
    """Payloads that are not a JSON object are refused."""
    with pytest.raises(ValidationError):
        wire.OptIn.model_validate_json(raw)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_validation_error(raw: bytes) -> None:
    """Any bytes either parse or raise ValidationError, for every inbound model."""
    for model in (wire.OptIn, wire.PushRegistration, wire.Decision):
        try:
            model.model_validate_json(raw)
        except ValidationError:
            pass


def record(**changes: Any) -> wire.Record:
    fields: dict[str, Any] = {
        "id": "3f1c",
        "version": 1,
        "status": "completed",
        "cause": None,
        "contributor": "anonymous",
        "vehicle_type": "RT",
        "connector": "type2",
        "ocm_connection_type_id": 25,
        "latitude": 51.3023,
        "longitude": 0.40145,
        "station": {"ocm_id": 1234, "title": "Depot"},
        "charge_point": None,
        "started_at": datetime(2024, 11, 11, 18, 19, 21, 123456, tzinfo=UTC),
        "ended_at": datetime(2024, 11, 11, 20, 0, 0, tzinfo=timezone(timedelta(hours=1))),
        "energy_kwh": 21.4,
        "max_power_kw": 7.2,
        "max_voltage": 231.0,
        "max_current": 32.0,
        "soc_start": 20.0,
        "soc_end": 80.0,
        "comment": None,
        "updated_at": datetime(2024, 11, 11, 19, 0, 0, tzinfo=UTC),
        "license": "CC0-1.0",
    }
    fields.update(changes)
    return wire.Record.model_validate(fields)


def test_record_times_are_rfc3339_utc() -> None:
    """A record serialises every time as RFC 3339 in UTC with a Z suffix."""
    out = json.loads(record().model_dump_json())
    assert out["started_at"] == "2024-11-11T18:19:21Z"
    assert out["ended_at"] == "2024-11-11T19:00:00Z"
    assert out["updated_at"] == "2024-11-11T19:00:00Z"
    assert out["station"] == {"ocm_id": 1234, "title": "Depot"}


def test_record_open_session_has_null_end() -> None:
    """A record of a running session serialises ended_at as null."""
    out = json.loads(record(status="charging", ended_at=None).model_dump_json())
    assert out["ended_at"] is None and out["status"] == "charging"


def test_public_and_webhook_events_serialise_nested_times() -> None:
    """Public and webhook events carry the record's times, and the timestamp, as RFC 3339 Z."""
    event = wire.PublicEvent(type="session.completed", session=record())
    out = json.loads(event.model_dump_json())
    assert out["type"] == "session.completed"
    assert out["session"]["started_at"] == "2024-11-11T18:19:21Z"
    hook = wire.WebhookEvent(
        type="session.completed",
        session=record(),
        timestamp=datetime(2024, 11, 11, 20, 0, 5, tzinfo=timezone(timedelta(hours=-5))),
    )
    out = json.loads(hook.model_dump_json())
    assert out["timestamp"] == "2024-11-12T01:00:05Z"
    assert out["session"]["ended_at"] == "2024-11-11T19:00:00Z"


@given(st.datetimes(timezones=st.just(UTC)))
def test_rfc3339_round_trips_to_the_second(t: datetime) -> None:
    """rfc3339 output ends in Z and parses back to the same second."""
    s = wire.rfc3339(t)
    assert s.endswith("Z")
    assert datetime.fromisoformat(s) == t.replace(microsecond=0)


def test_record_rejects_unknown_status() -> None:
    """A record with a status outside DESIGN §4 is refused."""
    with pytest.raises(ValidationError):
        record(status="paused")
