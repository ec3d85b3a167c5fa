"""Accounts are isolated: another account's nodes and chunks are 404, as
if they did not exist, whatever the request."""

from __future__ import annotations

import os

import pytest

from megafs.errors import NotFound
from tests.integration.users import User, put_file


async def test_nodes_of_another_account_do_not_exist(alice: User, bob: User) -> None:
    folder, file = os.urandom(16), os.urandom(16)
    commit = os.urandom(16)
    for node, parent in ((folder, alice.root), (file, folder)):
        await alice.client.put_node(
            node,
            parent=parent,
            expect_version=0,
            meta=b"alice",
            content=b"secret",
            chunks=[],
            commit_id=commit,
        )

    for node in (alice.root, folder, file):
        with pytest.raises(NotFound):
            await bob.client.get_node(node)
        with pytest.raises(NotFound):
            await bob.client.list_children(node)
        with pytest.raises(NotFound):
            await bob.client.delete_node(node, expect_version=1)
        with pytest.raises(NotFound):  # replacing: no such node (for bob)
            await bob.client.put_node(
                node,
                parent=bob.root,
                expect_version=1,
                meta=b"bob",
                content=None,
                chunks=[],
                commit_id=commit,
            )
    with pytest.raises(NotFound):  # alice's folder as a parent: missing
        await bob.client.put_node(
            os.urandom(16),
            parent=folder,
            expect_version=0,
            meta=b"bob",
            content=None,
            chunks=[],
            commit_id=os.urandom(16),
        )

    # Node ids are per account: bob may use the same id in his own tree
    # (and the same commit id), which changes nothing of alice's.
    assert (
        await bob.client.put_node(
            file,
            parent=bob.root,
            expect_version=0,
            meta=b"bob",
            content=None,
            chunks=[],
            commit_id=commit,
        )
        == 1
    )
    assert [n.id for n in await bob.client.list_children(bob.root)] == [file]
    mine = await alice.client.get_node(file)
    assert (mine.parent, mine.meta, mine.content) == (folder, b"alice", b"secret")
    assert [n.id for n in await alice.client.list_children(folder)] == [file]


async def test_chunks_of_another_account_do_not_exist(alice: User, bob: User) -> None:
    chunk = os.urandom(32)
    await alice.client.put_chunk(chunk, b"alice's ciphertext")
    with pytest.raises(NotFound):
        await bob.client.get_chunk(chunk)
    assert await bob.client.get_chunks([chunk]) == {}
    assert await bob.client.missing_chunks([chunk]) == {chunk}
    with pytest.raises(NotFound, match="chunk"):
        await put_file(bob.client, bob.root, chunk)
    # bob uploading the same id stores bob's bytes for bob only.
    await bob.client.put_chunk(chunk, b"bob's ciphertext")
    assert await bob.client.get_chunk(chunk) == b"bob's ciphertext"
    assert await alice.client.get_chunk(chunk) == b"alice's ciphertext"
    assert (await bob.client.account()).used == len(bob.creds.root_meta) + 16
