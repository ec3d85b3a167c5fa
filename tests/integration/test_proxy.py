"""The test proxy itself (tests/helpers/proxy.py): the API other tests rely
on (the malicious-server tests, the crash tests) does what its docstring
says, with the real client in front and the real server behind it."""

from __future__ import annotations

import os
import time

import pytest
import trio

from megafs.errors import RemoteError
from megafs.remote import RemoteClient
from megafs.wire import API_PREFIX
from tests.helpers.proxy import Drop, Error, Proxy, ProxyResponse, Reset, Truncate
from tests.helpers.server import ServerProcess
from tests.integration.test_chunks import send_cut_short
from tests.integration.users import new_user


async def test_tamper_chain_replay_and_clients(proxy: Proxy) -> None:
    async with RemoteClient(proxy.url, retries=0) as client:
        real = await client.health()
        # Two hooks on one route compose, newest first.
        proxy.on(
            lambda r, forward: forward().with_json(lambda v: {**v, "version": v["version"] + "b"}),
            path="/v1/health",
        )
        proxy.on(
            lambda r, forward: forward().with_json(lambda v: {**v, "version": v["version"] + "a"}),
            path="/v1/health",
            times=1,
        )
        assert await client.health() == real + "ba"
        assert await client.health() == real + "b"  # the times=1 hook is gone
        proxy.clear()
        first = proxy.find("GET", "/v1/health")[0]
        proxy.on(
            lambda r, forward: ProxyResponse.json_answer({"ok": True, "version": "B"}),
            client="desktop",
        )
        async with RemoteClient(proxy.url_for("desktop"), retries=0) as desktop:
            assert await desktop.health() == "B"
        assert await client.health() == real
        proxy.on(lambda r, forward: first.response, path="/v1/health")
        assert await client.health() == real
    assert [r.client for r in proxy.records].count("desktop") == 1


@pytest.mark.parametrize(
    "fault",
    [Drop(), Drop(after_server=True), Reset(), Truncate(0.5), Error(503), Error(500)],
    ids=["drop", "drop after server", "reset", "truncate", "503", "500"],
)
async def test_faults_reach_the_client_as_remote_errors(proxy: Proxy, fault: object) -> None:
    proxy.on(lambda r, forward: fault, path="/v1/health")  # type: ignore[arg-type,return-value]
    async with RemoteClient(proxy.url, retries=1) as client:
        with pytest.raises(RemoteError):
            await client.health()
        proxy.clear()
        await client.health()
    faulted = [r for r in proxy.records if r.fault is not None]
    assert len(faulted) == 2 and {r.fault for r in faulted} == {fault.kind}  # type: ignore[attr-defined]


async def test_random_faults_are_seeded_and_cleared(proxy: Proxy) -> None:
    proxy.faults(drop=0.25, reset=0.25, error5xx=0.25, truncate=0.25, seed=3)
    async with RemoteClient(proxy.url, retries=0) as client:
        for _ in range(8):
            with pytest.raises(RemoteError):
                await client.health()
        proxy.clear()
        await client.health()
    stats = proxy.statistics()
    assert stats["requests"] == 9
    assert sum(stats.get(k, 0) for k in ("drop", "reset", "error", "truncate")) == 8


async def test_a_body_the_client_stops_sending_is_not_forwarded(
    proxy: Proxy, server: ServerProcess
) -> None:
    """As at any real proxy, an incomplete request (its client was killed
    mid-upload) ends at the proxy: it never reaches the server as a whole,
    shorter one, which the server would store as the chunk."""
    user = await new_user(server.url)
    async with user.client as client:
        chunk_id = os.urandom(32)
        port = int(proxy.url.rsplit(":", 1)[1])
        path = f"{API_PREFIX}/chunks/{chunk_id.hex()}"
        await send_cut_short(port, path, str(client.token), 1 << 20, bytes(128 << 10))
        deadline = time.monotonic() + 10
        while proxy.statistics().get("incomplete", 0) < 1:
            assert time.monotonic() < deadline, "the proxy did not see the body end early"
            await trio.sleep(0.05)
        assert not proxy.find("PUT", path)
        assert await client.missing_chunks([chunk_id]) == {chunk_id}
