"""Fixtures of the local cache's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.tools import small_disk as _small_disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB disk of its own."""
    with _small_disk(tmp_path / "disk", "4m") as disk:
        yield disk
