"""Many simulated vehicles at once: one connection each, one thread for all of them.

Every vehicle has its own MQTT connection (the client id is the vehicle id, as on real
modules), but all sockets are served by one selector loop that also steps the stories, so
the thread count stays at one whatever the fleet size. The cap is the process's open-file
limit (raised to the hard limit at start) and the broker's own; see `max_vehicles()`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import resource
import selectors
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from rich.console import Console
from rich.live import Live
from rich.table import Table

from firmware_sim import scenarios
from firmware_sim.module import IDLE_INTERVAL_S, Module, PahoLink

# Stories a fleet mixes by default, with weights. late-gridlog is left out: it swaps the
# module's clock and drops the link, which the shared loop does not model.
DEFAULT_MIX: dict[str, int] = {
    "completed": 4,
    "home": 4,
    "jimbo": 2,
    "interrupted": 2,
    "paused": 2,
    "owner-stop": 1,
}
_RESERVED_FDS = 64  # stdio, the selector, the broker of a local stack...


def max_vehicles() -> int:
    """Raise the open-file limit as far as allowed and return how many vehicles fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(0, soft - _RESERVED_FDS)


@dataclass
class Car:
    """One vehicle of the fleet and where its current story stands."""

    module: Module
    link: PahoLink
    rounds_left: int
    steps: scenarios.Steps | None = None
    story: str = ""
    retry_at: float = 0.0
    finished: bool = False


@dataclass
class Stats:
    """What the fleet did so far."""

    vehicles: int = 0
    connected: int = 0
    charging: int = 0
    completed: int = 0
    interrupted: int = 0
    stopped: int = 0
    finished: int = 0
    messages: int = 0
    started: float = field(default_factory=time.monotonic)
    stories: dict[str, int] = field(default_factory=dict)

    def table(self) -> Table:
        """Render the progress table."""
        t = Table(title="firmware-sim fleet", show_header=False, min_width=44)
        t.add_row("vehicles connected", f"{self.connected} / {self.vehicles}")
        t.add_row("charging now", str(self.charging))
        t.add_row("charges completed", str(self.completed))
        t.add_row("charges aborted (interrupted)", str(self.interrupted))
        t.add_row("charges stopped by owner", str(self.stopped))
        t.add_row("vehicles done", f"{self.finished} / {self.vehicles}")
        t.add_row("messages sent", str(self.messages))
        t.add_row("elapsed", f"{time.monotonic() - self.started:.0f} s")
        t.add_row("stories", ", ".join(f"{k} {v}" for k, v in sorted(self.stories.items())))
        return t


