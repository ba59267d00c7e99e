"""Apply the numbered SQL migrations under an advisory lock."""

from __future__ import annotations

from importlib import resources

import asyncpg

# Any constant works; it only has to be the same for every replica and CLI run.
_LOCK_ID = 0x63686172  # "char"

_CREATE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def available() -> list[tuple[int, str, str]]:
    """Return (version, name, sql) of every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("service.adapters").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction; return their names."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(_CREATE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in available():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied
