"""`firmware-sim`: emulated OVMS v3 modules, an owner app, a fleet and the demo."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from firmware_sim import fleet as fleet_mod
from firmware_sim import scenarios
from firmware_sim.app import OwnerApp, Policy, Seen
from firmware_sim.module import Module, ModuleError
from service import wire

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()

Host = Annotated[
    str, typer.Option(envvar="CHARGESHARE_MQTT_HOST", help="Broker host.", show_default=True)
]
Port = Annotated[int, typer.Option(envvar="CHARGESHARE_MQTT_PORT", help="Broker port.")]
TlsCa = Annotated[
    str | None, typer.Option("--tls-ca", envvar="CHARGESHARE_MQTT_TLS_CA", help="CA file: use TLS.")
]
Owner = Annotated[str, typer.Option(help="Owner account (MQTT username).")]
Password = Annotated[str, typer.Option(help="Owner account password.")]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return wire.rfc3339(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help=f"One of: {', '.join(scenarios.STORIES)}.")],
    owner: Owner,
    password: Password,
    vehicle: Annotated[str, typer.Option(help="Vehicle id (also the MQTT client id).")] = "SIM1",
    host: Host = "127.0.0.1",
    port: Port = 1883,
    speed: Annotated[
        float, typer.Option(help="Fraction of the firmware's real waits to sleep (0: none).")
    ] = 1.0,
    tls_ca: TlsCa = None,
    vehicle_type: Annotated[str, typer.Option(help="`v.type` code.")] = "RT",
    grid_log: Annotated[bool, typer.Option(help="Also send *-LOG-Grid records.")] = False,
) -> None:
    """Play one scripted story on one module; print what the service should end up with."""
    if scenario not in scenarios.STORIES:
        raise typer.BadParameter(f"unknown scenario {scenario!r}", param_hint="SCENARIO")
    m = Module(
        owner,
        vehicle,
        password,
        host,
        port,
        tls_ca=tls_ca,
        vehicle_type=vehicle_type,
        grid_log=grid_log,
    )
    try:
        m.connect()
    except ModuleError as exc:
        console.print(f"[red]✗ {exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"[green]✓[/green] {vehicle} connected to {host}:{port} as {owner}")
    try:
        expected = scenarios.run(scenario, m, speed)
    finally:
        m.disconnect()
    console.print(f"{m.sent} messages sent")
    print(json.dumps(dataclasses.asdict(expected), default=_jsonable, indent=2))


def _describe(seen: Seen) -> str:
    if seen.kind == "question" and seen.question is not None:
        q = seen.question
        return (
            f"question {seen.request_id} ({q.kind}) at {q.session.latitude},{q.session.longitude}"
        )
    if seen.kind == "answered" and seen.decision is not None:
        return f"answered {seen.request_id}: {seen.decision.choice}"
    if seen.kind == "status" and seen.status is not None:
        return f"status {seen.status.model_dump_json()}"
    if seen.kind == "error" and seen.error is not None:
        return f"error {seen.error.code}: {seen.error.error} ({seen.error.topic})"
    return f"{seen.kind} {seen.request_id} {seen.raw}".strip()


@app.command("app")
def owner_app(
    owner: Owner,
    password: Password,
    vehicle: Annotated[str, typer.Option(help="Vehicle to opt in.")] = "SIM1",
    host: Host = "127.0.0.1",
    port: Port = 1883,
    tls_ca: TlsCa = None,
    answer: Annotated[
        str, typer.Option(help="Answer to share questions: always|once|not_once|never|none.")
    ] = "always",
    abort_reason: Annotated[
        str,
        typer.Option(
            help="Answer to abort questions: station_fault|user_interrupted|other_fault|none."
        ),
    ] = "station_fault",
    nickname: Annotated[
        str | None, typer.Option(help="Public nickname (default anonymous).")
    ] = None,
    opt_in: Annotated[bool, typer.Option(help="Publish the opt-in first.")] = True,
    seconds: Annotated[float, typer.Option(help="Run this long (0: until Ctrl-C).")] = 0.0,
    mqtt5: Annotated[bool, typer.Option(help="Connect with MQTT 5 instead of 3.1.1.")] = False,
) -> None:
    """Be the owner's app: opt in, then answer every question by a fixed policy."""
    for value, allowed in ((answer, wire.SHARE_CHOICES), (abort_reason, wire.ABORT_CHOICES)):
        if value != "none" and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)} or none")
    policy = Policy(
        answer=None if answer == "none" else answer,
        abort_reason=None if abort_reason == "none" else abort_reason,
    )
    client = OwnerApp(
        owner, password, host, port, vehicle=vehicle, answer=policy, tls_ca=tls_ca, mqtt5=mqtt5
    )
    client.connect()
    if opt_in:
        client.opt_in(vehicle, nickname=nickname)
        console.print(f"[green]✓[/green] {vehicle} opted in as {nickname or 'anonymous'}")
    shown = 0
    end = None if seconds <= 0 else time.monotonic() + seconds
    try:
        while end is None or time.monotonic() < end:
            client.wait_for(lambda s: True, timeout=0.5, since=shown)
            log = client.log
            for seen in log[shown:]:
                console.print(
                    f"{time.strftime('%H:%M:%S')} {seen.vehicle or '-'} {_describe(seen)}"
                )
            shown = len(log)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


@app.command()
def fleet(
    owner: Owner,
    password: Password,
    vehicles: Annotated[int, typer.Option(help="How many vehicles.")] = 10,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    tls_ca: TlsCa = None,
    speed: Annotated[float, typer.Option(help="Fraction of firmware waits to sleep.")] = 0.05,
    rounds: Annotated[int, typer.Option(help="Stories per vehicle.")] = 1,
    mix: Annotated[
        str | None, typer.Option(help="Stories and weights, e.g. completed=4,home=2,jimbo.")
    ] = None,
    prefix: Annotated[
        str, typer.Option(help="Vehicle id prefix (ids are PREFIX00001...).")
    ] = "SIM",
    seed: Annotated[int | None, typer.Option(help="Random seed for a repeatable mix.")] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
) -> None:
    """Run many vehicles of one owner at firmware cadence times SPEED, with live progress."""
    try:
        f = fleet_mod.Fleet(
            owner,
            password,
            host,
            port,
            vehicles=vehicles,
            speed=speed,
            rounds=rounds,
            mix=fleet_mod.parse_mix(mix),
            prefix=prefix,
            tls_ca=tls_ca,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    stats = f.run(console, max_seconds=max_seconds)
    if stats.finished < stats.vehicles:
        console.print(f"[yellow]{stats.vehicles - stats.finished} vehicles did not finish[/yellow]")
        raise typer.Exit(1)


@app.command()
def demo(
    env_file: Annotated[Path, typer.Option(help="Written by `make up`.")] = Path(".run/stack.env"),
    state_file: Annotated[Path, typer.Option(help="Demo accounts kept between runs.")] = Path(
        ".run/demo.json"
    ),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each observation.")] = 10.0,
) -> None:
    """Play DESIGN's story against the running stack; exit 0 only if every step happened."""
    from firmware_sim import demo as demo_mod

    ok = demo_mod.main(env_file, state_file, timeout=timeout, console=console)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    """Run the CLI."""
    app()
