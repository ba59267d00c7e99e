"""Owner accounts in Postgres, mirrored into Mosquitto's password and ACL files."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import asyncpg

from service import brokeradmin, errors, topics
from service.config import Settings

# Names that would collide with the service account or the partner accounts (`partner-<name>`).
RESERVED_PREFIXES = ("partner-", "chargeshare")

# Serialises rewrites of the broker files, so that two CLI runs never drop each other's account.
_BROKER_LOCK = 0x62726F6B  # "brok"

LOCK_BROKER = "SELECT pg_advisory_xact_lock($1)"
SELECT_OWNERS = "SELECT name FROM owners ORDER BY name"
# A disabled partner loses MQTT access at the next sync; its account stays in the password file.
SELECT_PARTNER_USERS = "SELECT mqtt_username FROM partners WHERE enabled ORDER BY mqtt_username"
INSERT_OWNER = "INSERT INTO owners (name) VALUES ($1)"
DELETE_OWNER = "DELETE FROM owners WHERE name = $1 RETURNING name"

# Runs inside remove_owner's transaction before the owner's rows are deleted (e.g. --erase).
BeforeDelete = Callable[[asyncpg.Connection, str], Awaitable[None]]


def broker_files(settings: Settings) -> brokeradmin.BrokerFiles:
    """Return the broker files named by the settings, or raise ConfigError."""
    if settings.broker_dir is None:
        raise errors.ConfigError(
            "CHARGESHARE_BROKER_DIR",
            "not set: point it at the directory of the broker's passwd and acl files "
            "(for the local stack: source .run/stack.env)",
        )
    return brokeradmin.BrokerFiles(settings.broker_dir, settings.broker_pid_file)


def check_owner_name(name: str, settings: Settings) -> None:
    """Raise BrokerAdminError if `name` cannot be an owner account."""
    if not topics.valid_name(name):
        raise errors.BrokerAdminError(
            f"owner name {name!r} is not allowed: use 1-64 of A-Z a-z 0-9 _ . @ -"
        )
    lowered = name.lower()
    if lowered.startswith(RESERVED_PREFIXES) or name == settings.mqtt_username:
        raise errors.BrokerAdminError(
            f"owner name {name!r} is reserved: names starting with "
            + " or ".join(repr(p) for p in RESERVED_PREFIXES)
            + " belong to the service and to partners"
        )


async def _write_acl(
    conn: asyncpg.Connection, settings: Settings, files: brokeradmin.BrokerFiles
) -> None:
    """Take the broker lock and rewrite the ACL from the database (inside a transaction)."""
    await conn.execute(LOCK_BROKER, _BROKER_LOCK)
    owners = [r["name"] for r in await conn.fetch(SELECT_OWNERS)]
    partners = [r["mqtt_username"] for r in await conn.fetch(SELECT_PARTNER_USERS)]
    files.write_acl(settings.mqtt_username, owners, partners)


async def sync_broker(conn: asyncpg.Connection, settings: Settings) -> None:
    """Rewrite the ACL from every owner and enabled partner, then make the broker reread it."""
    files = broker_files(settings)
    async with conn.transaction():
        await _write_acl(conn, settings, files)
    files.reload()


async def add_owner(conn: asyncpg.Connection, settings: Settings, name: str, password: str) -> None:
    """Create an owner account that can log in at once; raise AlreadyExists if taken."""
    check_owner_name(name, settings)
    if not password or "\n" in password:
        raise errors.BrokerAdminError("a password must be non-empty and one line")
    files = broker_files(settings)
    credentials_written = False
    try:
        async with conn.transaction():
            await conn.execute(LOCK_BROKER, _BROKER_LOCK)
            try:
                await conn.execute(INSERT_OWNER, name)
            except asyncpg.UniqueViolationError:
                raise errors.AlreadyExists("owner", name) from None
            files.set_password(name, password)
            credentials_written = True
            await _write_acl(conn, settings, files)
    except BaseException:
        if credentials_written:  # the row is gone with the transaction: take the login back too
            files.remove_user(name)
            # Without its password line a stale ACL entry admits nobody; keep the first error.
            with contextlib.suppress(Exception):
                await sync_broker(conn, settings)
        raise
    files.reload()


async def remove_owner(
    conn: asyncpg.Connection,
    settings: Settings,
    name: str,
    *,
    before_delete: BeforeDelete | None = None,
) -> None:
    """Delete an owner (its rows cascade) and its broker login; raise NotFound if absent."""
    files = broker_files(settings)
    async with conn.transaction():
        await conn.execute(LOCK_BROKER, _BROKER_LOCK)
        exists = await conn.fetchval("SELECT 1 FROM owners WHERE name = $1", name)
        if exists is None:
            raise errors.NotFound("owner", name)
        if before_delete is not None:
            await before_delete(conn, name)
        await conn.fetchval(DELETE_OWNER, name)
        files.remove_user(name)
        await _write_acl(conn, settings, files)
    files.reload()
