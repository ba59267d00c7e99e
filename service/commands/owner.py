"""`chargeshare owner ...`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from service import logs
from service.adapters import accounts, owners
from service.commands.common import fail, run_with_db
from service.config import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False)

T = TypeVar("T")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def emit(as_json: bool, obj: dict[str, Any], text: str) -> None:
    """Print the JSON object or the human-readable line."""
    typer.echo(json.dumps(obj) if as_json else text)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Account name: the <owner> level of ovms/<owner>/.")],
    password: Annotated[
        str,
        typer.Option(prompt=True, hide_input=True, confirmation_prompt=True, help="MQTT password."),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Create an owner account for vehicles and apps, usable at once."""

    async def work(conn: asyncpg.Connection, settings: Settings) -> None:
        await accounts.add_owner(conn, settings, name, password)

    run_with_db(work)
    emit(as_json, {"name": name, "mqtt_username": name}, f"added owner {name}")


@app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="Account name.")],
    erase: Annotated[
        bool,
        typer.Option(
            "--erase",
            help="Also delete everything stored about the owner and anonymise what was published.",
        ),
    ] = False,
    retract: Annotated[
        bool,
        typer.Option("--retract", help="With --erase: retract what was published instead."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete an owner account (its vehicles' rows cascade) and its broker login."""
    if retract and not erase:
        raise fail("--retract only goes with --erase")
    done = owners.Erased()

    async def work(conn: asyncpg.Connection, settings: Settings) -> None:
        hook = None
        if erase:
            logs.configure(settings.log_json)  # the erasure logs its effects: on stderr
            hook = owners.eraser(settings, retract=retract, now=datetime.now(UTC), into=done)
        await accounts.remove_owner(conn, settings, name, before_delete=hook)

    run_with_db(work)
    obj: dict[str, Any] = {"name": name, "removed": True, "erased": erase}
    text = f"removed owner {name}"
    if erase:
        obj.update(anonymised=done.anonymised, retracted=done.retracted)
        text += (
            f"; erased: {done.anonymised} published sessions anonymised, {done.retracted} retracted"
        )
    emit(as_json, obj, text)


@app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Account name.")],
    as_json: JsonFlag = False,
) -> None:
    """Print everything stored about an owner as JSON (push tokens masked)."""

    async def work(conn: asyncpg.Connection, settings: Settings) -> dict[str, Any]:
        return await owners.export(conn, name)

    data = run_with_db(work)
    typer.echo(json.dumps(data) if as_json else json.dumps(data, indent=2, ensure_ascii=False))
