"""Push notifications to owners' phones: FCM and APNs senders, and the outbox Deliverer.

A push row names one token (`push_tokens.id`) and carries the question's request id, kind and
text. The deliverer reads the token and the question as they are at sending time, so a token
replaced meanwhile gets the push, a dead one gets nothing, and an owner who answered first gets
no stale push. A dead token (FCM UNREGISTERED / INVALID_ARGUMENT / SENDER_ID_MISMATCH, APNs 410
or 400 BadDeviceToken) is deactivated; anything the service itself failed at is retried through
the outbox. Each platform is a lane with its own in-flight cap and a pause after service-level
failures, so a slow or dead FCM never takes the dispatcher's slots that APNs rows need, and the
reverse. Both notifications carry the request id as collapse id: a push sent twice (a replica
that died after sending, before deleting its row) shows on the phone once.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import re
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import aioapns
import asyncpg
import firebase_admin
import requests
import structlog
from aioapns import exceptions as apns_errors
from firebase_admin import credentials, messaging
from firebase_admin import exceptions as fcm_errors
from google.auth.transport import requests as google_requests

from service import errors, outbox
from service.adapters import push_tokens
from service.config import Settings

log = structlog.get_logger("push")

TITLE = "ChargeShare"
_app_names = itertools.count(1)
_HEX = re.compile(r"[0-9A-Fa-f]{16,200}")


@dataclass(frozen=True, slots=True)
class Notice:
    """What one push says: the question to read, and a line for the lock screen."""

    request_id: str
    kind: str
    text: str

    @classmethod
    def from_payload(cls, payload: bytes) -> Notice:
        """Decode an outbox payload written by push_tokens.enqueue_question."""
        d = json.loads(payload)
        return cls(request_id=str(d["request_id"]), kind=str(d["kind"]), text=str(d["text"]))

    @property
    def collapse_id(self) -> str:
        """Return the id under which a phone shows repeated pushes of this question once."""
        return self.request_id[:64]  # apns-collapse-id is at most 64 bytes


@dataclass(frozen=True, slots=True)
class Sent:
    message_id: str


@dataclass(frozen=True, slots=True)
class DeadToken:
    """The platform says this token will never work again."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The platform refused this message, not the token: sending it again cannot help."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Not sent this time; `platform_down` when the service failed, not just this token."""

    reason: str
    retry_after_s: float | None = None
    platform_down: bool = True


SendResult = Sent | DeadToken | Rejected | Unavailable


class Sender(Protocol):
    """Sends one notice to one token of one platform."""

    platform: str

    async def send(self, token: str, sandbox: bool, notice: Notice) -> SendResult: ...

    async def aclose(self) -> None: ...


def retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def mask(token: str) -> str:
    """Shorten a token for logs."""
    return token[:8] + "…" if len(token) > 12 else "…"


# --- FCM -------------------------------------------------------------------------------------


class _TimedRequest(google_requests.Request):
    """google-auth's transport with a bounded timeout (its default is 120 s)."""

    def __init__(self, session: requests.Session, timeout_s: float) -> None:
        super().__init__(session)
        self._timeout_s = timeout_s

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(  # type: ignore[no-untyped-call]
            url, method, body, headers, timeout or self._timeout_s, **kwargs
        )


