"""End-to-end fixtures: the real service in-process against the test broker and database."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import pytest

from service import app
from service.config import Settings
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER, BrokerHandle
from tests.mqttprobe import Probe


def service_settings(broker: BrokerHandle, database_url: str, **over: object) -> Settings:
    """Settings for one test's service: its own client id and shared-subscription group."""
    tag = secrets.token_hex(3)
    base: dict[str, object] = dict(
        database_url=database_url,
        mqtt_port=broker.port,
        mqtt_username=SERVICE_USER,
        mqtt_password=SERVICE_PASSWORD,
        client_id=f"svc-{tag}",
        share_group=f"g{tag}",
        session_expiry_s=60,
        location_secret=b"test-location-secret-0123456789",
        settle_s=0.3,
    )
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def service(broker: BrokerHandle, database_url: str) -> AsyncIterator[app.Service]:
    """The whole service (no HTTP API) running in this test's event loop."""
    async with app.running(service_settings(broker, database_url), api_enabled=False) as svc:
        yield svc


@pytest.fixture
def partner(broker: BrokerHandle, probe: Callable[[str, str], Probe]) -> Probe:
    """A partner subscribed to every public topic."""
    name = f"partner-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(10)
    broker.add_partner(name, password)
    p = probe(name, password)
    p.subscribe("chargeshare/public/#")
    return p
