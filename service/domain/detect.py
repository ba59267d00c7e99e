"""OVMS metric and grid-log readings → charge phases and phase changes (DESIGN §2).

Phase rules, first match wins (state and substate are `v.c.state` / `v.c.substate`):

| state                | substate                  | v.c.charging | phase    |
| -------------------- | ------------------------- | ------------ | -------- |
| done                 | any                       | any          | DONE     |
| error                | any                       | any          | ABORTED  |
| stopped              | onrequest                 | any          | STOPPED  |
| stopped              | scheduledstop             | any          | DONE     |
| timerwait            | onrequest, scheduledstop  | no/unknown   | PAUSED   |
| stopped, timerwait   | not timerwait / powerwait | any          | ABORTED  |
| charging             | any                       | any          | CHARGING |
| any                  | any                       | yes          | CHARGING |
| a pause state        | any                       | no/unknown   | PAUSED   |
| any                  | timerwait, powerwait      | no/unknown   | PAUSED   |
| anything else        |                           |              | IDLE     |

Pause states are timerwait, powerwait, heating, topoff and prepare. A terminal state (done,
stopped) wins over `v.c.charging`, and `v.c.state` charging wins over `v.c.charging` no, so the
unordered arrival of the two metrics at the end of a charge never turns an abort into a completion.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum


class Phase(StrEnum):
    """Where a vehicle is in a charge, as its latest readings say."""

    IDLE = "idle"
    CHARGING = "charging"
    PAUSED = "paused"
    DONE = "done"
    ABORTED = "aborted"
    STOPPED = "stopped"  # stopped by the owner


class Change(StrEnum):
    """What a phase change means for the charge session."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    ABORT = "abort"
    OWNER_STOP = "owner_stop"
    NONE = "none"


# Metrics the service keeps per vehicle. The position is not among them: it is sealed or hashed
# (service.sealing, privacy), and v.p.location (the owner's own geofence name) is never kept.
KEPT_METRICS: frozenset[str] = frozenset(
    {
        "v.c.charging",
        "v.c.state",
        "v.c.substate",
        "v.c.type",
        "v.c.mode",
        "v.c.pilot",
        "v.c.voltage",
        "v.c.current",
        "v.c.power",
        "v.c.kwh",
        "v.c.kwh.grid",
        "v.c.time",
        "v.c.timestamp",
        "v.c.climit",
        "v.c.limit.soc",
        "v.d.cp",
        "v.b.soc",
        "v.type",
        "m.time.utc",
        "v.p.gpslock",
        "v.p.gpssq",
        "s.v3.connected",
    }
)
POSITION_METRICS = frozenset({"v.p.latitude", "v.p.longitude"})

MAX_VALUE_LENGTH = 256
MAX_NUMBER = 1e9  # no charge metric comes near this; larger values are garbage
_NUMBER = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIME_TEXT = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,6})?"
    r"(?: ?([A-Za-z]{1,6}|[+-]\d{2}:?\d{2}))?$"
)
_EPOCH = re.compile(r"^[0-9]{1,12}$")
_UTC_NAMES = frozenset({"UTC", "GMT", "Z", "UT"})
# Clocks before GPS or NTP sync read 1970; such times mean "unknown".
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2200, 1, 1, tzinfo=UTC)
_LATEST_EPOCH = int(_LATEST.timestamp())

_BOOL_METRICS = frozenset(
    {"v.c.charging", "v.c.pilot", "v.d.cp", "v.p.gpslock", "s.v3.connected", "v.e.on"}
)
_NUMBER_METRICS = frozenset(
    {
        "v.c.voltage",
        "v.c.current",
        "v.c.power",
        "v.c.kwh",
        "v.c.kwh.grid",
        "v.c.time",
        "v.c.climit",
        "v.c.limit.soc",
        "v.b.soc",
        "v.p.gpssq",
    }
)
_TIME_METRICS = frozenset({"m.time.utc", "v.c.timestamp"})

_PAUSE_STATES = frozenset({"timerwait", "powerwait", "heating", "topoff", "prepare"})
_PAUSE_SUBSTATES = frozenset({"timerwait", "powerwait"})


def parse_bool(s: str) -> bool | None:
    """Read an OVMS boolean (yes/no, 1/0, true/false); None if it is none of these."""
    v = s.strip().lower()
    if v in ("yes", "1", "true"):
        return True
    if v in ("no", "0", "false"):
        return False
    return None


def parse_float(s: str) -> float | None:
    """Read a plain decimal number; None for empty, garbage, nan, inf or absurd magnitudes."""
    v = s.strip()
    if len(v) > 64 or not _NUMBER.match(v):
        return None
    x = float(v)
    if not math.isfinite(x) or abs(x) > MAX_NUMBER:
        return None
    return x