class FcmSender:
    """Send through FCM HTTP v1 with firebase-admin's async path, one App per sender."""

    platform = "fcm"

    def __init__(
        self, credentials_file: str, *, base_url: str | None = None, timeout_s: float = 10.0
    ) -> None:
        try:
            cert = credentials.Certificate(credentials_file)
        except (OSError, ValueError) as exc:
            raise errors.ConfigError(
                "CHARGESHARE_FCM_CREDENTIALS", f"not a usable service-account JSON file: {exc}"
            ) from None
        self._timeout_s = timeout_s
        self._app = firebase_admin.initialize_app(
            cert, options={"httpTimeout": timeout_s}, name=f"chargeshare-push-{next(_app_names)}"
        )
        # firebase-admin has no endpoint option. Its messaging service is created once per App
        # and formats its URL then, so point it at `base_url` here, before any send (libs.md §3).
        try:
            self._service = messaging._get_messaging_service(self._app)
        except ValueError as exc:  # no project id in the credential
            firebase_admin.delete_app(self._app)
            raise errors.ConfigError("CHARGESHARE_FCM_CREDENTIALS", str(exc)) from None
        if base_url:
            self._service._fcm_url = (
                f"{base_url.rstrip('/')}/v1/projects/{cert.project_id}/messages:send"
            )
        self._credential = cert.get_credential()
        self._refresh_lock = asyncio.Lock()

    def message(self, token: str, notice: Notice) -> messaging.Message:
        """Build the FCM message: a notification plus data {request_id, kind}."""
        with warnings.catch_warnings():
            # FCM v1 addresses an app by its registration token, which is what the apps send
            # us; firebase-admin 7 flags Message.token in favour of installation ids.
            warnings.simplefilter("ignore", DeprecationWarning)
            return messaging.Message(
                token=token,
                notification=messaging.Notification(title=TITLE, body=notice.text),
                data={"request_id": notice.request_id, "kind": notice.kind},
                android=messaging.AndroidConfig(
                    priority="high",
                    notification=messaging.AndroidNotification(tag=notice.collapse_id),
                ),
                apns=messaging.APNSConfig(headers={"apns-collapse-id": notice.collapse_id}),
            )

    async def _ensure_access_token(self) -> None:
        # google-auth refreshes synchronously inside the send (libs.md pitfall 18): do it here,
        # in a thread, so a slow token endpoint never stalls the event loop.
        if self._credential.valid:
            return
        async with self._refresh_lock:
            if not self._credential.valid:
                await asyncio.to_thread(self._refresh)

    def _refresh(self) -> None:
        with requests.Session() as session:
            self._credential.refresh(_TimedRequest(session, self._timeout_s))

    async def send(self, token: str, sandbox: bool, notice: Notice) -> SendResult:
        """Send one notice; `sandbox` means nothing to FCM."""
        try:
            await self._ensure_access_token()
        except Exception as exc:  # google-auth's own errors and requests' transport errors
            return Unavailable(f"fcm: no access token: {type(exc).__name__}: {exc}")
        try:
            msg = self.message(token, notice)
        except ValueError as exc:
            return Rejected(f"fcm: {exc}")
        try:
            batch = await messaging.send_each_async([msg], app=self._app)
        except fcm_errors.FirebaseError as exc:
            return fcm_failure(exc)
        resp = batch.responses[0]
        if resp.success:
            return Sent(resp.message_id or "")
        return fcm_failure(resp.exception)

    async def aclose(self) -> None:
        """Close the HTTP client and delete the App."""
        # delete_app closes the service with asyncio.run(), which cannot run inside a loop:
        # close the async client here, then delete the App in a thread, where that is a no-op.
        await self._service._async_client.aclose()
        await asyncio.to_thread(firebase_admin.delete_app, self._app)


def fcm_failure(exc: BaseException | None) -> SendResult:
    """Classify an FCM error: dead token, refused message, or try again (and when)."""
    if exc is None:
        return Unavailable("fcm: failed without an error")
    reason = f"fcm {type(exc).__name__}: {exc}"
    # INVALID_ARGUMENT also covers a malformed message, but ours are fixed and small: per
    # Firebase's token-management guidance it means the token is not a valid one.
    if isinstance(
        exc,
        messaging.UnregisteredError
        | messaging.SenderIdMismatchError
        | fcm_errors.InvalidArgumentError,
    ):
        return DeadToken(reason)
    response = getattr(exc, "http_response", None)
    after = retry_after(response.headers.get("Retry-After")) if response is not None else None
    if isinstance(exc, messaging.QuotaExceededError):
        return Unavailable(reason, after, platform_down=False)
    # UNAVAILABLE, INTERNAL, timeouts, and credentials FCM refused: the service, not the token.
    return Unavailable(reason, after)


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


# --- the outbox deliverer --------------------------------------------------------------------


class _Lane:
    """One platform: its sender, how many sends are in flight, and a pause after failures."""

    def __init__(self, sender: Sender, inflight_max: int, pause_base_s: float, pause_cap_s: float):
        self.sender = sender
        self.inflight_max = inflight_max
        self.pause_base_s = pause_base_s
        self.pause_cap_s = pause_cap_s
        self.inflight = 0
        self.failures = 0
        self.paused_until = 0.0

    def paused_for(self) -> float:
        return max(0.0, self.paused_until - time.monotonic())

    def failed(self) -> float | None:
        """Pause the lane after a service failure; return the pause, or None if one is on."""
        now = time.monotonic()
        if now < self.paused_until:  # sends already in flight when the pause began count once
            return None
        self.failures += 1
        delay = outbox.backoff(self.failures, self.pause_base_s, self.pause_cap_s)
        self.paused_until = now + delay
        return delay

    def worked(self) -> None:
        self.failures = 0
        self.paused_until = 0.0


