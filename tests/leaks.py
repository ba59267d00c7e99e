"""Find a position in text in any of the forms the privacy tests forbid."""

from __future__ import annotations

import re

from service.domain import privacy


def coordinate_leaks(text: str, where: tuple[float, float]) -> list[str]:
    """Return each form of `where` found in text: 3-7 decimals, or a geohash longer than 5."""
    found = []
    for value in where:
        for digits in range(3, 8):
            s = f"{value:.{digits}f}"
            # Not preceded by a digit, nor by "<digit>:" (the seconds of 12:00:51.2847 are no
            # latitude). A longer number that starts with it counts: it holds this rounding.
            if re.search(r"(?<!\d)(?<!\d:)" + re.escape(s), text):
                found.append(s)
    found += [g for n in range(6, 13) if (g := privacy.geohash(*where, n)) in text]
    return found
