"""Run the operator CLI as the operator does, against a broker of the test's own."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from service import brokeradmin, localstack
from service.config import Settings
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER

CHARGESHARE = Path(sys.executable).parent / "chargeshare"
SECRET = "cli-test-location-secret-0123456789"


@dataclass
class Stack:
    """A broker of this test's own (its ACL is rewritten from this test's database)."""

    broker: localstack.Broker
    files: brokeradmin.BrokerFiles
    database_url: str
    extra: dict[str, str] = field(default_factory=dict)  # more settings for the CLI

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CHARGESHARE_DATABASE_URL": self.database_url,
            "CHARGESHARE_BROKER_DIR": str(self.files.directory),
            "CHARGESHARE_BROKER_PID_FILE": str(self.broker.pid_file),
            "CHARGESHARE_MQTT_USERNAME": SERVICE_USER,
            "CHARGESHARE_LOCATION_SECRET": SECRET,
            **self.extra,
        }

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def snapshot(self) -> tuple[str, str]:
        return self.files.passwd.read_text(), self.files.acl.read_text()


def own_stack(directory: Path, database_url: str) -> Iterator[Stack]:
    """Start a broker that only this test changes; stop it afterwards (a fixture body)."""
    b = localstack.Broker(directory=directory, port=localstack.free_port())
    files = brokeradmin.BrokerFiles(b.directory, b.pid_file)
    files.set_password(SERVICE_USER, SERVICE_PASSWORD)
    files.write_acl(SERVICE_USER, [], [])
    proc = localstack.start_broker(b)
    yield Stack(b, files, database_url)
    localstack.stop_broker(proc)


async def cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    """Run `chargeshare ARGS` in a subprocess; return (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(CHARGESHARE),
        *args,
        env=stack.env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _connack(port: int, username: str, password: str) -> int:
    result: list[int] = []
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"cli-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
    )
    c.username_pw_set(username, password)
    c.on_connect = lambda client, u, flags, rc, props: result.append(rc.value)
    c.connect("127.0.0.1", port)
    try:
        for _ in range(20):  # each round ends on broker traffic or after 1 s: a liveness guard
            if result:
                break
            c.loop(timeout=1.0)  # a refused CONNACK makes loop() report an error: that is fine
    finally:
        c.disconnect()
    assert result, "no CONNACK from the broker"
    return result[0]


async def connack(port: int, username: str, password: str) -> int:
    """Log in with MQTT 5 to a broker on loopback; return the CONNACK reason code (0 = accepted)."""
    return await asyncio.to_thread(_connack, port, username, password)
