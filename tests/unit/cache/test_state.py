"""The local state database's copy of the server's nodes: a new listing
replaces the old one exactly, whether or not it needed writing (offline
use), and a listing is current (served without the server) only while the
change feed has said nothing it does not already hold."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio

from megafs.cache import JournalEntry, LocalState
from megafs.cache import state as state_module
from megafs.remote.responses import Change, RemoteNode

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
            await state.save_listing(FOLDER, listing, at=None)
            assert _key(await state.cached_children(FOLDER)) == _key(listing)
        kept = await state.cached_children(FOLDER)
        # The same versions again (new objects, as a new listing brings):
        # nothing changes, not even the bytes kept for them.
        same = [_node(a, 3), _node(b, 3)]
        await state.save_listing(FOLDER, same, at=None)
        assert _key(await state.cached_children(FOLDER)) == _key(kept)
        # A node that moved to another folder leaves this one's listing.
        other = bytes([9]) * 16
        await state.save_node(_node(b, 4, parent=other), at=None)
        await state.save_listing(FOLDER, [kept_a := _node(a, 3)], at=None)
        after_move = await state.cached_children(FOLDER)
        assert after_move is not None and [n.id for n in after_move] == [kept_a.id]
        assert await state.cached_children(other) is None  # never listed
    finally:
        await state.aclose()


async def test_reading_the_kept_nodes_leaves_the_log_to_its_next_fold(tmp_path: Path) -> None:
    """A file opened while others are written (git add) reads its manifest
    from the kept nodes; that read must not wait for the fold of what the
    writes appended, which the log never holds anything of."""
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        node = _node(bytes([1]) * 16, 1)
        await state.save_listing(FOLDER, [node], at=None)
        chunk_id, blob = os.urandom(32), os.urandom(100)
        await state.add_chunk_file(chunk_id, blob)
        kept = await state.cached_node(node.id)
        assert kept is not None and kept.meta == node.meta
        assert _key(await state.cached_children(FOLDER)) == _key([node])
        # Not folded: the chunk's file is still to be written.
        assert state.unfolded_chunk(chunk_id) == blob
        assert not list(state.chunk_dir.rglob("*"))
        await state.fold()
        assert state.unfolded_chunk(chunk_id) is None
        assert [p.read_bytes() for p in state.chunk_dir.rglob("*") if p.is_file()] == [blob]
    finally:
        await state.aclose()


def _change(node: RemoteNode, seq: int, *, deleted: bool = False) -> Change:
    return Change(node.id, node.parent, node.version, seq, deleted)


async def _current(state: LocalState, folder: bytes = FOLDER) -> list[bytes] | None:
    kept = await state.cached_children(folder, current=True)
    return None if kept is None else sorted(n.id for n in kept)


async def test_the_feed_keeps_a_listing_current_only_while_it_holds_every_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    state = await LocalState.open(path)
    try:
        assert state.cursor is None
        await state.reset_cursor(10)
        await state.save_listing(FOLDER, [_node(a, 1), _node(b, 1)], at=10)
        assert await _current(state) == [a, b]
        # Changes it holds (the listing came after them) and a deletion.
        await state.apply_changes(
            [_change(_node(a, 1), 11), _change(_node(b, 1), 12, deleted=True)], 12
        )
        assert await _current(state) == [a]
        # A listing asked for before the feed moved on is kept, not trusted.
        await state.save_listing(FOLDER, [_node(a, 1), _node(c, 1)], at=11)
        assert await _current(state) is None
        assert _key(await state.cached_children(FOLDER)) is not None
        await state.save_listing(FOLDER, [_node(a, 1), _node(c, 1)], at=12)
        assert await _current(state) == [a, c]
    finally:
        await state.aclose()
    # The cursor and what is current survive a restart.
    state = await LocalState.open(path)
    try:
        assert state.cursor == 12
        assert await _current(state) == [a, c]
        # A newer version of a child: the listing no longer says what it is.
        await state.apply_changes([_change(_node(c, 2), 13)], 13)
        assert await _current(state) is None
        await state.save_listing(FOLDER, [_node(a, 1), _node(c, 2)], at=13)
        # A node that moves in from elsewhere (unknown here).
        other = bytes([9]) * 16
        await state.apply_changes([_change(_node(b, 5, parent=other), 14)], 14)
        assert await _current(state) == [a, c]
        await state.apply_changes([_change(_node(b, 6, parent=FOLDER), 15)], 15)
        assert await _current(state) is None
        await state.save_listing(FOLDER, [_node(a, 1), _node(b, 6), _node(c, 2)], at=15)
        # A node fetched while the feed moved on: if the row holds that
        # version already, nothing is lost; if not, the folder is stale.
        await state.save_node(_node(c, 2), at=3)
        assert await _current(state) == [a, b, c]
        await state.save_node(_node(c, 9), at=3)
        assert await _current(state) is None
        # Starting over from a new position trusts nothing.
        await state.reset_cursor(100)
        assert await _current(state) is None
    finally:
        await state.aclose()


def _entry(node_id: bytes, seq: int, parent: bytes, base: int) -> JournalEntry:
    return JournalEntry(
        node_id=node_id,
        seq=seq,
        op="put",
        parent=parent,
        base_version=base,
        meta=os.urandom(40),
        content=None,
        chunks=(),
        commit_id=os.urandom(16),
    )


async def test_what_this_device_commits_is_current_unless_the_feed_raced_it(
    tmp_path: Path,
) -> None:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    new, raced, child = (bytes([i]) * 16 for i in (4, 5, 6))
    try:
        await state.reset_cursor(1)
        await state.save_listing(FOLDER, [], at=1)
        # A folder created here: its listing is known to be empty.
        await state.put_entry(_entry(new, 1, FOLDER, 0))
        await state.entries_committed([(new, 1, 1)])
        assert await _current(state) == [new]
        assert await _current(state, new) == []
        # Our own commit coming back through the feed changes nothing.
        await state.apply_changes([Change(new, FOLDER, 1, 2, False)], 2)
        assert await _current(state) == [new]
        # Our own commit of a folder and a file in it, coming back through
        # the feed before the answer to the commit does.
        mine, its_file = bytes([7]) * 16, bytes([8]) * 16
        await state.put_entry(_entry(mine, 10, FOLDER, 0))
        await state.put_entry(_entry(its_file, 11, mine, 0))
        await state.apply_changes(
            [Change(mine, FOLDER, 1, 5, False), Change(its_file, mine, 1, 6, False)], 6
        )
        await state.entries_committed([(mine, 10, 1), (its_file, 11, 1)])
        assert await _current(state, mine) == [its_file]
        # The feed names a child of a folder whose creation is still pending
        # (another device was quicker than our commit's answer).
        await state.put_entry(_entry(raced, 2, FOLDER, 0))
        await state.apply_changes([Change(child, raced, 1, 3, False)], 3)
        await state.entries_committed([(raced, 2, 1)])
        assert await _current(state, raced) is None
        assert await _current(state) == sorted([new, raced, mine])
        # Another device's newer change of a node of ours, named by the
        # feed before our commit's answer came: the row is not trusted.
        await state.put_entry(_entry(new, 3, FOLDER, 1))
        await state.apply_changes([Change(new, FOLDER, 3, 4, False)], 4)
        await state.entries_committed([(new, 3, 2)])
        assert await _current(state) is None
        # A change that never lands takes its row with it.
        await state.save_listing(FOLDER, [_node(raced, 1)], at=4)
        await state.put_entry(_entry(raced, 4, FOLDER, 1))
        await state.entries_dropped([(raced, 4, 7)])
        assert await _current(state) is None
        assert await state.load_journal() == []
    finally:
        await state.aclose()


def _folder(node_id: bytes, parent: bytes) -> RemoteNode:
    """A folder's row: only files have content (docs/format.md §13)."""
    return RemoteNode(
        id=node_id, parent=parent, version=1, meta=os.urandom(40), content=None, content_size=0
    )


