"""A local stand-in for FCM: HTTP v1 `messages:send` and the Google OAuth token endpoint.

It generates a service-account credential whose `token_uri` points at itself, checks the signed
JWT assertion of the token request, then accepts `POST /v1/projects/<project>/messages:send`
only with an access token it issued. Errors are answered in FCM's own format (status, error
code detail, Retry-After), so firebase-admin raises the same exceptions as against Google.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.testing.serving import Listener

# Either scope lets a token send through FCM.
FCM_SCOPES = {
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
}
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs for Google's endpoint whatever the token_uri; Google checks exactly this.
TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"

# errorCode → (HTTP status, google.rpc status), as FCM answers them.
ERRORS = {
    "UNREGISTERED": (404, "NOT_FOUND"),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED"),
    "UNAVAILABLE": (503, "UNAVAILABLE"),
    "INTERNAL": (500, "INTERNAL"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED"),
}


@dataclass
class Received:
    """One `messages:send` request as the fake saw it."""

    token: str
    message: dict[str, Any]
    status: int | None = None  # None while held, or when the client left before the answer
    error: str | None = None  # the FCM errorCode answered

    @property
    def delivered(self) -> bool:
        return self.status == 200


@dataclass
class FakeFcm(Listener):
    """FCM on loopback; run it on its own loop (see fake_push.serve_in_thread)."""

    host: str = "127.0.0.1"
    port: int = 0
    project_id: str = "chargeshare-fake"
    dead: set[str] = field(default_factory=set)  # answered UNREGISTERED
    invalid: set[str] = field(default_factory=set)  # answered INVALID_ARGUMENT
    script: dict[str, list[str]] = field(default_factory=dict)  # errorCodes to answer first
    retry_after_s: int | None = None  # sent with QUOTA_EXCEEDED and UNAVAILABLE
    on_notification: Callable[[Received], None] | None = None
    received: list[Received] = field(default_factory=list)
    token_requests: int = 0

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._issued: set[str] = set()
        self._ids = itertools.count(1)
        self._init_listener()

    @property
    def url(self) -> str:
        """The base URL to give the service as its FCM endpoint."""
        return f"http://{self.host}:{self.port}"

    @property
    def client_email(self) -> str:
        return f"push@{self.project_id}.iam.gserviceaccount.com"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self) -> dict[str, str]:
        """Return a service-account credential that authenticates against this fake."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "1",
            "token_uri": self.token_uri,
        }

    def write_credentials(self, path: Path) -> Path:
        """Write the service-account JSON to `path`; return it."""
        path.write_text(json.dumps(self.service_account(), indent=2))
        path.chmod(0o600)
        return path

    def delivered(self) -> list[Received]:
        """The messages answered 200."""
        return [r for r in list(self.received) if r.delivered]

    # --- running ---

    async def start(self) -> None:
        """Listen (again on the same port after a stop)."""
        await self._listen()

    # --- HTTP/1.1 ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, reader)
                if request is None:
                    return
                answer = await self._answer(request, body, reader)
                if answer is None:
                    return  # the client went away while the answer was held
                status, headers, payload = answer
                hdrs = [("content-type", "application/json; charset=UTF-8"), *headers]
                hdrs.append(("content-length", str(len(payload))))
                writer.write(conn.send(h11.Response(status_code=status, headers=hdrs)) or b"")
                writer.write(conn.send(h11.Data(data=payload)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError, h11.LocalProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, request: h11.Request, body: bytes, reader: asyncio.StreamReader
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        target = request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        if request.method == b"POST" and target == "/token":
            if not self._gate().is_set() and not await _wait_or_gone(self._gate(), reader):
                return None
            return self._token(body)
        if request.method != b"POST" or target != f"/v1/projects/{self.project_id}/messages:send":
            return _error(404, "NOT_FOUND", f"no such method: {target}")
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self._issued:
            return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        try:
            message = json.loads(body)["message"]
            token = message["token"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
        rec = Received(token=token, message=message)
        self.received.append(rec)
        code = self._code_for(token)
        if not self._gate().is_set() and not await _wait_or_gone(self._gate(), reader):
            return None
        if code is not None:
            rec.status, rec.error = ERRORS[code][0], code
            extra = []
            if code in ("QUOTA_EXCEEDED", "UNAVAILABLE") and self.retry_after_s is not None:
                extra.append(("retry-after", str(self.retry_after_s)))
            status, payload = _fcm_error(code, token)
            return status, extra, payload
        rec.status = 200
        if self.on_notification is not None:
            self.on_notification(rec)
        name = f"projects/{self.project_id}/messages/{next(self._ids)}"
        return 200, [], json.dumps({"name": name}).encode()

    def _code_for(self, token: str) -> str | None:
        if token in self.dead:
            return "UNREGISTERED"
        if token in self.invalid:
            return "INVALID_ARGUMENT"
        queued = self.script.get(token)
        if queued:
            return queued.pop(0)
        return None

    def _token(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != JWT_BEARER:
            return 400, [], b'{"error": "unsupported_grant_type"}'
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self._key.public_key(),
                algorithms=["RS256"],
                audience=TOKEN_AUDIENCE,
                issuer=self.client_email,
            )
        except jwt.PyJWTError as exc:
            return 400, [], json.dumps({"error": "invalid_grant", "detail": str(exc)}).encode()
        scopes = str(claims.get("scope", "")).split()
        if not FCM_SCOPES.intersection(scopes):
            return 400, [], b'{"error": "invalid_scope"}'
        self.token_requests += 1
        access = "ya29.fake-" + secrets.token_urlsafe(16)
        self._issued.add(access)
        body_out = {"access_token": access, "expires_in": 3600, "token_type": "Bearer"}
        return 200, [], json.dumps(body_out).encode()


def _fcm_error(code: str, token: str) -> tuple[int, bytes]:
    status, rpc = ERRORS[code]
    messages = {
        "UNREGISTERED": "Requested entity was not found.",
        "INVALID_ARGUMENT": "The registration token is not a valid FCM registration token",
    }
    err = {
        "error": {
            "code": status,
            "message": messages.get(code, f"{rpc.lower()} (fake)"),
            "status": rpc,
            "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
            ],
        }
    }
    return status, json.dumps(err).encode()


def _error(status: int, rpc: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = {"error": {"code": status, "message": message, "status": rpc}}
    return status, [], json.dumps(body).encode()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _wait_or_gone(gate: asyncio.Event, reader: asyncio.StreamReader) -> bool:
    """Wait for the gate to open; False if the client hung up first."""
    opened = asyncio.ensure_future(gate.wait())
    gone = asyncio.ensure_future(reader.read(1))  # HTTP/1.1 without pipelining: only EOF comes
    done, pending = await asyncio.wait({opened, gone}, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    return opened in done
