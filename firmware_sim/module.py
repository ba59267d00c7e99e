"""One emulated OVMS v3 module: metrics, events, notifications and grid logs over MQTT 3.1.1."""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from firmware_sim.formats import (
    GridRecord,
    MetricValue,
    SimClock,
    format_metric,
    format_time,
    grid_log_text,
    mp_encode,
)
from firmware_sim.links import Link, Message, ModuleError, PahoLink, Recorder
from service import topics

__all__ = [  # what scenarios and tests import from here, wherever it is defined
    "CHARGING_INTERVAL_S",
    "IDLE_INTERVAL_S",
    "Charge",
    "GridRecord",
    "Message",
    "Module",
    "ModuleError",
    "PahoLink",
    "Recorder",
    "SimClock",
    "format_metric",
    "grid_log_text",
]

Clock = Callable[[], float]
# A stop with one of these substates is an info notification; any other substate is an alert.
PLANNED_STOP_SUBSTATES = frozenset({"scheduledstop", "timerwait", "onrequest"})
# Pauses inside one plug-in: (state, substate, still charging). powerwait as the Renault Zoe
# module reports it ("waiting for current").
PAUSES: dict[str, tuple[str, str, bool]] = {
    "timerwait": ("timerwait", "timerwait", False),
    "powerwait": ("stopped", "powerwait", False),
    "heating": ("heating", "", False),
    "topoff": ("topoff", "", True),
}
CHARGING_INTERVAL_S = 10  # firmware cadence while charging
IDLE_INTERVAL_S = 600  # firmware cadence when idle


# ---- the module ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """A text notification waiting for the link."""

    level: str
    subtype: str
    text: str
    legacy: bool


@dataclass
class Charge:
    """One plug-in as the module saw it, for scenarios to say what the service should find."""

    started: float
    latitude: float
    longitude: float
    connector: str
    soc_start: float
    ended: float | None = None
    outcome: Literal["charging", "completed", "interrupted", "stopped"] = "charging"
    energy_kwh: float = 0.0
    energy_grid_kwh: float = 0.0
    soc_end: float | None = None
    max_power_kw: float = 0.0
    pauses: list[str] = field(default_factory=list)


def _initial_metrics(vehicle_type: str, vehicle_id: str) -> dict[str, MetricValue]:
    return {
        "v.type": vehicle_type,
        "v.vin": f"VF1SIM{zlib.crc32(vehicle_id.encode()):011d}",
        "s.v3.peers": 0,
        "v.e.on": False,
        "v.e.awake": False,
        "v.c.charging": False,
        "v.c.state": "",
        "v.c.substate": "",
        "v.c.mode": "standard",
        "v.c.type": "undefined",
        "v.c.pilot": False,
        "v.d.cp": False,
        "v.c.voltage": 0.0,
        "v.c.current": 0.0,
        "v.c.power": 0.0,
        "v.c.climit": 32.0,
        "v.c.kwh": 0.0,
        "v.c.kwh.grid": 0.0,
        "v.c.kwh.grid.total": 1834.2,
        "v.c.time": 0,
        "v.c.limit.soc": 0.0,
        "v.c.limit.range": 0.0,
        "v.c.temp": 18.0,
        "v.c.12v.temp": 19.0,
        "v.b.soc": 35.0,
        "v.b.soh": 97.0,
        "v.b.health": "",
        "v.b.cac": 108.4,
        "v.b.voltage": 355.2,
        "v.b.current": 0.0,
        "v.b.power": 0.0,
        "v.b.temp": 16.0,
        "v.b.range.est": 98.0,
        "v.b.range.ideal": 105.0,
        "v.b.range.full": 280.0,
        "v.b.energy.used.total": 6532.1,
        "v.b.energy.recd.total": 911.4,
        "v.b.coulomb.used.total": 18122.0,
        "v.b.coulomb.recd.total": 2531.0,
        "v.p.gpslock": False,
        "v.p.odometer": 23816.4,
        "v.e.temp": 12.5,
        "v.e.cabintemp": 15.0,
    }


