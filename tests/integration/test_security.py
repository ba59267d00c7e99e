"""Security: the broker's access matrix, size limits, hostile input, and secrets kept as hashes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import app, handler, localstack, observability, topics, wire
from service.config import Settings
from tests.conftest import SERVICE_PASSWORD, SERVICE_USER, BrokerHandle
from tests.e2e import steps
from tests.e2e.conftest import service_settings
from tests.integration.test_broker_acl import NOT_AUTHORIZED, Client, accepted
from tests.mqttprobe import Probe

PACKET_TOO_LARGE = 149  # 0x95, the reason code mosquitto puts in the PUBACK
BROKER_LIMIT = 65536  # broker/conf.d/chargeshare.conf message_size_limit
GENERIC_REASON = "the service could not handle it"  # the handler's answer to its own bugs


# ---- the access matrix (DESIGN §1) -------------------------------------------------------------


@dataclass
class Cast:
    """The accounts of one matrix run: two owners, a partner and the service."""

    a: tuple[str, str]
    b: tuple[str, str]
    partner: tuple[str, str]

    def login(self, actor: str) -> tuple[str | None, str | None]:
        return {
            "owner_a": self.a,
            "owner_b": self.b,
            "partner": self.partner,
            "service": (SERVICE_USER, SERVICE_PASSWORD),
            "anonymous": (None, None),
            "wrong_password": (self.a[0], self.a[1] + "-wrong"),
        }[actor]


REQUEST_ID = "0123456789abcdef0123456789abcdef"

# topic name -> (template, who may write it, who may read it); A and B are the owners' names.
MATRIX: dict[str, tuple[str, set[str], set[str]]] = {
    "A metric": ("ovms/{A}/car/metric/v/b/soc", {"owner_a", "service"}, {"owner_a", "service"}),
    "A event": ("ovms/{A}/car/event", {"owner_a", "service"}, {"owner_a", "service"}),
    "A grid log": (
        "ovms/{A}/car/notify/data/log/grid/7/-30", {"owner_a", "service"}, {"owner_a", "service"}
    ),
    "A optin": ("ovms/{A}/car/chargeshare/optin", {"owner_a", "service"}, {"owner_a", "service"}),
    "A push": ("ovms/{A}/car/chargeshare/push", {"owner_a", "service"}, {"owner_a", "service"}),
    "A decision": (
        "ovms/{A}/car/chargeshare/decision/" + REQUEST_ID, {"owner_a", "service"},
        {"owner_a", "service"},
    ),
    "A request": (
        "ovms/{A}/car/chargeshare/request/" + REQUEST_ID, {"service"}, {"owner_a", "service"}
    ),
    "A status": ("ovms/{A}/car/chargeshare/status", {"service"}, {"owner_a", "service"}),
    "A error": ("ovms/{A}/car/chargeshare/error", {"service"}, {"owner_a", "service"}),
    "A unknown": ("ovms/{A}/car/whatever", {"service"}, {"owner_a", "service"}),
    "B metric": ("ovms/{B}/car/metric/v/b/soc", {"owner_b", "service"}, {"owner_b", "service"}),
    "B status": ("ovms/{B}/car/chargeshare/status", {"service"}, {"owner_b", "service"}),
    "public": ("chargeshare/public/sessions/u/1/0", {"service"}, {"partner", "service"}),
    "outside": ("somewhere/else", {"service"}, {"service"}),
}  # fmt: skip
READERS = ("owner_a", "owner_b", "partner", "service")


@pytest.fixture
def cast(broker: BrokerHandle, new_owner: Callable[[], tuple[str, str]]) -> Cast:
    """Two fresh owners and a fresh partner on the test broker."""
    name, password = f"partner-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    broker.add_partner(name, password)
    return Cast(new_owner(), new_owner(), (name, password))


@pytest.fixture
def connect(broker: BrokerHandle) -> Iterator[Callable[[str | None, str | None], Client]]:
    """Open MQTT 5 connections to the test broker; close them after the test."""
    opened: list[Client] = []

    def make(username: str | None, password: str | None) -> Client:
        opened.append(Client(broker.port, username, password))
        return opened[-1]

    yield make
    for c in opened:
        c.close()


def _topic(cast: Cast, template: str) -> str:
    return template.format(A=cast.a[0], B=cast.b[0])


@pytest.mark.parametrize("actor", ["anonymous", "wrong_password"])
def test_matrix_logins_without_valid_credentials_are_refused(
    actor: str, cast: Cast, connect: Callable[[str | None, str | None], Client]
) -> None:
    """Anonymous clients and wrong passwords get CONNACK 0x87 and can do nothing."""
    client = connect(*cast.login(actor))
    assert client.connack == NOT_AUTHORIZED and not client.connected


@pytest.mark.parametrize("actor", READERS)
def test_matrix_writes(
    actor: str, cast: Cast, connect: Callable[[str | None, str | None], Client]
) -> None:
    """Each account may publish exactly the topics DESIGN §1 gives it (others: PUBACK 0x87)."""
    client = connect(*cast.login(actor))
    got, want = {}, {}
    for name, (template, writers, _) in MATRIX.items():
        reason = client.publish(_topic(cast, template), b"matrix")
        got[name] = "allowed" if accepted(reason) else f"refused {reason:#x}"
        want[name] = "allowed" if actor in writers else f"refused {NOT_AUTHORIZED:#x}"
    assert got == want


@pytest.mark.parametrize("actor", READERS)
def test_matrix_reads(
    actor: str, cast: Cast, connect: Callable[[str | None, str | None], Client]
) -> None:
    """Subscribed to everything, each account receives exactly the topics it may read."""
    reader = connect(*cast.login(actor))
    reader.subscribe("#")
    for template, _, _ in MATRIX.values():
        reader.subscribe(_topic(cast, template))  # explicit filters are filtered too
    # The marker is the last message, on a topic this reader may read: all before it were routed.
    marker = {
        "owner_a": f"ovms/{cast.a[0]}/car/metric/marker",
        "owner_b": f"ovms/{cast.b[0]}/car/metric/marker",
        "partner": "chargeshare/public/marker",
        "service": "marker",
    }[actor]
    service = connect(SERVICE_USER, SERVICE_PASSWORD)
    for template, _, _ in MATRIX.values():
        assert accepted(service.publish(_topic(cast, template), b"matrix"))
    assert accepted(service.publish(marker, b"end"))
    received = {t for t, _ in reader.wait_for(marker)} - {marker}
    by_topic = {_topic(cast, template): name for name, (template, _, _) in MATRIX.items()}
    got = {by_topic[t] for t in received if t in by_topic}
    want = {name for name, (_, _, readers) in MATRIX.items() if actor in readers}
    assert got == want


# ---- message sizes -----------------------------------------------------------------------------


async def test_oversized_messages_are_refused_and_the_service_goes_on(
    broker: BrokerHandle,
    database_url: str,
    owner: tuple[str, str],
    connect: Callable[[str | None, str | None], Client],
    probe: Callable[[str, str], Probe],
    db: asyncpg.Connection,
) -> None:
    """The broker refuses > 64 KiB (PUBACK 0x95); the service refuses > 16 KiB; both go on."""
    name, password = owner
    phone = probe(name, password)
    phone.subscribe(f"ovms/{name}/+/chargeshare/#")
    car = connect(name, password)
    watcher = connect(SERVICE_USER, SERVICE_PASSWORD)
    watcher.subscribe(f"ovms/{name}/#")
    async with app.running(service_settings(broker, database_url), api_enabled=False):
        huge = json.dumps({"enabled": True, "nickname": "x" * BROKER_LIMIT}).encode()
        # paho takes PUBACK 0x95 for a protocol error, so the broker's own client sends this one.
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-p", str(broker.port), "-u", name, "-P", password, "-V", "5",
            "-q", "1", "-t", topics.optin(name, "car"), "-s", "-d",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await pub.communicate(huge)
        assert f"received PUBACK (Mid: 1, RC:{PACKET_TOO_LARGE})" in out.decode(), out.decode()
        # Over the service's own limit but within the broker's: a clear error for the owner.
        big = json.dumps({"enabled": True, "nickname": "x" * (wire.MAX_PAYLOAD + 10)}).encode()
        assert accepted(await asyncio.to_thread(car.publish, topics.optin(name, "car"), big))
        err = steps.body((await phone.wait_for(steps.error("invalid_payload")))[0])
        assert f"longer than {wire.MAX_PAYLOAD} bytes" in str(err["error"])
        # And the same connection and service carry on with a normal message.
        steps.opt_in(phone, name, "car", nickname="Small")
        await phone.wait_for(steps.status(enabled=True, handle="Small"))
    sizes = [len(p) for t, p in watcher.messages if t == topics.optin(name, "car")]
    assert max(sizes) < BROKER_LIMIT  # the refused message never reached any subscriber
    assert await db.fetchval("SELECT nickname FROM vehicles WHERE owner = $1", name) == "Small"


# ---- hostile input at the handler --------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE sessions; --",
    '" OR 1=1 --',
    "$1",
    "'); DELETE FROM owners WHERE ('1'='1",
    "../../../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "/dev/zero",
    "%00%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",
    "\ufeff",
    "😀" * 60,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ ᚠᛇᚻ",
    "\r\n\t",
    "1e309",
    "-1e309",
    "NaN",
    "Infinity",
    "9" * 400,
    "-0",
    "0x10",
    "1_000",
    " 42 ",
    "$(reboot)",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    '{"$ne": null}',
    "x" * 5000,
]
hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=200))
huge_number = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**309]),
)
json_value = st.one_of(
    st.none(), st.booleans(), huge_number, hostile_text, st.just([]), st.just({})
)
# Valid names as well as hostile ones, so that many messages get past the topic check.
name_segment = st.one_of(st.sampled_from(["car", "o.k", "a@b", "-", "..", "x" * 64]), hostile_text)
METRIC_NAMES = [
    "v/c/state", "v/c/substate", "v/c/charging", "v/c/kwh", "v/c/power", "v/c/type",
    "v/b/soc", "v/p/latitude", "v/p/longitude", "v/c/voltage", "m/time/utc",
]  # fmt: skip


def _json(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def hostile_message(draw: st.DrawFn, owner: str, request_ids: list[str]) -> tuple[str, bytes]:
    """Draw one inbound (topic, payload) with hostile strings in topic segments and fields."""
    vehicle = draw(st.one_of(st.sampled_from(["car", "car2"]), name_segment))
    who = draw(st.one_of(st.just(owner), name_segment))
    base = f"ovms/{who}/{vehicle}"
    kind = draw(
        st.sampled_from(["metric", "event", "notify", "grid", "optin", "push", "decision", "raw"])
    )
    text = draw(hostile_text)
    if kind == "metric":
        metric = draw(st.one_of(st.sampled_from(METRIC_NAMES), name_segment))
        return f"{base}/metric/{metric}", text.encode("utf-8", "surrogatepass")
    if kind == "event":
        return f"{base}/event", text.encode("utf-8", "surrogatepass")
    if kind == "notify":
        return f"{base}/notify/info/{draw(name_segment)}", text.encode("utf-8", "surrogatepass")
    if kind == "grid":
        entry = draw(st.one_of(st.integers(0, 10**12).map(str), name_segment))
        age = draw(st.one_of(st.integers(-(10**9), 10**6).map(str), name_segment))
        fields = draw(st.lists(hostile_text, min_size=40, max_size=47))
        version = draw(st.sampled_from(["1", "2", "99", "-1"]))
        record = ",".join(["*-LOG-Grid", version, str(draw(huge_number)), *fields])
        return f"{base}/notify/data/log/grid/{entry}/{age}", record.encode("utf-8", "surrogatepass")
    if kind == "optin":
        body = {"enabled": draw(st.one_of(st.booleans(), json_value)), "nickname": text}
        return f"{base}/chargeshare/optin", _json(body)
    if kind == "push":
        body = {
            "app_id": draw(hostile_text),
            "platform": draw(st.one_of(st.sampled_from(["fcm", "apns"]), hostile_text)),
            "token": text,
            "sandbox": draw(json_value),
        }
        return f"{base}/chargeshare/push", _json(body)
    if kind == "decision":
        rid = draw(st.one_of(st.sampled_from(request_ids), st.just(uuid.uuid4().hex), name_segment))
        body = {
            "choice": draw(st.one_of(st.sampled_from([*wire.SHARE_CHOICES]), hostile_text)),
            "charge_point": draw(hostile_text),
            "comment": text,
            "ocm_id": draw(huge_number),
        }
        return f"{base}/chargeshare/decision/{rid}", _json(body)
    raw_topic = draw(st.text(max_size=300))
    return raw_topic, draw(st.binary(max_size=300))


SEED_OWNER = "INSERT INTO owners (name) VALUES ($1)"
SEED_VEHICLE = """
INSERT INTO vehicles (owner, vehicle_id, salt, handle, opted_in) VALUES ($1, $2, $3, $4, true)
RETURNING id
"""
SEED_SESSION = """
INSERT INTO sessions (id, vehicle, status, share, source, started_at, latitude, longitude, region)
VALUES ($1, $2, 'charging', 'asking', 'metrics', now(), 51.3023, 0.40145, 'u10')
"""
SEED_QUESTION = """
INSERT INTO questions (request_id, session, vehicle, kind, created_at, expires_at)
VALUES ($1, $2, $3, 'share', now(), now() + interval '1 day')
"""
TABLES = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
NEW_ERRORS = (
    "SELECT id, topic, payload FROM outbox WHERE id > $1 AND topic LIKE '%/chargeshare/error'"
)


@dataclass
class Bench:
    """A handler on a seeded database: one owner, vehicles with pending questions."""

    pool: asyncpg.Pool
    handler: handler.Handler
    owner: str
    request_ids: list[str]
    tables: int


async def _bench(database_url: str) -> Bench:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    owner = "jimbo"
    ids = []
    async with pool.acquire() as conn:
        await conn.execute(SEED_OWNER, owner)
        for vid in ("car", "car2"):
            pk = await conn.fetchval(SEED_VEHICLE, owner, vid, os.urandom(16), "anon-" + vid)
            session, rid = uuid.uuid4(), uuid.uuid4().hex
            await conn.execute(SEED_SESSION, session, pk)
            await conn.execute(SEED_QUESTION, rid, session, pk)
            ids.append(rid)
        tables = await conn.fetchval(TABLES)
    s = service_settings_for_db(database_url)
    return Bench(pool, handler.Handler(pool, s), owner, ids, tables)


def service_settings_for_db(database_url: str) -> Settings:
    return Settings(database_url=database_url, location_secret=b"test-location-secret-0123456789")


def _rejections() -> float:
    return sum(
        s.value
        for m in observability.REJECTED.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


async def _check(b: Bench, topic: str, payload: bytes) -> bool:
    """Handle one hostile message; check it was refused clearly or stored as given."""
    async with b.pool.acquire() as conn:
        last = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
    rejected_before = _rejections()
    await b.handler.handle(topic, payload)  # never raises
    rejected = _rejections() - rejected_before
    async with b.pool.acquire() as conn:
        errors = await conn.fetch(NEW_ERRORS, last)
        assert await conn.fetchval(TABLES) == b.tables
        assert await conn.fetchval("SELECT count(*) FROM owners WHERE name = $1", b.owner) == 1
        assert await conn.fetchval("SELECT count(*) FROM questions") == len(b.request_ids)
        parts = topic.split("/")
        addressable = (
            len(parts) >= 3
            and parts[0] == topics.ROOT
            and topics.valid_name(parts[1])
            and topics.valid_name(parts[2])
        )
        if rejected and addressable:
            assert len(errors) == 1, (topic, payload[:200])
        else:
            assert errors == [], (topic, payload[:200])
        for e in errors:
            assert e["topic"] == topics.error(parts[1], parts[2])
            body = json.loads(e["payload"])
            assert body["code"] in get_args(wire.ErrorCode)
            assert body["topic"] == topic[:512]
            assert body["error"] and body["error"] != GENERIC_REASON, (topic, payload[:300], body)
        if not rejected and addressable and parts[3:] == ["chargeshare", "optin"]:
            sent = json.loads(payload)
            if sent["enabled"] is True:  # accepted: the nickname is stored exactly as sent
                stored = await conn.fetchval(
                    "SELECT nickname FROM vehicles WHERE owner = $1 AND vehicle_id = $2",
                    parts[1], parts[2],
                )  # fmt: skip
                assert stored == sent["nickname"]
        if not rejected and addressable and parts[3:] == ["chargeshare", "push"]:
            sent = json.loads(payload)
            if sent["token"] is not None:
                stored = await conn.fetchval(
                    "SELECT token FROM push_tokens WHERE app_id = $1 ORDER BY updated_at DESC",
                    sent["app_id"],
                )
                assert stored == sent["token"]
    return bool(rejected)


def test_hostile_input_is_refused_clearly_or_stored_as_data(database_url: str) -> None:
    """SQL, paths, odd unicode and huge numbers in any topic or field never break the service."""
    loop = asyncio.new_event_loop()
    bench = loop.run_until_complete(_bench(database_url))
    outcomes: list[tuple[str, bool]] = []
    try:

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(message=hostile_message(bench.owner, bench.request_ids))
        def check(message: tuple[str, bytes]) -> None:
            rejected = loop.run_until_complete(_check(bench, *message))
            parts = message[0].split("/")
            outcomes.append((parts[3] if len(parts) > 3 else "", rejected))

        check()
        # The run reached the handler's inner paths: both refusals and accepted messages.
        assert any(r for _, r in outcomes) and not all(r for _, r in outcomes)
        assert {"metric", "chargeshare", "notify"} <= {k for k, _ in outcomes}
    finally:
        loop.run_until_complete(bench.pool.close())
        loop.close()


@pytest.mark.parametrize("text", HOSTILE)
async def test_each_hostile_string_in_each_text_field(database_url: str, text: str) -> None:
    """Every listed hostile string, in every text field of every app message, is handled."""
    bench = await _bench(database_url)
    o, rid = bench.owner, bench.request_ids[0]
    messages = [
        (topics.metric(o, "car", "v.c.state"), text.encode()),
        (topics.metric(o, "car", "v.c.kwh"), text.encode()),
        (topics.metric(o, "car", "v.p.latitude"), text.encode()),
        (topics.optin(o, "car"), _json({"enabled": True, "nickname": text})),
        (topics.push(o, "car"), _json({"app_id": text, "platform": "fcm", "token": text})),
        (topics.push(o, "car"), _json({"app_id": "a", "platform": text, "token": "t"})),
        (topics.decision(o, "car", rid), _json({"choice": text})),
        (topics.decision(o, "car2", bench.request_ids[1]),
         _json({"choice": "once", "charge_point": text, "comment": text})),
        (topics.grid_log(o, "car", 1, -5), f"*-LOG-Grid,2,86400,{text}".encode()),
        (f"ovms/{o}/car/chargeshare/decision/{text}", b"{}"),
        (f"ovms/{o}/{text}/chargeshare/optin", b"{}"),
    ]  # fmt: skip
    try:
        for topic, payload in messages:
            await _check(bench, topic, payload)
    finally:
        await bench.pool.close()


# ---- secrets stored only as hashes -------------------------------------------------------------

CHARGESHARE = Path(sys.executable).parent / "chargeshare"


def _cli(env: dict[str, str], *args: str) -> dict[str, str]:
    done = subprocess.run(
        [str(CHARGESHARE), *args, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, str] = json.loads(done.stdout)
    return out


def _forms(secret: str) -> list[str]:
    """The secret and ways it could sit in a dump: its body after a prefix, hex of its bytes."""
    forms = [secret, secret.encode().hex()]
    for sep in ("_", "-"):
        _, _, body = secret.partition(sep)
        if body and len(body) >= 16:
            forms += [body, body.encode().hex()]
    return forms


def test_passwords_and_api_keys_are_stored_only_as_hashes(
    postgres: localstack.Database, database_url: str, tmp_path: Path
) -> None:
    """After owner add and partner add, no secret appears in a database dump or the passwd file."""
    broker_dir = tmp_path / "broker"
    env = {
        **os.environ,
        "CHARGESHARE_DATABASE_URL": database_url,
        "CHARGESHARE_BROKER_DIR": str(broker_dir),
        "CHARGESHARE_LOCATION_SECRET": "test-location-secret-0123456789",
        "CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK": "1",
    }
    owner_password = "owner-pw-" + secrets.token_urlsafe(16)
    _cli(env, "owner", "add", "jimbo", "--password", owner_password)
    creds = _cli(env, "partner", "add", "ocm", "--webhook", "http://127.0.0.1:9/hook")
    secret_values = [
        owner_password,
        creds["mqtt_password"],
        creds["api_key"],
        creds["webhook_secret"],
    ]
    assert all(secret_values)
    dbname = database_url.rsplit("/", 1)[1]
    dump = subprocess.run(
        [str(localstack.pg_bindir() / "pg_dump"), "-h", "127.0.0.1", "-p", str(postgres.port),
         "-U", postgres.user, "--data-only", dbname],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "ocm" in dump and "jimbo" in dump  # the dump does hold the accounts
    passwd = (broker_dir / "passwd").read_text()
    for secret in secret_values:
        for form in _forms(secret):
            assert form not in dump, f"a secret is in the database dump ({form[:6]}...)"
            assert form not in passwd, f"a secret is in the passwd file ({form[:6]}...)"
    key_digest = hashlib.sha256(creds["api_key"].encode()).hexdigest()
    assert key_digest in dump  # what is stored instead of the key
    for line in passwd.splitlines():
        user, _, hashed = line.partition(":")
        assert hashed.startswith(("$7$", "$6$")), user  # mosquitto_passwd's salted hashes
