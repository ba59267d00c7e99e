"""`chargeshare stack up|down` (what `make up` and `make down` run), in a temporary state dir."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.integration import clikit

CHARGESHARE = Path(sys.executable).parent / "chargeshare"
KEYS = {
    "CHARGESHARE_MQTT_HOST",
    "CHARGESHARE_MQTT_PORT",
    "CHARGESHARE_DATABASE_URL",
    "CHARGESHARE_API_URL",
}


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A state directory for one stack, stopped and deleted after the test."""
    # Not pytest's 0700 tmp dir: Postgres runs as user postgres when we are root.
    root = Path(tempfile.mkdtemp(prefix="chargeshare-stack-"))
    root.chmod(0o755)
    yield root / "run"
    subprocess.run(
        [str(CHARGESHARE), "stack", "down"],
        env={**os.environ, "CHARGESHARE_STACK_DIR": str(root / "run")},
        capture_output=True,
        check=False,
    )
    shutil.rmtree(root, ignore_errors=True)


async def cli(stack_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `chargeshare ARGS` with this stack dir; return (status, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(CHARGESHARE),
        *args,
        env={**os.environ, **(env or {}), "CHARGESHARE_STACK_DIR": str(stack_dir)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def read_env(stack_dir: Path) -> dict[str, str]:
    """Parse stack.env the way a shell would."""
    env = {}
    for line in (stack_dir / "stack.env").read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


async def connack(env: dict[str, str], username: str, password: str) -> int:
    """Log in to the stack's broker; return the CONNACK reason code (0 = accepted)."""
    return await clikit.connack(int(env["CHARGESHARE_MQTT_PORT"]), username, password)


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_up_starts_broker_and_postgres_and_down_stops_them(stack_dir: Path) -> None:
    """`stack up` starts a migrated Postgres and the broker and writes stack.env; `down` stops."""
    status, out = await cli(stack_dir, "stack", "up", "--no-service")
    assert status == 0, out
    env = read_env(stack_dir)
    assert set(env) >= KEYS
    assert env["CHARGESHARE_BROKER_DIR"] == str(stack_dir / "broker")
    assert stat.S_IMODE((stack_dir / "location.secret").stat().st_mode) == 0o600
    conn = await asyncpg.connect(env["CHARGESHARE_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
    finally:
        await conn.close()
    service_password = (stack_dir / "service.password").read_text().strip()
    assert await connack(env, "chargeshare-service", service_password) == 0

    status, out = await cli(stack_dir, "stack", "up", "--no-service")
    assert status == 0 and "already up" in out

    status, out = await cli(stack_dir, "stack", "down")
    assert status == 0, out
    assert await refuses_connections(int(env["CHARGESHARE_MQTT_PORT"]))
    db_port = int(env["CHARGESHARE_DATABASE_URL"].rsplit(":", 1)[1].split("/")[0])
    assert await refuses_connections(db_port)
    status, out = await cli(stack_dir, "stack", "status")
    assert status == 3 and "running" not in out


async def test_data_and_accounts_survive_down_and_up(stack_dir: Path) -> None:
    """After `stack down` and `stack up` the database rows and owner logins are still there."""
    assert (await cli(stack_dir, "stack", "up", "--no-service"))[0] == 0
    env = read_env(stack_dir)
    secret = (stack_dir / "location.secret").read_text()
    status, out = await cli(stack_dir, "owner", "add", "carol", "--password", "pw-c", env=env)
    assert status == 0, out

    assert (await cli(stack_dir, "stack", "down"))[0] == 0
    status, out = await cli(stack_dir, "stack", "up", "--no-service")
    assert status == 0, out

    again = read_env(stack_dir)
    assert again == env
    assert (stack_dir / "location.secret").read_text() == secret
    conn = await asyncpg.connect(again["CHARGESHARE_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT name FROM owners") == "carol"
    finally:
        await conn.close()
    assert await connack(again, "carol", "pw-c") == 0
