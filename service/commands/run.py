"""`chargeshare serve` and `chargeshare migrate`."""

from __future__ import annotations

import asyncio
import signal

import typer

from service import errors
from service.config import Settings

# The service's heavy imports (FastAPI, gmqtt, firebase-admin) happen inside `serve` only, so the
# other commands start quickly.


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
        settings.require_secret()
    except errors.ConfigError as exc:
        typer.echo(f"chargeshare: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


async def _serve(settings: Settings) -> None:
    from service import app as service_app

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await service_app.serve(settings)
    except asyncio.CancelledError:
        pass


async def _migrate(settings: Settings) -> list[str]:
    import asyncpg

    from service.adapters import schema

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await schema.migrate(conn)
    finally:
        await conn.close()


def register(app: typer.Typer) -> None:
    """Add the serve and migrate commands to the root CLI."""

    @app.command()
    def serve() -> None:
        """Run the service (settings from CHARGESHARE_* environment variables)."""
        from service import logs

        settings = _settings()
        logs.configure(settings.log_json)
        asyncio.run(_serve(settings))

    @app.command()
    def migrate() -> None:
        """Apply database migrations not yet applied."""
        settings = Settings.from_env()
        applied = asyncio.run(_migrate(settings))
        typer.echo("applied: " + ", ".join(applied) if applied else "schema up to date")