def parse_time(s: str) -> datetime | None:
    """Read an OVMS time metric ("2024-11-11 18:19:21 UTC" or epoch seconds) as aware UTC.

    Local zone abbreviations ("CET") give no offset, so such times are None, as are times
    before 2000 (an unsynced module clock) or unreadable text.
    """
    v = s.strip()
    if _EPOCH.match(v):
        seconds = int(v)
        if seconds >= _LATEST_EPOCH:
            return None
        t = datetime.fromtimestamp(seconds, UTC)
    else:
        m = _TIME_TEXT.match(v)
        if not m:
            return None
        zone = m.group(7)
        if zone is None or zone.upper() in _UTC_NAMES:
            tz = UTC
        elif zone[0] in "+-":
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            if offset >= timedelta(hours=24):
                return None
            tz = timezone(-offset if zone[0] == "-" else offset)
        else:
            return None
        year, month, day, hour, minute, second = (int(m.group(n)) for n in range(1, 7))
        try:
            t = datetime(year, month, day, hour, minute, second, tzinfo=tz)
        except ValueError:
            return None
        t = t.astimezone(UTC)
    if not _EARLIEST <= t < _LATEST:
        return None
    return t


def valid_metric_value(name: str, value: str) -> str | None:
    """Return why a metric value is unacceptable, or None if it is fine.

    An empty value means unset and is fine, except for a position metric, which must be a number.
    """
    if len(value) > MAX_VALUE_LENGTH:
        return f"{name} value is longer than {MAX_VALUE_LENGTH} characters"
    if _CONTROL.search(value):
        return f"{name} value contains control characters"
    if value.strip() == "" and name not in POSITION_METRICS:
        return None
    if name == "v.p.latitude":
        x = parse_float(value)
        if x is None or not -90.0 <= x <= 90.0:
            return "v.p.latitude must be a number in -90..90"
    elif name == "v.p.longitude":
        x = parse_float(value)
        if x is None or not -180.0 <= x <= 180.0:
            return "v.p.longitude must be a number in -180..180"
    elif name in _BOOL_METRICS:
        if parse_bool(value) is None:
            return f"{name} must be yes or no"
    elif name in _NUMBER_METRICS:
        if parse_float(value) is None:
            return f"{name} must be a number"
    elif name in _TIME_METRICS:
        v = value.strip()
        if not (_EPOCH.match(v) or _TIME_TEXT.match(v)):
            return f"{name} must be a time like 2024-11-11 18:19:21 UTC or epoch seconds"
    return None


def _phase(charging: bool | None, state: str, substate: str) -> Phase:
    state, substate = state.strip().lower(), substate.strip().lower()
    if state == "done":
        return Phase.DONE
    if state == "error":
        return Phase.ABORTED
    if state == "stopped" and substate == "onrequest":
        return Phase.STOPPED
    if state == "stopped" and substate == "scheduledstop":
        return Phase.DONE
    if state == "timerwait" and substate in ("onrequest", "scheduledstop"):
        return Phase.CHARGING if charging else Phase.PAUSED
    if state in ("stopped", "timerwait") and substate not in _PAUSE_SUBSTATES:
        return Phase.ABORTED
    if state == "charging" or charging:
        return Phase.CHARGING
    if state in _PAUSE_STATES or state == "stopped" or substate in _PAUSE_SUBSTATES:
        return Phase.PAUSED
    return Phase.IDLE


def phase_of(metrics: Mapping[str, str]) -> Phase:
    """Return the charge phase that a vehicle's latest metrics describe."""
    return _phase(
        parse_bool(metrics.get("v.c.charging", "")),
        metrics.get("v.c.state", ""),
        metrics.get("v.c.substate", ""),
    )


@dataclass(frozen=True)
class Reading:
    """The numbers of one charge moment, as far as the metrics tell them."""

    energy_kwh: float | None
    power_kw: float | None
    voltage: float | None
    current: float | None
    soc: float | None
    connector: str | None
    vehicle_type: str | None
    charge_time_s: float | None


def _text(s: str | None) -> str | None:
    v = (s or "").strip()
    return v or None


def reading(metrics: Mapping[str, str]) -> Reading:
    """Return the charge numbers in a vehicle's latest metrics."""
    connector = _text(metrics.get("v.c.type"))
    if connector is not None:
        connector = connector.lower()
        if connector == "undefined":
            connector = None

    def num(name: str) -> float | None:
        return parse_float(metrics.get(name, ""))

    return Reading(
        energy_kwh=num("v.c.kwh"),
        power_kw=num("v.c.power"),
        voltage=num("v.c.voltage"),
        current=num("v.c.current"),
        soc=num("v.b.soc"),
        connector=connector,
        vehicle_type=_text(metrics.get("v.type")),
        charge_time_s=num("v.c.time"),
    )


_ACTIVE = frozenset({Phase.CHARGING, Phase.PAUSED})
_END_CHANGE = {
    Phase.DONE: Change.COMPLETE,
    Phase.ABORTED: Change.ABORT,
    Phase.STOPPED: Change.OWNER_STOP,
}


