"""What a push says, what sending it can come to, and what every sender offers."""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Protocol

TITLE = "ChargeShare"  # the notification title on every phone


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
