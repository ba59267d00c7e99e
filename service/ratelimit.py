"""Per-owner token buckets for inbound MQTT, so that one noisy vehicle cannot starve the others.

Every inbound message costs its owner (`ovms/<owner>/...`) one token; a bucket holds at most
`owner_message_burst` tokens and refills at `owner_message_rate` per second. Over the limit, a
message is dropped (and acked: it must not come back), counted, and at most once per
`owner_rate_notice_s` the owner hears why on `P chargeshare/error` (code `rate_limited`).
Retained snapshots that the broker sends when the service (re)subscribes are not charged: they
say what the vehicle last reported, not how fast it talks. Buckets live in one replica, so with
N replicas on the shared subscription an owner gets about N times the rate.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from service import errors, observability, topics
from service.config import Settings

log = structlog.get_logger("ratelimit")

OnMessage = Callable[[str, bytes, bool, datetime | None], Awaitable[None]]
Reject = Callable[[str, errors.InputError], Awaitable[None]]

SWEEP_S = 60.0


class Verdict(enum.Enum):
    ADMIT = "admit"
    DROP = "drop"
    DROP_AND_TELL = "drop_and_tell"  # the first drop of a notice window: tell the owner


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    told_at: float | None = None
    dropped: int = 0  # since the last notice
    dropped_before: int = 0  # in the window before the last notice


class OwnerLimiter:
    """Decide, per owner, whether an inbound message is handled or dropped."""

    def __init__(
        self,
        rate: float,
        burst: int,
        notice_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise errors.ConfigError(
                "CHARGESHARE_OWNER_MESSAGE_RATE", "rate must be > 0 and burst >= 1"
            )
        self.rate = rate
        self.burst = burst
        self.notice_s = notice_s
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._swept = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> OwnerLimiter:
        """Build the limiter the settings describe."""
        return cls(
            settings.owner_message_rate,
            settings.owner_message_burst,
            settings.owner_rate_notice_s,
        )

    def check(self, topic: str, retained: bool) -> Verdict:
        """Charge the message's owner one token; say whether to handle the message."""
        if retained:
            return Verdict.ADMIT
        parts = topic.split("/", 2)
        if len(parts) < 3 or parts[0] != topics.ROOT:
            return Verdict.ADMIT  # not an owner's topic: the handler rejects it
        now = self.clock()
        if now - self._swept > SWEEP_S:
            self._sweep(now)
        b = self._buckets.get(parts[1])
        if b is None:
            b = self._buckets[parts[1]] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate)
        b.updated = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return Verdict.ADMIT
        b.dropped += 1
        if b.told_at is None or now - b.told_at >= self.notice_s:
            b.told_at = now
            b.dropped_before, b.dropped = b.dropped - 1, 1
            return Verdict.DROP_AND_TELL
        return Verdict.DROP

    def dropped_before_notice(self, owner: str) -> int:
        """Return how many of the owner's messages were dropped in the window before the last."""
        b = self._buckets.get(owner)
        return 0 if b is None else b.dropped_before

    def _sweep(self, now: float) -> None:
        """Forget owners whose bucket is full again and whose notice window has passed."""
        self._swept = now
        refill_s = self.burst / self.rate
        for owner in [
            o
            for o, b in self._buckets.items()
            if now - b.updated >= refill_s
            and (b.told_at is None or now - b.told_at >= self.notice_s)
        ]:
            del self._buckets[owner]


def guard(limiter: OwnerLimiter, handle: OnMessage, reject: Reject) -> OnMessage:
    """Wrap an inbound-message callback so that owners over their rate are dropped."""

    async def on_message(
        topic: str, payload: bytes, retained: bool, since: datetime | None
    ) -> None:
        verdict = limiter.check(topic, retained)
        if verdict is Verdict.ADMIT:
            await handle(topic, payload, retained, since)
            return
        observability.RATE_LIMITED.inc()
        if verdict is Verdict.DROP:
            return
        owner = topic.split("/", 2)[1]
        log.warning(
            "owner over its message rate; dropping its messages",
            owner=owner,
            topic=topic[:200],
            dropped_in_last_window=limiter.dropped_before_notice(owner),
            rate_per_s=limiter.rate,
            burst=limiter.burst,
        )
        reason = (
            f"more than {limiter.rate:g} messages per second (bursts up to {limiter.burst}) "
            "from this account: messages are dropped until the rate falls"
        )
        try:
            await reject(topic, errors.RateLimited(topic, reason))
        except errors.TRANSIENT as exc:  # the notice is best effort; dropping goes on
            log.warning("could not queue the rate-limit notice", owner=owner, error=str(exc))

    return on_message
