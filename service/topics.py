"""Build and parse every MQTT topic of DESIGN.md (shared with firmware_sim)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

ROOT = "ovms"
PUBLIC_ROOT = "chargeshare/public"

# An owner or vehicle name: one topic level, no wildcards, no separators, no control characters.
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
# Wildcards and control characters (NUL included) never belong in a topic name (MQTT 4.7.3).
_FORBIDDEN = re.compile(r"[+#\x00-\x1f\x7f]")
_GRID_INT = re.compile(r"^-?[0-9]{1,12}$")
MAX_TOPIC_LENGTH = 512


class Kind(Enum):
    """What an inbound topic carries."""

    METRIC = "metric"
    EVENT = "event"
    NOTIFY = "notify"
    GRID_LOG = "grid_log"
    OPTIN = "optin"
    PUSH = "push"
    DECISION = "decision"


@dataclass(frozen=True, slots=True)
class Parsed:
    """An inbound topic taken apart."""

    kind: Kind
    owner: str
    vehicle: str
    name: str = ""  # metric name with dots, event name, notify subtype, or request id
    entry_id: int = 0  # grid log entry id
    age_s: int = 0  # grid log age (<= 0)


class TopicError(ValueError):
    """A topic that is not one of DESIGN.md's inbound topics."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"{reason}: {topic!r}")


def valid_name(name: str) -> bool:
    """Tell whether a string can be an owner or vehicle topic level."""
    return bool(_NAME.match(name))


def prefix(owner: str, vehicle: str) -> str:
    """Return the vehicle prefix `ovms/<owner>/<vehicle>/`."""
    return f"{ROOT}/{owner}/{vehicle}/"


def metric(owner: str, vehicle: str, name: str) -> str:
    """Return the topic of metric `name` (dots become slashes)."""
    return prefix(owner, vehicle) + "metric/" + name.replace(".", "/")


def event(owner: str, vehicle: str, name: str) -> str:
    """Return the per-event topic of event `name`."""
    return prefix(owner, vehicle) + "event/" + name.replace(".", "/")


def legacy_event(owner: str, vehicle: str) -> str:
    """Return the legacy event topic whose payload is the dotted event name."""
    return prefix(owner, vehicle) + "event"


def notify(owner: str, vehicle: str, level: str, subtype: str) -> str:
    """Return a notification topic, e.g. level `info`, subtype `charge.started`."""
    return prefix(owner, vehicle) + f"notify/{level}/" + subtype.replace(".", "/")


def grid_log(owner: str, vehicle: str, entry_id: int, age_s: int) -> str:
    """Return the topic of one `*-LOG-Grid` record (age is minus its age in seconds)."""
    return prefix(owner, vehicle) + f"notify/data/log/grid/{entry_id}/{age_s}"


def optin(owner: str, vehicle: str) -> str:
    return prefix(owner, vehicle) + "chargeshare/optin"


def push(owner: str, vehicle: str) -> str:
    return prefix(owner, vehicle) + "chargeshare/push"


def request(owner: str, vehicle: str, request_id: str) -> str:
    return prefix(owner, vehicle) + f"chargeshare/request/{request_id}"


def decision(owner: str, vehicle: str, request_id: str) -> str:
    return prefix(owner, vehicle) + f"chargeshare/decision/{request_id}"


def status(owner: str, vehicle: str) -> str:
    return prefix(owner, vehicle) + "chargeshare/status"


def error(owner: str, vehicle: str) -> str:
    return prefix(owner, vehicle) + "chargeshare/error"


def public_session(geohash: str) -> str:
    """Return the public topic for a session whose location has this geohash."""
    g = geohash[:3]
    if len(g) != 3:
        raise ValueError(f"geohash too short: {geohash!r}")
    return f"{PUBLIC_ROOT}/sessions/{g[0]}/{g[1]}/{g[2]}"


# What the service subscribes to (as a shared subscription). Metrics travel on their own link.
METRIC_FILTERS = ("ovms/+/+/metric/#",)
EVENT_FILTERS = (
    "ovms/+/+/event",
    "ovms/+/+/event/#",
    "ovms/+/+/notify/info/#",
    "ovms/+/+/notify/alert/#",
    "ovms/+/+/notify/data/log/grid/#",
    "ovms/+/+/chargeshare/optin",
    "ovms/+/+/chargeshare/push",
    "ovms/+/+/chargeshare/decision/+",
)


def is_metric(topic: str) -> bool:
    """Tell cheaply whether a topic is a metric topic."""
    parts = topic.split("/", 4)
    return len(parts) == 5 and parts[0] == ROOT and parts[3] == "metric"


def parse(topic: str) -> Parsed:
    """Take an inbound topic apart, or raise TopicError saying why it is not one."""
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(topic, f"topic longer than {MAX_TOPIC_LENGTH} characters")
    if _FORBIDDEN.search(topic):
        raise TopicError(topic, "topic contains a wildcard or control character")
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT:
        raise TopicError(topic, "not under ovms/<owner>/<vehicle>/")
    owner, vehicle, rest = parts[1], parts[2], parts[3:]
    if not valid_name(owner) or not valid_name(vehicle):
        raise TopicError(topic, "owner or vehicle id is not a valid name")
    head = rest[0]
    if head == "metric" and len(rest) >= 2 and all(rest[1:]):
        return Parsed(Kind.METRIC, owner, vehicle, ".".join(rest[1:]))
    if head == "event":
        if len(rest) == 1:
            return Parsed(Kind.EVENT, owner, vehicle, "")
        if all(rest[1:]):
            return Parsed(Kind.EVENT, owner, vehicle, ".".join(rest[1:]))
    if head == "notify" and len(rest) >= 3:
        if rest[1:4] == ["data", "log", "grid"]:
            if len(rest) != 6:
                raise TopicError(topic, "grid log topic needs <entry id>/<age>")
            if not (_GRID_INT.match(rest[4]) and _GRID_INT.match(rest[5])):
                raise TopicError(topic, "grid log entry id and age must be integers")
            entry_id, age = int(rest[4]), int(rest[5])
            if entry_id < 0 or age > 0 or age < -10 * 365 * 86400:
                raise TopicError(topic, "grid log entry id must be >= 0 and age <= 0")
            return Parsed(Kind.GRID_LOG, owner, vehicle, "", entry_id, age)
        if rest[1] in ("info", "alert", "error") and all(rest[2:]):
            return Parsed(Kind.NOTIFY, owner, vehicle, ".".join(rest[2:]))
    if head == "chargeshare" and len(rest) >= 2:
        if rest[1:] == ["optin"]:
            return Parsed(Kind.OPTIN, owner, vehicle)
        if rest[1:] == ["push"]:
            return Parsed(Kind.PUSH, owner, vehicle)
        if len(rest) == 3 and rest[1] == "decision":
            if not _REQUEST_ID.match(rest[2]):
                raise TopicError(topic, "request id must be 32 lowercase hex digits")
            return Parsed(Kind.DECISION, owner, vehicle, rest[2])
    raise TopicError(topic, "not a topic the service accepts")
