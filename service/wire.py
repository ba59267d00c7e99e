"""Pydantic payloads of DESIGN.md §3 and §4 (shared with firmware_sim)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

MAX_PAYLOAD = 16 * 1024  # bytes; larger app messages are refused before parsing

ShareChoice = Literal["always", "once", "not_once", "never"]
AbortChoice = Literal["user_interrupted", "station_fault", "other_fault"]
SHARE_CHOICES: tuple[str, ...] = ("always", "once", "not_once", "never")
ABORT_CHOICES: tuple[str, ...] = ("user_interrupted", "station_fault", "other_fault")
QuestionKind = Literal["share", "abort_reason"]
EventType = Literal[
    "session.started",
    "session.completed",
    "session.interrupted",
    "session.updated",
    "session.retracted",
]
ErrorCode = Literal[
    "invalid_payload",
    "invalid_topic",
    "unknown_request",
    "invalid_choice",
    "already_answered",
    "unknown_vehicle",
    "rate_limited",
]

Text = Annotated[str, StringConstraints(max_length=200)]
LongText = Annotated[str, StringConstraints(max_length=1000)]
Nickname = Annotated[
    str, StringConstraints(min_length=1, max_length=40, pattern=r"^[^\x00-\x1f\x7f]+$")
]


def rfc3339(t: datetime) -> str:
    """Format a time as RFC 3339 in UTC with a Z suffix."""
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Strict(BaseModel):
    # strict: a public contract; "yes" or 1 for a boolean, "12" for a number are wrong types.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # Postgres text cannot hold U+0000: refuse it here with a reason, not later with a crash.
        if isinstance(v, str) and "\x00" in v:
            raise ValueError("text must not contain NUL (U+0000)")
        return v


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)

    @field_serializer("*", when_used="json")
    def _times(self, v: Any) -> Any:
        return rfc3339(v) if isinstance(v, datetime) else v


# ---- app → service ---------------------------------------------------------------------------


class OptIn(_Strict):
    """`P chargeshare/optin`: whether and under which name the vehicle shares."""

    enabled: bool
    nickname: Nickname | None = None


class PushRegistration(_Strict):
    """`P chargeshare/push`: a phone's push token; `token` null unregisters."""

    app_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    platform: Literal["fcm", "apns"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None
    sandbox: bool = False


class Decision(_Strict):
    """`P chargeshare/decision/<request_id>`: the owner's answer to a question."""

    choice: Annotated[str, StringConstraints(max_length=40)]
    charge_point: Text | None = None
    comment: LongText | None = None
    ocm_id: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None


# ---- service → app ---------------------------------------------------------------------------


class QuestionSession(_Out):
    id: str
    started_at: datetime
    ended_at: datetime | None
    latitude: float | None
    longitude: float | None
    energy_kwh: float | None
    connector: str | None


class Station(_Out):
    ocm_id: int
    title: str | None = None
    points: int | None = None


class Question(_Out):
    """`P chargeshare/request/<request_id>` (retained)."""

    request_id: str
    kind: QuestionKind
    session: QuestionSession
    station: Station | None
    choices: list[str]
    created_at: datetime
    expires_at: datetime


class Status(_Out):
    """`P chargeshare/status` (retained)."""

    enabled: bool
    handle: str
    pending: int


class Error(_Out):
    """`P chargeshare/error`: why a message was rejected."""

    topic: str
    error: str
    code: ErrorCode


# ---- partner side ----------------------------------------------------------------------------


class PublicStation(_Out):
    ocm_id: int
    title: str | None = None


class Record(_Out):
    """One published session (DESIGN §4); every change bumps `version`."""

    id: str
    version: int
    status: Literal["charging", "completed", "interrupted", "retracted"]
    cause: AbortChoice | None
    contributor: str
    vehicle_type: str | None
    connector: str | None
    ocm_connection_type_id: int | None
    latitude: float | None
    longitude: float | None
    station: PublicStation | None
    charge_point: str | None
    started_at: datetime
    ended_at: datetime | None
    energy_kwh: float | None
    max_power_kw: float | None
    max_voltage: float | None
    max_current: float | None
    soc_start: float | None
    soc_end: float | None
    comment: str | None
    updated_at: datetime
    license: str


class PublicEvent(_Out):
    """Payload on `chargeshare/public/sessions/<g1>/<g2>/<g3>`."""

    type: EventType
    session: Record


class WebhookEvent(PublicEvent):
    """Body POSTed to partner webhooks: the public event plus when it happened."""

    timestamp: datetime
