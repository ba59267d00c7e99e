"""Scripted charging stories, each driving one Module and saying what the service should find."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from firmware_sim.module import CHARGING_INTERVAL_S, IDLE_INTERVAL_S, Charge, Module, SimClock

# A story yields how long the firmware waits next (simulated seconds) and returns what to expect.
Steps = Generator[float, None, "Expected"]
Story = Callable[[Module], Steps]


@dataclass(frozen=True, slots=True)
class Place:
    """Where a charge happens."""

    name: str
    latitude: float
    longitude: float
    geofence: str = ""  # `v.p.location` when the module has a matching user geofence


PUBLIC_STATION = Place("public station", 51.302300, 0.401450)
RAPID_HUB = Place("rapid charging hub", 51.270840, 0.523110)
SUPERMARKET = Place("supermarket car park", 51.335120, 0.365980)
HOME = Place("home", 51.284700, 0.452300, geofence="Home")


@dataclass(frozen=True, slots=True)
class ExpectedSession:
    """One charge session the service should end up with."""

    status: Literal["completed", "interrupted", "stopped"]
    place: str
    latitude: float
    longitude: float
    connector: str
    energy_kwh: float  # into the battery (`v.c.kwh`); approximate
    energy_grid_kwh: float  # from the grid (`v.c.kwh.grid`)
    soc_start: float
    soc_end: float
    started_at: datetime  # module clock
    ended_at: datetime
    max_power_kw: float
    via: Literal["metrics", "grid_log"] = "metrics"


@dataclass(frozen=True, slots=True)
class Expected:
    """What a scenario should leave in the service, and how its owner answers questions."""

    scenario: str
    owner: str
    vehicle: str
    sessions: tuple[ExpectedSession, ...]
    share_answer: str | None = None  # the owner's answer to `share` questions
    abort_answer: str | None = None  # the owner's answer to `abort_reason` questions


def _expected(
    name: str,
    m: Module,
    charges: list[Charge],
    place: Place,
    *,
    share: str | None,
    abort: str | None = None,
    via: Literal["metrics", "grid_log"] = "metrics",
) -> Expected:
    sessions = []
    for c in charges:
        if c.outcome == "charging" or c.ended is None:
            continue
        sessions.append(
            ExpectedSession(
                status=c.outcome,
                place=place.name,
                latitude=c.latitude,
                longitude=c.longitude,
                connector=c.connector,
                energy_kwh=round(c.energy_kwh, 2),
                energy_grid_kwh=round(c.energy_grid_kwh, 2),
                soc_start=round(c.soc_start, 1),
                soc_end=round(c.soc_end if c.soc_end is not None else c.soc_start, 1),
                started_at=datetime.fromtimestamp(c.started, UTC),
                ended_at=datetime.fromtimestamp(c.ended, UTC),
                max_power_kw=round(c.max_power_kw, 2),
                via=via,
            )
        )
    return Expected(name, m.owner, m.vehicle_id, tuple(sessions), share, abort)


def _charge_for(m: Module, seconds: int) -> Generator[float, None, None]:
    """Charge for a while at the firmware's 10 s cadence."""
    for _ in range(max(1, seconds // CHARGING_INTERVAL_S)):
        m.tick(CHARGING_INTERVAL_S)
        yield CHARGING_INTERVAL_S


def _arrive(m: Module, place: Place) -> Generator[float, None, None]:
    m.drive_to(place.latitude, place.longitude, location=place.geofence)
    yield 30


def _plug(
    m: Module, place: Place, connector: str, **charger: float
) -> Generator[float, None, Charge]:
    charge = m.plug_in(
        place.latitude, place.longitude, connector, location=place.geofence, **charger
    )
    yield CHARGING_INTERVAL_S
    return charge


def jimbo(m: Module) -> Steps:
    """Charge at a public station never used before; a breaker trips after 25 minutes."""
    yield from _arrive(m, PUBLIC_STATION)
    charge = yield from _plug(m, PUBLIC_STATION, "type2")
    yield from _charge_for(m, 25 * 60)
    m.abort("interrupted")
    yield 120
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected("jimbo", m, [charge], PUBLIC_STATION, share="always", abort="station_fault")


def home(m: Module) -> Steps:
    """Charge overnight-style at home (16 A); the owner never shares home."""
    yield from _arrive(m, HOME)
    charge = yield from _plug(m, HOME, "type2", current=16.0)
    yield from _charge_for(m, 60 * 60)
    m.finish()
    yield 300
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected("home", m, [charge], HOME, share="never")


def interrupted(m: Module) -> Steps:
    """Fast-charge on CCS; the station faults after 8 minutes."""
    yield from _arrive(m, RAPID_HUB)
    charge = yield from _plug(m, RAPID_HUB, "ccs", voltage=400.0, current=110.0)
    yield from _charge_for(m, 8 * 60)
    m.abort("interrupted")
    yield 60
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected("interrupted", m, [charge], RAPID_HUB, share="once", abort="station_fault")


def paused(m: Module) -> Steps:
    """Charge with timerwait, powerwait and heating pauses inside one plug-in, then finish."""
    yield from _arrive(m, SUPERMARKET)
    charge = yield from _plug(m, SUPERMARKET, "type2", current=16.0)
    yield from _charge_for(m, 10 * 60)
    for kind, pause_s in (("timerwait", 300), ("powerwait", 120), ("heating", 180)):
        m.pause(kind)
        yield pause_s
        m.resume()
        yield from _charge_for(m, 10 * 60)
    m.finish()
    yield 120
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected("paused", m, [charge], SUPERMARKET, share="once")


def completed(m: Module) -> Steps:
    """Fast-charge on CCS for half an hour until done."""
    yield from _arrive(m, RAPID_HUB)
    charge = yield from _plug(m, RAPID_HUB, "ccs", voltage=400.0, current=120.0)
    yield from _charge_for(m, 30 * 60)
    m.finish()
    yield 60
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected("completed", m, [charge], RAPID_HUB, share="always")


def owner_stop(m: Module) -> Steps:
    """Charge at a public station; the owner stops it after 15 minutes."""
    yield from _arrive(m, PUBLIC_STATION)
    charge = yield from _plug(m, PUBLIC_STATION, "type2")
    yield from _charge_for(m, 15 * 60)
    m.stop_by_owner()
    yield 60
    m.unplug()
    yield IDLE_INTERVAL_S
    return _expected(
        "owner-stop", m, [charge], PUBLIC_STATION, share="once", abort="user_interrupted"
    )


LATE_BY_S = 3 * 3600


def late_gridlog(m: Module) -> Steps:
    """Charge while offline with grid logging on; the records arrive about 3 hours late."""
    m.grid_log_enabled = True
    real_clock = m.clock
    if m.online:
        m.go_offline(abrupt=True)
    yield 30
    charge_s = 30 * 60
    clock = SimClock(time.time() - LATE_BY_S - charge_s - 120)
    m.clock = clock
    # Offline: nobody watches, so the charge runs on the module's own clock without sleeping.
    charge = m.plug_in(PUBLIC_STATION.latitude, PUBLIC_STATION.longitude, "type2")
    for _ in range(charge_s // CHARGING_INTERVAL_S):
        m.tick(CHARGING_INTERVAL_S)
    m.finish()
    clock.advance(60)
    m.unplug()
    clock.set(time.time())
    m.clock = real_clock
    m.go_online()
    yield IDLE_INTERVAL_S
    return _expected("late-gridlog", m, [charge], PUBLIC_STATION, share="once", via="grid_log")


STORIES: dict[str, Story] = {
    "jimbo": jimbo,
    "home": home,
    "interrupted": interrupted,
    "paused": paused,
    "late-gridlog": late_gridlog,
    "completed": completed,
    "owner-stop": owner_stop,
}


# ---- brief stories: the same behaviours in 1-3 minutes of firmware time (fault tests, fleets) --

BRIEF_IDLE_S = 30  # the brief stories' last wait: long enough for the service to settle


def brief_completed(m: Module) -> Steps:
    """Fast-charge on CCS for 90 seconds until done."""
    yield from _arrive(m, RAPID_HUB)
    charge = yield from _plug(m, RAPID_HUB, "ccs", voltage=400.0, current=120.0)
    yield from _charge_for(m, 90)
    m.finish()
    yield 30
    m.unplug()
    yield BRIEF_IDLE_S
    return _expected("brief-completed", m, [charge], RAPID_HUB, share="always")


def brief_interrupted(m: Module) -> Steps:
    """Fast-charge on CCS; the station faults after a minute."""
    yield from _arrive(m, RAPID_HUB)
    charge = yield from _plug(m, RAPID_HUB, "ccs", voltage=400.0, current=110.0)
    yield from _charge_for(m, 60)
    m.abort("interrupted")
    yield 30
    m.unplug()
    yield BRIEF_IDLE_S
    return _expected(
        "brief-interrupted", m, [charge], RAPID_HUB, share="always", abort="station_fault"
    )


def brief_paused(m: Module) -> Steps:
    """Charge, wait on a timer for 30 seconds inside the same plug-in, charge again, finish."""
    yield from _arrive(m, SUPERMARKET)
    charge = yield from _plug(m, SUPERMARKET, "type2", current=16.0)
    yield from _charge_for(m, 40)
    m.pause("timerwait")
    yield 30
    m.resume()
    yield from _charge_for(m, 40)
    m.finish()
    yield 30
    m.unplug()
    yield BRIEF_IDLE_S
    return _expected("brief-paused", m, [charge], SUPERMARKET, share="always")


def brief_owner_stop(m: Module) -> Steps:
    """Charge at a public station; the owner stops it after a minute."""
    yield from _arrive(m, PUBLIC_STATION)
    charge = yield from _plug(m, PUBLIC_STATION, "type2")
    yield from _charge_for(m, 60)
    m.stop_by_owner()
    yield 30
    m.unplug()
    yield BRIEF_IDLE_S
    return _expected(
        "brief-owner-stop", m, [charge], PUBLIC_STATION, share="always", abort="user_interrupted"
    )


BRIEF_STORIES: dict[str, Story] = {
    "brief-completed": brief_completed,
    "brief-interrupted": brief_interrupted,
    "brief-paused": brief_paused,
    "brief-owner-stop": brief_owner_stop,
}


def run(
    story: str | Story,
    m: Module,
    speed: float = 1.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Expected:
    """Play a story on a connected module; sleep `speed` times each firmware wait (0: never)."""
    if isinstance(story, str):
        steps = (STORIES.get(story) or BRIEF_STORIES[story])(m)
    else:
        steps = story(m)
    try:
        while True:
            wait = next(steps)
            m.wait_published()
            if speed > 0 and wait > 0:
                sleep(wait * speed)
    except StopIteration as done:
        m.wait_published()
        result: Expected = done.value
        return result
