"""Grid cells, keyed cell hashes and geofence matching for charging locations (DESIGN §5).

A location that must not be recoverable from a database dump is stored only as
`cell_hash(secret, salt, cell_of(p0))`. A later fix `p` matches it when that hash is among
`lookup_hashes([secret, previous_secret], salt, p, radius)`: the hashes of every cell that comes
within `radius` of `p`. Because the stored cell contains `p0`, any fix within `radius` of `p0`
finds it; fixes farther away than `radius` plus one cell diagonal (about 43 m) never do.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence

CELL_PRECISION = 8  # geohash-8 cells (~38 m x 19 m at the equator)
EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)
MAX_RADIUS_M = 5_000.0  # fences are tens of metres; larger radii would hash too many cells
MAX_CELLS = 100_000  # refuse lookups that would hash more cells (only possible at the poles)

_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"
_M_PER_DEG = math.pi * EARTH_RADIUS_M / 180.0
# Nearest-point distances use the clamped corner, which may overestimate the true great-circle
# minimum by far less than a millimetre at fence sizes; the slack keeps the lookup a superset.
_SLACK_M = 0.001


def _check_point(lat: float, lon: float) -> None:
    if not (-90.0 <= lat <= 90.0) or not (-180.0 <= lon <= 180.0):
        raise ValueError(f"not a position: latitude {lat!r}, longitude {lon!r}")


def _bits(precision: int) -> tuple[int, int]:
    """Return (latitude bits, longitude bits) of a geohash of this precision."""
    if not 1 <= precision <= 12:
        raise ValueError(f"geohash precision must be 1..12, not {precision}")
    total = 5 * precision
    return total // 2, total - total // 2


def _index(value: float, lo: float, hi: float, bits: int) -> int:
    """Bisect [lo, hi] `bits` times exactly as geohash does; return the interval index."""
    index = 0
    for _ in range(bits):
        mid = (lo + hi) / 2
        index <<= 1
        if value >= mid:
            index |= 1
            lo = mid
        else:
            hi = mid
    return index


def _encode(lat_index: int, lon_index: int, lat_bits: int, lon_bits: int) -> str:
    """Interleave the two indices (longitude first) into base-32 characters."""
    code = 0
    li, oi = lat_bits, lon_bits
    for n in range(lat_bits + lon_bits):
        code <<= 1
        if n % 2 == 0:
            oi -= 1
            code |= (lon_index >> oi) & 1
        else:
            li -= 1
            code |= (lat_index >> li) & 1
    chars = []
    for _ in range((lat_bits + lon_bits) // 5):
        chars.append(_BASE32[code & 31])
        code >>= 5
    return "".join(reversed(chars))


def geohash(lat: float, lon: float, precision: int) -> str:
    """Return the geohash of a position at the given precision (1..12 characters)."""
    _check_point(lat, lon)
    lat_bits, lon_bits = _bits(precision)
    return _encode(
        _index(lat, -90.0, 90.0, lat_bits),
        _index(lon, -180.0, 180.0, lon_bits),
        lat_bits,
        lon_bits,
    )


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Return the great-circle (haversine) distance between two positions in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, max(0.0, a))))


def cell_of(lat: float, lon: float) -> str:
    """Return the CELL_PRECISION grid cell that contains a position."""
    return geohash(lat, lon, CELL_PRECISION)


def cells_near(lat: float, lon: float, radius_m: float) -> list[str]:
    """Return every CELL_PRECISION cell whose rectangle comes within radius_m of a position."""
    _check_point(lat, lon)
    if not 0.0 <= radius_m <= MAX_RADIUS_M:
        raise ValueError(f"radius must be 0..{MAX_RADIUS_M:g} m, not {radius_m!r}")
    lat_bits, lon_bits = _bits(CELL_PRECISION)
    rows, cols = 1 << lat_bits, 1 << lon_bits
    cell_h, cell_w = 180.0 / rows, 360.0 / cols
    i0 = _index(lat, -90.0, 90.0, lat_bits)
    j0 = _index(lon, -180.0, 180.0, lon_bits)

    reach = radius_m + _SLACK_M
    dlat = reach / _M_PER_DEG
    i_lo = max(0, math.floor((lat - dlat + 90.0) / cell_h) - 1)
    i_hi = min(rows - 1, math.floor((lat + dlat + 90.0) / cell_h) + 1)
    # The widest longitude span is needed at the latitude in reach closest to a pole.
    widest = min(90.0, max(abs(lat - dlat), abs(lat + dlat)))
    cos_w = math.cos(math.radians(widest))
    if cos_w * _M_PER_DEG * 180.0 <= reach:
        span = cols  # the circle reaches (or nearly reaches) a pole: every longitude
    else:
        span = 2 * (math.ceil(reach / (_M_PER_DEG * cos_w) / cell_w) + 1) + 1
    span = min(span, cols)
    if (i_hi - i_lo + 1) * span > MAX_CELLS:
        raise ValueError(f"too close to a pole to list cells within {radius_m:g} m")
    j_first = j0 - span // 2 if span < cols else 0

    found: list[str] = []
    for i in range(i_lo, i_hi + 1):
        south = -90.0 + i * cell_h
        near_lat = min(max(lat, south), south + cell_h)
        for k in range(span):
            j = (j_first + k) % cols
            west = -180.0 + j * cell_w
            near_lon = _clamp_lon(lon, west, west + cell_w)
            if (i == i0 and j == j0) or distance_m(lat, lon, near_lat, near_lon) <= reach:
                found.append(_encode(i, j, lat_bits, lon_bits))
    return found


def _clamp_lon(lon: float, west: float, east: float) -> float:
    """Return the longitude in [west, east] nearest to lon, going either way round."""
    if west <= lon <= east:
        return lon
    to_west = (west - lon) % 360.0
    to_east = (lon - east) % 360.0
    return west if to_west <= to_east else east


def cell_hash(secret: bytes, salt: bytes, cell: str) -> bytes:
    """Return the keyed, per-vehicle salted hash of a grid cell."""
    return hmac.new(secret, salt + b"|" + cell.encode(), hashlib.sha256).digest()


def key_id(secret: bytes) -> str:
    """Return a short public fingerprint of a hashing key."""
    return hmac.new(secret, b"chargeshare key id", hashlib.sha256).hexdigest()[:12]


def lookup_hashes(
    keys: Sequence[bytes], salt: bytes, lat: float, lon: float, radius_m: float
) -> dict[bytes, tuple[str, str]]:
    """Map the hash of every cell within radius_m, under every key, to (key id, cell)."""
    cells = cells_near(lat, lon, radius_m)
    out: dict[bytes, tuple[str, str]] = {}
    for key in keys:
        kid = key_id(key)
        for cell in cells:
            out[cell_hash(key, salt, cell)] = (kid, cell)
    return out


def coarse(lat: float, lon: float) -> tuple[float, float]:
    """Round a position to 5 decimals (about 1 m) for publishing."""
    return round(lat, 5), round(lon, 5)
