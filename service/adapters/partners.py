"""Partner accounts in Postgres: sign-up, keys, webhooks, the delivery log, and the API key check.

What authenticates a partner (API key, MQTT password) is stored only as a hash: the API key as
SHA-256 plus a short prefix to find the row, the MQTT password by mosquitto_passwd. The webhook
secret is sealed (service/webhooks.py) because the service signs with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from service import errors, topics, webhooks
from service.adapters import accounts
from service.config import Settings

KEY_PREFIX = "cs_"
_LOOKUP_CHARS = 8  # random characters of the key kept in clear to find its row


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a partner is shown once, at sign-up."""

    name: str
    mqtt_username: str
    mqtt_password: str
    api_key: str
    webhook_secret: str | None
    license: str


@dataclass(frozen=True, slots=True)
class Partner:
    id: int
    name: str
    mqtt_username: str
    api_key_prefix: str
    webhook_url: str | None
    webhook_enabled: bool
    webhook_disabled_reason: str | None
    enabled: bool
    license: str
    license_accepted_at: datetime
    created_at: datetime
    pending: int


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    id: int
    name: str
    url: str
    sealed_secret: bytes


def new_api_key() -> str:
    """Return a fresh API key `cs_<random>`."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(api_key: str) -> str:
    """Return the part of a key stored in clear to find its row."""
    return api_key[: len(KEY_PREFIX) + _LOOKUP_CHARS]


def key_hash(api_key: str) -> bytes:
    """Return the stored hash of an API key."""
    return hashlib.sha256(api_key.encode()).digest()


def mqtt_username(name: str) -> str:
    """Return the broker account of a partner."""
    return f"partner-{name}"


def check_name(name: str) -> None:
    """Raise BrokerAdminError if `name` cannot be a partner."""
    if not topics.valid_name(name) or not topics.valid_name(mqtt_username(name)):
        raise errors.BrokerAdminError(
            f"partner name {name!r} is not allowed: use 1-56 of A-Z a-z 0-9 _ . @ -"
        )


# ---- registry ----------------------------------------------------------------------------------

INSERT = """
INSERT INTO partners (name, mqtt_username, api_key_hash, api_key_prefix, webhook_url,
                      webhook_secret_enc, webhook_enabled, license)
VALUES ($1, $2, $3, $4, $5::text, $6, $5::text IS NOT NULL, $7)
RETURNING id
"""
SELECT_ALL = """
SELECT p.id, p.name, p.mqtt_username, p.api_key_prefix, p.webhook_url, p.webhook_enabled,
       p.webhook_disabled_reason, p.enabled, p.license, p.license_accepted_at, p.created_at,
       (SELECT count(*) FROM outbox o WHERE o.kind = 'webhook' AND o.target = p.id) AS pending
FROM partners p ORDER BY p.name
"""
ROTATE = """
UPDATE partners
SET api_key_hash_previous = CASE WHEN $4 > 0 THEN api_key_hash END,
    api_key_prefix_previous = CASE WHEN $4 > 0 THEN api_key_prefix END,
    api_key_previous_until = CASE WHEN $4 > 0 THEN now() + make_interval(secs => $4) END,
    api_key_hash = $2, api_key_prefix = $3
WHERE name = $1
RETURNING id
"""
DISABLE = "UPDATE partners SET enabled = false WHERE name = $1 RETURNING mqtt_username"
DELETE = "DELETE FROM partners WHERE name = $1 RETURNING id, mqtt_username"
DELETE_PENDING = "DELETE FROM outbox WHERE kind = 'webhook' AND target = $1"
SELECT_DELIVERIES = """
SELECT d.at, d.outbox_id, d.webhook_id, d.attempt, d.status, d.error
FROM deliveries d JOIN partners p ON p.id = d.partner
WHERE p.name = $1
ORDER BY d.at DESC, d.id DESC
LIMIT $2
"""


async def add(
    conn: asyncpg.Connection, settings: Settings, name: str, webhook_url: str | None = None
) -> Credentials:
    """Sign a partner up (accepting the configured licence); raise AlreadyExists if taken."""
    check_name(name)
    secret: str | None = None
    sealed: bytes | None = None
    if webhook_url is not None:
        webhooks.validate_url(webhook_url, allow_http_loopback=settings.webhook_allow_http_loopback)
        secret = webhooks.new_secret()
        sealed = webhooks.seal(secret, master=settings.require_secret(), partner=name)
    files = accounts.broker_files(settings)
    user = mqtt_username(name)
    password = secrets.token_urlsafe(24)
    api_key = new_api_key()
    written = False
    try:
        async with conn.transaction():
            try:
                await conn.fetchval(
                    INSERT,
                    name,
                    user,
                    key_hash(api_key),
                    key_prefix(api_key),
                    webhook_url,
                    sealed,
                    settings.license,
                )
            except asyncpg.UniqueViolationError:
                raise errors.AlreadyExists("partner", name) from None
            files.set_password(user, password)
            written = True
            await accounts.sync_broker(conn, settings)
    except BaseException:
        if written:  # the row went with the transaction: take the login back too
            files.remove_user(user)
            with contextlib.suppress(Exception):
                await accounts.sync_broker(conn, settings)
        raise
    return Credentials(name, user, password, api_key, secret, settings.license)


async def list_all(conn: asyncpg.Connection) -> list[Partner]:
    """Return every partner, by name."""
    return [Partner(**dict(r)) for r in await conn.fetch(SELECT_ALL)]


async def rotate_key(conn: asyncpg.Connection, name: str, *, grace_s: int = 0) -> str:
    """Issue a new API key; the old one keeps working for `grace_s` seconds (0: stops now)."""
    api_key = new_api_key()
    found = await conn.fetchval(ROTATE, name, key_hash(api_key), key_prefix(api_key), grace_s)
    if found is None:
        raise errors.NotFound("partner", name)
    return api_key


async def disable(conn: asyncpg.Connection, settings: Settings, name: str) -> None:
    """Stop a partner's API key, webhooks and broker login, keeping its row and history."""
    files = accounts.broker_files(settings)
    async with conn.transaction():
        user = await conn.fetchval(DISABLE, name)
        if user is None:
            raise errors.NotFound("partner", name)
        files.remove_user(user)
        await accounts.sync_broker(conn, settings)


