"""Raw ceilings: a bare gmqtt subscriber on the metric topics, a bare asyncpg transaction loop.

`python -m bench.baselines subscribe PORT USER PASSWORD EXPECT` runs the subscriber as its own
process (like the service): MQTT 5, the service's metric filter as a shared subscription at the
service's QoS, the callback acking each message and doing nothing else. It prints `ready`, then
one JSON line with how many messages arrived between the first and the last.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from service import topics

# The shape of one charge transition (settle.judge of a start at a place answered `always`):
# claim the due vehicle, lock it, look for an open session and the place, insert the session and
# its events, set its share, bump its version, store the publication, queue the public message,
# settle the vehicle and queue its status.
SCHEMA = """
DROP TABLE IF EXISTS b_vehicles, b_places, b_sessions, b_events, b_publications, b_outbox;
CREATE TABLE b_vehicles (id bigint PRIMARY KEY, metrics jsonb NOT NULL, phase text NOT NULL,
                         judge_at timestamptz);
CREATE INDEX ON b_vehicles (judge_at) WHERE judge_at IS NOT NULL;
CREATE TABLE b_places (id bigserial PRIMARY KEY, vehicle bigint NOT NULL, cell bytea NOT NULL,
                       answer text NOT NULL);
CREATE INDEX ON b_places (cell);
CREATE TABLE b_sessions (id uuid PRIMARY KEY, vehicle bigint NOT NULL, place bigint,
                         is_open boolean NOT NULL, status text NOT NULL, share text NOT NULL,
                         started_at timestamptz NOT NULL, energy_kwh double precision,
                         version integer NOT NULL DEFAULT 0, updated_at timestamptz);
CREATE INDEX ON b_sessions (vehicle) WHERE is_open;
CREATE TABLE b_events (id bigserial PRIMARY KEY, session uuid NOT NULL, at timestamptz NOT NULL,
                       event text NOT NULL, detail jsonb NOT NULL DEFAULT '{}');
CREATE TABLE b_publications (seq bigserial PRIMARY KEY, session uuid NOT NULL,
                             version integer NOT NULL, event_type text NOT NULL,
                             record jsonb NOT NULL, happened_at timestamptz NOT NULL);
CREATE TABLE b_outbox (id bigserial PRIMARY KEY, kind text NOT NULL, topic text,
                       payload bytea NOT NULL, ordering_key text,
                       available_at timestamptz NOT NULL DEFAULT now());
