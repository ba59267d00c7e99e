"""Drive the local stack at several fleet sizes and collect every figure of the report."""

from __future__ import annotations

import asyncio
import json
import math
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import gmqtt

from bench import baselines, connections, load
from bench.stack import OWNER, PARTNER, SERVICE_USER, ServiceProc, Stack, cpu_seconds, memory_kb
from service import topics


@dataclass
class Config:
    """What one `python -m bench` run measures."""

    sizes: tuple[int, ...] = (100, 1000, 10000)
    speedups: dict[int, float] = field(default_factory=lambda: {100: 20.0, 1000: 3.0})
    warmup_s: float = 10.0
    window_s: float = 40.0
    drain_s: float = 60.0
    load_connections: int = 4
    transition_vehicles: int = 1000  # per size: min(size, this) vehicles change phase at once
    burst_messages: int = 10000  # metric messages of the saturation burst
    burst_vehicles: int = 2000
    replicas: tuple[int, ...] = (1, 2)
    baseline_s: float = 5.0
    connection_target: int = 19000
    settle_s: float = 0.5
    directory: Path = Path(".run/bench")

    def speedup(self, size: int) -> float:
        return self.speedups.get(size, 1.0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def machine() -> dict[str, Any]:
    """Describe the machine the numbers come from."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    import os

    from service.localstack import pg_bindir

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": version(["mosquitto", "-h"]),
        "postgres": version([str(pg_bindir() / "postgres"), "--version"]),
        "gmqtt": __import__("gmqtt").__version__,
        "asyncpg": asyncpg.__version__,
    }


class Run:
    """One benchmark run over all sizes."""

    def __init__(self, cfg: Config, say: Any = print) -> None:
        self.cfg = cfg
        self.say = say
        self.stack = Stack(cfg.directory.resolve())

    async def main(self) -> dict[str, Any]:
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        self.stack.start()
        results: dict[str, Any] = {"machine": machine(), "config": _jsonable(asdict(self.cfg))}
        try:
            results["transaction_baseline"] = await self.transaction_baseline()
            results["sizes"] = []
            for n in self.cfg.sizes:
                results["sizes"].append(await self.size(n))
            if self.cfg.connection_target:
                results["connections"] = await self.connection_capacity()
        finally:
            self.stack.stop()
        results["runtime_s"] = round(time.monotonic() - started, 1)
        return results

    # ---- baselines -------------------------------------------------------------------------

    async def transaction_baseline(self) -> list[dict[str, Any]]:
        url = await self.stack.fresh_database("bench_baseline")
        out = []
        for conns in (1, 4):
            r = await baselines.transaction_loop(
                url, connections=conns, seconds=self.cfg.baseline_s
            )
            self.say(f"asyncpg transition-shaped txn, {conns} conn(s): {r.per_s:,.0f}/s")
            out.append({"connections": conns, "per_s": r.per_s, "n": r.transactions})
        return out

    async def bare_subscriber(
        self, clients: list[gmqtt.Client], ids: list[str], rounds: int
    ) -> dict[str, Any]:
        expect = rounds * len(ids)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.baselines", "subscribe", str(self.stack.port),
            SERVICE_USER, self.stack.passwords[SERVICE_USER], str(expect),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        cpu0 = cpu_seconds(proc.pid)
        t0, t1, sent = await load.blast(clients, ids, rounds, base=900000)
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        cpu = cpu_seconds(proc.pid) - cpu0  # read before the process is reaped: close enough
        await proc.wait()
        got = json.loads(line)
        span = max(got["last"] - got["first"], 1e-6)
        r = {
            "sent": sent,
            "publish_per_s": sent / max(t1 - t0, 1e-6),
            "received": got["received"],
            "per_s": got["received"] / span,
            "cpu_s": cpu,
        }
        self.say(
            f"  bare gmqtt subscriber: {r['per_s']:,.0f} msg/s "
            f"(load generator published {r['publish_per_s']:,.0f} msg/s)"
        )
        return r

    # ---- one size --------------------------------------------------------------------------

    async def size(self, n: int) -> dict[str, Any]:
        cfg, stack = self.cfg, self.stack
        speedup = cfg.speedup(n)
        self.say(f"== {n} vehicles (firmware time x{speedup:g})")
        stack.restart_broker()
        pw = stack.passwords
        clients = [
            await load.connect(f"bench-load-{i}", stack.port, SERVICE_USER, pw[SERVICE_USER])
            for i in range(cfg.load_connections)
        ]
        latency = load.Latency()
        fleet = load.Fleet(clients, n, speedup=speedup, latency=latency)
        burst_ids = fleet.vehicle_ids[: min(n, cfg.burst_vehicles)]
        rounds = max(1, math.ceil(cfg.burst_messages / len(burst_ids)))
        out: dict[str, Any] = {"vehicles": n, "speedup": speedup}
        out["bare_subscriber"] = await self.bare_subscriber(clients, burst_ids, rounds)
        url = await stack.fresh_database(f"bench_{n}")
        app = load.OwnerApp(
            await load.connect("bench-app", stack.port, SERVICE_USER, pw[SERVICE_USER])
        )
        partner = load.Partner(
            await load.connect("bench-partner", stack.port, PARTNER, pw[PARTNER]), latency
        )
        t_ids = [f"T{i:05d}" for i in range(min(n, cfg.transition_vehicles))]
        runner = asyncio.create_task(fleet.run())
        out["phases"] = []
        try:
            db = await asyncpg.connect(url)
            try:
                for k, replicas in enumerate(cfg.replicas):
                    svcs = [
                        await asyncio.to_thread(
                            stack.start_service,
                            url,
                            f"bench-{n}-{r}",
                            f"bench{n}",
                            CHARGESHARE_SETTLE_S=str(cfg.settle_s),
                        )
                        for r in range(replicas)
                    ]
                    try:
                        if k == 0:
                            out["seed_s"] = await self.seed(clients, fleet, t_ids, db)
                            out["plug_in_s"] = await self.plug_in(fleet, db)
                        phase = await self.phase(n, replicas, k, svcs, clients, fleet, t_ids, db)
                        phase["peak_rss_mib"] = [s.peak_rss_kb() / 1024 for s in svcs]
                        out["phases"].append(phase)
                    finally:
                        for s in svcs:
                            await asyncio.to_thread(stack.stop_service, s)
            finally:
                await db.close()
        finally:
            runner.cancel()
            for c in [*clients, app.client, partner.client]:
                await c.disconnect()
        out["events"] = latency.events
        return out

    async def seed(
        self, clients: list[gmqtt.Client], fleet: load.Fleet, t_ids: list[str], db: Any
    ) -> float:
        """Opt every vehicle in (retained, as the app does); place the transition vehicles."""
        t0 = time.monotonic()
        body = json.dumps({"enabled": True, "nickname": None}).encode()
        ids = fleet.vehicle_ids + t_ids
        for i, vid in enumerate(ids):
            topic = topics.optin(load.owner_of(vid), vid)
            clients[i % len(clients)].publish(topic, body, qos=1, retain=True)
            if i % 500 == 0:
                await asyncio.sleep(0)
        for i, vid in enumerate(t_ids):
            lat, lon = load.place(i, base_lat=40.0)
            c, owner = clients[i % len(clients)], load.owner_of(vid)
            c.publish(topics.metric(owner, vid, "v.p.latitude"), f"{lat:.6f}", qos=0, retain=True)
            c.publish(topics.metric(owner, vid, "v.p.longitude"), f"{lon:.6f}", qos=0, retain=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            opted = await db.fetchval("SELECT count(*) FROM vehicles WHERE opted_in")
            placed = await db.fetchval(
                "SELECT count(*) FROM vehicles WHERE vehicle_id LIKE 'T%' "
                "AND position_enc IS NOT NULL"
            )
            if opted >= len(ids) and placed >= len(t_ids):
                break
            await asyncio.sleep(0.5)
        seconds = time.monotonic() - t0
        self.say(f"  seeded {len(ids)} opt-ins in {seconds:.1f} s")
        return seconds

    async def plug_in(self, fleet: load.Fleet, db: Any) -> float:
        """Start the stories; wait until the vehicles charging from the start have sessions."""
        t0 = time.monotonic()
        plugging = fleet.begin()
        fleet.resume()
        while time.monotonic() - t0 < 300:
            if await db.fetchval("SELECT count(*) FROM sessions") >= 0.95 * plugging:
                break
            await asyncio.sleep(0.5)
        fleet.pause()
        seconds = time.monotonic() - t0
        self.say(f"  {plugging} vehicles plugged in; their sessions open after {seconds:.1f} s")
        return seconds

    async def phase(
        self,
        n: int,
        replicas: int,
        k: int,
        svcs: list[ServiceProc],
        clients: list[gmqtt.Client],
        fleet: load.Fleet,
        t_ids: list[str],
        db: Any,
    ) -> dict[str, Any]:
        cfg = self.cfg
        r: dict[str, Any] = {"replicas": replicas}
        lat = fleet.latency

        def cpu() -> float:
            return sum(s.cpu() for s in svcs)

        # -- the fleet at firmware cadence: latency, transitions, outbox depth, CPU
        fleet.resume()
        await asyncio.sleep(cfg.warmup_s)
        lat.pending.clear()
        lat.samples.clear()
        lat.measuring = True
        db_t0 = await db.fetchval("SELECT now()")
        m0, cpu0, bcpu0, t0 = fleet.counts.metrics, cpu(), self._broker_cpu(), time.monotonic()
        depth: list[tuple[float, int]] = []
        charging: list[int] = []
        while time.monotonic() - t0 < cfg.window_s:
            depth.append((time.monotonic() - t0, await db.fetchval("SELECT count(*) FROM outbox")))
            charging.append(fleet.charging())
            await asyncio.sleep(1.0)
        span = time.monotonic() - t0
        lat.measuring = False
        fleet.pause()
        r["window_s"] = span
        r["offered_metrics_per_s"] = (fleet.counts.metrics - m0) / span
        r["charging_mean"] = sum(charging) / max(1, len(charging))
        r["service_cpu_cores"] = (cpu() - cpu0) / span
        r["broker_cpu_cores"] = (self._broker_cpu() - bcpu0) / span
        r["transitions"] = await db.fetchval(
            "SELECT count(*) FROM session_events WHERE event <> 'share' AND at >= $1", db_t0
        )
        r["transitions_per_s"] = r["transitions"] / span
        lags = [x for _, x in lat.samples]
        r["latency_n"] = len(lags)
        for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            v = percentile(lags, q)
            r[f"latency_{name}_s"] = v
        r["outbox_depth"] = depth
        r["ingest_lag_s"] = await self.ingest_lag(clients, db, f"S{0:06d}", 1000 * (k + 1))
        self.say(
            f"  {replicas} replica(s): offered {r['offered_metrics_per_s']:,.0f} metric msg/s, "
            f"{r['transitions_per_s']:.1f} transitions/s, latency p50 "
            f"{_ms(r['latency_p50_s'])} p99 {_ms(r['latency_p99_s'])} max "
            f"{_ms(r['latency_max_s'])} (n={len(lags)}), service CPU "
            f"{r['service_cpu_cores']:.2f} cores, outbox max {max(d for _, d in depth)}, "
            f"ingest lag after the window {r['ingest_lag_s']:.1f} s"
        )
        await self.outbox_empty(db)
        # -- saturation: many phase changes at once
        r["transition_burst"] = await self.transition_burst(clients, t_ids, db, svcs)
        # -- saturation: a burst of metric changes
        r["metric_burst"] = await self.metric_burst(
            clients, fleet.vehicle_ids[: min(n, cfg.burst_vehicles)], db, svcs, k
        )
        return r

    def _broker_cpu(self) -> float:
        return cpu_seconds(self.stack.broker_pid())

    async def ingest_lag(self, clients: list[gmqtt.Client], db: Any, vid: str, mark: int) -> float:
        """Time a marker metric published now takes to reach the database (the backlog)."""
        t0 = time.monotonic()
        value = f"{mark}.25"
        owner = load.owner_of(vid)
        clients[0].publish(topics.metric(owner, vid, "v.c.limit.soc"), value.encode(), qos=0)
        while time.monotonic() - t0 < self.cfg.drain_s:
            got = await db.fetchval(
                "SELECT metrics->>'v.c.limit.soc' FROM vehicles WHERE owner = $1 AND "
                "vehicle_id = $2",
                owner,
                vid,
            )
            if got == value:
                break
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    async def outbox_empty(self, db: Any, limit_s: float = 30.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if not await db.fetchval("SELECT count(*) FROM outbox"):
                return
            await asyncio.sleep(0.2)

    async def transition_burst(
        self, clients: list[gmqtt.Client], t_ids: list[str], db: Any, svcs: list[ServiceProc]
    ) -> dict[str, Any]:
        """All transition vehicles start charging at once, then all complete."""
        k = len(t_ids)
        db_t0 = await db.fetchval("SELECT now()")
        cpu0, pg0 = sum(s.cpu() for s in svcs), self.stack.postgres_cpu()
        t0 = time.monotonic()

        def send(values: dict[str, str]) -> None:
            for i, vid in enumerate(t_ids):
                c = clients[i % len(clients)]
                for name, value in values.items():
                    topic = topics.metric(load.owner_of(vid), vid, name)
                    c.publish(topic, value.encode(), qos=0, retain=True)

        async def wait(sql: str) -> float:
            while time.monotonic() - t0 < 300:
                if await db.fetchval(sql, db_t0) >= k:
                    break
                await asyncio.sleep(0.1)
            return time.monotonic()

        base = (
            "SELECT count(*) FROM sessions s JOIN vehicles v ON v.id = s.vehicle "
            "WHERE v.vehicle_id LIKE 'T%' AND s.created_at >= $1"
        )
        send({"v.c.substate": "", "v.c.state": "charging", "v.c.charging": "yes"})
        t1 = await wait(base)
        send({"v.c.substate": "stopped", "v.c.state": "done", "v.c.charging": "no"})
        t2 = await wait(base + " AND s.ended_at IS NOT NULL")
        cpu = sum(s.cpu() for s in svcs) - cpu0
        r = {
            "postgres_cpu_cores": (self.stack.postgres_cpu() - pg0) / (t2 - t0),
            "service_cpu_cores": cpu / (t2 - t0),
            "vehicles": k,
            "starts_per_s": k / (t1 - t0),
            "ends_per_s": k / (t2 - t1),
            "per_s": 2 * k / (t2 - t0),
            "cpu_ms_per_transition": cpu / (2 * k) * 1000,
        }
        self.say(
            f"  transition burst ({k} vehicles): {r['per_s']:,.0f} transitions/s "
            f"(starts {r['starts_per_s']:,.0f}/s, ends {r['ends_per_s']:,.0f}/s); CPU cores: "
            f"service {r['service_cpu_cores']:.2f}, postgres {r['postgres_cpu_cores']:.2f}"
        )
        await self.outbox_empty(db)
        return r

    async def metric_burst(
        self, clients: list[gmqtt.Client], ids: list[str], db: Any, svcs: list[ServiceProc], k: int
    ) -> dict[str, Any]:
        """Publish metric changes flat out; time how fast the service stores them."""
        rounds = max(1, math.ceil(self.cfg.burst_messages / len(ids)))
        base = 100000 * (k + 1)
        final = base + rounds - 1
        cpu0, pg0, b0 = sum(s.cpu() for s in svcs), self.stack.postgres_cpu(), self._broker_cpu()
        t0, t1, sent = await load.blast(clients, ids, rounds, base=base)
        done = 0
        last_change = time.monotonic()
        while time.monotonic() - t0 < 300:
            rows = await db.fetch(
                "SELECT metrics->>'v.c.kwh.grid' AS x FROM vehicles WHERE vehicle_id = ANY($1)",
                ids,
            )
            now = time.monotonic()
            progress = 0
            for row in rows:
                try:
                    x = int(float(row["x"]))
                except (TypeError, ValueError):
                    continue
                if base <= x <= final:
                    progress += x - base + 1
            if progress > done:
                done, last_change = progress, now
            if done >= sent or now - last_change > 5.0:
                break
            await asyncio.sleep(0.25)
        cpu = sum(s.cpu() for s in svcs) - cpu0
        span = max(last_change - t0, 1e-6)
        r = {
            "postgres_cpu_cores": (self.stack.postgres_cpu() - pg0) / span,
            "broker_cpu_cores": (self._broker_cpu() - b0) / span,
            "service_cpu_cores": cpu / span,
            "sent": sent,
            "stored": done,
            "publish_per_s": sent / max(t1 - t0, 1e-6),
            "per_s": done / span,
            "cpu_us_per_message": cpu / max(done, 1) * 1e6,
        }
        self.say(
            f"  metric burst: {r['per_s']:,.0f} msg/s stored ({done}/{sent}), "
            f"{r['cpu_us_per_message']:.0f} µs service CPU per message; CPU cores: service "
            f"{r['service_cpu_cores']:.2f}, postgres {r['postgres_cpu_cores']:.2f}, broker "
            f"{r['broker_cpu_cores']:.2f}"
        )
        return r

    # ---- connections -----------------------------------------------------------------------

    async def connection_capacity(self) -> dict[str, Any]:
        self.stack.restart_broker()
        r = await connections.capacity(
            self.stack.port,
            OWNER,
            self.stack.passwords[OWNER],
            self.stack.broker_pid(),
            self.cfg.connection_target,
        )
        out = asdict(r)
        out["per_s"] = r.per_s
        out["broker_peak_rss_mib"] = memory_kb(self.stack.broker_pid()) / 1024
        self.say(
            f"connections: {r.reached} idle connections in {r.seconds:.1f} s "
            f"({r.per_s:,.0f}/s), stopped by: {r.stopped_by}; round trip "
            f"{r.roundtrip_ms if r.roundtrip_ms is None else round(r.roundtrip_ms, 2)} ms"
        )
        self.stack.stop_broker()
        return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