async def remove(conn: asyncpg.Connection, settings: Settings, name: str) -> None:
    """Delete a partner, its pending webhooks, its delivery log and its broker login."""
    files = accounts.broker_files(settings)
    async with conn.transaction():
        row = await conn.fetchrow(DELETE, name)
        if row is None:
            raise errors.NotFound("partner", name)
        await conn.execute(DELETE_PENDING, row["id"])
        files.remove_user(row["mqtt_username"])
        await accounts.sync_broker(conn, settings)


async def deliveries(conn: asyncpg.Connection, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """Return a partner's most recent webhook attempts, newest first."""
    if await conn.fetchval("SELECT 1 FROM partners WHERE name = $1", name) is None:
        raise errors.NotFound("partner", name)
    return [
        {**dict(r), "outcome": _outcome(r["status"], r["error"])}
        for r in await conn.fetch(SELECT_DELIVERIES, name, limit)
    ]


def _outcome(status: int | None, error: str | None) -> str:
    if status is not None and 200 <= status < 300:
        return "delivered"
    if status == 410:
        return "gone"
    if error is not None and error.startswith("gave up"):
        return "gave up"
    return "will retry"


# ---- the API key check -------------------------------------------------------------------------

CANDIDATES = """
SELECT id, enabled, api_key_hash, api_key_hash_previous,
       coalesce(api_key_previous_until > now(), false) AS previous_valid
FROM partners
WHERE api_key_prefix = $1 OR api_key_prefix_previous = $1
"""


async def authenticate(conn: asyncpg.Connection, api_key: str) -> int | None:
    """Return the id of the enabled partner holding this current (or still valid) key, or None."""
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
        return None
    digest = key_hash(api_key)
    found: int | None = None
    for r in await conn.fetch(CANDIDATES, key_prefix(api_key)):
        # Constant-time comparisons, each made whatever the previous ones said.
        current = hmac.compare_digest(digest, r["api_key_hash"])
        previous = r["api_key_hash_previous"] is not None and hmac.compare_digest(
            digest, r["api_key_hash_previous"]
        )
        if r["enabled"] and (current or (previous and r["previous_valid"])):
            found = r["id"]
    return found


# ---- webhook delivery --------------------------------------------------------------------------

SELECT_TARGET = """
SELECT id, name, webhook_url AS url, webhook_secret_enc AS sealed_secret
FROM partners
WHERE id = $1 AND enabled AND webhook_enabled AND webhook_url IS NOT NULL
"""
ENABLED_TARGETS = """
SELECT id FROM partners WHERE enabled AND webhook_enabled AND webhook_url IS NOT NULL
"""
DISABLE_WEBHOOK = """
UPDATE partners SET webhook_enabled = false, webhook_disabled_at = now(),
                    webhook_disabled_reason = $2
WHERE id = $1
"""
INSERT_DELIVERY = """
INSERT INTO deliveries (partner, outbox_id, webhook_id, attempt, status, error)
VALUES ($1, $2, $3, (SELECT count(*) + 1 FROM deliveries WHERE outbox_id = $2), $4, $5)
"""


async def webhook_target(conn: asyncpg.Connection, partner_id: int) -> WebhookTarget | None:
    """Return where to deliver a partner's webhooks, or None if it takes none now."""
    r = await conn.fetchrow(SELECT_TARGET, partner_id)
    return None if r is None else WebhookTarget(**dict(r))


async def webhook_partner_ids(conn: asyncpg.Connection) -> list[int]:
    """Return the ids of the partners that take webhooks now."""
    return [r["id"] for r in await conn.fetch(ENABLED_TARGETS)]


async def disable_webhook(conn: asyncpg.Connection, partner_id: int, reason: str) -> None:
    """Stop delivering webhooks to a partner (its endpoint said it is gone)."""
    await conn.execute(DISABLE_WEBHOOK, partner_id, reason)


async def record_delivery(
    conn: asyncpg.Connection,
    *,
    partner_id: int,
    outbox_id: int,
    webhook_id: str,
    status: int | None,
    error: str | None,
) -> None:
    """Log one webhook attempt (numbered from 1 per outbox row)."""
    await conn.execute(INSERT_DELIVERY, partner_id, outbox_id, webhook_id, status, error)
