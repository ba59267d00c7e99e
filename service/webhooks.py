"""Standard Webhooks v1 signing, webhook URL rules, and the sealed storage of webhook secrets.

Pure: no I/O and no clock (the caller passes the timestamp). Signature (standardwebhooks.com):
`webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>`, where the key is
the base64-decoded part of `whsec_<base64>`.

The secret is symmetric, so the service must keep it to sign; it is stored AES-GCM encrypted
with a key derived (HKDF-SHA256) from the location secret, which lives outside the database,
and bound to the partner's name as associated data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service import errors

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_URL = 2000
_SEAL_INFO = b"chargeshare webhook secret v1"
_NONCE = 12


def new_secret() -> str:
    """Return a fresh `whsec_<base64>` secret."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """Return the HMAC key of a `whsec_...` secret; raise ValueError if malformed."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise ValueError("webhook secret is not base64 after whsec_") from None
    if len(key) < 24:
        raise ValueError("webhook secret is shorter than 24 bytes")
    return key


def message_id(session: str, version: int) -> str:
    """Return the webhook-id of one version of one session (the same on every retry)."""
    return f"msg_{session}_{version}"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `webhook-signature` value for this message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the request headers of one signed delivery."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def is_loopback(host: str) -> bool:
    """Tell whether a URL host names this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_url(url: str, *, allow_http_loopback: bool) -> str:
    """Return the URL if partners may be sent to it, else raise InvalidWebhookUrl."""
    if len(url) > MAX_URL or any(c.isspace() for c in url):
        raise errors.InvalidWebhookUrl(url, "too long or contains white space")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise errors.InvalidWebhookUrl(url, str(exc)) from None
    if not host:
        raise errors.InvalidWebhookUrl(url, "no host")
    if parts.username is not None or parts.password is not None:
        raise errors.InvalidWebhookUrl(url, "credentials in the URL are not allowed")
    if parts.fragment:
        raise errors.InvalidWebhookUrl(url, "a fragment is not allowed")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and is_loopback(host):
        if allow_http_loopback:
            return url
        raise errors.InvalidWebhookUrl(
            url, "plain http is allowed only with CHARGESHARE_WEBHOOK_ALLOW_HTTP_LOOPBACK"
        )
    raise errors.InvalidWebhookUrl(url, "must be https (http only on loopback in development)")


def _seal_key(master: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO)
    return hkdf.derive(master)


def seal(secret: str, *, master: bytes, partner: str) -> bytes:
    """Encrypt a webhook secret for storage (nonce || ciphertext)."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(_seal_key(master)).encrypt(nonce, secret.encode(), partner.encode())


def unseal(sealed: bytes, *, masters: Iterable[bytes], partner: str) -> str:
    """Decrypt a stored webhook secret with the current or a previous master secret."""
    nonce, box = sealed[:_NONCE], sealed[_NONCE:]
    for master in masters:
        try:
            return AESGCM(_seal_key(master)).decrypt(nonce, box, partner.encode()).decode()
        except InvalidTag:
            continue
    raise errors.ConfigError(
        "CHARGESHARE_LOCATION_SECRET", f"cannot decrypt the webhook secret of partner {partner!r}"
    )
