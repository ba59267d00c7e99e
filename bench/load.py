"""A multiplexing load generator: many simulated OVMS modules over a few gmqtt connections.

Each vehicle is a `firmware_sim` Module (so metric names, formats and the set of metrics changed
per tick are the firmware's) whose link is one of a few shared MQTT connections of the owner
account. Vehicles follow charge stories at firmware cadence (10 s while charging, 600 s idle)
compressed by a time factor. The owner's app answers every question, and a partner subscriber
times each public event against the vehicle publish that caused it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from firmware_sim.module import CHARGING_INTERVAL_S, IDLE_INTERVAL_S, Module
from service import topics

# The stories' shares: completed, interrupted (station fault), paused then completed, owner stop.
STORY_WEIGHTS = {"completed": 45, "interrupted": 20, "paused": 20, "owner-stop": 15}
CHARGE_S = (300.0, 1500.0)  # firmware seconds of charging per plug-in
IDLE_S = (1800.0, 5400.0)  # firmware seconds between charges: about 20 % of the fleet charges
SHARE_CHARGING = (sum(CHARGE_S) / 2) / (sum(CHARGE_S) / 2 + sum(IDLE_S) / 2)


def place(index: int, base_lat: float = 45.0) -> tuple[float, float]:
    """Return a vehicle's own charging place (0.01° apart: distinct places, distinct keys)."""
    return round(base_lat + (index // 400) * 0.01, 6), round(1.0 + (index % 400) * 0.01, 6)


def place_key(lat: float, lon: float) -> tuple[float, float]:
    return round(lat, 3), round(lon, 3)


def owner_of(vehicle_id: str) -> str:
    """Return the owner account of a simulated vehicle (one vehicle per owner, as is typical)."""
    return "o-" + vehicle_id.lower()


async def connect(
    client_id: str, port: int, user: str, password: str, *, v5: bool = False, clean: bool = True
) -> gmqtt.Client:
    """Open one gmqtt connection to the local broker."""
    client = gmqtt.Client(client_id, clean_session=clean)
    client.set_auth_credentials(user, password)
    client.set_config({"reconnect_retries": 0})
    await client.connect("127.0.0.1", port, version=MQTTv50 if v5 else MQTTv311, keepalive=60)
    return client


@dataclass
class Counts:
    """What the load generator published."""

    metrics: int = 0
    other: int = 0


class MuxLink:
    """A firmware_sim Link that sends through one of the load generator's shared connections."""

    def __init__(self, client: gmqtt.Client, counts: Counts) -> None:
        self.client = client
        self.counts = counts
        self.muted = False

    def start(self, on_up: Callable[[], None], on_down: Callable[[], None]) -> None:
        # The fleet is long connected: skip the full retained snapshot a fresh connect sends.
        self.muted = True
        try:
            on_up()
        finally:
            self.muted = False

    def publish(self, topic: str, payload: str, qos: int, retain: bool) -> None:
        if self.muted:
            return
        self.client.publish(topic, payload.encode(), qos=qos, retain=retain)
        if qos == 0 and "/metric/" in topic:
            self.counts.metrics += 1
        else:
            self.counts.other += 1

    def flush(self, timeout: float) -> bool:
        return True

    def stop(self, *, abrupt: bool) -> None:
        return None


@dataclass
class Car:
    """One simulated vehicle and its story."""

    index: int
    module: Module
    lat: float
    lon: float
    steps: Generator[float, None, None] | None = None
    charged: int = 0  # plug-ins so far (the first one at a place asks the owner)


class Latency:
    """Match public events to the vehicle publishes that caused them."""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, str], float] = {}
        self.by_place: dict[tuple[float, float], int] = {}
        self.samples: list[tuple[float, float]] = []  # (receive time, latency s)
        self.events: dict[str, int] = {}
        self.measuring = False

    def mark(self, index: int, event_type: str) -> None:
        if self.measuring:
            self.pending[(index, event_type)] = time.monotonic()

    def seen(self, payload: bytes) -> None:
        now = time.monotonic()
        try:
            event = json.loads(payload)
            kind = event["type"]
            rec = event["session"]
        except (ValueError, KeyError, TypeError):
            return
        self.events[kind] = self.events.get(kind, 0) + 1
        if rec.get("latitude") is None:
            return
        index = self.by_place.get(place_key(rec["latitude"], rec["longitude"]))
        if index is None:
            return
        sent = self.pending.pop((index, kind), None)
        if sent is not None:
            self.samples.append((now, now - sent))