class Module:
    """An OVMS v3 module: connects as the firmware does and publishes what the firmware would."""

    def __init__(
        self,
        owner: str,
        vehicle_id: str,
        password: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        tls_ca: str | None = None,
        vehicle_type: str = "RT",
        grid_log: bool = False,
        grid_log_version: int = 2,
        grid_log_storetime_days: int = 365,
        legacy_notify: bool = False,
        notify_events: bool = True,
        capacity_kwh: float = 40.0,
        efficiency: float = 0.92,
        clock: Clock = time.time,
        keepalive: int = 60,
        threaded: bool = True,
        link: Link | None = None,
    ) -> None:
        self.owner, self.vehicle_id = owner, vehicle_id
        self.grid_log_enabled = grid_log
        self.grid_log_version = grid_log_version
        self.grid_log_storetime_days = grid_log_storetime_days
        self.legacy_notify = legacy_notify
        self.notify_events = notify_events
        self.capacity_kwh, self.efficiency = capacity_kwh, efficiency
        self.clock: Clock = clock
        self.sent = 0  # messages handed to the link
        self.charges: list[Charge] = []
        self._rng = random.Random(vehicle_id)
        self._values: dict[str, MetricValue] = _initial_metrics(vehicle_type, vehicle_id)
        self._values["m.time.utc"] = format_time(self.clock())
        self._texts = {n: format_metric(n, v) for n, v in self._values.items()}
        self._queue: list[Notification | GridRecord] = []  # notifications while offline
        self._entry_id = 0
        self._last_charge_time = 0
        self._charger = (230.0, 32.0)
        self._online = False
        self._up = threading.Event()
        self._lock = threading.RLock()
        will = Message(self._metric_topic("s.v3.connected"), "no", 0, True)
        self.link: Link = link or PahoLink(
            vehicle_id,
            owner,
            password,
            host,
            port,
            will=will,
            tls_ca=tls_ca,
            keepalive=keepalive,
            threaded=threaded,
        )

    # ---- connection ----------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Tell whether the module is connected to the broker."""
        return self._online

    def connect(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Connect, then publish `s.v3.connected=yes`, every metric and queued notifications."""
        self._up.clear()
        self.link.start(self._link_up, self._link_down)
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while not self._up.wait(0.05):
            refused = getattr(self.link, "refused", None)
            if refused:
                raise ModuleError(self.vehicle_id, f"broker refused the connection: {refused}")
            if time.monotonic() > deadline:
                raise ModuleError(self.vehicle_id, "no connection to the broker")
        self.wait_published(timeout)

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker keeps the session; the will does not fire)."""
        self.wait_published()
        self.link.stop(abrupt=False)
        self._link_down()

    def go_offline(self, *, abrupt: bool = True) -> None:
        """Lose the link (cellular gone): the will fires; notifications queue up meanwhile."""
        self.wait_published()
        self.link.stop(abrupt=abrupt)
        self._link_down()

    def go_online(self, timeout: float = 10.0) -> None:
        """Reconnect and send everything the module kept while offline."""
        self.connect(timeout)

    def wait_published(self, timeout: float = 10.0) -> bool:
        """Wait until every message so far has left the module (QoS 1/2: acknowledged)."""
        return self.link.flush(timeout)

    flush = wait_published

    def _link_up(self) -> None:
        with self._lock:
            self._online = True
            self._values["s.v3.connected"] = True
            self._texts["s.v3.connected"] = "yes"
            self._values["m.time.utc"] = format_time(self.clock())
            self._texts["m.time.utc"] = format_metric("m.time.utc", self._values["m.time.utc"])
            self._publish_metric("s.v3.connected")
            for name in self._texts:
                if name != "s.v3.connected":
                    self._publish_metric(name)
            queued, self._queue = self._queue, []
            for item in queued:
                if isinstance(item, GridRecord):
                    self._send_grid(item)
                else:
                    self._send_notify(item)
        self._up.set()

    def _link_down(self) -> None:
        with self._lock:
            self._online = False
            self._values["s.v3.connected"] = False
            self._texts["s.v3.connected"] = "no"

    # ---- publishing ----------------------------------------------------------------------

    def _metric_topic(self, name: str) -> str:
        return topics.metric(self.owner, self.vehicle_id, name)

    def _publish(self, topic: str, payload: str, qos: int, retain: bool) -> None:
        self.link.publish(topic, payload, qos, retain)
        self.sent += 1

    def _publish_metric(self, name: str) -> None:
        self._publish(self._metric_topic(name), self._texts[name], 0, True)

    def metric(self, name: str) -> MetricValue | None:
        """Return a metric's current value (None if never set)."""
        return self._values.get(name)

    def text(self, name: str) -> str | None:
        """Return a metric's current payload text (None if never set)."""
        return self._texts.get(name)

    def set(self, **metrics: MetricValue) -> list[str]:
        """Set metrics given as keywords with `_` for `.` (`v_c_state="done"`); see set_metrics."""
        return self.set_metrics({k.replace("_", "."): v for k, v in metrics.items()})

    def set_metrics(self, metrics: Mapping[str, MetricValue]) -> list[str]:
        """Set metrics; publish the changed ones and raise what the firmware raises on change."""
        with self._lock:
            before = dict(self._texts)
            changed = []
            for name, value in metrics.items():
                text = format_metric(name, value)
                self._values[name] = value
                if before.get(name) != text:
                    self._texts[name] = text
                    changed.append(name)
            if self._online:
                for name in changed:
                    self._publish_metric(name)
            self._react(changed, before)
            return changed

    def _react(self, changed: list[str], before: Mapping[str, str]) -> None:
        """Do what vehicle.cpp MetricModified and NotifyChargeState do for changed metrics."""
        extra: dict[str, MetricValue] = {}
        for name in changed:
            new, old = self._texts[name], before.get(name)
            if old is None:
                continue
            if name == "v.c.charging":
                self.event("vehicle.charge.start" if new == "yes" else "vehicle.charge.stop")
                if new == "no":
                    extra["v.c.timestamp"] = format_time(self.clock())
            elif name == "v.d.cp":
                self.event("vehicle.charge.prepare" if new == "yes" else "vehicle.charge.finish")
            elif name == "v.c.pilot":
                self.event(
                    "vehicle.charge.pilot.on" if new == "yes" else "vehicle.charge.pilot.off"
                )
            elif name == "v.c.type":
                self.event("vehicle.charge.type")
            elif name == "v.c.mode":
                self.event("vehicle.charge.mode")
            elif name == "v.c.state":
                self.event("vehicle.charge.state")
        if extra:
            self.set_metrics(extra)
        if "v.c.state" in changed and before.get("v.c.state") is not None:
            self._notify_charge_state()

    def _notify_charge_state(self) -> None:
        state = self._texts.get("v.c.state", "")
        substate = self._texts.get("v.c.substate", "")
        stat = self.stat_text()
        if state == "done":
            self.notify("info", "charge.done", stat)
        elif state in ("stopped", "timerwait"):
            level = "info" if substate in PLANNED_STOP_SUBSTATES else "alert"
            self.notify(level, "charge.stopped", stat)
        elif state == "charging":
            self.notify("info", "charge.started", stat)
        elif state == "topoff":
            self.notify("info", "charge.toppingoff", stat)
        elif state == "heating":
            self.notify("info", "heating.started", stat)
        if state and self.grid_log_enabled:
            self.grid_log()

    def event(self, name: str) -> None:
        """Publish an event on `P event/<a>/<b>` (empty) and legacy `P event` (dotted name)."""
        with self._lock:
            if not self._online:
                return  # events are QoS 0 and not queued: lost while offline
            self._publish(topics.event(self.owner, self.vehicle_id, name), "", 0, False)
            self._publish(topics.legacy_event(self.owner, self.vehicle_id), name, 0, False)

    def notify(self, level: str, subtype: str, text: str, *, legacy: bool | None = None) -> None:
        """Send an info/alert/error notification (QoS 1); legacy = firmware <= 3.3.004 form."""
        note = Notification(level, subtype, text, self.legacy_notify if legacy is None else legacy)
        with self._lock:
            if self.notify_events:
                self.event(f"notify.{level}.{subtype}")
            if self._online:
                self._send_notify(note)
            else:
                self._queue.append(note)

    def _send_notify(self, note: Notification) -> None:
        if note.legacy:
            # Up to 3.3.004: dotted subtype in the topic and an mp_encoded body.
            topic = (
                topics.prefix(self.owner, self.vehicle_id) + f"notify/{note.level}/{note.subtype}"
            )
            self._publish(topic, mp_encode(note.text), 1, False)
        else:
            topic = topics.notify(self.owner, self.vehicle_id, note.level, note.subtype)
            self._publish(topic, note.text, 1, False)

    def grid_log(self, *, version: int | None = None, **overrides: MetricValue) -> GridRecord:
        """Make one `*-LOG-Grid` record from the current metrics and send or queue it."""
        with self._lock:
            values = dict(self._values)
            values.update({k.replace("_", "."): v for k, v in overrides.items()})
            self._entry_id += 1
            text = grid_log_text(
                values,
                charge_time_s=self._last_charge_time,
                version=self.grid_log_version if version is None else version,
                storetime_days=self.grid_log_storetime_days,
            )
            record = GridRecord(self._entry_id, self.clock(), text)
            if self._online:
                self._send_grid(record)
            else:
                self._queue.append(record)
            return record

    def _send_grid(self, record: GridRecord) -> None:
        age = -max(0, round(self.clock() - record.created))
        topic = topics.grid_log(self.owner, self.vehicle_id, record.entry_id, age)
        self._publish(topic, record.text, 2, False)

    @property
    def queued(self) -> int:
        """Return how many notifications and grid logs wait for the link."""
        return len(self._queue)

    def number(self, name: str) -> float:
        """Return a numeric metric as a float (0 if unset or not a number)."""
        value = self._values.get(name)
        return float(value) if isinstance(value, int | float) else 0.0

    def stat_text(self) -> str:
        """Render the `stat` command's output, the body of charge notifications."""
        n = self.number
        lines = []
        if self._values.get("v.c.pilot") is True:
            mode = self._texts.get("v.c.mode", "standard").capitalize()
            state = self._texts.get("v.c.state", "").capitalize() or "Plugged in"
            lines += [
                f"{mode} - {state}",
                f"{n('v.c.voltage'):.1f}V/{n('v.c.current'):.1f}A",
                f"Drawn: {n('v.c.kwh.grid'):.1f} kWh",
                f"Charged: {n('v.c.kwh'):.1f} kWh",
            ]
        else:
            lines.append("Not charging")
        lines += [
            f"SOC: {n('v.b.soc'):.1f}%",
            f"Ideal range: {n('v.b.range.ideal'):.0f}km",
            f"Est. range: {n('v.b.range.est'):.0f}km",
            f"ODO: {n('v.p.odometer'):.1f}km",
            f"CAC: {n('v.b.cac'):.1f}Ah",
            f"SOH: {n('v.b.soh'):.0f}%",
        ]
        return "\n".join(lines)

    # ---- charge behaviour (as the DEMO vehicle and common vehicle modules do it) --------

    @property
    def charge(self) -> Charge | None:
        """Return the charge of the current plug-in, if the vehicle is plugged in."""
        if self.charges and self.charges[-1].ended is None:
            return self.charges[-1]
        return None

    def drive_to(self, latitude: float, longitude: float, *, location: str = "") -> None:
        """Arrive somewhere: GPS position with lock, and the matching geofence name."""
        self.set_metrics(
            {
                "v.p.latitude": float(latitude),
                "v.p.longitude": float(longitude),
                "v.p.gpslock": True,
                "v.p.gpssq": 82,
                "v.p.gpsmode": "AA",
                "v.p.satcount": 11,
                "v.p.altitude": 46.0,
                "v.p.location": location,
                "m.time.utc": format_time(self.clock()),
            }
        )

    def plug_in(
        self,
        latitude: float,
        longitude: float,
        connector: str = "type2",
        *,
        voltage: float = 230.0,
        current: float = 32.0,
        location: str = "",
    ) -> Charge:
        """Plug in and start charging: position first, then the charge metrics."""
        self.drive_to(latitude, longitude, location=location)
        self._charger = (voltage, current)
        charge = Charge(self.clock(), latitude, longitude, connector, self.number("v.b.soc"))
        self.charges.append(charge)
        self._last_charge_time = 0
        self.set_metrics(
            {
                "v.d.cp": True,
                "v.c.pilot": True,
                "v.c.type": connector,
                "v.c.mode": "standard",
                "v.c.climit": current,
                "v.c.kwh": 0.0,
                "v.c.kwh.grid": 0.0,
                "v.c.time": 0,
                **self._flow(running=True),
                "v.c.state": "charging",
                "v.c.substate": "",
                "v.c.charging": True,
            }
        )
        return charge

    def _flow(self, *, running: bool) -> dict[str, MetricValue]:
        """Charger and battery flow metrics while energy flows (or not)."""
        if not running:
            return {
                "v.c.voltage": 0.0,
                "v.c.current": 0.0,
                "v.c.power": 0.0,
                "v.b.current": 0.0,
                "v.b.power": 0.0,
            }
        volt, amp = self._charger
        volt = round(volt + self._rng.uniform(-1.5, 1.5), 1)
        power = volt * amp / 1000.0
        battery_kw = power * self.efficiency
        bat_volt = self.number("v.b.voltage") or 355.0
        return {
            "v.c.voltage": volt,
            "v.c.current": float(amp),
            "v.c.power": power,
            "v.b.power": -battery_kw,
            "v.b.current": -battery_kw * 1000.0 / bat_volt,
        }

    def tick(self, seconds: float = CHARGING_INTERVAL_S) -> None:
        """Let time pass: while charging, energy, SOC, range and charge time grow."""
        if isinstance(self.clock, SimClock):
            self.clock.advance(seconds)
        values: dict[str, MetricValue] = {"m.time.utc": format_time(self.clock())}
        if self._values.get("v.c.charging") is True:
            flow = self._flow(running=True)
            grid_kwh = float(flow["v.c.power"]) * seconds / 3600.0  # type: ignore[arg-type]
            battery_kwh = grid_kwh * self.efficiency
            soc = min(100.0, self.number("v.b.soc") + battery_kwh / self.capacity_kwh * 100.0)
            kwh = self.number("v.c.kwh") + battery_kwh
            charge_time = int(self.number("v.c.time") + seconds)
            self._last_charge_time = charge_time
            left_h = (
                (100.0 - soc) / 100.0 * self.capacity_kwh / max(battery_kwh, 1e-9) * seconds / 3600
            )
            values.update(flow)
            values.update(
                {
                    "v.c.kwh": kwh,
                    "v.c.kwh.grid": self.number("v.c.kwh.grid") + grid_kwh,
                    "v.c.kwh.grid.total": self.number("v.c.kwh.grid.total") + grid_kwh,
                    "v.c.time": charge_time,
                    "v.c.duration.full": int(left_h * 60),
                    "v.b.soc": soc,
                    "v.b.range.est": soc * 2.8,
                    "v.b.range.ideal": soc * 3.0,
                    "v.c.temp": 18.0 + min(20.0, charge_time // 180),
                }
            )
            charge = self.charge
            if charge is not None:
                charge.max_power_kw = max(charge.max_power_kw, float(flow["v.c.power"]))  # type: ignore[arg-type]
        self.set_metrics(values)

    def pause(
        self, kind: str = "timerwait", *, state: str | None = None, substate: str | None = None
    ) -> None:
        """Pause inside the plug-in: timerwait, powerwait, heating or topoff (or explicit)."""
        base_state, base_sub, still_charging = PAUSES.get(kind, (kind, "", False))
        if self.charge is not None:
            self.charge.pauses.append(kind)
        self.set_metrics(
            {
                **self._flow(running=still_charging),
                "v.c.state": base_state if state is None else state,
                "v.c.substate": base_sub if substate is None else substate,
                "v.c.charging": still_charging,
            }
        )

    def resume(self) -> None:
        """Charge again after a pause."""
        self.set_metrics(
            {
                **self._flow(running=True),
                "v.c.state": "charging",
                "v.c.substate": "",
                "v.c.charging": True,
            }
        )

    def _end(
        self, outcome: Literal["completed", "interrupted", "stopped"], state: str, substate: str
    ) -> None:
        self.set_metrics(
            {
                **self._flow(running=False),
                "v.c.duration.full": 0,
                "v.c.state": state,
                "v.c.substate": substate,
                "v.c.charging": False,
            }
        )
        charge = self.charge
        if charge is not None:
            charge.ended = self.clock()
            charge.outcome = outcome
            charge.energy_kwh = self.number("v.c.kwh")
            charge.energy_grid_kwh = self.number("v.c.kwh.grid")
            charge.soc_end = self.number("v.b.soc")

    def finish(self) -> None:
        """Complete the charge: state done (as the DEMO vehicle: substate stopped)."""
        self._end("completed", "done", "stopped")

    def abort(self, substate: str = "interrupted") -> None:
        """The charge fails (breaker trips, station fault): state stopped, substate interrupted."""
        self._end("interrupted", "stopped", substate)

    def stop_by_owner(self) -> None:
        """The owner stops the charge: state stopped, substate onrequest."""
        self._end("stopped", "stopped", "onrequest")

    def unplug(self) -> None:
        """Pull the cable: pilot off, port closed, charge time back to 0."""
        if self._values.get("v.c.charging") is True:
            self.stop_by_owner()
        self.set_metrics({"v.c.pilot": False, "v.d.cp": False, "v.c.time": 0})
