"""Grid cells, keyed hashes and geofence matching (service.domain.privacy)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from service.domain import privacy

SECRET = b"k" * 32
OLD_SECRET = b"o" * 32
SALT = b"vehicle-salt-1"
RADIUS = 75.0

lats = st.floats(min_value=-80.0, max_value=80.0, allow_nan=False)
lons = st.floats(min_value=-180.0, max_value=180.0, allow_nan=False)
bearings = st.floats(min_value=0.0, max_value=360.0, allow_nan=False)


def moved(lat: float, lon: float, bearing_deg: float, d_m: float) -> tuple[float, float]:
    """Return the point d_m metres from (lat, lon) along a great circle with this bearing."""
    delta = d_m / privacy.EARTH_RADIUS_M
    p1, l1, b = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    p2 = math.asin(math.sin(p1) * math.cos(delta) + math.cos(p1) * math.sin(delta) * math.cos(b))
    l2 = l1 + math.atan2(
        math.sin(b) * math.sin(delta) * math.cos(p1),
        math.cos(delta) - math.sin(p1) * math.sin(p2),
    )
    lon2 = (math.degrees(l2) + 540.0) % 360.0 - 180.0
    return math.degrees(p2), lon2


def stored(lat: float, lon: float, secret: bytes = SECRET, salt: bytes = SALT) -> bytes:
    return privacy.cell_hash(secret, salt, privacy.cell_of(lat, lon))


def matches(h: bytes, lat: float, lon: float, keys: tuple[bytes, ...] = (SECRET,)) -> bool:
    return h in privacy.lookup_hashes(list(keys), SALT, lat, lon, RADIUS)


@pytest.mark.parametrize(
    ("lat", "lon", "precision", "expected"),
    [
        (57.64911, 10.40744, 11, "u4pruydqqvj"),
        (42.605, -5.603, 5, "ezs42"),
        (0.0, 0.0, 1, "s"),
        (-90.0, -180.0, 4, "0000"),
        (90.0, 180.0, 4, "zzzz"),
    ],
)
def test_geohash_known_values(lat: float, lon: float, precision: int, expected: str) -> None:
    """Geohash encodes reference positions to their published codes."""
    assert privacy.geohash(lat, lon, precision) == expected


@pytest.mark.parametrize(
    ("lat", "lon", "precision"), [(91, 0, 5), (0, 181, 5), (0, 0, 0), (0, 0, 13)]
)
def test_geohash_rejects_bad_input(lat: float, lon: float, precision: int) -> None:
    """Geohash refuses positions off the globe and precisions outside 1..12."""
    with pytest.raises(ValueError):
        privacy.geohash(lat, lon, precision)


def test_geohash_rejects_nan() -> None:
    """Geohash refuses a NaN coordinate instead of returning a cell."""
    with pytest.raises(ValueError):
        privacy.geohash(math.nan, 0.0, 8)


@given(lats, lons, st.integers(min_value=1, max_value=12))
def test_geohash_prefixes_nest(lat: float, lon: float, n: int) -> None:
    """A shorter geohash is a prefix of a longer one for the same position."""
    assert privacy.geohash(lat, lon, 12).startswith(privacy.geohash(lat, lon, n))


def test_distance_known_value() -> None:
    """One degree of latitude is about 111.2 km."""
    assert privacy.distance_m(0, 0, 1, 0) == pytest.approx(111_195, rel=1e-4)


@given(lats, lons, lats, lons)
def test_distance_is_symmetric(a: float, b: float, c: float, d: float) -> None:
    """Distance from p to q equals distance from q to p and is never negative."""
    pq, qp = privacy.distance_m(a, b, c, d), privacy.distance_m(c, d, a, b)
    assert pq >= 0
    assert math.isclose(pq, qp, rel_tol=1e-12, abs_tol=1e-9)


@given(lats, lons, st.floats(min_value=0.0, max_value=1000.0))
def test_own_cell_is_near(lat: float, lon: float, r: float) -> None:
    """A position's own cell is always among the cells near it, for any radius."""
    assert privacy.cell_of(lat, lon) in privacy.cells_near(lat, lon, r)


def test_cells_near_radius_zero_is_own_cell() -> None:
    """Radius 0 inside a cell gives just that cell."""
    lat, lon = 51.30230, 0.40145
    assert privacy.cells_near(lat, lon, 0.0) == [privacy.cell_of(lat, lon)]


@pytest.mark.parametrize("r", [-1.0, math.nan, privacy.MAX_RADIUS_M + 1])
def test_cells_near_rejects_bad_radius(r: float) -> None:
    """A negative, NaN or huge radius is refused."""
    with pytest.raises(ValueError):
        privacy.cells_near(0.0, 0.0, r)


