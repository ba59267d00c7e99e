"""Seal a vehicle's last position so that a stolen database does not reveal it.

Blob layout: version byte 0x01, 12-byte random nonce, AES-256-GCM ciphertext of two big-endian
doubles (latitude, longitude) with its 16-byte tag. The key is derived by HKDF-SHA256 from a
secret that lives outside the database; the vehicle's salt is the associated data, so a blob
copied to another vehicle does not open. Opening tries each given secret, so keys can rotate.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = b"\x01"
NONCE_BYTES = 12
_POINT = struct.Struct(">dd")
_INFO = b"chargeshare position"
BLOB_BYTES = 1 + NONCE_BYTES + _POINT.size + 16


def _key(secret: bytes) -> AESGCM:
    if not secret:
        raise ValueError("the sealing secret must not be empty")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
    return AESGCM(hkdf.derive(secret))


def seal_position(secret: bytes, salt: bytes, lat: float, lon: float) -> bytes:
    """Encrypt a position under a secret, bound to the vehicle's salt (NaN = not known yet)."""
    lat_ok = math.isnan(lat) or -90.0 <= lat <= 90.0
    lon_ok = math.isnan(lon) or -180.0 <= lon <= 180.0
    if not (lat_ok and lon_ok):
        raise ValueError(f"not a position: latitude {lat!r}, longitude {lon!r}")
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + _key(secret).encrypt(nonce, _POINT.pack(lat, lon), salt)


def open_position(secrets: Sequence[bytes], salt: bytes, blob: bytes) -> tuple[float, float] | None:
    """Decrypt a sealed position with the first secret that opens it; None if none does."""
    if len(blob) != BLOB_BYTES or blob[:1] != VERSION:
        return None
    nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
    for secret in secrets:
        if not secret:
            continue
        try:
            plain = _key(secret).decrypt(nonce, sealed, salt)
        except InvalidTag:
            continue
        lat, lon = _POINT.unpack(plain)
        if math.isinf(lat) or math.isinf(lon):
            return None
        return lat, lon  # either may be NaN: latitude and longitude arrive as separate metrics
    return None
