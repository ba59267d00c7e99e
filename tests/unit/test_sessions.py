"""The sharing state machine of DESIGN §5, over every state and event."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from service.domain import sessions as s
from service.domain.sessions import Share, Standing, Status

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
C, I, P, A = s.Status.CHARGING, s.Status.INTERRUPTED, s.Status.STOPPED, s.Status.COMPLETED  # noqa: E741

EVENTS: dict[str, s.Event] = {
    "end_completed": s.Ended(Status.COMPLETED),
    "end_interrupted": s.Ended(Status.INTERRUPTED),
    "end_stopped": s.Ended(Status.STOPPED),
    "end_charging": s.Ended(Status.CHARGING),
    "always": s.Answered("always"),
    "once": s.Answered("once"),
    "not_once": s.Answered("not_once"),
    "never": s.Answered("never"),
    "bogus_answer": s.Answered("sometimes"),
    "cause": s.CauseGiven("station_fault"),
    "bogus_cause": s.CauseGiven("gremlins"),
    "expired": s.QuestionExpired(),
    "place_never": s.PlaceNever(),
    "opted_out": s.OptedOut(),
    "started": s.Started(True, Standing.PENDING),
}


def names(effects: tuple[s.Effect, ...]) -> list[str]:
    out = []
    for e in effects:
        detail = getattr(e, "event_type", None) or getattr(e, "kind", None)
        answer = getattr(e, "answer", None)
        out.append(
            type(e).__name__ + (f":{detail}" if detail else "") + (f":{answer}" if answer else "")
        )
    return out


# (status, share, asked_cause, event) -> (new status, new share, effects) or None when illegal.
# Every combination not listed here is illegal: the sweep below checks that too.
LEGAL: dict[tuple[Status, Share, bool, str], tuple[Status, Share, list[str]]] = {
    # charging + ASKING
    (C, Share.ASKING, False, "end_completed"): (A, Share.ASKING, []),
    (C, Share.ASKING, False, "end_interrupted"): (I, Share.ASKING, []),
    (C, Share.ASKING, False, "end_stopped"): (P, Share.ASKING, []),
    (C, Share.ASKING, False, "always"): (
        C, Share.SHARED, ["SetStanding:always", "Publish:session.started"]),
    (C, Share.ASKING, False, "once"): (C, Share.SHARED, ["Publish:session.started"]),
    (C, Share.ASKING, False, "not_once"): (C, Share.UNSHARED, ["EraseCoordinates"]),
    (C, Share.ASKING, False, "never"): (
        C, Share.UNSHARED, ["SetStanding:never", "EraseCoordinates"]),
    (C, Share.ASKING, False, "expired"): (C, Share.UNSHARED, ["EraseCoordinates"]),
    (C, Share.ASKING, False, "place_never"): (
        C, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (C, Share.ASKING, False, "opted_out"): (
        C, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    # ended + ASKING: answers after completion
    (A, Share.ASKING, False, "always"): (
        A, Share.SHARED, ["SetStanding:always", "Publish:session.completed"]),
    (A, Share.ASKING, False, "once"): (A, Share.SHARED, ["Publish:session.completed"]),
    (A, Share.ASKING, False, "not_once"): (A, Share.UNSHARED, ["EraseCoordinates"]),
    (A, Share.ASKING, False, "never"): (
        A, Share.UNSHARED, ["SetStanding:never", "EraseCoordinates"]),
    (A, Share.ASKING, False, "expired"): (A, Share.UNSHARED, ["EraseCoordinates"]),
    (A, Share.ASKING, False, "place_never"): (
        A, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (A, Share.ASKING, False, "opted_out"): (
        A, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (I, Share.ASKING, False, "once"): (
        I, Share.SHARED,
        ["Publish:session.interrupted", "AskOwner:abort_reason", "Push:abort_reason"]),
    (I, Share.ASKING, False, "always"): (
        I, Share.SHARED,
        ["SetStanding:always", "Publish:session.interrupted", "AskOwner:abort_reason",
         "Push:abort_reason"]),
    (I, Share.ASKING, False, "not_once"): (I, Share.UNSHARED, ["EraseCoordinates"]),
    (I, Share.ASKING, False, "never"): (
        I, Share.UNSHARED, ["SetStanding:never", "EraseCoordinates"]),
    (I, Share.ASKING, False, "expired"): (I, Share.UNSHARED, ["EraseCoordinates"]),
    (I, Share.ASKING, False, "place_never"): (
        I, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (I, Share.ASKING, False, "opted_out"): (
        I, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (P, Share.ASKING, False, "once"): (P, Share.SHARED, ["Publish:session.completed"]),
    (P, Share.ASKING, False, "always"): (
        P, Share.SHARED, ["SetStanding:always", "Publish:session.completed"]),
    (P, Share.ASKING, False, "not_once"): (P, Share.UNSHARED, ["EraseCoordinates"]),
    (P, Share.ASKING, False, "never"): (
        P, Share.UNSHARED, ["SetStanding:never", "EraseCoordinates"]),
    (P, Share.ASKING, False, "expired"): (P, Share.UNSHARED, ["EraseCoordinates"]),
    (P, Share.ASKING, False, "place_never"): (
        P, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    (P, Share.ASKING, False, "opted_out"): (
        P, Share.UNSHARED, ["Withdraw:share", "EraseCoordinates"]),
    # SHARED
    (C, Share.SHARED, False, "end_completed"): (A, Share.SHARED, ["Publish:session.completed"]),
    (C, Share.SHARED, False, "end_stopped"): (P, Share.SHARED, ["Publish:session.completed"]),
    (C, Share.SHARED, False, "end_interrupted"): (
        I, Share.SHARED,
        ["Publish:session.interrupted", "AskOwner:abort_reason", "Push:abort_reason"]),
    (C, Share.SHARED, False, "place_never"): (C, Share.RETRACTED, ["Retract", "EraseCoordinates"]),
    (C, Share.SHARED, False, "opted_out"): (C, Share.SHARED, []),
    (A, Share.SHARED, False, "place_never"): (A, Share.RETRACTED, ["Retract", "EraseCoordinates"]),
    (A, Share.SHARED, False, "opted_out"): (A, Share.SHARED, []),
    (P, Share.SHARED, False, "place_never"): (P, Share.RETRACTED, ["Retract", "EraseCoordinates"]),
    (P, Share.SHARED, False, "opted_out"): (P, Share.SHARED, []),
    (I, Share.SHARED, True, "cause"): (I, Share.SHARED, ["Publish:session.updated"]),
    (I, Share.SHARED, True, "place_never"): (I, Share.RETRACTED, ["Retract", "EraseCoordinates"]),
    (I, Share.SHARED, True, "opted_out"): (I, Share.SHARED, []),
    (I, Share.SHARED, False, "place_never"): (
        I, Share.RETRACTED, ["Retract", "EraseCoordinates"]),
    (I, Share.SHARED, False, "opted_out"): (I, Share.SHARED, []),
}  # fmt: skip
# PRIVATE, UNSHARED and RETRACTED: charging ends silently; place_never and opted_out change nothing.
for _share in (Share.PRIVATE, Share.UNSHARED, Share.RETRACTED):
    for _end, _status in (("end_completed", A), ("end_interrupted", I), ("end_stopped", P)):
        LEGAL[(C, _share, False, _end)] = (_status, _share, [])
    for _status in (C, A, I, P):
        for _ev in ("place_never", "opted_out"):
            LEGAL[(_status, _share, False, _ev)] = (_status, _share, [])

ALL = list(itertools.product(list(Status), list(Share), (False, True), list(EVENTS)))


@pytest.mark.parametrize(("status", "share", "asked", "event"), ALL)
def test_every_state_and_event(status: Status, share: Share, asked: bool, event: str) -> None:
    """Each (state, event) pair gives the tabled result, or is refused as illegal."""
    state = s.State(status, share, asked_cause=asked)
    expected = LEGAL.get((status, share, asked, event))
    if expected is None and asked:
        # asked_cause only matters for CauseGiven; otherwise the pair behaves as without it.
        base = LEGAL.get((status, share, False, event))
        expected = base if event != "cause" else None
    if expected is None:
        with pytest.raises(s.IllegalTransition):
            s.apply(state, EVENTS[event], now=NOW)
        return
    new, effects = s.apply(state, EVENTS[event], now=NOW)
    assert (new.status, new.share, names(effects)) == expected


@pytest.mark.parametrize(
    ("opted_in", "standing", "share", "effects"),
    [
        (False, Standing.PENDING, Share.PRIVATE, ["EraseCoordinates"]),
        (False, Standing.ALWAYS, Share.PRIVATE, ["EraseCoordinates"]),
        (False, Standing.NEVER, Share.PRIVATE, ["EraseCoordinates"]),
        (True, Standing.NEVER, Share.PRIVATE, ["EraseCoordinates"]),
        (True, Standing.ALWAYS, Share.SHARED, ["Publish:session.started"]),
        (True, Standing.PENDING, Share.ASKING, ["AskOwner:share", "Push:share"]),
    ],
)
def test_start(opted_in: bool, standing: Standing, share: Share, effects: list[str]) -> None:
    """A new charge is private, shared or asked about according to opt-in and the place."""
    state, out = s.start(s.Started(opted_in, standing))
    assert (state.status, state.share, names(out)) == (Status.CHARGING, share, effects)


def test_stopped_by_owner_is_published_with_user_cause() -> None:
    """A charge the owner stopped is published as completed with cause user_interrupted."""
    state, _ = s.apply(s.State(C, Share.SHARED), s.Ended(Status.STOPPED), now=NOW)
    assert state.cause == "user_interrupted"


def test_cause_is_kept() -> None:
    """The owner's abort reason is stored on the state that gets published."""
    state, _ = s.apply(s.State(I, Share.SHARED, asked_cause=True), s.CauseGiven("other_fault"),
                       now=NOW)  # fmt: skip
    assert state.cause == "other_fault"


@pytest.mark.parametrize("choice", ["always", "once"])
def test_sharing_a_charge_the_owner_stopped_gives_the_user_cause(choice: str) -> None:
    """Sharing after an owner's stop publishes cause user_interrupted; other causes stay unset."""
    state, _ = s.apply(s.State(P, Share.ASKING), s.Answered(choice), now=NOW)
    assert state.cause == "user_interrupted"
    for status in (C, A, I):
        other, _ = s.apply(s.State(status, Share.ASKING), s.Answered(choice), now=NOW)
        assert other.cause is None
