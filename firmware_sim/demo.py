"""`firmware-sim demo`: DESIGN's story against the running stack, each step checked for real."""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from firmware_sim import demo_channels as channels
from firmware_sim.app import OwnerApp, Seen
from firmware_sim.module import Module, ModuleError
from firmware_sim.partner import PartnerListener, Received
from firmware_sim.scenarios import HOME, PUBLIC_STATION
from service import wire

OWNER = "jimbo"
VEHICLE = "JIMBO1"
PARTNER = "demo-partner"
NEAR_DEG = 0.01  # about 1 km: "near" a place for matching questions and public records
RUN_SHIFT_DEG = 0.004  # each run moves both places ~450 m north: the station is always new


class DemoError(Exception):
    """The demo cannot start (stack not up, a command missing or failing)."""


@dataclass
class Context:
    """Everything the steps share."""

    env: dict[str, str]
    console: Console
    timeout: float
    module: Module
    app: OwnerApp
    partner: PartnerListener
    station: tuple[float, float]
    home: tuple[float, float]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step of the story: do something, then check that the real effect was observed."""

    title: str
    run: Callable[[Context], bool]


# Hooks: later checks (push received by a fake FCM, webhook delivered, ...) append steps here.
EXTRA_STEPS: list[Step] = []


# ---- setup -----------------------------------------------------------------------------------


def read_env(path: Path) -> dict[str, str]:
    """Read `KEY=value` shell lines (values shell-quoted) as written by `make up`."""
    if not path.exists():
        raise DemoError(f"{path} not found: start the stack first (make up)")
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line.removeprefix("export "))
        if words and "=" in words[0]:
            key, _, value = words[0].partition("=")
            env[key] = value
    return env


def chargeshare(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the operator CLI with the stack's settings."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _json_out(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    if done.returncode != 0:
        raise DemoError(f"{what} failed: {(done.stderr or done.stdout).strip()}")
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise DemoError(f"{what} printed no JSON: {done.stdout.strip()!r}") from None
    return result


def _unknown_command(done: subprocess.CompletedProcess[str]) -> bool:
    text = (done.stderr + done.stdout).lower()
    return done.returncode == 2 and ("no such command" in text or "usage:" in text)


def ensure_owner(env: dict[str, str], state: dict[str, Any]) -> str:
    """Create owner jimbo, or reuse the password kept from an earlier run; return it."""
    password = secrets.token_urlsafe(16)
    done = chargeshare(env, "owner", "add", OWNER, "--password", password, "--json")
    if done.returncode == 0:
        return password
    if _unknown_command(done):
        raise DemoError("`chargeshare owner add` is not implemented yet")
    if state.get("owner_password"):
        return str(state["owner_password"])
    chargeshare(env, "owner", "remove", OWNER, "--json")
    _json_out(
        chargeshare(env, "owner", "add", OWNER, "--password", password, "--json"), "owner add"
    )
    return password


def ensure_partner(env: dict[str, str], state: dict[str, Any]) -> tuple[str, str]:
    """Sign up the demo partner, or reuse its MQTT login kept from an earlier run."""
    done = chargeshare(env, "partner", "add", PARTNER, "--json")
    if _unknown_command(done):
        raise DemoError("`chargeshare partner add` is not implemented yet")
    if done.returncode != 0:
        kept = state.get("partner")
        if isinstance(kept, dict) and kept.get("mqtt_username") and kept.get("mqtt_password"):
            return str(kept["mqtt_username"]), str(kept["mqtt_password"])
        chargeshare(env, "partner", "remove", PARTNER, "--json")
        done = chargeshare(env, "partner", "add", PARTNER, "--json")
    creds = _json_out(done, "partner add")
    if "mqtt_username" not in creds or "mqtt_password" not in creds:
        raise DemoError(f"partner add returned no MQTT login: {sorted(creds)}")
    state["partner"] = {k: creds[k] for k in ("mqtt_username", "mqtt_password")}
    return str(creds["mqtt_username"]), str(creds["mqtt_password"])


# ---- matching --------------------------------------------------------------------------------


def _near(lat: float | None, lon: float | None, place: tuple[float, float]) -> bool:
    if lat is None or lon is None:
        return False
    return math.hypot(lat - place[0], lon - place[1]) < NEAR_DEG


def _question(kind: str, place: tuple[float, float]) -> Callable[[Seen], bool]:
    def match(s: Seen) -> bool:
        q = s.question
        return (
            s.kind == "question"
            and q is not None
            and q.kind == kind
            and _near(q.session.latitude, q.session.longitude, place)
        )

    return match


def _public(event_type: str, place: tuple[float, float]) -> Callable[[Received], bool]:
    def match(r: Received) -> bool:
        e = r.event
        return (
            e is not None
            and e.type == event_type
            and _near(e.session.latitude, e.session.longitude, place)
        )

    return match


def _charge(ctx: Context, ticks: int) -> None:
    for _ in range(ticks):
        ctx.module.tick(10)
        time.sleep(0.05)
    ctx.module.wait_published()


# ---- the story -------------------------------------------------------------------------------


def opt_in(ctx: Context) -> bool:
    since = len(ctx.app.log)
    ctx.app.opt_in(VEHICLE, nickname="Jimbo")
    seen = ctx.app.wait_for(
        lambda s: s.kind == "status" and s.status is not None and s.status.enabled,
        ctx.timeout,
        since=since,
    )
    if seen is not None and seen.status is not None:
        ctx.console.print(f"    status: handle {seen.status.handle!r}")
    return seen is not None


def plug_in_public(ctx: Context) -> bool:
    ctx.notes["log_mark"] = len(ctx.app.log)
    ctx.notes["partner_mark"] = len(ctx.partner.events)
    lat, lon = ctx.station
    ctx.module.plug_in(lat, lon, "type2")
    ctx.console.print(f"    at {lat:.6f}, {lon:.6f} (type2, 7.4 kW)")
    _charge(ctx, 3)
    return ctx.module.online


def share_question(ctx: Context) -> bool:
    seen = ctx.app.wait_for(
        _question("share", ctx.station), ctx.timeout, since=ctx.notes["log_mark"]
    )
    if seen is None:
        return False
    ctx.notes["share_rid"] = seen.request_id
    ctx.console.print(
        f"    request {seen.request_id}, choices {seen.question.choices if seen.question else []}"
    )
    return True


def _answer(ctx: Context, key: str, choice: str) -> bool:
    rid = ctx.notes.get(key)
    if not rid:
        return False
    since = len(ctx.app.log)
    ctx.app.decide(VEHICLE, rid, wire.Decision(choice=choice))
    cleared = ctx.app.wait_for(
        lambda s: s.kind == "cleared" and s.request_id == rid, ctx.timeout, since=since
    )
    rejected = [s for s in ctx.app.log[since:] if s.kind == "error"]
    for s in rejected:
        if s.error is not None:
            ctx.console.print(f"    [red]service said: {s.error.code}: {s.error.error}[/red]")
    return cleared is not None and not rejected


def answer_always(ctx: Context) -> bool:
    return _answer(ctx, "share_rid", "always")


def partner_started(ctx: Context) -> bool:
    got = ctx.partner.wait_for(
        _public("session.started", ctx.station), ctx.timeout, since=ctx.notes["partner_mark"]
    )
    if got is not None and got.event is not None:
        s = got.event.session
        ctx.console.print(
            f"    {got.topic}: contributor {s.contributor}, {s.connector}, {s.license}"
        )
    return got is not None


def breaker_trips(ctx: Context) -> bool:
    _charge(ctx, 6)
    ctx.notes["log_mark"] = len(ctx.app.log)
    ctx.module.abort("interrupted")
    ctx.module.wait_published()
    charge = ctx.module.charges[-1]
    ctx.console.print(f"    after {charge.energy_kwh:.2f} kWh: state stopped, substate interrupted")
    return ctx.module.text("v.c.state") == "stopped"


def partner_interrupted(ctx: Context) -> bool:
    got = ctx.partner.wait_for(
        _public("session.interrupted", ctx.station), ctx.timeout, since=ctx.notes["partner_mark"]
    )
    return got is not None


def abort_question(ctx: Context) -> bool:
    seen = ctx.app.wait_for(
        _question("abort_reason", ctx.station), ctx.timeout, since=ctx.notes["log_mark"]
    )
    if seen is None:
        return False
    ctx.notes["abort_rid"] = seen.request_id
    return True


def answer_station_fault(ctx: Context) -> bool:
    return _answer(ctx, "abort_rid", "station_fault")


def partner_updated(ctx: Context) -> bool:
    got = ctx.partner.wait_for(
        lambda r: (
            _public("session.updated", ctx.station)(r)
            and r.event is not None
            and r.event.session.cause == "station_fault"
        ),
        ctx.timeout,
        since=ctx.notes["partner_mark"],
    )
    ctx.module.unplug()
    return got is not None


def plug_in_home(ctx: Context) -> bool:
    ctx.notes["log_mark"] = len(ctx.app.log)
    ctx.notes["home_mark"] = len(ctx.partner.events)
    lat, lon = ctx.home
    ctx.module.plug_in(lat, lon, "type2", current=16.0, location="Home")
    ctx.console.print(f"    at {lat:.6f}, {lon:.6f}")
    _charge(ctx, 3)
    seen = ctx.app.wait_for(_question("share", ctx.home), ctx.timeout, since=ctx.notes["log_mark"])
    if seen is None:
        return False
    ctx.notes["home_rid"] = seen.request_id
    return True


def answer_never(ctx: Context) -> bool:
    ok = _answer(ctx, "home_rid", "never")
    _charge(ctx, 6)
    ctx.module.finish()
    ctx.module.unplug()
    ctx.module.wait_published()
    return ok


def nothing_near_home(ctx: Context) -> bool:
    quiet = min(ctx.timeout, 5.0)
    ctx.console.print(f"    listening {quiet:.0f} s for anything near home...")
    time.sleep(quiet)
    leaked = [
        r
        for r in ctx.partner.events[ctx.notes["home_mark"] :]
        if r.event is None or _near(r.event.session.latitude, r.event.session.longitude, ctx.home)
    ]
    for r in leaked:
        ctx.console.print(f"    [red]partner got {r.topic}: {r.raw[:120]}[/red]")
    return not leaked


def register_phones(ctx: Context) -> bool:
    for app_id, platform, token in channels.PHONES:
        ctx.app.register_push(app_id, platform, token)  # type: ignore[arg-type]
        ctx.console.print(f"    {app_id}: {platform} token {token[:12]}…")
    return True


def _buzz(ctx: Context, key: str) -> bool:
    rid = ctx.notes.get(key)
    log = ctx.notes.get("push_log")
    if not rid or log is None:
        return False
    got = channels.wait_notifications(log, rid, ctx.timeout)
    for n in got:
        name = channels.PHONE_NAMES.get(n.get("platform", ""), n.get("platform"))
        ctx.console.print(
            f"    📱 {name}: {n.get('body')!r} (request {str(rid)[:8]}…, {n.get('kind')})"
        )
    return {n.get("platform") for n in got} >= {p for _, p, _ in channels.PHONES}


def phones_buzz_share(ctx: Context) -> bool:
    return _buzz(ctx, "share_rid")


def phones_buzz_abort(ctx: Context) -> bool:
    return _buzz(ctx, "abort_rid")


def phones_buzz_home(ctx: Context) -> bool:
    return _buzz(ctx, "home_rid")


def webhook_partner(ctx: Context) -> bool:
    receiver: channels.Receiver = ctx.notes["receiver"]
    ok = receiver.wait(3, ctx.timeout)
    for e in receiver.events:
        s = e["session"]
        ctx.console.print(
            f"    🔏 {e['type']} v{s['version']} ({s['status']}, cause {s['cause']}), signature ok"
        )
    types = [e["type"] for e in receiver.events]
    wanted = ["session.started", "session.interrupted", "session.updated"]
    near_home = [
        e for e in receiver.events if _near(e["session"]["latitude"], e["session"]["longitude"],
                                            ctx.home)
    ]  # fmt: skip
    return ok and types[:3] == wanted and not receiver.bad_signatures and not near_home


def pull_everything(ctx: Context) -> bool:
    records = channels.pull_all(ctx.env["CHARGESHARE_API_URL"], ctx.notes["api_key"])
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        latest[r["id"]] = r
    ctx.console.print(f"    {len(records)} changes, {len(latest)} sessions in the feed")
    ours = [r for r in latest.values() if _near(r["latitude"], r["longitude"], ctx.station)]
    for r in ours:
        ctx.console.print(
            f"    {r['id'][:8]}… v{r['version']} {r['status']} cause {r['cause']}, "
            f"{r['energy_kwh']} kWh, {r['license']}"
        )
    near_home = [r for r in latest.values() if _near(r["latitude"], r["longitude"], ctx.home)]
    return (
        any(r["status"] == "interrupted" and r["cause"] == "station_fault" for r in ours)
        and not near_home
    )


STORY: list[Step] = [
    Step("Jimbo opts in (nickname Jimbo)", opt_in),
    Step("He plugs in at a public station never used before", plug_in_public),
    Step("A question appears (kind share)", share_question),
    Step('He answers "always"', answer_always),
    Step("The partner receives session.started", partner_started),
    Step("A breaker trips (state stopped, substate interrupted)", breaker_trips),
    Step("The partner receives session.interrupted", partner_interrupted),
    Step("An abort_reason question appears", abort_question),
    Step('He answers "station_fault"', answer_station_fault),
    Step("The partner receives session.updated with cause station_fault", partner_updated),
    Step("He charges at home; a question appears (kind share)", plug_in_home),
    Step('He answers "never"', answer_never),
    Step("The partner never receives anything near home", nothing_near_home),
    Step("The webhook partner got every event, signed, and nothing near home", webhook_partner),
    Step("A pull of everything shared shows the station's session, and nothing near home",
         pull_everything),
]  # fmt: skip
PUSH_STEPS: dict[str, Step] = {  # inserted after the step of the same title when push is on
    "Jimbo opts in (nickname Jimbo)": Step("His two phones register for push", register_phones),
    "A question appears (kind share)": Step("Both phones buzz", phones_buzz_share),
    "An abort_reason question appears": Step("Both phones buzz again", phones_buzz_abort),
    "He charges at home; a question appears (kind share)": Step(
        "Both phones buzz about home", phones_buzz_home
    ),
}


def story(push: bool) -> list[Step]:
    """The story's steps, with the phones' steps when the fake push servers run."""
    steps: list[Step] = []
    for step in STORY:
        steps.append(step)
        if push and step.title in PUSH_STEPS:
            steps.append(PUSH_STEPS[step.title])
    return steps


def ensure_webhook_partner(env: dict[str, str], state: dict[str, Any], runs: int) -> Any:
    """Sign up this run's webhook partner (its receiver's port is new each run)."""
    receiver = channels.Receiver()
    url = receiver.start()
    old = state.get("hook_partner")
    if old:
        chargeshare(env, "partner", "remove", str(old), "--json")
    name = f"demo-hook-{runs + 1}"
    creds = _json_out(
        chargeshare(env, "partner", "add", name, "--webhook", url, "--json"),
        "partner add --webhook",
    )
    receiver.secret = str(creds["webhook_secret"])
    state["hook_partner"] = name
    return receiver, str(creds["api_key"])


def main(
    env_file: Path,
    state_file: Path,
    *,
    timeout: float = 10.0,
    console: Console | None = None,
    extra_steps: list[Step] | None = None,
) -> bool:
    """Run the demo; print each step with ✓ or ✗; return True only if every step happened."""
    console = console or Console()
    try:
        env = read_env(env_file)
        host = env.get("CHARGESHARE_MQTT_HOST", "127.0.0.1")
        port = int(env.get("CHARGESHARE_MQTT_PORT", "1883"))
        tls_ca = env.get("CHARGESHARE_MQTT_TLS_CA") or None
        state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
        password = ensure_owner(env, state)
        partner_user, partner_password = ensure_partner(env, state)
    except (DemoError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        console.print(f"[red]✗ cannot start the demo: {exc}[/red]")
        return False
    runs = int(state.get("runs", 0))
    try:
        receiver, api_key = ensure_webhook_partner(env, state, runs)
    except (DemoError, OSError, subprocess.TimeoutExpired) as exc:
        console.print(f"[red]✗ cannot start the demo: {exc}[/red]")
        return False
    state.update(owner_password=password, runs=runs + 1)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    os.chmod(state_file, 0o600)

    shift = RUN_SHIFT_DEG * runs
    station = (round(PUBLIC_STATION.latitude + shift, 6), PUBLIC_STATION.longitude)
    home = (round(HOME.latitude + shift, 6), HOME.longitude)
    console.rule(f"ChargeShare demo (run {runs + 1}) on {host}:{port}")
    module = Module(OWNER, VEHICLE, password, host, port, tls_ca=tls_ca)
    owner_app = OwnerApp(
        OWNER, password, host, port, vehicle=VEHICLE, client_id=f"{VEHICLE}-app", tls_ca=tls_ca
    )
    partner = PartnerListener(partner_user, partner_password, host, port, tls_ca=tls_ca)
    try:
        partner.connect()
        owner_app.connect()
        module.connect()
    except (ConnectionError, ModuleError, OSError) as exc:
        console.print(f"[red]✗ cannot connect to the broker: {exc}[/red]")
        for close in (partner.close, owner_app.close):
            close()
        return False
    ctx = Context(env, console, timeout, module, owner_app, partner, station, home)
    ctx.notes.update(receiver=receiver, api_key=api_key)
    push_log = os.environ.get("CHARGESHARE_DEMO_PUSH_LOG")
    if push_log:
        ctx.notes["push_log"] = Path(push_log)
    else:
        console.print("    (no fake push servers: phones are left out; `make demo` runs them)")
    results: list[bool] = []
    try:
        for step in [*story(bool(push_log)), *EXTRA_STEPS, *(extra_steps or [])]:
            try:
                ok = step.run(ctx)
            except Exception as exc:  # a step that crashes is a failed step, the demo goes on
                console.print(f"    [red]{type(exc).__name__}: {exc}[/red]")
                ok = False
            results.append(ok)
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            console.print(f"{mark} {step.title}")
    finally:
        module.disconnect()
        owner_app.close()
        partner.close()
        receiver.stop()
    passed = sum(results)
    console.rule(
        f"[green]all {passed} steps happened[/green]"
        if all(results)
        else f"[red]{len(results) - passed} of {len(results)} steps did not happen[/red]"
    )
    return all(results)