class Fleet:
    """N vehicles, one per owner, playing charge stories at firmware cadence / `speedup`."""

    def __init__(
        self,
        clients: Sequence[gmqtt.Client],
        vehicles: int,
        *,
        speedup: float,
        prefix: str = "S",
        seed: int = 7,
        latency: Latency | None = None,
    ) -> None:
        self.speedup = speedup
        self.counts = Counts()
        self.latency = latency or Latency()
        self.rng = random.Random(seed)
        self.cars: list[Car] = []
        self._heap: list[tuple[float, int, Car]] = []
        self._order = itertools.count()
        self._shift = 0.0
        self._paused_at: float | None = time.monotonic()
        self._resumed = asyncio.Event()
        links = [MuxLink(c, self.counts) for c in clients]
        for i in range(vehicles):
            link = links[i % len(links)]
            vid = f"{prefix}{i:06d}"
            m = Module(owner_of(vid), vid, "", link=link, threaded=False)
            m.connect(wait=False)
            lat, lon = place(i)
            self.latency.by_place[place_key(lat, lon)] = i
            self.cars.append(Car(i, m, lat, lon))

    @property
    def vehicle_ids(self) -> list[str]:
        return [c.module.vehicle_id for c in self.cars]

    def charging(self) -> int:
        return sum(1 for c in self.cars if c.module.metric("v.c.charging") is True)

    # ---- stories ---------------------------------------------------------------------------

    def _idle(self, m: Module, seconds: float) -> Generator[float, None, None]:
        while seconds > 0:
            step = min(float(IDLE_INTERVAL_S), seconds)
            yield step
            m.tick(step)
            seconds -= step

    def _charge(self, m: Module, seconds: float) -> Generator[float, None, None]:
        for _ in range(max(1, int(seconds // CHARGING_INTERVAL_S))):
            m.tick(CHARGING_INTERVAL_S)
            yield CHARGING_INTERVAL_S

    def _story(
        self, car: Car, first_idle: float, first_charge: float | None
    ) -> Generator[float, None, None]:
        m, rng, lat = car.module, self.rng, self.latency
        yield from self._idle(m, first_idle)
        names = list(STORY_WEIGHTS)
        weights = [STORY_WEIGHTS[n] for n in names]
        while True:
            m.drive_to(car.lat, car.lon)
            yield 30.0
            # The first start at a place is published once the owner's app answers `always`.
            lat.mark(car.index, "session.started")
            m.plug_in(car.lat, car.lon, "type2" if car.index % 3 else "ccs")
            car.charged += 1
            yield CHARGING_INTERVAL_S
            story = rng.choices(names, weights)[0]
            charge_s = rng.uniform(*CHARGE_S) if first_charge is None else first_charge
            first_charge = None
            if story == "paused":
                yield from self._charge(m, charge_s / 2)
                m.pause("timerwait")
                yield 120.0
                m.resume()
                yield from self._charge(m, charge_s / 2)
            else:
                yield from self._charge(m, charge_s)
            if story == "interrupted":
                lat.mark(car.index, "session.interrupted")
                m.abort("interrupted")
            elif story == "owner-stop":
                lat.mark(car.index, "session.completed")
                m.stop_by_owner()
            else:
                lat.mark(car.index, "session.completed")
                m.finish()
            yield 60.0
            m.unplug()
            yield from self._idle(m, rng.uniform(*IDLE_S))

    def begin(self) -> int:
        """Start every story as if the fleet had run for long; return how many plug in now.

        About SHARE_CHARGING of the vehicles plug in within 10 firmware seconds and charge for
        what is left of a charge (uniform), so completions are spread from the start; the
        others are idle for what is left of an idle spell.
        """
        now = time.monotonic()
        plugging = 0
        for car in self.cars:
            first_charge: float | None = None
            if self.rng.random() < SHARE_CHARGING:
                first_idle = self.rng.uniform(0, 10)
                first_charge = self.rng.uniform(CHARGING_INTERVAL_S, CHARGE_S[1])
                plugging += 1
            else:
                first_idle = self.rng.uniform(0, IDLE_S[1])
            car.steps = self._story(car, first_idle, first_charge)
            heapq.heappush(self._heap, (now + self._wait(car), next(self._order), car))
        return plugging

    def _wait(self, car: Car) -> float:
        assert car.steps is not None
        return next(car.steps) / self.speedup

    def pause(self) -> None:
        """Stop every story where it is (firmware time stands still)."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            self._resumed.clear()

    def resume(self) -> None:
        """Continue the stories."""
        if self._paused_at is not None:
            self._shift += time.monotonic() - self._paused_at
            self._paused_at = None
            self._resumed.set()

    async def run(self) -> None:
        """Step the vehicles whose time has come, until cancelled."""
        while True:
            if self._paused_at is not None:
                await self._resumed.wait()
            now = time.monotonic() - self._shift
            n = 0
            while self._heap and self._heap[0][0] <= now:
                at, _, car = heapq.heappop(self._heap)
                heapq.heappush(self._heap, (at + self._wait(car), next(self._order), car))
                n += 1
                if n % 200 == 0:
                    await asyncio.sleep(0)  # let the sockets drain
            delay = 0.05 if not self._heap else min(0.05, max(0.0, self._heap[0][0] - now))
            await asyncio.sleep(delay)


async def blast(
    clients: Sequence[gmqtt.Client],
    vehicle_ids: Sequence[str],
    rounds: int,
    *,
    metric: str = "v.c.kwh.grid",
    base: int = 100000,
) -> tuple[float, float, int]:
    """Publish `rounds` changes of one metric per vehicle as fast as possible; (t0, t1, n)."""
    t0 = time.monotonic()
    n = 0
    for r in range(rounds):
        payload = str(base + r).encode()
        for i, vid in enumerate(vehicle_ids):
            topic = topics.metric(owner_of(vid), vid, metric)
            clients[i % len(clients)].publish(topic, payload, qos=0)
            n += 1
            if n % 500 == 0:
                await asyncio.sleep(0)
    return t0, time.monotonic(), n


class OwnerApp:
    """The owners' apps: answer every share question `always`, every abort `station_fault`.

    One connection of an account that may write every owner's decisions stands in for the
    owners' phones (the load generator multiplexes the same way).
    """

    def __init__(self, client: gmqtt.Client) -> None:
        self.client = client
        self.answered: set[str] = set()
        client.on_message = self._on_message
        client.subscribe(gmqtt.Subscription("ovms/+/+/chargeshare/request/+", qos=1))

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        if not payload:
            return 0
        try:
            q = json.loads(payload)
            request_id, kind = q["request_id"], q["kind"]
        except (ValueError, KeyError, TypeError):
            return 0
        if request_id in self.answered:
            return 0
        self.answered.add(request_id)
        _, owner, vid = topic.split("/")[:3]
        choice = "always" if kind == "share" else "station_fault"
        body = json.dumps({"choice": choice}).encode()
        self.client.publish(topics.decision(owner, vid, request_id), body, qos=1)
        return 0


@dataclass
class Partner:
    """A partner subscribed to every public topic, timing events with a Latency."""

    client: gmqtt.Client
    latency: Latency
    received: int = 0
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client.on_message = self._on_message
        self.client.subscribe(gmqtt.Subscription(topics.PUBLIC_ROOT + "/#", qos=1))

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.received += 1
        self.latency.seen(payload)
        return 0
