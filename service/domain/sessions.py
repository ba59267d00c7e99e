"""The sharing state machine of DESIGN §5: everything that decides what a session shares lives here.

A charge session has a charge status (charging, then completed, interrupted or stopped by the
owner) and a share state:

    PRIVATE    nothing shareable: vehicle opted out, or the place is `never`
    ASKING     a `share` question is open
    SHARED     published to partners
    UNSHARED   the owner said not_once / never, or the question expired
    RETRACTED  was published, then the owner said `never` for its place

`apply(state, event, now=...)` returns the new state and the effects the caller must perform, in
order, inside the same transaction. It does no I/O and reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    CHARGING = "charging"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"  # stopped by the owner (substate onrequest)


class Share(StrEnum):
    PRIVATE = "private"
    ASKING = "asking"
    SHARED = "shared"
    UNSHARED = "unshared"
    RETRACTED = "retracted"


class Standing(StrEnum):
    """A location's standing answer."""

    PENDING = "pending"
    ALWAYS = "always"
    NEVER = "never"


# ---- state -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    status: Status
    share: Share
    cause: str | None = None
    asked_cause: bool = False  # an abort_reason question was created


# ---- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """A charge began; `standing` is the answer of the place it began at."""

    opted_in: bool
    standing: Standing


@dataclass(frozen=True, slots=True)
class Ended:
    """The charge ended with this status."""

    status: Status


@dataclass(frozen=True, slots=True)
class Answered:
    """The owner answered the `share` question."""

    choice: str  # always | once | not_once | never


@dataclass(frozen=True, slots=True)
class CauseGiven:
    """The owner said why an interrupted charge stopped."""

    cause: str  # user_interrupted | station_fault | other_fault


@dataclass(frozen=True, slots=True)
class QuestionExpired:
    """The `share` question ran out of time unanswered."""


@dataclass(frozen=True, slots=True)
class PlaceNever:
    """The owner said `never` for this session's place (while answering another session)."""


@dataclass(frozen=True, slots=True)
class OptedOut:
    """The vehicle stopped sharing."""


Event = Started | Ended | Answered | CauseGiven | QuestionExpired | PlaceNever | OptedOut


# ---- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish the session as it stands now, with this event type."""

    event_type: str


@dataclass(frozen=True, slots=True)
class AskOwner:
    """Create a question of this kind (retained on the owner's request topic)."""

    kind: str  # share | abort_reason


@dataclass(frozen=True, slots=True)
class Push:
    """Send a push notification for the question just created."""

    kind: str


@dataclass(frozen=True, slots=True)
class Retract:
    """Publish `session.retracted`: the record without place, station or comment."""


@dataclass(frozen=True, slots=True)
class SetStanding:
    """Store a standing answer for the session's place."""

    answer: Standing


