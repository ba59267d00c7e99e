"""A local stand-in for APNs: HTTP/2 over TLS with a self-signed certificate.

It checks what Apple checks before accepting a notification: `POST /3/device/<token>`, the
`apns-topic`, the `apns-push-type`, and an ES256 provider token (JWT with `kid` = key id,
`iss` = team id, `iat` under an hour old) signed by the .p8 key it generated. Answers are
APNs's: 200 with `apns-id`, or a status with `{"reason": ...}`.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import json
import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError

from service.testing.serving import Listener

PUSH_TYPES = {"alert", "background", "voip", "complication", "fileprovider", "mdm", "liveactivity"}
REASONS = {
    400: "BadDeviceToken",
    410: "Unregistered",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


@dataclass
class Received:
    """One notification request as the fake saw it."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    status: int | None = None  # None while held, or when the client left before the answer
    reason: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status == 200


def make_key() -> str:
    """Return a new P-256 key in the .p8 (PKCS#8 PEM) form Apple hands out."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed TLS certificate for localhost and 127.0.0.1; return (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake APNs")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "apns-cert.pem", directory / "apns-cert-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class FakeApns(Listener):
    """APNs on loopback; run it on its own loop (see fake_push.serve_in_thread)."""

    directory: Path  # where the certificate and the .p8 key are written
    topic: str = "org.openvehicles.chargeshare"
    team_id: str = "TEAMFAKE01"
    key_id: str = "KEYFAKE001"
    host: str = "127.0.0.1"
    port: int = 0
    dead: set[str] = field(default_factory=set)  # answered 410 Unregistered
    bad: set[str] = field(default_factory=set)  # answered 400 BadDeviceToken
    script: dict[str, list[int]] = field(default_factory=dict)  # statuses to answer first
    on_notification: Callable[[Received], None] | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key_pem = make_key()
        self.key_file = self.directory / f"AuthKey_{self.key_id}.p8"
        self.key_file.write_text(self.key_pem)
        self.key_file.chmod(0o600)
        self.cert_file, self._cert_key = make_certificate(self.directory)
        private = serialization.load_pem_private_key(self.key_pem.encode(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        self._public = private.public_key()
        self._init_listener()

    @property
    def url(self) -> str:
        """The base URL to give the service as its APNs server."""
        return f"https://{self.host}:{self.port}"

    def delivered(self) -> list[Received]:
        """The notifications answered 200."""
        return [r for r in list(self.received) if r.delivered]

    # --- running ---

    async def start(self) -> None:
        """Listen (again on the same port after a stop)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self._cert_key)
        context.set_alpn_protocols(["h2"])
        await self._listen(context)

    # --- HTTP/2 ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytearray] = {}
        answering: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, RequestReceived):
                        heads[event.stream_id] = {str(k): str(v) for k, v in event.headers or []}
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, DataReceived):
                        bodies[event.stream_id] += event.data or b""
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, StreamEnded):
                        sid = event.stream_id
                        task = asyncio.create_task(
                            self._answer(conn, writer, sid, heads.pop(sid), bytes(bodies.pop(sid)))
                        )
                        answering[sid] = task
                        task.add_done_callback(functools.partial(_forget, answering, sid))
                    elif isinstance(event, StreamReset) and event.stream_id in answering:
                        answering[event.stream_id].cancel()
                    elif isinstance(event, ConnectionTerminated):
                        return
                writer.write(conn.data_to_send())
        except (ConnectionError, ProtocolError, ssl.SSLError):
            return
        finally:
            for task in list(answering.values()):
                task.cancel()  # the client is gone: what was held is never answered
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self,
        conn: H2Connection,
        writer: asyncio.StreamWriter,
        stream_id: int,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        status, reason, rec = self._judge(headers, body)
        if rec is not None:
            self.received.append(rec)
            if not self._gate().is_set():
                await self._gate().wait()  # cancelled if the client leaves meanwhile
            if writer.is_closing():
                return  # never answered: the client left while the answer was held
            rec.status, rec.reason = status, reason
            if status == 200 and self.on_notification is not None:
                self.on_notification(rec)
        if writer.is_closing():
            return
        try:
            response = [(":status", str(status)), ("apns-id", apns_id)]
            if status == 200:
                conn.send_headers(stream_id, response, end_stream=True)
            else:
                body_out: dict[str, Any] = {"reason": reason}
                if status == 410:
                    body_out["timestamp"] = int(time.time() * 1000)
                conn.send_headers(stream_id, [*response, ("content-type", "application/json")])
                conn.send_data(stream_id, json.dumps(body_out).encode(), end_stream=True)
            writer.write(conn.data_to_send())
        except ProtocolError:
            return

    def _judge(self, h: dict[str, str], body: bytes) -> tuple[int, str | None, Received | None]:
        """Return the status and reason APNs would answer, and the record of a notification."""
        path = h.get(":path", "")
        if h.get(":method") != "POST":
            return 405, "MethodNotAllowed", None
        if not path.startswith("/3/device/") or len(path) == len("/3/device/"):
            return 404, "BadPath", None
        auth = h.get("authorization", "")
        if not auth.startswith("bearer "):
            return 403, "MissingProviderToken", None
        if (problem := self._check_jwt(auth[len("bearer ") :])) is not None:
            return 403, problem, None
        if not h.get("apns-topic"):
            return 400, "MissingTopic", None
        if h["apns-topic"] != self.topic:
            return 400, "DeviceTokenNotForTopic", None
        if h.get("apns-push-type") not in PUSH_TYPES:
            return 400, "InvalidPushType", None
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, "PayloadEmpty", None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return 400, "PayloadEmpty", None
        token = path[len("/3/device/") :]
        rec = Received(
            token=token,
            headers={k: v for k, v in h.items() if k.startswith("apns-")},
            payload=payload,
        )
        if token in self.dead:
            return 410, "Unregistered", rec
        if token in self.bad:
            return 400, "BadDeviceToken", rec
        queued = self.script.get(token)
        if queued:
            status = queued.pop(0)
            return status, REASONS.get(status, "InternalServerError"), rec
        return 200, None, rec

    def _check_jwt(self, token: str) -> str | None:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token, self._public, algorithms=["ES256"], options={"require": ["iss", "iat"]}
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
            return "InvalidProviderToken"
        if claims["iss"] != self.team_id:
            return "InvalidProviderToken"
        if claims["iat"] < time.time() - 3600:
            return "ExpiredProviderToken"
        return None


def _forget(tasks: dict[int, asyncio.Task[None]], stream_id: int, _: object) -> None:
    tasks.pop(stream_id, None)


def new_token() -> str:
    """Return a fresh device token in APNs's form (64 hex digits)."""
    return secrets.token_hex(32)
