"""Find a vehicle's charging place by keyed cell hashes (no coordinates stored), or add one."""

from __future__ import annotations

from collections.abc import Sequence

from service.adapters import store
from service.domain import privacy, sessions
from service.effects import Ctx


async def find_or_add(
    ctx: Ctx, secrets: Sequence[bytes], lat: float, lon: float
) -> tuple[int, sessions.Standing]:
    """Return (place id, standing answer) of the place within the fence radius, adding it if new.

    A place found under the previous key is re-keyed to the current one on this match.
    """
    v = ctx.vehicle
    radius = ctx.settings.fence_radius_m
    wanted = privacy.lookup_hashes(list(secrets), v.salt, lat, lon, radius)  # may raise ValueError
    found = await ctx.conn.fetchrow(store.FIND_PLACE, list(wanted), v.pk)
    current_key = privacy.key_id(secrets[0])
    if found is not None:
        if found["key_id"] != current_key:
            _, cell = wanted[bytes(found["cell_hash"])]
            await _rekey(ctx, found["id"], secrets[0], v.salt, cell, current_key)
        return found["id"], sessions.Standing(found["answer"])
    place_id: int = await ctx.conn.fetchval(store.NEW_PLACE, v.pk)
    cell = privacy.cell_of(lat, lon)
    await ctx.conn.execute(
        store.ADD_CELL, privacy.cell_hash(secrets[0], v.salt, cell), current_key, place_id
    )
    return place_id, sessions.Standing.PENDING


async def _rekey(ctx: Ctx, place_id: int, secret: bytes, salt: bytes, cell: str, key: str) -> None:
    # `cell` is the place's own cell: the lookup learnt it when its old-key hash matched, so the
    # place keeps its position (and its fence) under the new key.
    await ctx.conn.execute(store.ADD_CELL, privacy.cell_hash(secret, salt, cell), key, place_id)
    await ctx.conn.execute(store.REKEY_CELLS, place_id, key)