@dataclass(frozen=True, slots=True)
class EraseCoordinates:
    """Forget the session's coordinates (only the place's keyed hash remains)."""


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Clear an open question of this kind that no longer applies."""

    kind: str


Effect = Publish | AskOwner | Push | Retract | SetStanding | EraseCoordinates | Withdraw


class IllegalTransition(Exception):
    """The event cannot happen to a session in this state."""

    def __init__(self, state: State, event: Event) -> None:
        self.state = state
        self.event = event
        super().__init__(f"{type(event).__name__} not allowed when {state.status}/{state.share}")


SHARE_CHOICES = ("always", "once", "not_once", "never")
CAUSES = ("user_interrupted", "station_fault", "other_fault")

_END_EVENT = {
    Status.CHARGING: "session.started",
    Status.COMPLETED: "session.completed",
    Status.STOPPED: "session.completed",
    Status.INTERRUPTED: "session.interrupted",
}


def event_type_now(status: Status) -> str:
    """Return the event type that publishes a session in this charge status."""
    return _END_EVENT[status]


def _ask(kind: str) -> tuple[Effect, ...]:
    return (AskOwner(kind), Push(kind))


def start(event: Started) -> tuple[State, tuple[Effect, ...]]:
    """Decide what a new charge shares."""
    if not event.opted_in or event.standing is Standing.NEVER:
        return State(Status.CHARGING, Share.PRIVATE), (EraseCoordinates(),)
    if event.standing is Standing.ALWAYS:
        return State(Status.CHARGING, Share.SHARED), (Publish("session.started"),)
    return State(Status.CHARGING, Share.ASKING), _ask("share")


def _ended(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    assert isinstance(e, Ended)
    if e.status is Status.CHARGING:
        raise IllegalTransition(s, e)
    new = replace(s, status=e.status)
    if s.share is not Share.SHARED:
        return new, ()
    if e.status is Status.STOPPED:
        return replace(new, cause="user_interrupted"), (Publish("session.completed"),)
    if e.status is Status.INTERRUPTED:
        return replace(new, asked_cause=True), (
            Publish("session.interrupted"),
            *_ask("abort_reason"),
        )
    return new, (Publish("session.completed"),)


def _answered(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    assert isinstance(e, Answered)
    if e.choice not in SHARE_CHOICES:
        raise IllegalTransition(s, e)
    if e.choice in ("not_once", "never"):
        effects: tuple[Effect, ...] = (EraseCoordinates(),)
        if e.choice == "never":
            effects = (SetStanding(Standing.NEVER), *effects)
        return replace(s, share=Share.UNSHARED), effects
    shared = replace(s, share=Share.SHARED)
    effects = (Publish(event_type_now(s.status)),)
    if e.choice == "always":
        effects = (SetStanding(Standing.ALWAYS), *effects)
    if s.status is Status.STOPPED:
        shared = replace(shared, cause="user_interrupted")
    if s.status is Status.INTERRUPTED:
        shared = replace(shared, asked_cause=True)
        effects = (*effects, *_ask("abort_reason"))
    return shared, effects


def _cause(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    assert isinstance(e, CauseGiven)
    if e.cause not in CAUSES or s.status is not Status.INTERRUPTED or not s.asked_cause:
        raise IllegalTransition(s, e)
    return replace(s, cause=e.cause), (Publish("session.updated"),)


def _expired(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    return replace(s, share=Share.UNSHARED), (EraseCoordinates(),)


def _place_never(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    if s.share is Share.SHARED:
        return replace(s, share=Share.RETRACTED), (Retract(), EraseCoordinates())
    if s.share is Share.ASKING:
        return replace(s, share=Share.UNSHARED), (Withdraw("share"), EraseCoordinates())
    return s, ()


def _opted_out(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    if s.share is Share.ASKING:
        return replace(s, share=Share.UNSHARED), (Withdraw("share"), EraseCoordinates())
    # Published sessions stay published (consent was given for them) until retracted.
    return s, ()


def _nothing(s: State, e: Event) -> tuple[State, tuple[Effect, ...]]:
    return s, ()


_Handler = Callable[[State, Event], tuple[State, tuple[Effect, ...]]]

# Which events each share state accepts. Ended is accepted while charging only (checked below).
TRANSITIONS: dict[Share, dict[type, _Handler]] = {
    Share.PRIVATE: {Ended: _ended, PlaceNever: _nothing, OptedOut: _nothing},
    Share.ASKING: {
        Ended: _ended,
        Answered: _answered,
        QuestionExpired: _expired,
        PlaceNever: _place_never,
        OptedOut: _opted_out,
    },
    Share.SHARED: {Ended: _ended, CauseGiven: _cause, PlaceNever: _place_never, OptedOut: _nothing},
    Share.UNSHARED: {Ended: _ended, PlaceNever: _nothing, OptedOut: _nothing},
    Share.RETRACTED: {Ended: _ended, PlaceNever: _nothing, OptedOut: _nothing},
}


def apply(state: State, event: Event, *, now: datetime) -> tuple[State, tuple[Effect, ...]]:
    """Apply one event to a session; raise IllegalTransition if it cannot happen now."""
    del now  # decisions here do not depend on time yet; it is an argument so they may
    if isinstance(event, Started):
        raise IllegalTransition(state, event)  # a session starts only once: use start()
    if isinstance(event, Ended) and state.status is not Status.CHARGING:
        raise IllegalTransition(state, event)
    handler = TRANSITIONS[state.share].get(type(event))
    if handler is None:
        raise IllegalTransition(state, event)
    return handler(state, event)
