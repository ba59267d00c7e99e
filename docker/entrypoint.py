"""What the service container runs: `chargeshare ARGS` (default `serve`).

Before `serve`, make the container's settings true in the shared stores: apply migrations, write
the service's own broker account (CHARGESHARE_MQTT_USERNAME / _PASSWORD) into the broker's
password file, rewrite the ACL from the database and make the broker reread both (SIGHUP to the
pid in CHARGESHARE_BROKER_PID_FILE: the compose file shares the broker's pid namespace). Replicas
starting at once take the same advisory lock as `chargeshare owner add`.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from service import errors
from service.adapters import accounts, schema
from service.config import Settings

CONNECT_TIMEOUT_S = 120.0


async def _connect(url: str) -> asyncpg.Connection:
    """Connect to the database, waiting while it starts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_S
    delay = 0.5
    while True:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(url)
            return conn
        except (OSError, asyncpg.PostgresError) as exc:
            if loop.time() > deadline:
                raise SystemExit(f"chargeshare-entrypoint: database unreachable: {exc}") from None
            print(f"chargeshare-entrypoint: waiting for the database: {exc}", file=sys.stderr)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def prepare(settings: Settings) -> None:
    """Migrate, admit the service's broker account and rewrite the ACL."""
    conn = await _connect(settings.database_url)
    try:
        await schema.migrate(conn)
        if settings.broker_dir is None:
            return  # the broker's accounts are managed elsewhere
        if not settings.mqtt_password:
            raise errors.ConfigError("CHARGESHARE_MQTT_PASSWORD", "required with a broker dir")
        files = accounts.broker_files(settings)
        async with conn.transaction():
            await conn.execute(accounts.LOCK_BROKER, accounts._BROKER_LOCK)
            files.set_password(settings.mqtt_username, settings.mqtt_password)
        await accounts.sync_broker(conn, settings)
    finally:
        await conn.close()


def main() -> None:
    """Prepare when serving, then replace this process with the chargeshare CLI."""
    args = sys.argv[1:] or ["serve"]
    if args[0] == "serve":
        try:
            asyncio.run(prepare(Settings.from_env()))
        except errors.ChargeShareError as exc:
            raise SystemExit(f"chargeshare-entrypoint: {exc}") from None
    os.execvp("chargeshare", ["chargeshare", *args])


if __name__ == "__main__":
    main()