class Fleet:
    """Run N vehicles of one owner, each playing a random mix of stories."""

    def __init__(
        self,
        owner: str,
        password: str,
        host: str,
        port: int,
        *,
        vehicles: int,
        speed: float = 0.05,
        rounds: int = 1,
        mix: dict[str, int] | None = None,
        prefix: str = "SIM",
        tls_ca: str | None = None,
        seed: int | None = None,
        connects_per_tick: int = 50,
        start_spread_s: float = IDLE_INTERVAL_S,
    ) -> None:
        cap = max_vehicles()
        if vehicles > cap:
            raise ValueError(f"{vehicles} vehicles need more open files than allowed (cap {cap})")
        self.speed, self.connects_per_tick = speed, connects_per_tick
        self.start_spread_s = start_spread_s  # first plug-ins spread over this (firmware s)
        self.rng = random.Random(seed)
        self.mix = mix or DEFAULT_MIX
        self.selector = selectors.DefaultSelector()
        self.cars: list[Car] = []
        self.stats = Stats(vehicles=vehicles)
        self._heap: list[tuple[float, int, Car]] = []
        self._order = itertools.count()
        for i in range(vehicles):
            m = Module(
                owner, f"{prefix}{i + 1:05d}", password, host, port, tls_ca=tls_ca, threaded=False
            )
            assert isinstance(m.link, PahoLink)
            self._attach(m.link.client)
            self.cars.append(Car(m, m.link, rounds))

    # ---- sockets ---------------------------------------------------------------------------

    def _attach(self, client: mqtt.Client) -> None:
        sel = self.selector

        def opened(c: mqtt.Client, userdata: object, sock: object) -> None:
            sel.register(sock, selectors.EVENT_READ, c)  # type: ignore[arg-type]

        def closed(c: mqtt.Client, userdata: object, sock: object) -> None:
            try:
                sel.unregister(sock)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        def want_write(c: mqtt.Client, userdata: object, sock: object) -> None:
            try:
                sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        def written(c: mqtt.Client, userdata: object, sock: object) -> None:
            try:
                sel.modify(sock, selectors.EVENT_READ, c)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                pass

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = written

    def _serve(self, timeout: float) -> None:
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        for key, mask in self.selector.select(timeout):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    # ---- stories ---------------------------------------------------------------------------

    def _pick(self) -> str:
        names = list(self.mix)
        return self.rng.choices(names, weights=[self.mix[n] for n in names])[0]

    def _schedule(self, car: Car, delay_s: float, *, real: bool = False) -> None:
        """Run the car's next step after a firmware wait times speed (or a real delay)."""
        at = time.monotonic() + (delay_s if real else delay_s * self.speed)
        heapq.heappush(self._heap, (at, next(self._order), car))

    def _step(self, car: Car) -> None:
        if not car.module.online:
            self._schedule(car, 0.2, real=True)
            return
        if car.steps is None:
            if car.rounds_left <= 0:
                car.finished = True
                return
            car.rounds_left -= 1
            car.story = self._pick()
            story = scenarios.STORIES.get(car.story) or scenarios.BRIEF_STORIES[car.story]
            car.steps = story(car.module)
            self.stats.stories[car.story] = self.stats.stories.get(car.story, 0) + 1
        try:
            wait = next(car.steps)
        except StopIteration:
            car.steps = None
            wait = 0.0
        self._schedule(car, wait)

    def _connect_some(self, now: float) -> None:
        budget = self.connects_per_tick
        for car in self.cars:
            if budget <= 0:
                return
            if car.finished or car.module.online or now < car.retry_at:
                continue
            car.retry_at = now + 5.0
            budget -= 1
            try:
                if car.link.client.socket() is None:
                    car.module.connect(wait=False)
            except OSError:
                car.retry_at = now + 10.0

    def _refresh(self) -> None:
        s = self.stats
        s.connected = sum(1 for c in self.cars if c.module.online)
        s.charging = sum(1 for c in self.cars if c.module.metric("v.c.charging") is True)
        outcomes = [ch.outcome for c in self.cars for ch in c.module.charges]
        s.completed = outcomes.count("completed")
        s.interrupted = outcomes.count("interrupted")
        s.stopped = outcomes.count("stopped")
        s.finished = sum(1 for c in self.cars if c.finished)
        s.messages = sum(c.module.sent for c in self.cars)

    def run(self, console: Console | None = None, *, max_seconds: float | None = None) -> Stats:
        """Connect everyone, play the stories to the end, disconnect; return the totals."""
        console = console or Console()
        for car in self.cars:
            # Spread the first plug-ins over one idle interval, as real cars would be.
            self._schedule(car, self.rng.uniform(0, self.start_spread_s))
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        last_misc = last_draw = 0.0
        with Live(self.stats.table(), console=console, refresh_per_second=4) as live:
            while not all(c.finished for c in self.cars):
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    break
                self._connect_some(now)
                while self._heap and self._heap[0][0] <= now:
                    _, _, car = heapq.heappop(self._heap)
                    self._step(car)
                timeout = 0.25 if not self._heap else min(0.25, max(0.0, self._heap[0][0] - now))
                self._serve(timeout)
                if now - last_misc >= 1.0:
                    last_misc = now
                    for car in self.cars:
                        car.link.client.loop_misc()
                if now - last_draw >= 0.25:
                    last_draw = now
                    self._refresh()
                    live.update(self.stats.table())
            self._drain()
            self._refresh()
            live.update(self.stats.table())
        self.close()
        return self.stats

    def _drain(self, timeout: float = 10.0) -> None:
        """Let queued packets leave and QoS 1/2 handshakes finish."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            busy = [c for c in self.cars if c.module.online and c.link.client.want_write()]
            self._serve(0.05)
            if not busy:
                break

    def close(self) -> None:
        """Disconnect every vehicle cleanly."""
        for car in self.cars:
            if car.module.online:
                car.module.disconnect()
        end = time.monotonic() + 2.0
        while self.selector.get_map() and time.monotonic() < end:
            self._serve(0.05)
        self.selector.close()


def parse_mix(
    text: str | None, names: Sequence[str] = (*scenarios.STORIES, *scenarios.BRIEF_STORIES)
) -> dict[str, int]:
    """Parse `completed=4,home=2,jimbo` into weights (default weight 1)."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in names:
            raise ValueError(f"unknown story {name!r}; known: {', '.join(names)}")
        mix[name] = int(weight) if weight else 1
    return mix
