"""Every simulator scenario, played by firmware_sim against the real service."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from firmware_sim import scenarios
from firmware_sim.app import OwnerApp, Policy
from firmware_sim.module import Module
from service import app
from tests.conftest import BrokerHandle
from tests.e2e import steps
from tests.mqttprobe import Probe

ANSWERS = {"home": "never"}


@pytest.mark.parametrize("story", sorted(scenarios.STORIES))
async def test_scenario_ends_as_the_simulator_expects(
    story: str,
    service: app.Service,
    broker: BrokerHandle,
    owner: tuple[str, str],
    partner: Probe,
    db: asyncpg.Connection,
) -> None:
    """The service records each charge of the story with its result and publishes per answer."""
    name, pw = owner
    answer = ANSWERS.get(story, "always")
    phone = OwnerApp(name, pw, port=broker.port, vehicle="sim1",
                     answer=Policy(answer=answer, abort_reason="other_fault"))  # fmt: skip
    phone.connect()
    module = Module(name, "sim1", pw, port=broker.port, grid_log=story == "late-gridlog")
    try:
        phone.opt_in(nickname="Sim")
        await asyncio.sleep(0.3)
        module.connect()
        expected = await asyncio.to_thread(scenarios.run, story, module, 0.0015)
        want = sorted(s.status for s in expected.sessions)
        got: list[str] = []
        for _ in range(200):
            rows = await db.fetch(
                "SELECT s.status, s.energy_kwh, s.share FROM sessions s"
                " JOIN vehicles v ON v.id = s.vehicle WHERE v.owner = $1 AND NOT s.is_open",
                name,
            )
            got = sorted(r["status"] for r in rows)
            if got == want:
                break
            await asyncio.sleep(0.05)
        assert got == want
        for exp, row in zip(
            sorted(expected.sessions, key=lambda s: s.status),
            sorted(rows, key=lambda r: r[0]),
            strict=True,
        ):
            assert row["energy_kwh"] == pytest.approx(exp.energy_kwh, abs=0.5)
        await asyncio.sleep(0.5)
        published = {steps.body(m)["type"] for m in partner.messages()}
        if answer == "never":
            assert published == set()
        else:
            final = {"completed": "session.completed", "stopped": "session.completed",
                     "interrupted": "session.interrupted"}  # fmt: skip
            assert {final[w] for w in want} <= published
    finally:
        module.disconnect()
        phone.close()
