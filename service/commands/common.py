"""What every database-backed CLI command shares: settings, one connection, one-line failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import typer

from service import errors
from service.config import Settings

T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise (status 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def run_with_db(work: Callable[[asyncpg.Connection, Settings], Awaitable[T]]) -> T:
    """Run `work` with the settings and one database connection; exit 1 on a known failure."""
    try:
        settings = Settings.from_env()
    except errors.ConfigError as exc:
        raise fail(str(exc)) from None

    async def go() -> T:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await work(conn, settings)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except errors.ChargeShareError as exc:
        raise fail(str(exc)) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise fail(f"database {settings.database_url}: {exc}") from None
