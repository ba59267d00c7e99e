"""Push notifications to owners' phones: the outbox Deliverer over the FCM and APNs senders.

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
import random
import time
from pathlib import Path
from types import TracebackType

import asyncpg
import structlog

from service import errors, outbox
from service.adapters import push_tokens
from service.adapters.apns import ApnsSender
from service.adapters.fcm import FcmSender
from service.adapters.notices import DeadToken, Notice, Rejected, Sender, Sent, Unavailable, mask
from service.config import Settings

log = structlog.get_logger("push")


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
