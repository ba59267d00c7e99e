"""Masking of push tokens in an owner's export."""

from __future__ import annotations

import pytest

from service.adapters import owners


@pytest.mark.parametrize(
    ("token", "masked"),
    [
        ("", ""),
        ("short", "*****"),
        ("exactly12chr", "************"),
        ("fcm-token-abcdefghijklmnop", "fcm-…mnop"),
    ],
)
def test_mask_token_keeps_at_most_eight_characters(token: str, masked: str) -> None:
    """A token shows at most its first and last four characters, and short ones nothing."""
    assert owners.mask_token(token) == masked
