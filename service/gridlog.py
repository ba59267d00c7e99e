"""Place `*-LOG-Grid` records (possibly hours late) on the right session, never a duplicate one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from service import settle
from service.adapters import store
from service.domain import detect, sessions
from service.effects import Ctx

log = structlog.get_logger("gridlog")

# A record belongs to a session whose span, widened by this much, contains the record's time.
WINDOW = timedelta(seconds=120)

MATCH = f"""
SELECT {store.SESSION_COLS} FROM sessions
WHERE vehicle = $1 AND started_at <= $2::timestamptz + $4::interval
  AND coalesce(ended_at, 'infinity'::timestamptz) >= $3::timestamptz - $4::interval
ORDER BY abs(extract(epoch FROM started_at - $3::timestamptz)) LIMIT 1 FOR UPDATE
"""

_END = {
    detect.Phase.DONE: sessions.Status.COMPLETED,
    detect.Phase.ABORTED: sessions.Status.INTERRUPTED,
    detect.Phase.STOPPED: sessions.Status.STOPPED,
}


async def apply(ctx: Ctx, secrets: Sequence[bytes], rec: detect.GridRecord, at: datetime) -> None:
    """Apply one grid record that describes the vehicle's charge state at time `at`."""
    phase = rec.phase()
    if phase not in _END and phase is not detect.Phase.CHARGING:
        return  # pauses and idle states change nothing a session records
    began = at - timedelta(seconds=rec.charge_time_s or 0)
    found = await ctx.conn.fetchrow(MATCH, ctx.vehicle.pk, at, began, WINDOW)
    row = dict(found) if found is not None else None
    where = None
    if rec.latitude is not None and rec.longitude is not None:
        where = (rec.latitude, rec.longitude)
    reading = detect.Reading(
        energy_kwh=rec.charge_kwh,
        power_kw=None,
        voltage=None,
        current=None,
        soc=rec.soc,
        connector=rec.charge_type if rec.charge_type not in ("", "undefined") else None,
        vehicle_type=ctx.vehicle.metrics.get("v.type"),
        charge_time_s=rec.charge_time_s,
    )
    bound = log.bind(owner=ctx.vehicle.owner, vehicle=ctx.vehicle.vehicle_id, at=at.isoformat())
    if phase is detect.Phase.CHARGING:
        if row is not None:
            bound.info("grid record matches a known session", session=str(row["id"]))
            return
        has_open = await ctx.conn.fetchrow(store.OPEN_SESSION, ctx.vehicle.pk)
        made = await settle.start_session(
            ctx, secrets, began, where, reading, source="gridlog", is_open=has_open is None
        )
        bound.info("session from grid record", session=str(made["id"]))
        return
    status = _END[phase]
    if row is None:
        made = await settle.start_session(
            ctx, secrets, began, where, reading, source="gridlog", ended=(status, at)
        )
        bound.info("ended session from grid record", session=str(made["id"]), status=status.value)
    elif row["ended_at"] is None:
        await settle.end_session(ctx, row, status, at, reading)
        bound.info("session ended by grid record", session=str(row["id"]), status=status.value)
    else:
        bound.info("grid record matches an ended session", session=str(row["id"]))