def change(previous: Phase, current: Phase, session_open: bool) -> Change:
    """Return what moving from one phase to another means for the vehicle's session.

    Charging after any other phase starts a session, or resumes the open one. Charging after a
    pause with no open session (the service missed the start) is a START as well.
    """
    if previous == current:
        return Change.NONE
    if current == Phase.CHARGING:
        return Change.RESUME if session_open else Change.START
    if previous == Phase.CHARGING and current == Phase.PAUSED:
        return Change.PAUSE
    if previous in _ACTIVE:
        if current in _END_CHANGE:
            return _END_CHANGE[current]
        if current == Phase.IDLE and session_open:
            return Change.COMPLETE
    return Change.NONE


# Open Charge Map ConnectionTypeID per v.c.type (OCM CoreReferenceData StandardConnectionTypes).
OCM_CONNECTION_TYPE: Mapping[str, int | None] = {
    "type1": 1,  # J1772
    "chademo": 2,
    "roadster": 8,  # Tesla Roadster
    "type2": 25,  # Type 2 socket (Mennekes)
    "supercharger": 27,
    "teslaus": 30,  # Tesla Model S/X connector
    "ccs": 33,  # CCS (Type 2)
    "undefined": None,
    "": None,
}


# ---- grid log records ------------------------------------------------------------------------

GRID_HEADER = "*-LOG-Grid"
GRID_FIELDS = {1: 44, 2: 45}  # record version → number of fields after <storetime>
MAX_GRID_RECORD = 4096
MAX_GRID_TEXT = 200


@dataclass(frozen=True)
class GridRecord:
    """One `*-LOG-Grid` record: the vehicle's charge state at one state change."""

    version: int
    store_time_s: int
    gpslock: bool | None
    latitude: float | None
    longitude: float | None
    location_name: str
    charge_type: str
    state: str
    substate: str
    mode: str
    charge_time_s: float | None
    charge_kwh: float | None
    charge_kwh_grid: float | None
    soc: float | None
    odometer: float | None

    def phase(self) -> Phase:
        """Return the charge phase this record describes."""
        return _phase(None, self.state, self.substate)


def parse_grid_record(payload: str) -> GridRecord:
    """Parse a `*-LOG-Grid,<ver>,<storetime_s>,<fields>` record or raise ValueError saying why."""
    if len(payload) > MAX_GRID_RECORD:
        raise ValueError(f"grid record longer than {MAX_GRID_RECORD} characters")
    # The firmware cuts a record at the first LF and turns LF inside strings into CR.
    line = payload.split("\n", 1)[0].rstrip("\r").replace("\r", " ")
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as e:
        raise ValueError(f"grid record is not valid CSV: {e}") from None
    if len(rows) != 1:
        raise ValueError("grid record must be one CSV line")
    row = rows[0]
    if len(row) < 3 or row[0] != GRID_HEADER:
        raise ValueError(f"grid record must start with {GRID_HEADER},<version>,<storetime>")
    if not _EPOCH.match(row[1]) or int(row[1]) not in GRID_FIELDS:
        raise ValueError(f"grid record version must be 1 or 2, not {row[1][:20]!r}")
    version = int(row[1])
    if not _EPOCH.match(row[2]):
        raise ValueError(f"grid record storetime must be whole seconds, not {row[2][:20]!r}")
    fields = row[3:]
    if len(fields) != GRID_FIELDS[version]:
        raise ValueError(
            f"grid record version {version} needs {GRID_FIELDS[version]} fields, got {len(fields)}"
        )

    def text(n: int, what: str) -> str:
        v = fields[n - 1]
        if len(v) > MAX_GRID_TEXT or _CONTROL.search(v):
            raise ValueError(f"grid field {n} ({what}) is too long or has control characters")
        return v.strip()

    def num(n: int, what: str) -> float | None:
        v = fields[n - 1].strip()
        if v == "":
            return None
        x = parse_float(v)
        if x is None:
            raise ValueError(f"grid field {n} ({what}) is not a number: {v[:20]!r}")
        return x

    lock_text = fields[0].strip()
    gpslock = parse_bool(lock_text) if lock_text else None
    if lock_text and gpslock is None:
        raise ValueError(f"grid field 1 (gpslock) must be 0 or 1, not {lock_text[:20]!r}")
    latitude, longitude = num(2, "latitude"), num(3, "longitude")
    if latitude is not None and not -90.0 <= latitude <= 90.0:
        raise ValueError(f"grid field 2 (latitude) out of range -90..90: {latitude}")
    if longitude is not None and not -180.0 <= longitude <= 180.0:
        raise ValueError(f"grid field 3 (longitude) out of range -180..180: {longitude}")
    return GridRecord(
        version=version,
        store_time_s=int(row[2]),
        gpslock=gpslock,
        latitude=latitude,
        longitude=longitude,
        location_name=text(5, "location"),
        charge_type=text(6, "charge type"),
        state=text(7, "state"),
        substate=text(8, "substate"),
        mode=text(9, "mode"),
        charge_time_s=num(20, "charge time"),
        charge_kwh=num(21, "charge kWh"),
        charge_kwh_grid=num(22, "charge kWh grid"),
        soc=num(28, "soc"),
        odometer=num(45, "odometer") if version >= 2 else None,
    )
