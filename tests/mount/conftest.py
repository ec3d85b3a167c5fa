"""The mount tier: the real ``megafs`` CLI, a real FUSE mount and the real
server over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess, running_server


@pytest.fixture(autouse=True)
def _need_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing on this machine")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, which it may stop, kill and restart."""
    with running_server(tmp_path / "server") as srv:
        yield srv


@pytest.fixture
def drive(tmp_path: Path, server: ServerProcess) -> Iterator[Drive]:
    d = Drive(tmp_path / "alice", server.url)
    d.signup()
    try:
        yield d
    finally:
        d.cleanup()
