"""How an OVMS v3 module writes values and grid-log records, and a clock a scenario can move."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

MetricValue = str | int | float | bool | datetime | Sequence[float]

# Metrics the firmware formats with a fixed number of decimals (metrics_standard.cpp SetFormat).
FIXED6 = frozenset({"v.p.latitude", "v.p.longitude"})


# ---- value formatting ------------------------------------------------------------------------


def format_float(value: float) -> str:
    """Format a float like a C++ stream with default settings (6 significant digits)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = f"{value:g}"
    return "0" if text == "-0" else text


def format_time(t: float | datetime) -> str:
    """Format a time as the firmware's DateUTC / DateLocal text (module time zone UTC)."""
    dt = t if isinstance(t, datetime) else datetime.fromtimestamp(t, UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_metric(name: str, value: MetricValue) -> str:
    """Return a metric's MQTT payload: plain text in native units, as `AsString()` renders it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6f}" if name in FIXED6 else format_float(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, str):
        return value
    return ",".join(format_float(float(v)) for v in value)


def mp_encode(text: str) -> str:
    """Encode text for a CSV field like the firmware: "," becomes ";" and LF becomes CR."""
    return text.replace(",", ";").replace("\n", "\r")


# ---- grid log --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GridRecord:
    """One `*-LOG-Grid` record and when the module made it (module clock)."""

    entry_id: int
    created: float
    text: str

    @property
    def fields(self) -> list[str]:
        """Return the data fields after `*-LOG-Grid,<version>,<storetime>`."""
        return self.text.split(",")[3:]


def grid_log_text(
    values: Mapping[str, MetricValue],
    *,
    charge_time_s: int,
    version: int = 2,
    storetime_days: int = 365,
) -> str:
    """Build one `*-LOG-Grid` CSV line from metric values (44 fields in v1, 45 in v2)."""

    def f(name: str, decimals: int) -> str:
        raw = values.get(name, 0.0)
        number = float(raw) if isinstance(raw, int | float) else 0.0
        return f"{number:.{decimals}f}"

    def s(name: str) -> str:
        raw = values.get(name, "")
        return mp_encode(raw if isinstance(raw, str) else format_metric(name, raw))

    gpslock = "1" if values.get("v.p.gpslock") is True else "0"
    fields = [
        gpslock,
        f("v.p.latitude", 6),
        f("v.p.longitude", 6),
        f("v.p.altitude", 1),
        s("v.p.location"),
        s("v.c.type"),
        s("v.c.state"),
        s("v.c.substate"),
        s("v.c.mode"),
        f("v.c.climit", 1),
        f("v.c.limit.range", 1),
        f("v.c.limit.soc", 1),
        s("v.g.type"),
        s("v.g.state"),
        s("v.g.substate"),
        s("v.g.mode"),
        f("v.g.climit", 1),
        f("v.g.limit.range", 1),
        f("v.g.limit.soc", 1),
        str(charge_time_s),
        f("v.c.kwh", 3),
        f("v.c.kwh.grid", 3),
        f("v.c.kwh.grid.total", 3),
        "0",
        f("v.g.kwh", 3),
        f("v.g.kwh.grid", 3),
        f("v.g.kwh.grid.total", 3),
        f("v.b.soc", 1),
        f("v.b.range.est", 1),
        f("v.b.range.ideal", 1),
        f("v.b.range.full", 1),
        f("v.b.voltage", 1),
        f("v.b.temp", 1),
        f("v.c.temp", 1),
        f("v.c.12v.temp", 1),
        f("v.e.temp", 1),
        f("v.e.cabintemp", 1),
        f("v.b.soh", 3),
        s("v.b.health"),
        f("v.b.cac", 3),
        f("v.b.energy.used.total", 3),
        f("v.b.energy.recd.total", 3),
        f("v.b.coulomb.used.total", 3),
        f("v.b.coulomb.recd.total", 3),
    ]
    if version >= 2:
        fields.append(f("v.p.odometer", 1))
    return f"*-LOG-Grid,{version},{storetime_days * 86400}," + ",".join(fields)


# ---- the clock ---------------------------------------------------------------------------------


class SimClock:
    """A module clock that moves only when told: charges can happen hours before "now"."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.t += seconds

    def set(self, t: float) -> None:
        """Jump to a time (e.g. back to real time when the module comes online again)."""
        self.t = t
