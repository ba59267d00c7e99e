"""`chargeshare partner ...` as the operator runs it, against a real broker and database."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from service import webhooks
from tests.integration.clikit import SECRET, Stack, cli

NOT_AUTHORIZED = 0x87


def _mqtt(port: int, username: str, password: str) -> tuple[int, int | None]:
    """Log in with MQTT 5 and try one QoS 1 publish; return (CONNACK, PUBACK) reason codes."""
    connack: list[int] = []
    puback: list[int] = []
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"p-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
    )
    c.username_pw_set(username, password)
    c.on_connect = lambda client, u, flags, rc, props: connack.append(rc.value)
    c.on_publish = lambda client, u, mid, rc, props: puback.append(rc.value)
    c.connect("127.0.0.1", port)
    try:
        for _ in range(20):  # each round ends on broker traffic or after 1 s: a liveness guard
            if connack:
                break
            c.loop(timeout=1.0)
        assert connack, "no CONNACK from the broker"
        if connack[0] != 0:
            return connack[0], None
        c.publish("chargeshare/public/sessions/u/1/0", b"{}", qos=1)
        for _ in range(20):
            if puback:
                break
            c.loop(timeout=1.0)
    finally:
        c.disconnect()
    return connack[0], puback[0] if puback else None


async def login(stack: Stack, username: str, password: str) -> tuple[int, int | None]:
    return await asyncio.to_thread(_mqtt, stack.broker.port, username, password)


async def partner_rows(database_url: str) -> list[dict[str, object]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM partners ORDER BY name")]
    finally:
        await conn.close()


async def test_add_prints_secrets_once_and_stores_only_hashes(stack: Stack) -> None:
    """`partner add --json` prints working credentials; the database holds none of them."""
    stack.extra["CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK"] = "1"
    status, out, err = await cli(
        stack, "partner", "add", "acme", "--webhook", "http://127.0.0.1:9/hook", "--json"
    )
    assert (status, err) == (0, "")
    creds = json.loads(out)
    assert set(creds) == {
        "name",
        "mqtt_username",
        "mqtt_password",
        "api_key",
        "webhook_secret",
        "license",
    }
    assert creds["name"] == "acme" and creds["mqtt_username"] == "partner-acme"
    assert creds["api_key"].startswith("cs_") and creds["webhook_secret"].startswith("whsec_")
    assert creds["license"] == "CC0-1.0"
    [row] = await partner_rows(stack.database_url)
    dump = repr(row).encode()
    for secret in (creds["mqtt_password"], creds["api_key"], creds["webhook_secret"]):
        assert secret.encode() not in dump
    assert creds["mqtt_password"] not in stack.files.passwd.read_text()
    assert row["license"] == "CC0-1.0" and row["license_accepted_at"] is not None
    assert row["webhook_enabled"] is True
    sealed = row["webhook_secret_enc"]
    assert isinstance(sealed, bytes)
    opened = webhooks.unseal(sealed, masters=[SECRET.encode()], partner="acme")
    assert opened == creds["webhook_secret"]
    # The partner logs in at once and may read public topics, never write them.
    assert "user partner-acme\ntopic read chargeshare/public/#\n" in stack.files.acl.read_text()
    assert await login(stack, "partner-acme", creds["mqtt_password"]) == (0, NOT_AUTHORIZED)


async def test_adding_an_existing_name_fails_and_changes_nothing(stack: Stack) -> None:
    """Adding a taken name exits 1 with a one-line reason and keeps the first credentials."""
    status, out, _ = await cli(stack, "partner", "add", "acme", "--json")
    assert status == 0
    first = json.loads(out)
    before_files, before_rows = stack.snapshot(), await partner_rows(stack.database_url)
    status, out, err = await cli(stack, "partner", "add", "acme", "--json")
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "already exists" in err
    assert stack.snapshot() == before_files
    assert await partner_rows(stack.database_url) == before_rows
    assert (await login(stack, "partner-acme", first["mqtt_password"]))[0] == 0


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["a/b"], "not allowed"),
        (["x" * 60], "not allowed"),
        (["web", "--webhook", "http://partner.example/hook"], "https"),
        (["web", "--webhook", "http://127.0.0.1:9/hook"], "ALLOW_HTTP_LOOPBACK"),
        (["web", "--webhook", "not a url"], "refused"),
    ],
)
async def test_bad_names_and_webhook_urls_are_refused(
    stack: Stack, args: list[str], reason: str
) -> None:
    """A name that cannot be an account, or a webhook that is not https, exits 1 storing nothing."""
    before = stack.snapshot()
    status, out, err = await cli(stack, "partner", "add", *args, "--json")
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and reason in err
    assert stack.snapshot() == before
    assert await partner_rows(stack.database_url) == []


async def test_webhook_without_location_secret_is_refused(stack: Stack) -> None:
    """A webhook secret cannot be stored without the secret that seals it: exit 1."""
    stack.extra["CHARGESHARE_LOCATION_SECRET"] = ""
    status, _, err = await cli(
        stack, "partner", "add", "acme", "--webhook", "https://partner.example/hook"
    )
    assert status == 1 and "CHARGESHARE_LOCATION_SECRET" in err
    assert await partner_rows(stack.database_url) == []


async def test_list_rotate_disable_remove(stack: Stack) -> None:
    """The registry lists partners, rotates keys, and disabling or removing ends MQTT access."""
    _, out, _ = await cli(stack, "partner", "add", "acme", "--webhook", "https://a.example/h")
    assert "These secrets are not stored" in out
    _, out, _ = await cli(stack, "partner", "add", "bolt", "--json")
    bolt = json.loads(out)
    status, out, _ = await cli(stack, "partner", "list", "--json")
    listed = json.loads(out)["partners"]
    assert status == 0 and [p["name"] for p in listed] == ["acme", "bolt"]
    assert listed[0]["webhook_url"] == "https://a.example/h" and listed[0]["enabled"] is True
    assert listed[1]["license"] == "CC0-1.0" and listed[1]["license_accepted_at"].endswith("Z")
    status, out, _ = await cli(stack, "partner", "list")
    assert status == 0 and "acme" in out and "bolt" in out

    status, out, _ = await cli(stack, "partner", "rotate-key", "bolt", "--json")
    rotated = json.loads(out)
    assert status == 0 and rotated["api_key"].startswith("cs_")
    assert rotated["api_key"] != bolt["api_key"]

    assert (await login(stack, "partner-bolt", bolt["mqtt_password"]))[0] == 0
    status, _, err = await cli(stack, "partner", "disable", "bolt")
    assert (status, err) == (0, "")
    assert (await login(stack, "partner-bolt", bolt["mqtt_password"]))[0] == NOT_AUTHORIZED
    _, out, _ = await cli(stack, "partner", "list", "--json")
    assert [p["enabled"] for p in json.loads(out)["partners"]] == [True, False]

    status, _, err = await cli(stack, "partner", "remove", "bolt")
    assert (status, err) == (0, "")
    assert [r["name"] for r in await partner_rows(stack.database_url)] == ["acme"]
    assert "partner-bolt" not in stack.files.passwd.read_text()
    assert "partner-bolt" not in stack.files.acl.read_text()
    for command in ("remove", "disable", "rotate-key", "deliveries"):
        status, _, err = await cli(stack, "partner", command, "bolt")
        assert status == 1 and "no partner named 'bolt'" in err, command


async def test_deliveries_show_recent_attempts_with_status(stack: Stack) -> None:
    """`partner deliveries NAME` lists the latest attempts first, with status and outcome."""
    await cli(stack, "partner", "add", "acme", "--webhook", "https://a.example/h")
    conn = await asyncpg.connect(stack.database_url)
    try:
        pid = await conn.fetchval("SELECT id FROM partners")
        for attempt, (status, error, at) in enumerate(
            [(500, "HTTP 500", "2026-03-01 12:00Z"), (200, None, "2026-03-01 12:01Z")], 1
        ):
            await conn.execute(
                "INSERT INTO deliveries (partner, outbox_id, webhook_id, attempt, status, error,"
                " at) VALUES ($1, 7, 'msg_s_1', $2, $3, $4, $5::text::timestamptz)",
                pid,
                attempt,
                status,
                error,
                at,
            )
    finally:
        await conn.close()
    status, out, _ = await cli(stack, "partner", "deliveries", "acme", "--json")
    body = json.loads(out)
    assert status == 0 and body["name"] == "acme"
    assert [(d["attempt"], d["status"], d["outcome"]) for d in body["deliveries"]] == [
        (2, 200, "delivered"),
        (1, 500, "will retry"),
    ]
    assert body["deliveries"][0]["at"] == "2026-03-01T12:01:00Z"
    status, out, _ = await cli(stack, "partner", "deliveries", "acme")
    assert status == 0 and "msg_s_1" in out and "delivered" in out
