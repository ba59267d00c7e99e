"""Send pushes through APNs (aioapns, token authentication)."""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import aioapns
from aioapns import exceptions as apns_errors

from service import errors
from service.adapters.notices import (
    TITLE,
    DeadToken,
    Notice,
    Rejected,
    SendResult,
    Sent,
    Unavailable,
)

_HEX = re.compile(r"[0-9A-Fa-f]{16,200}")


# --- APNs ------------------------------------------------------------------------------------


async def _quiet(request: aioapns.NotificationRequest, result: Any) -> None:
    """Leave logging of refused notifications to the deliverer."""


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a send nobody waits for any more."""
    if not task.cancelled():
        task.exception()


class ApnsSender:
    """Send through APNs with aioapns and token (.p8, ES256) authentication."""

    platform = "apns"

    def __init__(
        self,
        *,
        key: str,
        key_id: str,
        team_id: str,
        topic: str,
        base_url: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self.topic = topic
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._server: tuple[str, int] | None = None
        if base_url:
            u = urlsplit(base_url)
            if u.scheme != "https" or not u.hostname:
                raise errors.ConfigError("CHARGESHARE_APNS_URL", f"not an https URL: {base_url}")
            self._server = (u.hostname, u.port or 443)
        self._clients: dict[bool, aioapns.APNs] = {}

    def _client(self, sandbox: bool) -> aioapns.APNs:
        # Made on first use: aioapns binds to the running loop when it is created.
        client = self._clients.get(sandbox)
        if client is None:
            context = ssl.create_default_context(cafile=self._ca_file)
            context.set_alpn_protocols(["h2"])
            client = aioapns.APNs(
                key=self._key,
                key_id=self._key_id,
                team_id=self._team_id,
                topic=self.topic,
                use_sandbox=sandbox,
                ssl_context=context,
                max_connection_attempts=1,  # the outbox retries, with backoff
                err_func=_quiet,
            )
            if self._server is not None:
                # aioapns has no host option (libs.md pitfall 17): a subclass of its protocol
                # points this client, and no other, at the configured server.
                base = client.pool.protocol_class
                host, port = self._server
                client.pool.protocol_class = type(
                    base.__name__, (base,), {"APNS_SERVER": host, "APNS_PORT": port}
                )
            self._clients[sandbox] = client
        return client

    def payload(self, notice: Notice) -> dict[str, Any]:
        """Build the APNs payload: an alert plus the custom keys request_id and kind."""
        return {
            "aps": {"alert": {"title": TITLE, "body": notice.text}, "sound": "default"},
            "request_id": notice.request_id,
            "kind": notice.kind,
        }

    async def send(self, token: str, sandbox: bool, notice: Notice) -> SendResult:
        """Send one notice to the production or the sandbox environment."""
        if not _HEX.fullmatch(token):
            return DeadToken("apns: BadDeviceToken (a device token is hexadecimal)")
        request = aioapns.NotificationRequest(
            device_token=token,
            message=self.payload(notice),
            push_type=aioapns.PushType.ALERT,
            priority=10,
            collapse_key=notice.collapse_id,
        )
        # Never cancel aioapns's send: it would leave a cancelled future in its request map, and
        # a later connection loss sets an exception on it (InvalidStateError in its callback).
        # A send given up on here finishes, or fails with its connection, on its own.
        sending = asyncio.ensure_future(self._client(sandbox).send_notification(request))
        sending.add_done_callback(_consume)
        try:
            result = await asyncio.wait_for(asyncio.shield(sending), self._timeout_s)
        except (apns_errors.MaxAttemptsExceeded, apns_errors.ConnectionError, OSError) as exc:
            return Unavailable(f"apns: unreachable: {type(exc).__name__}")
        except TimeoutError:
            return Unavailable(f"apns: no answer within {self._timeout_s} s")
        return apns_result(str(result.status), result.description, result.notification_id)

    async def aclose(self) -> None:
        """Close the connections."""
        for client in self._clients.values():
            client.pool.close()
        self._clients.clear()


def apns_result(status: str, reason: str | None, apns_id: str) -> SendResult:
    """Classify an APNs answer: sent, dead token, refused message, or try again."""
    text = f"apns {status} {reason or ''}".rstrip()
    if status == "200":
        return Sent(apns_id)
    if status == "410" or reason in ("BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"):
        return DeadToken(text)
    if status == "429":
        return Unavailable(text, platform_down=False)  # too many pushes to this one device
    if status in ("400", "404", "405", "413"):
        return Rejected(text)
    return Unavailable(text)  # 403 (our credentials), 500, 503
