"""What the server does for throughput keeps its guarantees: with group
commit, concurrent writes share commits, yet each is acknowledged only once
durable, succeeds or fails on its own, and survives a crash; with sessions
cached, a revoked one is still refused at once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio

from megafs.errors import AlreadyExists, AuthFailed
from megafs.remote import PutNode, RemoteClient
from megafs.server import NodeWrite, SQLiteMetadataStore
from tests.helpers.server import ServerProcess
from tests.integration.users import User, new_user, put_file

CONCURRENT = 48


async def test_acknowledged_writes_survive_a_crash(own_server: ServerProcess) -> None:
    """Chunks, nodes and batches acknowledged together (so in shared
    commits) are all there after the server is killed."""
    user = await new_user(own_server.url, retries=8)
    client = user.client
    chunks = {os.urandom(32): os.urandom(100 + i) for i in range(CONCURRENT)}
    nodes = {os.urandom(16): chunk for chunk in chunks}
    batched = [os.urandom(16) for _ in range(CONCURRENT)]

    async def upload(node: bytes, chunk: bytes) -> None:
        await client.put_chunk(chunk, chunks[chunk])
        await put_file(client, user.root, chunk, node)

    async with client:
        async with trio.open_nursery() as nursery:
            for node, chunk in nodes.items():
                nursery.start_soon(upload, node, chunk)
            for i in range(0, CONCURRENT, 8):
                ops = [
                    PutNode(n, user.root, 0, b"b", None, (), os.urandom(16))
                    for n in batched[i : i + 8]
                ]
                nursery.start_soon(client.commit_batch, ops)
        await trio.to_thread.run_sync(own_server.kill)
        await trio.to_thread.run_sync(own_server.start)
        listed = {n.id for n in await client.list_children(user.root)}
        assert listed == {*nodes, *batched}
        for chunk, data in chunks.items():
            assert await client.get_chunk(chunk) == data


async def test_racing_writes_of_one_node_get_one_winner(alice: User) -> None:
    """Creates of one node arriving together land in one group commit; each
    is checked against the ones before it, so exactly one wins."""
    node = os.urandom(16)
    outcomes: list[int | Exception] = []

    async def create() -> None:
        try:
            outcomes.append(
                await alice.client.put_node(
                    node,
                    parent=alice.root,
                    expect_version=0,
                    meta=os.urandom(8),
                    content=None,
                    chunks=[],
                    commit_id=os.urandom(16),
                )
            )
        except AlreadyExists as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENT):
            nursery.start_soon(create)
    assert outcomes.count(1) == 1
    assert sum(isinstance(o, AlreadyExists) for o in outcomes) == CONCURRENT - 1
    assert (await alice.client.get_node(node)).version == 1


async def test_two_stores_share_one_database(tmp_path: Path) -> None:
    """Two store instances (as two server processes would) writing one
    database at once: every write lands once, the rules hold across them."""
    path = tmp_path / "meta.sqlite3"
    stores = [await trio.to_thread.run_sync(SQLiteMetadataStore, path) for _ in range(2)]
    try:
        account = await stores[0].create_account(
            "a@example.org", {}, b"h", b"k", "00" * 16, b"m", quota=10**9, now=1
        )
        node = "11" * 16
        won: list[int] = []

        async def write(store: SQLiteMetadataStore, i: int) -> None:
            await store.put_node(account.id, f"{i:032x}", _write("00" * 16), now=1)
            with contextlib.suppress(AlreadyExists):
                won.append(await store.put_node(account.id, node, _write("00" * 16), now=1))

        async with trio.open_nursery() as nursery:
            for i in range(2, 2 + CONCURRENT):
                nursery.start_soon(write, stores[i % 2], i)
        assert won == [1]
        for store in stores:
            children = await store.list_children(account.id, "00" * 16, inline_max=0, limit=1000)
            assert children is not None and len(children) == CONCURRENT + 1
    finally:
        for store in stores:
            await store.aclose()


async def test_a_cached_session_is_refused_as_soon_as_it_ends(
    alice: User, server: ServerProcess
) -> None:
    async with RemoteClient(server.url) as phone, RemoteClient(server.url) as laptop:
        for client, device in ((phone, "phone"), (laptop, "laptop")):
            await client.login(alice.creds.email, alice.creds.auth_secret, device)
            await client.account()  # the server now has the session cached
        (phone_session,) = [s for s in await phone.sessions() if s.current]
        await alice.client.revoke_session(phone_session.id)
        with pytest.raises(AuthFailed):
            await phone.account()

        token = laptop.token
        await laptop.logout()
        laptop.token = token
        with pytest.raises(AuthFailed):
            await laptop.account()


def _write(parent: str) -> NodeWrite:
    return NodeWrite(parent, 0, b"m", None, frozenset(), os.urandom(16))
