"""The change feed: every node write and delete in sequence, per account,
followed page by page or by long poll; cursors that expire."""

from __future__ import annotations

import os
import sqlite3
from functools import partial
from pathlib import Path

import pytest
import trio

from megafs.errors import CursorExpired, InvalidRequest
from megafs.remote import Change, DeleteNode, PutNode, RemoteClient
from megafs.server import NodeWrite, SQLiteMetadataStore
from megafs.server.feed import ChangeWatch
from tests.helpers.schema import UNDO_V3
from tests.helpers.server import ServerProcess
from tests.integration.users import User, new_user

#: Far longer than any wake-up should take, far shorter than the waits
#: asked for: a poll that returns within it was woken, not timed out.
WOKEN_WITHIN = 10
WAIT = 25


def put(node: bytes, parent: bytes, version: int = 0, meta: bytes = b"m") -> PutNode:
    return PutNode(node, parent, version, meta, None, (), os.urandom(16))


def summary(changes: list[Change]) -> list[tuple[bytes, bytes | None, int, bool]]:
    return [(c.id, c.parent, c.version, c.deleted) for c in changes]


async def test_two_clients_of_one_account_see_each_others_changes(
    alice: User, server: ServerProcess
) -> None:
    async with RemoteClient(server.url) as phone:
        await phone.login(alice.creds.email, alice.creds.auth_secret, "phone")
        cursor = await phone.change_cursor()
        folder, file, gone = os.urandom(16), os.urandom(16), os.urandom(16)
        await alice.client.commit_batch(
            [put(folder, alice.root), put(file, folder), put(gone, alice.root)]
        )
        await alice.client.commit_batch([put(file, alice.root, version=1), DeleteNode(gone, 1)])

        changes, cursor2 = await phone.changes(cursor)
        # Each node once, at its latest change, in the order of those changes.
        assert summary(changes) == [
            (folder, alice.root, 1, False),
            (file, alice.root, 2, False),
            (gone, alice.root, 1, True),
        ]
        assert cursor2 == changes[-1].seq == await phone.change_cursor()
        assert await phone.changes(cursor2) == ([], cursor2)

        await phone.put_node(
            folder,
            parent=alice.root,
            expect_version=1,
            meta=b"renamed",
            content=None,
            chunks=[],
            commit_id=os.urandom(16),
        )
        changes, cursor3 = await alice.client.changes(cursor2)
        assert summary(changes) == [(folder, alice.root, 2, False)]
        assert cursor3 > cursor2


async def test_pages_follow_each_other(alice: User) -> None:
    start = await alice.client.change_cursor()
    nodes = [os.urandom(16) for _ in range(7)]
    await alice.client.commit_batch([put(node, alice.root) for node in nodes])
    seen: list[Change] = []
    cursor = start
    while True:
        page, cursor = await alice.client.changes(cursor, limit=3)
        if not page:
            break
        assert len(page) <= 3
        seen += page
    assert [c.id for c in seen] == nodes
    # From 0, the feed lists every node the account has: the root first.
    everything, _ = await alice.client.changes(0)
    assert [c.id for c in everything] == [alice.root, *nodes]


async def test_a_long_poll_returns_once_there_is_a_change(
    alice: User, server: ServerProcess
) -> None:
    async with RemoteClient(server.url) as phone:
        await phone.login(alice.creds.email, alice.creds.auth_secret, "phone")
        cursor = await phone.change_cursor()
        node = os.urandom(16)
        answers: list[tuple[list[Change], int]] = []

        async def poll() -> None:
            answers.append(await phone.changes(cursor, wait=WAIT))

        with trio.fail_after(WOKEN_WITHIN):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)  # let the poll start waiting (it works either way)
                await alice.client.put_node(
                    node,
                    parent=alice.root,
                    expect_version=0,
                    meta=b"m",
                    content=None,
                    chunks=[],
                    commit_id=os.urandom(16),
                )
        [(changes, _)] = answers
        assert [c.id for c in changes] == [node]

        # With a change already there, a long poll answers at once.
        with trio.fail_after(WOKEN_WITHIN):
            changes, _ = await phone.changes(cursor, wait=WAIT)
        assert [c.id for c in changes] == [node]


async def test_other_accounts_changes_are_never_visible(alice: User, bob: User) -> None:
    cursor = await bob.client.change_cursor()
    assert summary((await bob.client.changes(0))[0]) == [(bob.root, None, 1, False)]
    folder = os.urandom(16)
    await bob.client.commit_batch([put(folder, bob.root)])
    await bob.client.commit_batch([DeleteNode(folder, 1)])
    bobs, bob_cursor = await bob.client.changes(cursor)
    alice_cursor = await alice.client.change_cursor()

    async def poll() -> None:
        assert await alice.client.changes(alice_cursor, wait=1) == ([], alice_cursor)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)  # not woken by bob's change
        await bob.client.commit_batch([put(os.urandom(16), bob.root)])
    everything, _ = await alice.client.changes(0)
    assert {c.id for c in everything} == {alice.root}
    # The same node id in two accounts: two feeds that never meet.
    await alice.client.commit_batch([put(folder, alice.root)])
    assert summary((await alice.client.changes(alice_cursor))[0]) == [
        (folder, alice.root, 1, False)
    ]
    assert summary(bobs) == [(folder, bob.root, 1, True)]
    assert (await bob.client.changes(bob_cursor))[0][0].id != folder