def _ids(n: int, first: int) -> list[bytes]:
    return [bytes([first + i]) * 16 for i in range(n)]


async def _tree(state: LocalState) -> tuple[list[bytes], bytes, dict[bytes, list[bytes]]]:
    """FOLDER holding three folders (the first with one folder in it), each
    with two files; every listing current. Returns the three folders, the
    one below the first, and each folder's children."""
    s1, s2, s3 = _ids(3, 20)
    below = bytes([30]) * 16
    listings: dict[bytes, list[RemoteNode]] = {
        FOLDER: [_folder(s, FOLDER) for s in (s1, s2, s3)],
        s1: [_folder(below, s1), *(_node(i, 1, parent=s1) for i in _ids(2, 40))],
        s2: [_node(i, 1, parent=s2) for i in _ids(2, 50)],
        s3: [_node(i, 1, parent=s3) for i in _ids(2, 60)],
        below: [_node(i, 1, parent=below) for i in _ids(2, 70)],
    }
    await state.reset_cursor(10)
    for folder, listing in listings.items():
        await state.save_listing(folder, listing, at=10)
    return [s1, s2, s3], below, {f: sorted(n.id for n in v) for f, v in listings.items()}


def _delete_rows(path: Path, *folders: bytes) -> None:
    """Take folders' rows away behind the state's back (only a test does:
    the daemon alone writes its database), to tell which listings it holds
    in memory."""
    db = sqlite3.connect(path)
    with db:
        db.executemany("DELETE FROM nodes WHERE parent = ?", [(f,) for f in folders])
    db.close()


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read ahead right after a write (the tests write their listings first)."""
    monkeypatch.setattr(state_module, "AHEAD_QUIET", 0.0)


@pytest.mark.usefixtures("quiet")
async def test_a_walk_finds_the_listings_below_a_folder_read_with_it(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    state = await LocalState.open(path)
    try:
        (s1, s2, s3), below, children = await _tree(state)
        assert await _current(state) == children[FOLDER]
        # Every current listing below was read with it: answered from
        # memory once, then from the database again.
        _delete_rows(path, s1, s2, s3, below)
        for folder in (below, s2, s1, s3):
            assert await _current(state, folder) == children[folder]
            assert await _current(state, folder) == []
    finally:
        await state.aclose()


@pytest.mark.usefixtures("quiet")
async def test_what_was_read_ahead_goes_with_any_write_of_the_kept_nodes(
    tmp_path: Path,
) -> None:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        (s1, s2, s3), below, children = await _tree(state)
        assert await _current(state) == children[FOLDER]
        # A node fetched on its own lands in a folder read ahead...
        new = _node(bytes([90]) * 16, 1, parent=s2)
        await state.save_node(new, at=10)
        assert await _current(state, s2) == sorted([*children[s2], new.id])
        # ...and the feed deletes one from another.
        gone = children[s3][0]
        assert await _current(state) == children[FOLDER]  # read ahead again
        await state.apply_changes([Change(gone, s3, 2, 11, True)], 11)
        assert await _current(state, s3) == children[s3][1:]
        # A change the feed names makes a folder read ahead not current.
        assert await _current(state) == children[FOLDER]
        await state.apply_changes([Change(children[below][0], below, 2, 12, False)], 12)
        assert await _current(state, below) is None
        assert await _current(state, s1) == children[s1]
    finally:
        await state.aclose()


@pytest.mark.usefixtures("quiet")
async def test_a_walk_that_reaches_what_had_no_room_reads_on_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for three nodes, FOLDER's read keeps one folder (two files)
    and leaves the other two; asking for one of those reads the other."""
    monkeypatch.setattr(state_module, "AHEAD_NODES", 3)
    path = tmp_path / "state.sqlite3"
    state = await LocalState.open(path)
    try:
        folders, _, children = await _tree(state)
        assert await _current(state) == children[FOLDER]
        _delete_rows(path, *folders)
        held = [f for f in folders if await _current(state, f) == children[f]]
        assert len(held) == 1
        # The same again, the rows back (the write drops all read ahead).
        for folder in folders:
            kept = [_node(i, 1, parent=folder) for i in children[folder]]
            await state.save_listing(folder, kept, at=10)
        assert await _current(state) == children[FOLDER]
        # The walk reaches one of the two left: the other comes with it.
        first, other = (f for f in folders if f not in held)
        assert await _current(state, first) == children[first]
        _delete_rows(path, other)
        assert await _current(state, other) == children[other]
    finally:
        await state.aclose()


