"""Integration fixtures: a broker of the test's own for the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.clikit import Stack, own_stack


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[Stack]:
    """A broker that only this test changes, named with this test's database, for the CLI."""
    yield from own_stack(tmp_path / "broker", database_url)
