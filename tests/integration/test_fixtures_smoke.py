"""The test harness itself: a real broker and a real migrated database."""

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import BrokerHandle


async def test_database_is_migrated(db: asyncpg.Connection) -> None:
    """Each test's database holds the migrated schema."""
    names = {r["name"] for r in await db.fetch("SELECT name FROM schema_migrations")}
    assert "001_core.sql" in names


def test_owner_can_connect(broker: BrokerHandle, owner: tuple[str, str]) -> None:
    """An owner added at run time can log in without a broker restart."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="smoke")
    c.username_pw_set(*owner)
    assert c.connect("127.0.0.1", broker.port) == 0
    c.loop_start()
    try:
        import time

        for _ in range(50):
            if c.is_connected():
                break
            time.sleep(0.05)
        assert c.is_connected()
    finally:
        c.disconnect()
        c.loop_stop()
