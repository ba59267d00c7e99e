"""Sealed vehicle positions (service.sealing)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import sealing

SECRET = b"s" * 32
OLD = b"o" * 32
SALT = b"vehicle-salt"


def test_round_trip() -> None:
    """A sealed position opens to exactly the same coordinates with the same secret and salt."""
    blob = sealing.seal_position(SECRET, SALT, 51.3023, 0.40145)
    assert sealing.open_position([SECRET], SALT, blob) == (51.3023, 0.40145)


@given(
    st.floats(min_value=-90, max_value=90, allow_nan=False),
    st.floats(min_value=-180, max_value=180, allow_nan=False),
)
def test_round_trip_any_position(lat: float, lon: float) -> None:
    """Every valid position survives sealing bit for bit."""
    assert sealing.open_position([SECRET], SALT, sealing.seal_position(SECRET, SALT, lat, lon)) == (
        lat,
        lon,
    )


def test_blob_does_not_contain_the_position() -> None:
    """The sealed blob does not carry the coordinates in the clear."""
    blob = sealing.seal_position(SECRET, SALT, 51.3023, 0.40145)
    assert b"51.30" not in blob
    assert sealing._POINT.pack(51.3023, 0.40145) not in blob


def test_nonce_is_fresh_each_time() -> None:
    """Sealing the same position twice gives different blobs."""
    a = sealing.seal_position(SECRET, SALT, 1.0, 2.0)
    b = sealing.seal_position(SECRET, SALT, 1.0, 2.0)
    assert a != b


def test_wrong_secret_or_salt_does_not_open() -> None:
    """Another secret, or another vehicle's salt, opens nothing."""
    blob = sealing.seal_position(SECRET, SALT, 1.0, 2.0)
    assert sealing.open_position([OLD], SALT, blob) is None
    assert sealing.open_position([SECRET], b"other-vehicle", blob) is None
    assert sealing.open_position([], SALT, blob) is None


def test_rotation_opens_blob_sealed_with_previous_secret() -> None:
    """With [new, old] secrets a blob sealed under the old secret still opens."""
    blob = sealing.seal_position(OLD, SALT, 1.0, 2.0)
    assert sealing.open_position([SECRET, OLD], SALT, blob) == (1.0, 2.0)


@pytest.mark.parametrize("index", [0, 1, 13, -1])
def test_tampered_blob_does_not_open(index: int) -> None:
    """Flipping any byte (version, nonce, ciphertext or tag) makes the blob unopenable."""
    blob = bytearray(sealing.seal_position(SECRET, SALT, 1.0, 2.0))
    blob[index] ^= 0x01
    assert sealing.open_position([SECRET], SALT, bytes(blob)) is None


@given(st.binary(max_size=80))
def test_garbage_never_raises(blob: bytes) -> None:
    """Arbitrary bytes open to None rather than raising."""
    assert sealing.open_position([SECRET, OLD], SALT, blob) is None


def test_half_known_position_round_trips_as_nan() -> None:
    """A coordinate not known yet (NaN, its metric has not arrived) seals and opens as NaN."""
    blob = sealing.seal_position(SECRET, SALT, math.nan, 2.0)
    opened = sealing.open_position([SECRET], SALT, blob)
    assert opened is not None and math.isnan(opened[0]) and opened[1] == 2.0


@pytest.mark.parametrize(("lat", "lon"), [(91.0, 0.0), (0.0, -181.0), (math.inf, 0.0)])
def test_seal_refuses_non_positions(lat: float, lon: float) -> None:
    """Coordinates off the globe are refused."""
    with pytest.raises(ValueError):
        sealing.seal_position(SECRET, SALT, lat, lon)


def test_seal_refuses_empty_secret() -> None:
    """An empty secret is refused rather than used."""
    with pytest.raises(ValueError):
        sealing.seal_position(b"", SALT, 1.0, 2.0)
