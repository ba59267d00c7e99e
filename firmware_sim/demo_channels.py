"""The demo's other channels: Jimbo's phones (fake FCM / APNs) and a webhook + pull partner."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

PHONES = (
    ("jimbo-pixel", "fcm", "fcm-token-jimbo-pixel-0001"),
    ("jimbo-iphone", "apns", "a1" * 32),
)
PHONE_NAMES = {"fcm": "Android phone (FCM)", "apns": "iPhone (APNs)"}


def notifications(log: Path) -> list[dict[str, Any]]:
    """Read the notifications the fake FCM / APNs servers printed (one JSON object a line)."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def wait_notifications(log: Path, request_id: str, timeout: float) -> list[dict[str, Any]]:
    """Wait until every phone got a notification for this request; return what arrived."""
    deadline = time.monotonic() + timeout
    while True:
        got = [n for n in notifications(log) if n.get("request_id") == request_id]
        if {n.get("platform") for n in got} >= {p for _, p, _ in PHONES}:
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a Standard Webhooks v1 signature (written from the spec, not the service's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if "," in s]
    return any(hmac.compare_digest(expected, o) for o in offered)


@dataclass
class Receiver:
    """A partner's webhook endpoint on loopback that verifies and keeps what it is sent."""

    secret: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    def start(self) -> str:
        """Listen on a free loopback port; return the endpoint URL."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the http.server method name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.secret and verify(receiver.secret, headers, body):
                    receiver.events.append(json.loads(body))
                else:
                    receiver.bad_signatures += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/chargeshare"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(self.events) >= count


def pull_all(api_url: str, api_key: str) -> list[dict[str, Any]]:
    """Follow the pull API's cursor from the start until a page comes back empty."""
    records: list[dict[str, Any]] = []
    since = ""
    with httpx.Client(base_url=api_url, timeout=10.0) as client:
        for _ in range(1000):
            params = {"limit": "100", **({"since": since} if since else {})}
            r = client.get(
                "/v1/sessions", params=params, headers={"Authorization": f"Bearer {api_key}"}
            )
            r.raise_for_status()
            page = r.json()
            if not page["data"]:
                return records
            records.extend(page["data"])
            since = page["next"]
    return records