async def test_cursors_expire_when_deletes_are_forgotten(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url, retries=8)
    async with user.client as client:
        kept, gone = os.urandom(16), os.urandom(16)
        await client.commit_batch([put(kept, user.root), put(gone, user.root)])
        old = await client.change_cursor()
        await client.commit_batch([DeleteNode(gone, 1)])
        recent = await client.change_cursor()
        with pytest.raises(CursorExpired):  # ahead of the account
            await client.changes(recent + 1)

        # Restarted with no retention, the server forgets the delete at once.
        await trio.to_thread.run_sync(own_server.stop)
        own_server.args += ["--change-retention-days", "0"]
        await trio.to_thread.run_sync(own_server.start)
        with trio.fail_after(WOKEN_WITHIN):
            while True:  # the first collection runs as the server starts
                try:
                    await client.changes(old)
                except CursorExpired:
                    break
                await trio.sleep(0.05)
        assert await client.changes(recent) == ([], recent)  # it saw the delete
        fresh = await client.change_cursor()
        await client.commit_batch([put(gone, user.root)])  # created again
        changes, _ = await client.changes(fresh)
        assert summary(changes) == [(gone, user.root, 1, False)]


async def test_bad_arguments(alice: User) -> None:
    for kwargs in ({"wait": -1}, {"wait": 31}, {"limit": 0}, {"limit": 1001}):
        with pytest.raises(InvalidRequest):
            await alice.client.changes(0, **kwargs)
    with pytest.raises(InvalidRequest):  # the server checks too
        await alice.client.changes(-1)


async def test_a_version_2_database_gets_a_feed(tmp_path: Path) -> None:
    """Nodes from before the feed are numbered by the upgrade: a feed from
    0 lists them, and new changes come after them."""
    path = tmp_path / "meta.sqlite3"
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, path)
    account = await meta.create_account(
        "a@example.org", {}, b"h", b"k", "00" * 16, b"m", quota=10**6, now=1
    )
    await meta.put_node(account.id, "11" * 16, _write("00" * 16), now=1)
    await meta.aclose()
    with sqlite3.connect(path) as db:
        for statement in UNDO_V3:
            db.execute(statement)
    db.close()
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, path)
    try:
        old = await meta.changes(account.id, 0, limit=10)
        assert [c.id for c in old] == ["00" * 16, "11" * 16]
        await meta.put_node(account.id, "22" * 16, _write("11" * 16), now=2)
        new = await meta.changes(account.id, old[-1].seq, limit=10)
        assert [(c.id, c.parent) for c in new] == [("22" * 16, "11" * 16)]
    finally:
        await meta.aclose()


async def test_a_poll_notices_a_change_made_by_another_process(tmp_path: Path) -> None:
    """Two store instances on one database stand for two server processes:
    the watch of one is not told of the other's write, and finds it by
    polling the store."""
    path = tmp_path / "meta.sqlite3"
    here, there = [await trio.to_thread.run_sync(SQLiteMetadataStore, path) for _ in range(2)]
    try:
        account = await here.create_account(
            "a@example.org", {}, b"h", b"k", "00" * 16, b"m", quota=10**6, now=1
        )
        watch = ChangeWatch(here, stopping=trio.Event())
        cursor = await here.change_cursor(account.id)
        with trio.fail_after(WOKEN_WITHIN):
            async with watch.watching(account.id) as watched, trio.open_nursery() as nursery:
                write = partial(there.put_node, account.id, "11" * 16, _write("00" * 16), now=1)
                nursery.start_soon(write)
                await watch.wait_beyond(
                    watched, watched.generation, cursor, deadline=trio.current_time() + WAIT
                )
        assert [c.id for c in await here.changes(account.id, cursor, limit=10)] == ["11" * 16]
    finally:
        await here.aclose()
        await there.aclose()


def _write(parent: str) -> NodeWrite:
    return NodeWrite(parent, 0, b"m", None, frozenset(), os.urandom(16))


async def test_a_long_poll_is_answered_when_the_server_stops(tmp_path: Path) -> None:
    """SIGTERM ends a long poll with an empty page (a real answer), instead
    of the poll holding the server's graceful phase until it is cut off."""
    data = tmp_path / "own-server"
    data.mkdir()
    with ServerProcess(data) as own:
        user = await new_user(own.url)
        try:
            cursor = await user.client.change_cursor()
            answers: list[tuple[list[Change], int]] = []

            async def poll() -> None:
                answers.append(await user.client.changes(cursor, wait=WAIT))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(1)  # the poll is waiting on the server
                await trio.to_thread.run_sync(own.stop)
            assert answers == [([], cursor)]
        finally:
            await user.client.aclose()
