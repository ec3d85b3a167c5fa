"""The local state database's copy of the server's nodes (for working
offline): a new listing replaces the old one exactly, whether or not it
needed writing."""

from __future__ import annotations

import os
from pathlib import Path

from megafs.cache import LocalState
from megafs.remote.responses import RemoteNode

FOLDER = bytes(16)


def _node(node_id: bytes, version: int, parent: bytes = FOLDER) -> RemoteNode:
    return RemoteNode(
        id=node_id,
        parent=parent,
        version=version,
        meta=os.urandom(40),
        content=os.urandom(8),
        content_size=8,
    )


def _key(nodes: list[RemoteNode] | None) -> list[tuple[bytes, int, bytes]] | None:
    if nodes is None:
        return None
    return sorted((n.id, n.version, n.meta) for n in nodes)


async def test_a_listing_replaces_what_was_kept(tmp_path: Path) -> None:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        assert await state.cached_children(FOLDER) is None  # never listed
        a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
        steps = [
            [_node(a, 1), _node(b, 1)],
            [_node(a, 1), _node(b, 2)],  # b changed
            [_node(a, 1), _node(c, 1)],  # b gone, c new: same count
            [_node(c, 1)],  # a gone
            [],  # empty
            [_node(a, 3), _node(b, 3)],
        ]
        for listing in steps:
            await state.save_listing(FOLDER, listing)
            assert _key(await state.cached_children(FOLDER)) == _key(listing)
        kept = await state.cached_children(FOLDER)
        # The same versions again (new objects, as a new listing brings):
        # nothing changes, not even the bytes kept for them.
        same = [_node(a, 3), _node(b, 3)]
        await state.save_listing(FOLDER, same)
        assert _key(await state.cached_children(FOLDER)) == _key(kept)
        # A node that moved to another folder leaves this one's listing.
        other = bytes([9]) * 16
        await state.save_node(_node(b, 4, parent=other))
        await state.save_listing(FOLDER, [kept_a := _node(a, 3)])
        after_move = await state.cached_children(FOLDER)
        assert after_move is not None and [n.id for n in after_move] == [kept_a.id]
        assert await state.cached_children(other) is None  # never listed
    finally:
        await state.aclose()