def test_cells_near_at_pole_refuses_rather_than_listing_millions() -> None:
    """At a pole every longitude is near, so the lookup refuses with ValueError."""
    with pytest.raises(ValueError, match="pole"):
        privacy.cells_near(90.0, 0.0, RADIUS)


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        (60.0, 10.0),
        (60.5, -150.25),
        (0.00001, 0.00001),
        (-0.00001, 36.8),
        (51.30230, 0.40145),
        (-33.8688, 151.2093),
        (0.0, 179.99999),
        (0.0, -179.99999),
    ],
)
@pytest.mark.parametrize("bearing", [0, 45, 90, 135, 180, 225, 270, 315])
def test_fix_30m_away_matches(lat: float, lon: float, bearing: float) -> None:
    """A fix 30 m from a stored location, in any direction and latitude, matches at 75 m."""
    h = stored(lat, lon)
    assert matches(h, *moved(lat, lon, bearing, 30.0))


@pytest.mark.parametrize(("lat", "lon"), [(60.0, 10.0), (0.00001, 0.00001), (51.3023, 0.40145)])
@pytest.mark.parametrize("bearing", [0, 90, 180, 270, 30, 200])
@pytest.mark.parametrize("d", [150.0, 500.0])
def test_far_fix_does_not_match(lat: float, lon: float, bearing: float, d: float) -> None:
    """A fix 150 m or 500 m away from a stored location does not match at 75 m."""
    assert not matches(stored(lat, lon), *moved(lat, lon, bearing, d))


@pytest.mark.parametrize(("lat", "lon"), [(60.0, 10.0), (0.0, 0.0), (-45.0, -70.0)])
def test_fix_across_cell_border_matches(lat: float, lon: float) -> None:
    """A location just inside a cell corner matches a fix 30 m away in the neighbouring cell."""
    cell = privacy.cell_of(lat, lon)
    # Walk to the south-west corner of the cell, then a hair inside it.
    step = 1e-9
    c_lat, c_lon = lat, lon
    while privacy.cell_of(c_lat - 1e-6, c_lon) == cell:
        c_lat -= 1e-6
    while privacy.cell_of(c_lat, c_lon - 1e-6) == cell:
        c_lon -= 1e-6
    p0 = (c_lat + step, c_lon + step)
    assert privacy.cell_of(*p0) == cell
    p = moved(*p0, 225.0, 30.0)
    assert privacy.cell_of(*p) != cell
    assert matches(stored(*p0), *p)


@given(
    lats,
    lons,
    bearings,
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([20.0, 75.0, 300.0]),
)
def test_any_fix_within_radius_matches(
    lat: float, lon: float, bearing: float, frac: float, r: float
) -> None:
    """Every fix within the fence radius of a stored location finds its hash."""
    p = moved(lat, lon, bearing, frac * r)
    assume(privacy.distance_m(lat, lon, *p) <= r)
    assert stored(lat, lon) in privacy.lookup_hashes([SECRET], SALT, *p, r)


@given(lats, lons, bearings, st.floats(min_value=50.0, max_value=2000.0))
def test_fix_beyond_radius_plus_cell_never_matches(
    lat: float, lon: float, bearing: float, extra: float
) -> None:
    """A fix farther than radius plus a cell diagonal from a stored location never matches."""
    p = moved(lat, lon, bearing, RADIUS + extra)
    assert not matches(stored(lat, lon), *p)


def test_different_salt_or_secret_gives_different_hash() -> None:
    """The same cell hashes differently for another vehicle's salt or another secret."""
    cell = privacy.cell_of(51.3023, 0.40145)
    base = privacy.cell_hash(SECRET, SALT, cell)
    assert privacy.cell_hash(SECRET, b"other-salt", cell) != base
    assert privacy.cell_hash(OLD_SECRET, SALT, cell) != base
    assert len(base) == 32


def test_salted_hash_does_not_match_other_vehicle() -> None:
    """A location stored for one vehicle is not found by another vehicle's lookup."""
    h = stored(51.3023, 0.40145)
    assert h not in privacy.lookup_hashes([SECRET], b"other-salt", 51.3023, 0.40145, RADIUS)


def test_key_rotation_finds_location_hashed_with_old_key() -> None:
    """A lookup with [new, old] keys finds a location hashed with the old key, tagged as old."""
    lat, lon = 60.0, 10.0
    h = stored(lat, lon, secret=OLD_SECRET)
    found = privacy.lookup_hashes([SECRET, OLD_SECRET], SALT, *moved(lat, lon, 10, 30.0), RADIUS)
    assert found[h] == (privacy.key_id(OLD_SECRET), privacy.cell_of(lat, lon))
    assert not matches(h, lat, lon, keys=(SECRET,))


def test_key_id_is_short_stable_and_distinct() -> None:
    """A key id is 12 hex characters, the same for the same key and different across keys."""
    kid = privacy.key_id(SECRET)
    assert len(kid) == 12 and int(kid, 16) >= 0
    assert privacy.key_id(SECRET) == kid != privacy.key_id(OLD_SECRET)
    assert SECRET.hex()[:12] not in kid


def test_coarse_rounds_to_five_decimals() -> None:
    """Published coordinates are rounded to 5 decimals."""
    assert privacy.coarse(51.302345678, -0.401456789) == (51.30235, -0.40146)
