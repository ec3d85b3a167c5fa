"""``POST /nodes/batch``: many node puts and deletes in one request, each op
with the semantics of its single route and a result of its own."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from megafs.crypto import new_node_id
from megafs.errors import (
    AlreadyExists,
    InvalidRequest,
    NotEmpty,
    NotFound,
    QuotaExceeded,
    VersionConflict,
)
from megafs.remote import DeleteNode, PutNode
from megafs.wire import MAX_BATCH_OPS, b64e
from tests.helpers.server import running_server
from tests.integration.users import User, new_user


def put(
    node: bytes,
    parent: bytes | None,
    version: int = 0,
    *,
    meta: bytes = b"m",
    content: bytes | None = None,
    chunks: Sequence[bytes] = (),
) -> PutNode:
    return PutNode(node, parent, version, meta, content, chunks, os.urandom(16))


async def test_ops_apply_in_order(alice: User) -> None:
    """Later ops see earlier ones: a child of a folder made in the same
    batch, a replacement, a move, a delete."""
    folder, sub, file = new_node_id(), new_node_id(), new_node_id()
    results = await alice.client.commit_batch(
        [
            put(folder, alice.root),
            put(sub, folder),
            put(file, sub, content=b"manifest"),
            put(file, folder, version=1, meta=b"moved"),
            DeleteNode(sub, 1),
        ]
    )
    assert results == [1, 1, 1, 2, 0]
    assert [n.id for n in await alice.client.list_children(folder)] == [file]
    got = await alice.client.get_node(file)
    assert (got.parent, got.version, got.meta, got.content) == (folder, 2, b"moved", None)
    with pytest.raises(NotFound):
        await alice.client.get_node(sub)


async def test_each_op_succeeds_or_fails_on_its_own(alice: User) -> None:
    folder, child, loose = new_node_id(), new_node_id(), new_node_id()
    stored, absent = os.urandom(32), os.urandom(32)
    await alice.client.put_chunk(stored, b"sealed")
    results = await alice.client.commit_batch(
        [
            put(folder, alice.root),
            put(folder, alice.root),  # exists now
            put(child, folder, chunks=[stored]),
            put(loose, new_node_id()),  # no such parent
            put(loose, alice.root, chunks=[stored, absent]),  # a chunk is missing
            put(child, folder, version=7),  # stale
            DeleteNode(folder, 1),  # not empty
            DeleteNode(alice.root, 1),  # the root
            put(new_node_id(), alice.root, version=1),  # replacing what does not exist
            put(loose, loose),  # its own parent
        ]
    )
    kinds = [type(r) if isinstance(r, Exception) else r for r in results]
    assert kinds == [
        1,
        AlreadyExists,
        1,
        NotFound,
        NotFound,
        VersionConflict,
        NotEmpty,
        InvalidRequest,
        NotFound,
        InvalidRequest,
    ]
    assert "parent" in str(results[3]) and "chunk" in str(results[4])
    assert "version 1" in str(results[5])
    # The failed ops left nothing behind.
    assert [n.id for n in await alice.client.list_children(alice.root)] == [folder]
    assert [n.id for n in await alice.client.list_children(folder)] == [child]
    assert (await alice.client.get_node(child)).version == 1


async def test_a_retried_batch_answers_what_it_made(alice: User) -> None:
    """A batch whose answer was lost is sent again: the puts answer the
    versions their commit ids made, a landed delete is NotFound."""
    a, b, c = new_node_id(), new_node_id(), new_node_id()
    await alice.client.commit_batch([put(b, alice.root), put(c, alice.root)])
    ops = [put(a, alice.root), put(c, a, version=1), DeleteNode(b, 1)]
    assert await alice.client.commit_batch(ops) == [1, 2, 0]
    again = await alice.client.commit_batch(ops)
    assert again[:2] == [1, 2] and isinstance(again[2], NotFound)


async def test_large_batches_are_split_by_the_client(alice: User) -> None:
    folder = new_node_id()
    ids = [new_node_id() for _ in range(MAX_BATCH_OPS * 2 + 3)]
    ops = [put(folder, alice.root), *(put(node, folder) for node in ids)]
    assert await alice.client.commit_batch(ops) == [1] * len(ops)
    assert {n.id for n in await alice.client.list_children(folder)} == set(ids)
    assert await alice.client.commit_batch([]) == []


async def test_another_accounts_nodes_do_not_exist(alice: User, bob: User) -> None:
    folder = new_node_id()
    await alice.client.commit_batch([put(folder, alice.root, meta=b"alice")])
    results = await bob.client.commit_batch(
        [
            put(folder, bob.root, version=1),  # replacing alice's node
            put(new_node_id(), folder),  # alice's folder as the parent
            DeleteNode(folder, 1),
            put(folder, bob.root),  # ids are per account: bob may use it too
        ]
    )
    assert [type(r) for r in results[:3]] == [NotFound] * 3 and results[3] == 1
    mine = await alice.client.get_node(folder)
    assert (mine.parent, mine.meta, mine.version) == (alice.root, b"alice", 1)
    assert await alice.client.list_children(folder) == []


async def test_quota_counts_earlier_ops_of_the_batch(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", quota=10_000) as server:
        user = await new_user(server.url)
        async with user.client as client:
            a, b = new_node_id(), new_node_id()
            results = await client.commit_batch(
                [
                    put(a, user.root, meta=bytes(6000)),
                    put(b, user.root, meta=bytes(6000)),  # does not fit after a
                    put(a, user.root, version=1, meta=b"small"),  # shrinking always fits
                    put(b, user.root, meta=bytes(6000)),  # now it does
                ]
            )
            assert results[0] == 1 and isinstance(results[1], QuotaExceeded)
            assert results[2:] == [2, 1]
            used = (await client.account()).used
            assert used == len(user.creds.root_meta) + 5 + 6000


@pytest.mark.parametrize(
    "ops",
    [
        "not a list",
        [{"op": "rename", "id": "ab" * 16}],
        [{"op": "delete", "id": "ab" * 16, "expect_version": 0}],
        [{"op": "delete", "id": "AB" * 16, "expect_version": 1}],
        [{"op": "delete", "id": "ab" * 16, "expect_version": 1, "parent": None}],
        [
            {
                "op": "put",
                "id": "ab" * 16,
                "parent": None,
                "expect_version": 0,
                "meta": "%%",
                "content": None,
                "chunks": [],
                "commit_id": b64e(bytes(16)),
            }
        ],
        [{"op": "delete", "id": "ab" * 16, "expect_version": 1}] * (MAX_BATCH_OPS + 1),
    ],
    ids=[
        "not a list",
        "unknown op",
        "version 0",
        "bad id",
        "extra field",
        "bad base64",
        "too many",
    ],
)
async def test_a_malformed_batch_is_refused_whole(
    alice: User, raw: httpx.AsyncClient, ops: object
) -> None:
    """Nothing of a batch with a malformed op is applied, not even the
    valid ops before it."""
    valid = {
        "op": "put",
        "id": new_node_id().hex(),
        "parent": alice.root.hex(),
        "expect_version": 0,
        "meta": b64e(b"m"),
        "content": None,
        "chunks": [],
        "commit_id": b64e(bytes(16)),
    }
    body = {"ops": [valid, *ops] if isinstance(ops, list) else ops}
    answer = await raw.post(
        "/nodes/batch", json=body, headers={"Authorization": f"Bearer {alice.client.token}"}
    )
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request"), answer.text
    assert await alice.client.list_children(alice.root) == []
