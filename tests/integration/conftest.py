"""The integration tier: the real server (a child process, over HTTP on
127.0.0.1) and the real client, no mocks. Crypto material is random bytes
(``users``): the server never interprets it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from megafs.wire import API_PREFIX
from tests.helpers.proxy import Proxy, running_proxy
from tests.helpers.server import ServerProcess, running_server
from tests.integration.users import User, new_user

#: Every test client comes from 127.0.0.1: the shared server must not lock
#: that address out for the failed logins many tests make on purpose (the
#: limits themselves are tested on servers of their own).
SHARED_SERVER_ARGS = ("--failed-logins-per-address", "1000000")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the tests that do not stop it."""
    with running_server(tmp_path_factory.mktemp("shared") / "data", args=SHARED_SERVER_ARGS) as srv:
        yield srv


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of this test's own, which it may stop, kill and restart."""
    with running_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[Proxy]:
    """A recording, tampering proxy in front of the shared server."""
    with running_proxy(server.url) as p:
        yield p


@pytest.fixture
async def alice(server: ServerProcess) -> AsyncIterator[User]:
    user = await new_user(server.url)
    async with user.client:
        yield user


@pytest.fixture
async def bob(server: ServerProcess) -> AsyncIterator[User]:
    user = await new_user(server.url)
    async with user.client:
        yield user


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """Plain httpx on the API prefix, for requests our client would never send."""
    async with httpx.AsyncClient(base_url=server.url + API_PREFIX, timeout=30) as http:
        yield http
