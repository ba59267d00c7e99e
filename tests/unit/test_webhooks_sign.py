"""Standard Webhooks signing, webhook URL rules and sealed secrets (service/webhooks.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from service import errors, webhooks

# The example of the Standard Webhooks reference libraries (standard-webhooks, svix).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a delivery as a partner would, following the spec rather than the service's code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


def test_signature_matches_the_spec_example() -> None:
    """The signature of the spec's example message is the spec's value."""
    assert webhooks.signature(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_headers_verify_and_tampering_is_detected() -> None:
    """Headers made for a body verify, and not for a changed body, id or timestamp."""
    secret = webhooks.new_secret()
    body = b'{"type":"session.started"}'
    h = webhooks.headers(secret, "msg_a_1", 1700000000, body)
    assert h["content-type"] == "application/json"
    assert verify(secret, h, body)
    assert not verify(secret, h, body + b" ")
    assert not verify(secret, {**h, "webhook-id": "msg_a_2"}, body)
    assert not verify(secret, {**h, "webhook-timestamp": "1700000001"}, body)
    assert not verify(webhooks.new_secret(), h, body)


def test_new_secret_has_the_whsec_form() -> None:
    """A new secret is whsec_ plus base64 of 32 random bytes, different every time."""
    s = webhooks.new_secret()
    assert s.startswith("whsec_")
    assert len(base64.b64decode(s[6:], validate=True)) == 32
    assert webhooks.new_secret() != s


@pytest.mark.parametrize("bad", ["whsec_!!notbase64", "whsec_c2hvcnQ="])
def test_malformed_secret_is_refused(bad: str) -> None:
    """A secret that is not base64 or is too short is refused."""
    with pytest.raises(ValueError):
        webhooks.secret_key(bad)


def test_message_id_is_stable_per_version() -> None:
    """The webhook-id depends on session and version only, so retries keep it."""
    assert webhooks.message_id("s", 3) == webhooks.message_id("s", 3) == "msg_s_3"
    assert webhooks.message_id("s", 4) != webhooks.message_id("s", 3)


@pytest.mark.parametrize(
    ("url", "allow", "ok"),
    [
        ("https://partner.example/hook", False, True),
        ("https://partner.example:8443/hook?x=1", False, True),
        ("http://partner.example/hook", True, False),
        ("http://127.0.0.1:9000/hook", False, False),
        ("http://127.0.0.1:9000/hook", True, True),
        ("http://localhost/hook", True, True),
        ("http://[::1]:9000/hook", True, True),
        ("http://10.0.0.1/hook", True, False),
        ("ftp://partner.example/hook", True, False),
        ("https:///nohost", False, False),
        ("https://user:pw@partner.example/hook", False, False),
        ("https://partner.example/hook#frag", False, False),
        ("https://partner.example/a b", False, False),
        ("https://partner.example:99999/hook", False, False),
        ("https://partner.example/" + "a" * 2000, False, False),
    ],
)
def test_url_rules(url: str, allow: bool, ok: bool) -> None:
    """Webhook URLs are https, or http on loopback only when development allows it."""
    if ok:
        assert webhooks.validate_url(url, allow_http_loopback=allow) == url
    else:
        with pytest.raises(errors.InvalidWebhookUrl):
            webhooks.validate_url(url, allow_http_loopback=allow)


def test_sealed_secret_opens_only_with_its_master_and_partner() -> None:
    """A sealed secret opens with the current or previous master, for its own partner only."""
    secret = webhooks.new_secret()
    old, new = b"o" * 32, b"n" * 32
    sealed = webhooks.seal(secret, master=old, partner="acme")
    assert secret.encode() not in sealed
    assert webhooks.unseal(sealed, masters=[new, old], partner="acme") == secret
    with pytest.raises(errors.ConfigError):
        webhooks.unseal(sealed, masters=[new], partner="acme")
    with pytest.raises(errors.ConfigError):
        webhooks.unseal(sealed, masters=[old], partner="other")
