"""`chargeshare owner add|remove` as the operator runs it, against a real broker and database."""

from __future__ import annotations

import json
import secrets

import asyncpg
import pytest

from service.adapters import accounts
from tests.conftest import SERVICE_USER
from tests.integration.clikit import Stack, cli, connack


async def login(stack: Stack, username: str, password: str) -> int:
    """Log in to this test's broker; return the CONNACK reason code (0 = accepted)."""
    return await connack(stack.broker.port, username, password)


async def owners(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM owners ORDER BY name")]
    finally:
        await conn.close()


def name() -> str:
    return f"alice{secrets.token_hex(3)}"


async def test_added_owner_logs_in_at_once(stack: Stack) -> None:
    """`owner add --json` prints the account and the owner can log in without a broker restart."""
    who = name()
    status, out, err = await cli(stack, "owner", "add", who, "--password", "pw-1", "--json")
    assert (status, err) == (0, "")
    assert json.loads(out) == {"name": who, "mqtt_username": who}
    assert await owners(stack.database_url) == [who]
    assert await login(stack, who, "pw-1") == 0


async def test_adding_an_existing_owner_fails_and_changes_nothing(stack: Stack) -> None:
    """Adding a taken name exits 1 with a one-line reason and keeps the old password."""
    who = name()
    assert (await cli(stack, "owner", "add", who, "--password", "old-pw"))[0] == 0
    before = stack.snapshot()
    status, out, err = await cli(stack, "owner", "add", who, "--password", "new-pw", "--json")
    assert status == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "already exists" in err
    assert stack.snapshot() == before
    assert await owners(stack.database_url) == [who]
    assert await login(stack, who, "old-pw") == 0
    assert await login(stack, who, "new-pw") == 0x87


@pytest.mark.parametrize("bad", ["partner-bob", "chargeshare-x", SERVICE_USER, "a/b", "a+", ""])
async def test_reserved_or_invalid_names_are_refused(stack: Stack, bad: str) -> None:
    """Names that collide with service or partner accounts, or cannot be a topic level, fail."""
    before = stack.snapshot()
    status, _, err = await cli(stack, "owner", "add", bad, "--password", "pw")
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert stack.snapshot() == before
    assert await owners(stack.database_url) == []


async def test_removed_owner_can_no_longer_log_in(stack: Stack) -> None:
    """`owner remove` deletes the account row and its broker login at once."""
    who = name()
    assert (await cli(stack, "owner", "add", who, "--password", "pw-1"))[0] == 0
    assert await login(stack, who, "pw-1") == 0
    status, _, err = await cli(stack, "owner", "remove", who)
    assert (status, err) == (0, "")
    assert await owners(stack.database_url) == []
    assert await login(stack, who, "pw-1") == 0x87
    assert f"user {who}\n" not in stack.files.acl.read_text()


async def test_removing_an_unknown_owner_fails(stack: Stack) -> None:
    """Removing a name that is no owner exits 1 with a one-line reason."""
    status, _, err = await cli(stack, "owner", "remove", name())
    assert status == 1 and len(err.strip().splitlines()) == 1 and "no owner" in err


async def test_sync_broker_admits_enabled_partners_from_the_database(
    stack: Stack, db: asyncpg.Connection
) -> None:
    """sync_broker gives every enabled partner in the database read access to public topics."""
    for partner, enabled in (("partner-on", True), ("partner-off", False)):
        await db.execute(
            "INSERT INTO partners (name, mqtt_username, api_key_hash, api_key_prefix, license,"
            " enabled) VALUES ($1, $1, '\\x00', 'k', 'CC0-1.0', $2)",
            partner,
            enabled,
        )
        stack.files.set_password(partner, "pw")
    await accounts.sync_broker(db, stack.settings())
    acl = stack.files.acl.read_text()
    assert "user partner-on\ntopic read chargeshare/public/#\n" in acl
    assert "partner-off" not in acl
    assert f"user {SERVICE_USER}\ntopic readwrite #\n" in acl
