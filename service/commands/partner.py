"""`chargeshare partner ...`."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import typer

from service import wire
from service.adapters import partners
from service.commands.common import run_with_db

app = typer.Typer(no_args_is_help=True, add_completion=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Name = Annotated[str, typer.Argument(help="Partner name.")]


def _jsonable(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: wire.rfc3339(v) if isinstance(v, datetime) else v for k, v in obj.items()}


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj))


@app.command("add")
def add(
    name: Name,
    webhook: Annotated[
        str | None, typer.Option("--webhook", help="HTTPS URL to POST signed events to.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Sign a partner up; print its MQTT login, API key and webhook secret (shown only now)."""
    creds = run_with_db(lambda conn, settings: partners.add(conn, settings, name, webhook))
    if as_json:
        _print(asdict(creds))
        return
    typer.echo(
        f"added partner {creds.name}; by signing up it accepts the licence {creds.license}\n"
        f"  MQTT username   {creds.mqtt_username}\n"
        f"  MQTT password   {creds.mqtt_password}\n"
        f"  API key         {creds.api_key}\n"
        f"  webhook secret  {creds.webhook_secret or '(no webhook)'}\n"
        "These secrets are not stored and cannot be shown again."
    )


@app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """Show every partner."""
    found = run_with_db(lambda conn, settings: partners.list_all(conn))
    rows = [_jsonable(asdict(p)) for p in found]
    if as_json:
        _print({"partners": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "enabled", "API key", "webhook", "pending", "licence", "accepted")
    for p in found:
        hook = "-"
        if p.webhook_url:
            hook = p.webhook_url if p.webhook_enabled else f"{p.webhook_url} (off)"
        table.add_row(
            p.name,
            "yes" if p.enabled else "no",
            p.api_key_prefix + "…",
            hook,
            str(p.pending),
            p.license,
            wire.rfc3339(p.license_accepted_at),
        )
    Console().print(table)


@app.command("rotate-key")
def rotate_key(
    name: Name,
    grace_s: Annotated[
        int, typer.Option("--grace-s", min=0, help="Seconds the old key keeps working.")
    ] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Issue a new API key (shown only now); the old one stops after the grace period."""
    key = run_with_db(lambda conn, settings: partners.rotate_key(conn, name, grace_s=grace_s))
    if as_json:
        _print({"name": name, "api_key": key})
    else:
        typer.echo(f"new API key of {name}: {key}")


@app.command("disable")
def disable(name: Name, as_json: JsonFlag = False) -> None:
    """Stop a partner's API key, webhooks and MQTT login; keep its record."""
    run_with_db(lambda conn, settings: partners.disable(conn, settings, name))
    if as_json:
        _print({"name": name, "enabled": False})
    else:
        typer.echo(f"disabled partner {name}")


@app.command("remove")
def remove(name: Name, as_json: JsonFlag = False) -> None:
    """Delete a partner, its pending webhooks, its delivery log and its MQTT login."""
    run_with_db(lambda conn, settings: partners.remove(conn, settings, name))
    if as_json:
        _print({"name": name, "removed": True})
    else:
        typer.echo(f"removed partner {name}")


@app.command("deliveries")
def deliveries(
    name: Name,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Show a partner's recent webhook attempts, newest first."""
    found = run_with_db(lambda conn, settings: partners.deliveries(conn, name, limit))
    rows = [_jsonable(d) for d in found]
    if as_json:
        _print({"name": name, "deliveries": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("at", "webhook id", "attempt", "HTTP", "outcome", "error", title=name)
    for d in rows:
        status = "-" if d["status"] is None else str(d["status"])
        table.add_row(
            d["at"], d["webhook_id"], str(d["attempt"]), status, d["outcome"], d["error"] or ""
        )
    Console().print(table)
