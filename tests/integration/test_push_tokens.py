"""The push token registry and the push rows it puts in the outbox, against real Postgres."""

from __future__ import annotations

import json
import secrets

import asyncpg

from service import wire
from service.adapters import push_tokens


async def make_vehicle(db: asyncpg.Connection, owner: str | None = None) -> int:
    """Insert an owner and a vehicle; return the vehicle's key."""
    owner = owner or f"owner-{secrets.token_hex(3)}"
    await db.execute("INSERT INTO owners (name) VALUES ($1) ON CONFLICT DO NOTHING", owner)
    pk: int = await db.fetchval(
        "INSERT INTO vehicles (owner, vehicle_id, salt, handle) VALUES ($1, $2, $3, $4)"
        " RETURNING id",
        owner,
        f"car-{secrets.token_hex(3)}",
        secrets.token_bytes(16),
        "anon-test",
    )
    return pk


def reg(
    app_id: str, token: str | None, platform: str = "fcm", sandbox: bool = False
) -> wire.PushRegistration:
    return wire.PushRegistration(app_id=app_id, platform=platform, token=token, sandbox=sandbox)  # type: ignore[arg-type]


async def test_register_records_each_app_of_a_vehicle(db: asyncpg.Connection) -> None:
    """Each app of a vehicle gets its own active registration with its platform and sandbox flag."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-a"))
    await push_tokens.register(db, v, reg("tablet", "ab" * 32, "apns", sandbox=True))
    regs = await push_tokens.registrations(db, v)
    assert [(r.app_id, r.platform, r.token, r.sandbox, r.active) for r in regs] == [
        ("phone", "fcm", "tok-a", False, True),
        ("tablet", "apns", "ab" * 32, True, True),
    ]


async def test_new_token_replaces_and_reactivates(db: asyncpg.Connection) -> None:
    """A new token for the same app replaces the old one and makes the registration active again."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-old"))
    await push_tokens.register(db, v, reg("phone", None))
    assert [r.active for r in await push_tokens.registrations(db, v)] == [False]
    await push_tokens.register(db, v, reg("phone", "tok-new"))
    [r] = await push_tokens.registrations(db, v)
    assert (r.token, r.active) == ("tok-new", True)


async def test_null_token_unregisters_only_that_app(db: asyncpg.Connection) -> None:
    """A null token deactivates that app's registration and leaves the vehicle's other apps."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-a"))
    await push_tokens.register(db, v, reg("watch", "tok-b"))
    await push_tokens.register(db, v, reg("phone", None))
    assert {r.app_id: r.active for r in await push_tokens.registrations(db, v)} == {
        "phone": False,
        "watch": True,
    }


async def test_same_token_under_new_app_id_is_pushed_once(db: asyncpg.Connection) -> None:
    """A token registered again under a new app id retires the old one: one phone, one push."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("install-1", "tok-same"))
    await push_tokens.register(db, v, reg("install-2", "tok-same"))
    n = await push_tokens.enqueue_question(db, v, "req-1", "share", "Share?")
    assert n == 1
    assert {r.app_id: r.active for r in await push_tokens.registrations(db, v)} == {
        "install-1": False,
        "install-2": True,
    }


async def test_enqueue_question_queues_one_row_per_active_token(db: asyncpg.Connection) -> None:
    """A question queues one push row per active token of its vehicle, none for other vehicles."""
    v = await make_vehicle(db)
    other = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-a"))
    await push_tokens.register(db, v, reg("tablet", "ab" * 32, "apns"))
    await push_tokens.register(db, v, reg("old", "tok-c"))
    await push_tokens.register(db, v, reg("old", None))
    await push_tokens.register(db, other, reg("phone", "tok-x"))
    n = await push_tokens.enqueue_question(db, v, "req-7", "abort_reason", "What happened?")
    rows = await db.fetch("SELECT kind, target, payload FROM outbox ORDER BY id")
    active = {r.id for r in await push_tokens.registrations(db, v) if r.active}
    assert n == 2
    assert {r["target"] for r in rows} == active
    assert {r["kind"] for r in rows} == {"push"}
    assert [json.loads(r["payload"]) for r in rows] == [
        {"request_id": "req-7", "kind": "abort_reason", "text": "What happened?"}
    ] * 2


async def test_enqueue_question_is_part_of_the_callers_transaction(db: asyncpg.Connection) -> None:
    """Push rows queued in a transaction that rolls back are never sent."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-a"))
    tr = db.transaction()
    await tr.start()
    assert await push_tokens.enqueue_question(db, v, "req-1", "share", "Share?") == 1
    await tr.rollback()
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_enqueue_question_without_tokens_queues_nothing(db: asyncpg.Connection) -> None:
    """A vehicle with no app registered gets no push rows and the count says so."""
    v = await make_vehicle(db)
    assert await push_tokens.enqueue_question(db, v, "req-1", "share", "Share?") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_deactivate_spares_a_token_replaced_meanwhile(db: asyncpg.Connection) -> None:
    """A refusal of an old token does not deactivate the fresh token the app registered since."""
    v = await make_vehicle(db)
    await push_tokens.register(db, v, reg("phone", "tok-old"))
    [r] = await push_tokens.registrations(db, v)
    await push_tokens.register(db, v, reg("phone", "tok-new"))
    assert not await push_tokens.deactivate(db, r.id, "tok-old")
    assert await push_tokens.deactivate(db, r.id, "tok-new")
    [after] = await push_tokens.registrations(db, v)
    assert (after.token, after.active) == ("tok-new", False)
