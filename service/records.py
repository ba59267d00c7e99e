"""Build the public record (DESIGN §4) and the owner's question payload from a session row."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from service import wire
from service.domain import detect, privacy


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(float(v), digits)


def record(
    s: Mapping[str, Any], *, version: int, contributor: str, license: str, updated_at: datetime
) -> wire.Record:
    """Return the public record of a session as it stands now (retracted: no place at all)."""
    retracted = s["share"] == "retracted"
    status = "retracted" if retracted else s["status"]
    if status == "stopped":
        status = "completed"  # the owner stopped a charge that worked; `cause` says so
    lat = lon = None
    if not retracted and s["latitude"] is not None:
        lat, lon = privacy.coarse(s["latitude"], s["longitude"])
    connector = s["connector"]
    station = None
    if s["ocm_id"] is not None and not retracted:
        station = wire.PublicStation(ocm_id=s["ocm_id"])
    return wire.Record(
        id=str(s["id"]),
        version=version,
        status=status,  # type: ignore[arg-type]  # one of Record's literals, checked by pydantic
        cause=s["cause"],
        contributor=contributor,
        vehicle_type=s["vehicle_type"],
        connector=connector,
        ocm_connection_type_id=detect.OCM_CONNECTION_TYPE.get(connector or ""),
        latitude=lat,
        longitude=lon,
        station=station,
        charge_point=None if retracted else s["charge_point"],
        started_at=s["started_at"],
        ended_at=s["ended_at"],
        energy_kwh=_round(s["energy_kwh"]),
        max_power_kw=_round(s["max_power_kw"]),
        max_voltage=_round(s["max_voltage"], 1),
        max_current=_round(s["max_current"], 1),
        soc_start=_round(s["soc_start"], 1),
        soc_end=_round(s["soc_end"], 1),
        comment=None if retracted else s["comment"],
        updated_at=updated_at,
        license=license,
    )


def question(
    s: Mapping[str, Any],
    *,
    request_id: str,
    kind: str,
    created_at: datetime,
    expires_at: datetime,
) -> wire.Question:
    """Return the question payload the owner's app reads."""
    choices = wire.SHARE_CHOICES if kind == "share" else wire.ABORT_CHOICES
    station = wire.Station(ocm_id=s["ocm_id"]) if s["ocm_id"] is not None else None
    return wire.Question(
        request_id=request_id,
        kind="share" if kind == "share" else "abort_reason",
        session=wire.QuestionSession(
            id=str(s["id"]),
            started_at=s["started_at"],
            ended_at=s["ended_at"],
            latitude=s["latitude"],
            longitude=s["longitude"],
            energy_kwh=_round(s["energy_kwh"]),
            connector=s["connector"],
        ),
        station=station,
        choices=list(choices),
        created_at=created_at,
        expires_at=expires_at,
    )


PUSH_TEXT = {
    "share": "You started charging at a new place. Share this charge?",
    "abort_reason": "Your charge stopped early. What happened?",
}
