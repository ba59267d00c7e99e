"""`chargeshare serve` and `chargeshare migrate`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the serve and migrate commands to the root CLI."""