class PushDeliverer:
    """Deliver outbox rows of kind 'push' to FCM or APNs."""

    kind = push_tokens.KIND

    def __init__(
        self,
        pool: asyncpg.Pool,
        fcm: FcmSender | None,
        apns: ApnsSender | None,
        *,
        platform_inflight: int = 8,
        send_deadline_s: float = 20.0,
        pause_base_s: float = 1.0,
        pause_cap_s: float = 300.0,
    ) -> None:
        self.pool = pool
        self.send_deadline_s = send_deadline_s  # keep it under the dispatcher's lease
        self.lanes: dict[str, _Lane] = {
            s.platform: _Lane(s, platform_inflight, pause_base_s, pause_cap_s)
            for s in (fcm, apns)
            if s is not None
        }

    async def deliver(self, row: outbox.Row) -> outbox.Outcome:
        """Send one push, or say why not."""
        try:
            notice = Notice.from_payload(row.payload)
        except (ValueError, KeyError, TypeError) as exc:
            return outbox.Drop(f"unreadable push payload: {exc}")
        if row.target is None:
            return outbox.Drop("push row without a token")
        async with self.pool.acquire() as conn:
            target = await push_tokens.load_target(conn, row.target, notice.request_id)
        if target is None:
            return outbox.Drop("token unregistered")
        if not target.active:
            return outbox.Drop("token inactive")
        if target.question_state == "answered":
            return outbox.Drop("answered before delivery")
        if target.question_state != "pending" or target.question_expired:
            return outbox.Drop(f"question {target.question_state or 'gone'} before delivery")
        lane = self.lanes.get(target.platform)
        if lane is None:
            return outbox.Drop(f"{target.platform} is not configured")
        if paused := lane.paused_for():
            # Wake up spread over a second after the pause, not all in one burst.
            return outbox.Retry(
                f"{target.platform} paused after failures", paused + random.random()
            )
        if lane.inflight >= lane.inflight_max:
            return outbox.Retry(f"{target.platform} busy", random.uniform(0.2, 1.0))
        lane.inflight += 1
        try:
            result = await asyncio.wait_for(
                lane.sender.send(target.token, target.sandbox, notice), self.send_deadline_s
            )
        except TimeoutError:
            result = Unavailable(f"{target.platform}: no answer within {self.send_deadline_s} s")
        finally:
            lane.inflight -= 1
        bound = log.bind(
            platform=target.platform,
            outbox_id=row.id,
            request_id=notice.request_id,
            token=mask(target.token),
        )
        match result:
            case Sent(message_id=message_id):
                lane.worked()
                bound.info("push sent", message_id=message_id, attempt=row.attempts)
                return outbox.Done()
            case DeadToken(reason=reason):
                lane.worked()
                async with self.pool.acquire() as conn:
                    await push_tokens.deactivate(conn, row.target, target.token)
                bound.info("push token deactivated", reason=reason)
                return outbox.Drop(f"token deactivated: {reason}")
            case Rejected(reason=reason):
                bound.error("push refused", reason=reason)
                return outbox.Drop(reason)
            case Unavailable(reason=reason, retry_after_s=after, platform_down=down):
                if down and (pause := lane.failed()) is not None:
                    bound.warning(
                        "push platform paused",
                        reason=reason,
                        failures=lane.failures,
                        pause_s=round(pause, 2),
                    )
                return outbox.Retry(reason, after)

    async def aclose(self) -> None:
        """Close the senders' connections."""
        for lane in self.lanes.values():
            await lane.sender.aclose()

    async def __aenter__(self) -> PushDeliverer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


APNS_SETTINGS = ("apns_key_file", "apns_key_id", "apns_team_id", "apns_topic")


def senders(settings: Settings) -> tuple[FcmSender | None, ApnsSender | None]:
    """Make the senders that settings have credentials for; ConfigError on half a setup."""
    fcm = None
    if settings.fcm_credentials:
        fcm = FcmSender(
            settings.fcm_credentials, base_url=settings.fcm_url, timeout_s=settings.push_timeout_s
        )
    given = {name: getattr(settings, name) for name in APNS_SETTINGS}
    apns = None
    if any(given.values()):
        missing = [f"CHARGESHARE_{n.upper()}" for n, v in given.items() if not v]
        if missing:
            raise errors.ConfigError(
                missing[0],
                "APNs needs all of " + ", ".join(f"CHARGESHARE_{n.upper()}" for n in APNS_SETTINGS),
            )
        key_file = settings.apns_key_file
        assert key_file is not None
        try:
            key = Path(key_file).read_text()
        except OSError as exc:
            raise errors.ConfigError("CHARGESHARE_APNS_KEY_FILE", f"cannot read: {exc}") from None
        apns = ApnsSender(
            key=key,
            key_id=str(settings.apns_key_id),
            team_id=str(settings.apns_team_id),
            topic=str(settings.apns_topic),
            base_url=settings.apns_url,
            ca_file=settings.apns_ca_file,
            timeout_s=settings.push_timeout_s,
        )
    return fcm, apns


def build(settings: Settings, pool: asyncpg.Pool) -> PushDeliverer | None:
    """Make the push deliverer, or None (saying so once) when no platform has credentials.

    One delivery may take up to twice `push_timeout_s`: keep that under the dispatcher's lease.
    """
    fcm, apns = senders(settings)
    if fcm is None and apns is None:
        log.warning("push notifications off: no FCM or APNs credentials")
        return None
    log.info("push notifications on", fcm=fcm is not None, apns=apns is not None)
    return PushDeliverer(
        pool,
        fcm,
        apns,
        platform_inflight=settings.push_platform_inflight,
        send_deadline_s=2 * settings.push_timeout_s,
    )
