"""`python -m bench`: run the benchmarks, write docs/benchmarks.md and its chart."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from bench import report
from bench.run import Config, Run

REPO = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    """Read the command line into a Config."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--sizes", default="100,1000,10000", help="fleet sizes, comma-separated")
    p.add_argument(
        "--speedups",
        default="100=20,1000=3",
        help="firmware time compression per size (size=factor; others run at real cadence)",
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the window")
    p.add_argument("--window", type=float, default=40.0, help="measured seconds per phase")
    p.add_argument("--burst", type=int, default=10000, help="metric messages per saturation burst")
    p.add_argument("--transition-vehicles", type=int, default=1000)
    p.add_argument("--replicas", default="1,2", help="replica counts to measure")
    p.add_argument(
        "--connections", type=int, default=19000, help="connection ramp target (0: skip)"
    )
    p.add_argument("--baseline-seconds", type=float, default=5.0)
    p.add_argument("--dir", type=Path, default=REPO / ".run" / "bench", help="stack state")
    p.add_argument("--docs", type=Path, default=REPO / "docs", help="where the report goes")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "latest.json")
    p.add_argument("--notes", type=Path, help="markdown appended to the report")
    p.add_argument("--no-report", action="store_true", help="only print and save JSON")
    p.add_argument("--from-json", type=Path, help="do not measure: rewrite the report from JSON")
    p.add_argument("--command", help="the command to name in the report (with --from-json)")
    a = p.parse_args(argv)
    speedups = {}
    for part in filter(None, a.speedups.split(",")):
        size, _, factor = part.partition("=")
        speedups[int(size)] = float(factor)
    cfg = Config(
        sizes=tuple(int(x) for x in a.sizes.split(",") if x),
        speedups=speedups,
        warmup_s=a.warmup,
        window_s=a.window,
        burst_messages=a.burst,
        transition_vehicles=a.transition_vehicles,
        replicas=tuple(int(x) for x in a.replicas.split(",") if x),
        connection_target=a.connections,
        baseline_s=a.baseline_seconds,
        directory=a.dir,
    )
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    """Run, save the JSON results and write the report."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, a = parse(argv)
    if a.from_json:
        results = json.loads(a.from_json.read_text())
    else:
        results = asyncio.run(Run(cfg).main())
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(results, indent=1))
        print(f"results: {a.results}")
    if not a.no_report:
        notes = a.notes.read_text() if a.notes else ""
        command = a.command or " ".join(["python -m bench", *map(shlex.quote, argv)])
        md = report.write(results, a.docs, command, notes)
        print(f"report: {md}")


if __name__ == "__main__":
    main()
