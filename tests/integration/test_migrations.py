"""Numbered migrations applied once, under an advisory lock, by concurrent runners."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from service import localstack
from service.adapters import schema


async def test_concurrent_migrate_applies_each_migration_once(
    postgres: localstack.Database,
) -> None:
    """Three replicas migrating an empty database at once apply every file exactly once."""
    name = f"empty_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conns = [await asyncpg.connect(postgres.url(name)) for _ in range(3)]
    try:
        results = await asyncio.gather(*(schema.migrate(c) for c in conns))
        applied = sorted(n for r in results for n in r)
        assert applied == [n for _, n, _ in schema.available()]
        rows = await conns[0].fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [r["name"] for r in rows] == applied
        assert await schema.migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()


async def test_schema_refuses_a_second_open_session(db: asyncpg.Connection) -> None:
    """The database itself keeps one open session per vehicle and valid states."""
    await db.execute("INSERT INTO owners (name) VALUES ('o')")
    pk = await db.fetchval(
        "INSERT INTO vehicles (owner, vehicle_id, salt, handle) VALUES ('o', 'v', '\\x00', 'h')"
        " RETURNING id"
    )
    insert = (
        "INSERT INTO sessions (id, vehicle, status, share, source, started_at)"
        " VALUES (gen_random_uuid(), $1, $2, 'private', 'metrics', now())"
    )
    await db.execute(insert, pk, "charging")
    try:
        await db.execute(insert, pk, "charging")
        raise AssertionError("a second open session was accepted")
    except asyncpg.UniqueViolationError:
        pass
    try:
        await db.execute(insert.replace("'private'", "'bogus'"), pk, "completed")
        raise AssertionError("an unknown share state was accepted")
    except asyncpg.CheckViolationError:
        pass
