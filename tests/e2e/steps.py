"""What a vehicle and an app do in the end-to-end tests, and matchers for what they see."""

from __future__ import annotations

import json
from collections.abc import Callable

from service import topics
from tests.mqttprobe import Probe, Seen

STATION = (51.302300, 0.401450)
HOME = (51.284700, 0.452300)


def metrics(p: Probe, owner: str, vid: str, values: dict[str, str]) -> None:
    """Publish metrics the way an OVMS v3 module does: QoS 0, retained, plain strings."""
    for name, value in values.items():
        p.publish(topics.metric(owner, vid, name), value, qos=0, retain=True)


def plug_in(p: Probe, owner: str, vid: str, where: tuple[float, float]) -> None:
    """Move to a place and start charging there."""
    metrics(p, owner, vid, {
        "v.p.latitude": f"{where[0]:.6f}", "v.p.longitude": f"{where[1]:.6f}",
        "v.type": "RT", "v.c.type": "type2", "v.b.soc": "20", "v.c.kwh": "0",
        "v.c.substate": "", "v.c.state": "charging", "v.c.charging": "yes",
        "v.c.power": "7.2", "v.c.voltage": "231", "v.c.current": "32",
    })  # fmt: skip


def finish(p: Probe, owner: str, vid: str, kwh: str = "21.4") -> None:
    metrics(p, owner, vid, {"v.c.kwh": kwh, "v.b.soc": "80", "v.c.state": "done",
                            "v.c.charging": "no"})  # fmt: skip


def unplug(p: Probe, owner: str, vid: str) -> None:
    metrics(p, owner, vid, {"v.c.state": "", "v.c.substate": "", "v.c.charging": "no"})


def opt_in(p: Probe, owner: str, vid: str, nickname: str | None = "Jimbo") -> None:
    p.publish(topics.optin(owner, vid), json.dumps({"enabled": True, "nickname": nickname}),
              retain=True)  # fmt: skip


def answer(p: Probe, owner: str, vid: str, request_id: str, choice: str, **extra: object) -> None:
    p.publish(topics.decision(owner, vid, request_id), json.dumps({"choice": choice, **extra}))


def question(kind: str) -> Callable[[Seen], bool]:
    """Match a (non-empty) retained question of this kind."""

    def match(s: Seen) -> bool:
        if "/chargeshare/request/" not in s.topic or not s.payload:
            return False
        return bool(json.loads(s.payload)["kind"] == kind)

    return match


def public(event_type: str) -> Callable[[Seen], bool]:
    return lambda s: bool(json.loads(s.payload)["type"] == event_type)


def error(code: str) -> Callable[[Seen], bool]:
    return lambda s: (
        s.topic.endswith("/chargeshare/error") and json.loads(s.payload)["code"] == code
    )


def status(**want: object) -> Callable[[Seen], bool]:
    def match(s: Seen) -> bool:
        if not s.topic.endswith("/chargeshare/status"):
            return False
        got = json.loads(s.payload)
        return all(got.get(k) == v for k, v in want.items())

    return match


def body(s: Seen) -> dict[str, object]:
    return json.loads(s.payload)  # type: ignore[no-any-return]