"""
RECORD = json.dumps(
    {"status": "charging", "contributor": "anonymous", "latitude": 45.0, "longitude": 1.0,
     "connector": "type2", "energy_kwh": 0.0, "license": "CC0-1.0", "version": 1}
)  # fmt: skip


async def _transition(conn: asyncpg.Connection, vid: int) -> None:
    async with conn.transaction():
        await conn.execute("UPDATE b_vehicles SET judge_at = now() WHERE id = $1", vid)
        await conn.fetch(
            "SELECT id FROM b_vehicles WHERE judge_at <= now() AND id = $1 FOR UPDATE SKIP LOCKED",
            vid,
        )
        v = await conn.fetchrow("SELECT * FROM b_vehicles WHERE id = $1 FOR UPDATE", vid)
        await conn.fetchrow("SELECT * FROM b_sessions WHERE vehicle = $1 AND is_open", vid)
        place = await conn.fetchval(
            "SELECT id FROM b_places WHERE cell = ANY($1::bytea[])", [vid.to_bytes(8, "big")]
        )
        sid = uuid.uuid4()
        await conn.execute(
            "INSERT INTO b_sessions (id, vehicle, place, is_open, status, share, started_at) "
            "VALUES ($1, $2, $3, false, 'charging', 'private', now())",
            sid, vid, place,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO b_events (session, at, event) VALUES ($1, now(), 'start')", sid
        )
        await conn.execute(
            "UPDATE b_sessions SET share = 'shared', updated_at = now() WHERE id = $1", sid
        )
        await conn.fetchrow(
            "UPDATE b_sessions SET version = version + 1 WHERE id = $1 RETURNING version", sid
        )
        await conn.fetchval(
            "INSERT INTO b_publications (session, version, event_type, record, happened_at) "
            "VALUES ($1, 1, 'session.started', $2::jsonb, now()) RETURNING seq",
            sid, RECORD,
        )  # fmt: skip
        await conn.fetchval(
            "INSERT INTO b_outbox (kind, topic, payload, ordering_key) "
            "VALUES ('mqtt', 'chargeshare/public/sessions/u/0/5', $1, $2) RETURNING id",
            RECORD.encode(), str(sid),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO b_events (session, at, event) VALUES ($1, now(), 'share')", sid
        )
        await conn.execute(
            "UPDATE b_vehicles SET phase = 'charging', judge_at = NULL WHERE id = $1", v["id"]
        )
        await conn.fetchval("SELECT count(*) FROM b_sessions WHERE vehicle = $1 AND false", vid)
        await conn.fetchval(
            "INSERT INTO b_outbox (kind, topic, payload) VALUES ('mqtt', 'status', $1) "
            "RETURNING id",
            b'{"enabled":true}',
        )


STATEMENTS_PER_TRANSITION = 14  # the statements of _transition, BEGIN and COMMIT excluded


@dataclass(frozen=True)
class TxnResult:
    connections: int
    transactions: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0


async def transaction_loop(
    database_url: str, *, connections: int, seconds: float, vehicles: int = 10000
) -> TxnResult:
    """Run charge-transition-shaped transactions flat out on `connections` connections."""
    setup = await asyncpg.connect(database_url)
    try:
        await setup.execute(SCHEMA)
        await setup.execute(
            "INSERT INTO b_vehicles SELECT g, '{}'::jsonb, 'idle', NULL "
            "FROM generate_series(1, $1) g",
            vehicles,
        )
        await setup.execute(
            "INSERT INTO b_places (vehicle, cell, answer) "
            "SELECT g, int8send(g::bigint), 'always' FROM generate_series(1, $1) g",
            vehicles,
        )
        await setup.execute("ANALYZE")
    finally:
        await setup.close()
    conns = [await asyncpg.connect(database_url) for _ in range(connections)]
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(k: int, conn: asyncpg.Connection) -> None:
        nonlocal done
        vid = k + 1
        while time.monotonic() < deadline:
            await _transition(conn, vid)
            done += 1
            vid = (vid + connections - 1) % vehicles + 1

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    return TxnResult(connections, done, time.monotonic() - t0)


# ---- the bare subscriber -------------------------------------------------------------------


async def subscribe(port: int, user: str, password: str, expect: int, idle_s: float = 2.0) -> None:
    """Count metric messages (acking each, nothing else) and print the result as JSON."""
    first = last = 0.0
    count = 0

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        nonlocal first, last, count
        last = time.monotonic()
        if count == 0:
            first = last
        count += 1
        return 0

    client = gmqtt.Client("bench-bare-subscriber", clean_session=True)
    client.set_auth_credentials(user, password)
    client.on_message = on_message
    await client.connect("127.0.0.1", port, version=MQTTv50, keepalive=60)
    client.subscribe([gmqtt.Subscription(f"$share/bare/{f}", qos=0) for f in topics.METRIC_FILTERS])
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    while count < expect:
        await asyncio.sleep(0.1)
        if count and time.monotonic() - last > idle_s:
            break
    await client.disconnect()
    print(json.dumps({"received": count, "first": first, "last": last}), flush=True)


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[0] != "subscribe":
        sys.exit("usage: python -m bench.baselines subscribe PORT USER PASSWORD EXPECT")
    asyncio.run(subscribe(int(argv[1]), argv[2], argv[3], int(argv[4])))


if __name__ == "__main__":
    main(sys.argv[1:])
