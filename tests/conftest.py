"""Fixtures: a real Mosquitto and a real Postgres per test run; a database and owner per test."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import hypothesis
import pytest

from service import brokeradmin, localstack
from service.adapters import schema
from tests.mqttprobe import Probe

# Wall-clock deadlines make property tests flaky on a busy 2-core machine; examples still run.
hypothesis.settings.register_profile("chargeshare", deadline=None)
hypothesis.settings.load_profile("chargeshare")

SERVICE_USER = "chargeshare-service"
SERVICE_PASSWORD = "service-test-pw"
TEMPLATE = "chargeshare_template"
_counter = itertools.count(1)


@dataclass
class BrokerHandle:
    """A running test broker and the files that admit its accounts."""

    broker: localstack.Broker
    files: brokeradmin.BrokerFiles
    proc: subprocess.Popen[bytes]
    owners: dict[str, str]
    partners: dict[str, str]

    @property
    def port(self) -> int:
        return self.broker.port

    def add_owner(self, name: str, password: str) -> None:
        """Create an owner account and make the broker reread its files."""
        self.owners[name] = password
        self._apply(name, password)

    def add_partner(self, name: str, password: str) -> None:
        """Create a read-only partner account and make the broker reread its files."""
        self.partners[name] = password
        self._apply(name, password)

    def clear_retained(self, owner: str) -> None:
        """Delete every retained message under ovms/<owner>/ (later services must not see it)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        found: set[str] = set()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cleaner-{owner}")
        c.username_pw_set(SERVICE_USER, SERVICE_PASSWORD)
        c.on_message = lambda _c, _u, m: found.add(m.topic) if m.retain and m.payload else None
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            c.subscribe(f"ovms/{owner}/#", 0)
            time.sleep(0.3)
            for topic in sorted(found):
                c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        finally:
            c.disconnect()
            c.loop_stop()

    def _apply(self, name: str, password: str) -> None:
        self.files.set_password(name, password)
        self.files.write_acl(SERVICE_USER, self.owners, self.partners)
        self.files.reload()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """Start Mosquitto with the project's broker/ configuration on a free port."""
    d = tmp_path_factory.mktemp("mosquitto")
    b = localstack.Broker(directory=d, port=localstack.free_port())
    files = brokeradmin.BrokerFiles(d, b.pid_file)
    files.set_password(SERVICE_USER, SERVICE_PASSWORD)
    files.write_acl(SERVICE_USER, [], [])
    proc = localstack.start_broker(b)
    handle = BrokerHandle(b, files, proc, {}, {})
    yield handle
    localstack.stop_broker(proc)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.Database]:
    """Start a throwaway Postgres cluster and a migrated template database."""
    # Not under pytest's 0700 tmp dir: the cluster runs as user postgres when we are root.
    d = localstack.Database(
        Path(tempfile.mkdtemp(prefix="chargeshare-pg-")), localstack.free_port()
    )
    localstack.start_postgres(d, fsync=False)

    async def make_template() -> None:
        conn = await asyncpg.connect(d.url("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(d.url(TEMPLATE))
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(make_template())
    yield d
    localstack.stop_postgres(d, mode="immediate")
    shutil.rmtree(d.directory, ignore_errors=True)


@pytest.fixture
async def database_url(postgres: localstack.Database) -> AsyncIterator[str]:
    """A fresh migrated database for this test, cloned from the template."""
    name = f"test_{next(_counter)}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(postgres.url("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    finally:
        await conn.close()
    yield postgres.url(name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def new_owner(broker: BrokerHandle) -> Iterator[Callable[[], tuple[str, str]]]:
    """Make owner accounts on demand; what they left retained is cleared afterwards."""
    made: list[str] = []

    def make() -> tuple[str, str]:
        name = f"owner{next(_counter)}x{secrets.token_hex(2)}"
        password = secrets.token_urlsafe(12)
        broker.add_owner(name, password)
        made.append(name)
        return name, password

    yield make
    for name in made:
        broker.clear_retained(name)


@pytest.fixture
def owner(new_owner: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """A fresh owner account (name, password) on the test broker: each test its own prefix."""
    return new_owner()


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def probe(broker: BrokerHandle) -> Iterator[Callable[[str, str], Probe]]:
    """Open MQTT test clients as any account; all are closed after the test."""
    made: list[Probe] = []

    def make(username: str, password: str) -> Probe:
        made.append(Probe(broker.port, username, password))
        return made[-1]

    yield make
    for p in made:
        p.close()