async def test_nothing_is_read_ahead_for_a_while_after_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "AHEAD_QUIET", 0.5)
    path = tmp_path / "state.sqlite3"
    state = await LocalState.open(path)
    try:
        (s1, s2, s3), _, children = await _tree(state)
        assert await _current(state) == children[FOLDER]
        _delete_rows(path, s1)
        assert await _current(state, s1) == []  # not read ahead
        await trio.sleep(0.5)
        # A page of the feed with no change, a node fetched again at the
        # version kept: no write of the nodes.
        await state.apply_changes([], 10)
        kept = await state.cached_node(s2)
        assert kept is not None
        await state.save_node(kept, at=10)
        assert await _current(state) == children[FOLDER]
        _delete_rows(path, s2, s3)
        for folder in (s2, s3):
            assert await _current(state, folder) == children[folder]
    finally:
        await state.aclose()


async def test_reading_the_database_ahead_survives_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite3"
    state = await LocalState.open(path)
    await state.warm_up()
    await state.aclose()
    path.with_name(path.name + "-wal").mkdir()  # unreadable as a file
    await state.warm_up()
    assert any("could not read the local state ahead" in r.getMessage() for r in caplog.records)


async def test_kept_nodes_are_read_many_at_once(tmp_path: Path) -> None:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        kept = [_node(bytes([i]) * 16, i) for i in range(1, 6)]
        await state.save_listing(FOLDER, kept, at=None)
        missing = bytes([42]) * 16
        found = await state.cached_nodes([n.id for n in kept[1:4]] + [missing])
        assert {i: (n.version, n.meta, n.content) for i, n in found.items()} == {
            n.id: (n.version, n.meta, n.content) for n in kept[1:4]
        }
        assert await state.cached_nodes([]) == {}
        assert await state.cached_node(missing) is None
        one = await state.cached_node(kept[0].id)
        assert one is not None and (one.version, one.content) == (1, kept[0].content)
    finally:
        await state.aclose()
