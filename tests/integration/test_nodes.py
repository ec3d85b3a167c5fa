"""Nodes: compare-and-set, idempotent retries, tree rules, listings, quota."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from megafs.crypto import new_node_id
from megafs.errors import (
    AlreadyExists,
    InvalidRequest,
    NotEmpty,
    NotFound,
    QuotaExceeded,
    VersionConflict,
)
from megafs.wire import INLINE_CONTENT_MAX
from tests.helpers.server import running_server
from tests.integration.users import User, new_user


async def put(
    user: User,
    node_id: bytes,
    *,
    parent: bytes | None,
    version: int = 0,
    meta: bytes | None = None,
    content: bytes | None = None,
    chunks: Sequence[bytes] = (),
    commit_id: bytes | None = None,
) -> int:
    return await user.client.put_node(
        node_id,
        parent=parent,
        expect_version=version,
        meta=meta or os.urandom(50),
        content=content,
        chunks=chunks,
        commit_id=commit_id or os.urandom(16),
    )


async def test_create_replace_and_conflicts(alice: User) -> None:
    node = new_node_id()
    assert await put(alice, node, parent=alice.root, meta=b"v1") == 1
    with pytest.raises(AlreadyExists):
        await put(alice, node, parent=alice.root)
    assert await put(alice, node, parent=alice.root, version=1, meta=b"v2", content=b"c") == 2
    with pytest.raises(VersionConflict, match="version 2"):
        await put(alice, node, parent=alice.root, version=1, meta=b"stale")
    with pytest.raises(NotFound):
        await put(alice, new_node_id(), parent=alice.root, version=3)
    got = await alice.client.get_node(node)
    assert (got.id, got.parent, got.version, got.meta, got.content, got.content_size) == (
        node,
        alice.root,
        2,
        b"v2",
        b"c",
        1,
    )


async def test_retried_commit_answers_the_version_it_made(alice: User) -> None:
    """A commit whose answer was lost is retried with the same commit id: the
    server answers the version that commit made instead of a conflict, even
    after another write replaced it (the other device saw it first)."""
    node, commit = new_node_id(), os.urandom(16)
    assert await put(alice, node, parent=alice.root, commit_id=commit) == 1
    assert await put(alice, node, parent=alice.root, commit_id=commit) == 1
    replace = os.urandom(16)
    assert await put(alice, node, parent=alice.root, version=1, commit_id=replace) == 2
    assert await put(alice, node, parent=alice.root, version=1, commit_id=replace) == 2
    assert await put(alice, node, parent=alice.root, commit_id=commit, version=1) == 1
    assert await put(alice, node, parent=alice.root, commit_id=commit) == 1
    with pytest.raises(VersionConflict):  # a write that never landed, on a stale base
        await put(alice, node, parent=alice.root, version=1)
    # Deleted since: a retry of a write that landed does not bring it back...
    await alice.client.delete_node(node, expect_version=2)
    assert await put(alice, node, parent=alice.root, commit_id=commit) == 1
    assert await put(alice, node, parent=alice.root, commit_id=replace, version=1) == 2
    with pytest.raises(NotFound):
        await alice.client.get_node(node)
    # ...but a new write creates it again.
    assert await put(alice, node, parent=alice.root) == 1


async def test_parent_rules(alice: User) -> None:
    with pytest.raises(NotFound, match="parent"):
        await put(alice, new_node_id(), parent=new_node_id())
    with pytest.raises(InvalidRequest, match="own parent"):
        node = new_node_id()
        await put(alice, node, parent=node)
    with pytest.raises(InvalidRequest, match="no parent"):
        await put(alice, new_node_id(), parent=None)
    with pytest.raises(InvalidRequest, match="root"):
        await put(alice, alice.root, parent=new_node_id(), version=1)
    # The root's record can be replaced in place.
    assert await put(alice, alice.root, parent=None, version=1, meta=b"root v2") == 2


async def test_moving_a_folder_into_itself_is_refused(alice: User) -> None:
    a, b, c = new_node_id(), new_node_id(), new_node_id()
    await put(alice, a, parent=alice.root)
    await put(alice, b, parent=a)
    await put(alice, c, parent=b)
    for target in (b, c):
        with pytest.raises(InvalidRequest, match="into itself"):
            await put(alice, a, parent=target, version=1)
    # Moving down a sibling branch is fine.
    d = new_node_id()
    await put(alice, d, parent=alice.root)
    assert await put(alice, d, parent=c, version=1) == 2
    assert [n.id for n in await alice.client.list_children(c)] == [d]


async def test_delete(alice: User) -> None:
    folder, child = new_node_id(), new_node_id()
    await put(alice, folder, parent=alice.root)
    await put(alice, child, parent=folder)
    with pytest.raises(NotEmpty):
        await alice.client.delete_node(folder, expect_version=1)
    with pytest.raises(VersionConflict):
        await alice.client.delete_node(child, expect_version=2)
    await alice.client.delete_node(child, expect_version=1)
    with pytest.raises(NotFound):
        await alice.client.get_node(child)
    with pytest.raises(NotFound):
        await alice.client.delete_node(child, expect_version=1)
    await alice.client.delete_node(folder, expect_version=1)
    with pytest.raises(InvalidRequest, match="root"):
        await alice.client.delete_node(alice.root, expect_version=1)
    assert (await alice.client.get_node(alice.root)).version == 1


async def test_listing_inlines_only_small_content(alice: User) -> None:
    folder = new_node_id()
    await put(alice, folder, parent=alice.root)
    small, large, empty, none = (os.urandom(16) for _ in range(4))
    contents = {
        small: os.urandom(INLINE_CONTENT_MAX),
        large: os.urandom(INLINE_CONTENT_MAX + 1),
        empty: b"",
        none: None,
    }
    for node, content in contents.items():
        await put(alice, node, parent=folder, content=content)
    listed = {n.id: n for n in await alice.client.list_children(folder)}
    assert listed.keys() == contents.keys()
    assert [n.id for n in await alice.client.list_children(folder)] == sorted(contents)
    assert listed[small].content == contents[small]
    assert (listed[large].content, listed[large].content_size) == (None, INLINE_CONTENT_MAX + 1)
    assert (listed[empty].content, listed[empty].content_size) == (b"", 0)
    assert (listed[none].content, listed[none].content_size) == (None, 0)
    assert (await alice.client.get_node(large)).content == contents[large]
    assert await alice.client.list_children(small) == []
    with pytest.raises(NotFound):
        await alice.client.list_children(new_node_id())


async def test_node_must_reference_stored_chunks(alice: User) -> None:
    stored, missing = os.urandom(32), os.urandom(32)
    await alice.client.put_chunk(stored, b"sealed chunk")
    node = new_node_id()
    with pytest.raises(NotFound, match="chunk"):
        await put(alice, node, parent=alice.root, content=b"manifest", chunks=[stored, missing])
    with pytest.raises(NotFound):
        await alice.client.get_node(node)
    assert await put(alice, node, parent=alice.root, content=b"m", chunks=[stored, stored]) == 1


async def test_quota(tmp_path: Path) -> None:
    """Chunks and node records count; what does not fit is refused with
    507 and changes nothing; shrinking is always allowed."""
    with running_server(tmp_path / "data", quota=10_000) as server:
        user = await new_user(server.url)
        async with user.client:
            await _fill_quota(user)


async def _fill_quota(user: User) -> None:
    client = user.client
    used = (await client.account()).used
    assert used == len(user.creds.root_meta)
    chunk = os.urandom(32)
    await client.put_chunk(chunk, os.urandom(6000))
    await client.put_chunk(chunk, os.urandom(6000))  # stored once, counted once
    assert (await client.account()).used == used + 6000
    with pytest.raises(QuotaExceeded):
        await client.put_chunk(os.urandom(32), os.urandom(5000))
    node = new_node_id()
    with pytest.raises(QuotaExceeded):
        await put(user, node, parent=user.root, meta=os.urandom(4000), chunks=[chunk])
    with pytest.raises(NotFound):
        await client.get_node(node)
    await put(user, node, parent=user.root, meta=os.urandom(1000), chunks=[chunk])
    account = await client.account()
    assert account.used == used + 7000 and account.quota == 10_000
    await put(user, node, parent=user.root, version=1, meta=b"x", chunks=[chunk])
    assert (await client.account()).used == used + 6001
    await client.delete_node(node, expect_version=2)
    assert (await client.account()).used == used + 6000  # the chunk waits for collection


async def test_children_come_in_pages_that_the_client_joins(alice, raw) -> None:
    """A folder larger than a page is listed whole by the client; the raw
    pages are ordered by id, bounded, and chained by ``next``."""
    from megafs.wire import LIST_PAGE_MAX

    count = LIST_PAGE_MAX * 2 + 7
    ids = [os.urandom(16) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        limit = trio.CapacityLimiter(16)

        async def put(node_id: bytes) -> None:
            async with limit:
                await alice.client.put_node(
                    node_id,
                    parent=alice.root,
                    expect_version=0,
                    meta=b"m" * 40,
                    content=None,
                    chunks=[],
                    commit_id=os.urandom(16),
                )

        for node_id in ids:
            nursery.start_soon(put, node_id)
    listed = await alice.client.list_children(alice.root)
    assert sorted(n.id for n in listed) == sorted(ids)
    headers = {"Authorization": f"Bearer {alice.client.token}"}
    path = f"/nodes/{alice.root.hex()}/children"
    first = (await raw.get(path, headers=headers)).json()
    assert len(first["nodes"]) == LIST_PAGE_MAX
    assert first["next"] == first["nodes"][-1]["id"]
    page = (await raw.get(f"{path}?after={first['next']}&limit=5", headers=headers)).json()
    assert [n["id"] for n in page["nodes"]] == sorted(i.hex() for i in ids)[LIST_PAGE_MAX:][:5]
    for bad in ("?limit=0", f"?limit={LIST_PAGE_MAX + 1}", "?after=xyz", "?limit=-1"):
        assert (await raw.get(path + bad, headers=headers)).status_code == 400
