"""Render a run's results as docs/benchmarks.md and a latency-against-load chart (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHART = "benchmarks-latency.png"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f}"


def _n(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _best_txn(results: dict[str, Any]) -> float:
    return max((b["per_s"] for b in results.get("transaction_baseline", [])), default=0.0)


def chart(results: dict[str, Any], path: Path) -> None:
    """Draw p50 / p99 latency against offered load, and outbox depth over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for replicas, style in ((1, "-o"), (2, "--s")):
        pts = sorted(
            (p["offered_metrics_per_s"], p, s["vehicles"])
            for s in results["sizes"]
            for p in s["phases"]
            if p["replicas"] == replicas and p["latency_p50_s"] is not None
        )
        if not pts:
            continue
        xs = [x for x, _, _ in pts]
        for key, label in (("latency_p50_s", "p50"), ("latency_p99_s", "p99")):
            name = f"{label}, {replicas} replica{'s' if replicas > 1 else ''}"
            left.plot(xs, [p[key] * 1000 for _, p, _ in pts], style, label=name)
        for x, p, n in pts:
            left.annotate(f"{n:,}", (x, p["latency_p99_s"] * 1000), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))  # fmt: skip
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("offered metric messages / s (fleet at firmware cadence; labels: vehicles)")
    left.set_ylabel("vehicle publish → public event (ms)")
    left.set_title("Latency against load")
    left.grid(True, which="both", alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    for s in results["sizes"]:
        for p in s["phases"]:
            d = p["outbox_depth"]
            right.plot([t for t, _ in d], [x for _, x in d],
                       label=f"{s['vehicles']:,} vehicles, {p['replicas']} replica(s)")  # fmt: skip
    right.set_xlabel("seconds into the measured window")
    right.set_ylabel("outbox rows")
    right.set_title("Outbox depth over time")
    right.grid(True, alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, Any], command: str, notes: str = "") -> str:
    """Render the report."""
    m = results["machine"]
    cfg = results["config"]
    best_txn = _best_txn(results)
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`.venv/bin/python -m bench`); this run: "
        f"`{command}` ({results['runtime_s'] / 60:.1f} min).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"Python {m['python']}, {m['mosquitto']}, {m['postgres']}, gmqtt {m['gmqtt']}, "
        f"asyncpg {m['asyncpg']}. Everything (broker, Postgres with fsync on, the service, "
        "the load generator) shares these cores, so every figure is a co-located lower bound.",
        "",
        "## What is measured",
        "",
        "- **Fleet at firmware cadence**: each vehicle is a `firmware_sim` Module (the firmware's "
        "metric names, formats and per-tick changes: about 14 metric messages per 10 s tick while "
        "charging, one per 600 s idle tick) whose link is one of "
        f"{cfg['load_connections']} shared gmqtt connections. Stories: completed 45 %, "
        "interrupted 20 %, paused (timerwait) 20 %, stopped by the owner 15 %; about 20 % of the "
        "fleet charges at any time. Firmware time is compressed by the factor in the tables "
        f"(1 = real cadence). After a {cfg['warmup_s']:g} s warm-up, a {cfg['window_s']:g} s "
        "window is measured.",
        "- **Latency**: from the load generator's publish of the metric that changes the charge "
        "state to the partner's receipt of the public event (`session.started`, "
        "`.completed`, `.interrupted`), same clock. It includes the settle window "
        f"(`settle_s` = {cfg['settle_s']:g} s: a phase change is judged only after that much "
        "quiet). Every vehicle is opted in and the owner's app answers each question `always`, "
        "so every session is published; a vehicle's first start at its place asks the owner, "
        "so its `session.started` also includes the app's answer.",
        "- **Ingest at saturation**: a burst of metric changes (`v.c.kwh.grid`, QoS 0, flat "
        "out) over up to "
        f"{cfg['burst_vehicles']:,} vehicles; stored/s = changes found in Postgres / time to the "
        "last one. Ceiling: a bare gmqtt subscriber (MQTT 5, the service's shared metric "
        "subscription, acking each message, nothing else) receiving the same burst.",
        "- **Transitions at saturation**: up to "
        f"{cfg['transition_vehicles']:,} vehicles start charging at once, then all complete; "
        "transitions/s = 2 × vehicles / time until every session is open, then closed, in "
        "Postgres (with one replica these are first visits: each start also asks the owner). "
        "Ceiling: a bare asyncpg loop running the same shape of transaction as one charge "
        f"transition ({14} statements: claim, lock, open-session and place look-ups, insert "
        "session and events, share, version, publication, two outbox rows, settle).",
        "- **Service CPU and peak RSS**: `chargeshare serve` subprocesses, from "
        "`/proc/<pid>/stat` and `VmHWM`. **Outbox depth**: `count(*)` once a second. "
        "**Ingest lag**: how long a marker metric published right after the window takes to "
        "reach Postgres (the backlog left behind).",
        "",
        "## Raw baselines",
        "",
        "| ceiling | result |",
        "| --- | --- |",
    ]
    for b in results.get("transaction_baseline", []):
        lines.append(
            f"| asyncpg, charge-transition-shaped transaction, {b['connections']} connection(s) "
            f"| {b['per_s']:,.0f} txn/s |"
        )
    for s in results["sizes"]:
        b = s["bare_subscriber"]
        lines.append(
            f"| bare gmqtt subscriber, {s['vehicles']:,}-vehicle burst of {b['sent']:,} "
            f"| {b['per_s']:,.0f} msg/s (load generator published {b['publish_per_s']:,.0f}/s) |"
        )
    lines += [
        "",
        "## Results per size",
        "",
        "| vehicles | time × | replicas | offered metric msg/s | charging | transitions/s "
        "| latency p50 / p99 / max (ms) | n | service CPU (cores) | peak RSS (MiB) "
        "| outbox max | ingest lag (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in results["sizes"]:
        for p in s["phases"]:
            rss = " + ".join(f"{x:.0f}" for x in p["peak_rss_mib"])
            lines.append(
                f"| {s['vehicles']:,} | {s['speedup']:g} | {p['replicas']} "
                f"| {p['offered_metrics_per_s']:,.0f} | {p['charging_mean']:,.0f} "
                f"| {p['transitions_per_s']:.1f} "
                f"| {_ms(p['latency_p50_s'])} / {_ms(p['latency_p99_s'])} / "
                f"{_ms(p['latency_max_s'])} | {p['latency_n']} "
                f"| {p['service_cpu_cores']:.2f} | {rss} "
                f"| {max(d for _, d in p['outbox_depth'])} | {p['ingest_lag_s']:.1f} |"
            )
    lines += [
        "",
        "## Saturation, as ratios of the raw ceilings",
        "",
        "| vehicles | replicas | metric msgs stored/s | ÷ bare subscriber | service CPU µs/msg "
        "| transitions/s | ÷ bare asyncpg | service CPU ms/transition |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in results["sizes"]:
        bare = s["bare_subscriber"]["per_s"]
        for p in s["phases"]:
            mb, tb = p["metric_burst"], p["transition_burst"]
            lines.append(
                f"| {s['vehicles']:,} | {p['replicas']} | {mb['per_s']:,.0f} "
                f"| {mb['per_s'] / bare:.3f} | {mb['cpu_us_per_message']:,.0f} "
                f"| {tb['per_s']:,.0f} | {tb['per_s'] / best_txn:.3f} "
                f"| {tb['cpu_ms_per_transition']:.1f} |"
            )
    c = results.get("connections")
    if c:
        lines += [
            "",
            "## Broker connection capacity",
            "",
            f"Idle MQTT 3.1.1 connections (each a vehicle login with password), opened "
            f"{250} at a time with raw sockets: **{c['reached']:,}** in {c['seconds']:.1f} s "
            f"({c['per_s']:,.0f}/s); stopped by: {c['stopped_by']}. Broker peak RSS "
            f"{c['broker_peak_rss_mib']:.0f} MiB; a QoS 1 publish → subscribe round trip with "
            f"all of them open: {_n(c['roundtrip_ms'], 2)} ms. The open-file limit here is "
            f"{c['fd_limit']:,} per process (broker and load generator alike), so this is the "
            "ceiling on this machine without raising it.",
            "",
            "| connections | seconds | broker RSS (MiB) |",
            "| --- | --- | --- |",
        ]
        steps = c["steps"]
        for conns, secs, kb in [*steps[:: max(1, len(steps) // 8)], steps[-1]]:
            lines.append(f"| {conns:,} | {secs:.1f} | {kb / 1024:.1f} |")
    lines += ["", f"![latency against load]({CHART})", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def write(results: dict[str, Any], docs: Path, command: str, notes: str = "") -> Path:
    """Write docs/benchmarks.md and the chart; return the markdown path."""
    docs.mkdir(parents=True, exist_ok=True)
    chart(results, docs / CHART)
    md = docs / "benchmarks.md"
    md.write_text(markdown(results, command, notes))
    return md
