"""The daemon's local state: one SQLite database in the cache directory.

It holds ciphertext and ids only (a stolen laptop reveals nothing without
the password): the index of sealed chunks kept on disk, and the **journal**
of node changes not yet committed on the server. The journal keeps, per
node, the latest state to commit (sealed record, sealed manifest, chunk ids)
or a deletion; a later change replaces an earlier one, so the journal is as
large as the set of dirty nodes, not as the history.

Schema (documented here, at its source)::

    chunks(id BLOB PK      -- 32-byte chunk id (keyed hash, see format.md)
           size INT        -- bytes of the sealed chunk file
           dirty INT       -- 1 until the server has it; never evicted then
           atime INT)      -- last use (ns), for LRU eviction
    journal(node_id BLOB PK
            seq INT        -- grows with every change; the uploader removes an
                           -- entry only if it committed that very seq
            op TEXT        -- 'put' or 'delete'
            parent BLOB    -- new parent (put); the server sees it anyway
            base_version INT  -- server version this change was made on
                              -- (0 = node not yet on the server)
            meta BLOB, content BLOB   -- sealed record and manifest (put)
            chunks BLOB    -- concatenated 32-byte chunk ids (put)
            commit_id BLOB)  -- makes a retried commit idempotent
    seen(node_id BLOB PK, rev INT)  -- newest record revision seen per node:
                                    -- an older one from the server is a
                                    -- rollback and is refused (rule 8)
    nodes(id BLOB PK, parent, version, meta, content, content_size)
                   -- the server's nodes as last seen (sealed), for
                   -- listings without the server
    listed(id BLOB PK)   -- folders whose listing ``nodes`` holds
    current(id BLOB PK)  -- those of them whose listing is the server's as
                         -- of the change-feed cursor ``meta.cursor``
    meta(key TEXT PK, value BLOB)  -- format version of this database,
                                   -- ``cursor``: the change feed's position
                                   -- that ``current`` listings are exact at,
                                   -- and ``log_folded``: the last log applied

Calls run in a worker thread behind a limiter of one: SQLite is blocking
and the trio thread serves FUSE requests. The two writes a FUSE request
waits for, a journal entry and a chunk's row, are appended to a log instead
(cache/statelog.py) and applied at the start of the next call, so every
call sees them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from megafs.cache.chunkfiles import chunk_path, write_chunk_file
from megafs.cache.statelog import Record, StateLog, Value, leftover_logs
from megafs.errors import LocalDiskFull
from megafs.remote import Change, RemoteNode

__all__ = ["JournalEntry", "LocalState", "journal_left"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How much of the database's files ``LocalState.warm_up`` reads at most.
WARM_UP_BYTES = 256 << 20
#: How many nodes ``cached_children`` reads ahead at most (about 1.3 KiB
#: each); twice as many (counting each folder as one more) are kept.
AHEAD_NODES = 2048
#: Seconds after a write of the kept nodes during which nothing is read
#: ahead: while files are written, our commits land every few tens of
#: milliseconds, and each would drop what was read before a walk got to it.
AHEAD_QUIET = 1.0
_SCHEMA_VERSION = b"1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, size INTEGER NOT NULL, dirty INTEGER NOT NULL, atime INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (node_id BLOB PRIMARY KEY, rev INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    node_id BLOB PRIMARY KEY, seq INTEGER NOT NULL, op TEXT NOT NULL, parent BLOB,
    base_version INTEGER NOT NULL, meta BLOB, content BLOB, chunks BLOB NOT NULL,
    commit_id BLOB NOT NULL, sent_commit_id BLOB);
CREATE TABLE IF NOT EXISTS nodes (
    id BLOB PRIMARY KEY, parent BLOB, version INTEGER NOT NULL, meta BLOB NOT NULL,
    content BLOB, content_size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes (parent);
CREATE TABLE IF NOT EXISTS listed (id BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS current (id BLOB PRIMARY KEY);
"""


@dataclass
class JournalEntry:
    """The latest uncommitted state of one node."""

    node_id: bytes
    seq: int
    op: str  # "put" | "delete"
    parent: bytes | None
    base_version: int
    meta: bytes | None
    content: bytes | None
    chunks: tuple[bytes, ...]
    commit_id: bytes
    #: The commit id of an earlier state of the node that was sent and may
    #: have landed unconfirmed (a crash, a lost answer): if the server then
    #: refuses ``base_version``, that commit is asked about before anything
    #: is called a conflict (cache/uploader.py).
    sent_commit_id: bytes | None = None


class LocalState:
    def __init__(self, path: Path) -> None:
        self._path = path
        #: The chunk cache's files (docs/format.md §14), beside the
        #: database: the fold of a logged chunk writes its file there.
        self.chunk_dir = path.parent / "chunks"
        self._chunk_root = str(self.chunk_dir)
        #: Chunks logged by ``add_chunk_file`` whose fold is not done yet:
        #: chunk id -> sealed bytes. Added on the event loop; removed by the
        #: fold (database thread), after the files are written and the
        #: transaction is committed, unless logged again meanwhile.
        self._unfolded: dict[bytes, bytes] = {}
        self._unfolded_lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        #: A second connection, in a thread of its own, for reads of the
        #: local copy of the server's nodes (see ``_read``).
        self._read_limiter = trio.CapacityLimiter(1)
        self._reader: sqlite3.Connection | None = None
        self._log = StateLog(path)
        #: The change feed's position the ``current`` listings are exact at
        #: (None: none is). Changed only in the database thread, in the
        #: transaction that makes it true.
        self.cursor: int | None = None
        #: Changes the feed named while a change of ours to the same node was
        #: pending: node id -> (newest version, its parent); settled when
        #: ours lands or is dropped (``entries_committed``).
        self._raced: dict[bytes, tuple[int, bytes | None]] = {}
        #: Folders created here that the feed named a child of before their
        #: creation was known to have landed: not current when it has.
        self._raced_folders: set[bytes] = set()
        #: Current listings read ahead with a folder's own (see
        #: ``cached_children``), by folder id, until asked for or until a
        #: write that changes a listing (``_write_nodes``) drops them all.
        self._ahead: dict[bytes, list[RemoteNode]] = {}
        self._ahead_nodes = 0
        #: Current folders the last read ahead found but had no room for
        #: (a stack: the next read goes on from its top), at most
        #: ``AHEAD_NODES`` of them.
        self._frontier: dict[bytes, None] = {}
        #: Set when the read ahead under way ends.
        self._reading: trio.Event | None = None
        #: Moved on by every write of the kept nodes, as it starts and as it
        #: ends: a read ahead that saw it change may hold rows from before.
        self._nodes_generation = 0
        #: When the last one that changed a listing ended (trio's clock).
        self._nodes_written = -math.inf

    @classmethod
    async def open(cls, path: Path) -> LocalState:
        self = cls(path)
        await self._run(self._open_sync)
        return self

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        os.chmod(self._path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a crash of the daemon; fsync() asks for a full sync.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(journal)")}
        if "sent_commit_id" not in columns:  # a cache made before it existed
            db.execute("ALTER TABLE journal ADD COLUMN sent_commit_id BLOB")
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
        elif bytes(row[0]) != _SCHEMA_VERSION:
            db.close()
            raise RuntimeError(f"{self._path}: cache database from another megafs version")
        row = db.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()
        self.cursor = None if row is None else int(row[0])
        folded = _log_folded(db)
        leftover = leftover_logs(self._path, folded)
        if leftover:  # the daemon stopped before folding these
            with _transaction(db):
                for number, records in leftover:
                    _apply(db, records, number, self._chunk_root)
                    folded = number
        self._log.start(after=folded)
        self._db = db
        reader = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        reader.execute("PRAGMA query_only=1")
        self._reader = reader

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` in the database's thread, after folding the log: every
        call sees every write appended before it."""

        def work() -> _T:
            self._fold()
            return fn(*args)

        with local_disk(self._path.parent):
            return await trio.to_thread.run_sync(work, limiter=self._limiter)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` in one read transaction on the reader's
        thread, for reads of the tables the log never changes (``nodes``,
        ``listed``, ``current``: the local copy of the server's nodes).

        Such a read waits for no fold and no transaction of the database
        thread: a file opened while others are being written (``git add``
        reads each file and writes an object) would otherwise wait for the
        fold of what was just written. WAL gives the reader a snapshot of
        the last committed transaction, the state a read queued behind the
        writers would have seen had it run a moment earlier.
        """

        def work() -> _T:
            if self._reader is None:
                raise RuntimeError("local state is closed")
            with _transaction(self._reader) as db:
                return fn(db)

        with local_disk(self._path.parent):
            return await trio.to_thread.run_sync(work, limiter=self._read_limiter)

    async def warm_up(self) -> None:
        """Read the database's files once, in order, so that the page cache
        holds them. A walk of the tree (a first ``git status`` after a
        reboot) lists folder after folder from here, and each listing's rows
        lie anywhere in the file: read from a cold disk, page by page, they
        cost several times what the walk does with them (docs/performance.md
        §5). Reads at most ``WARM_UP_BYTES``; a failure is only logged."""

        def read() -> None:
            block = bytearray(1 << 20)
            left = WARM_UP_BYTES
            for path in (self._path, self._path.with_name(self._path.name + "-wal")):
                with contextlib.suppress(FileNotFoundError), open(path, "rb", buffering=0) as f:
                    while left > 0 and (n := f.readinto(block)):
                        left -= n

        try:
            await trio.to_thread.run_sync(read, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("could not read the local state ahead: %s", exc)

    async def _write_nodes(self, fn: Callable[[], bool]) -> None:
        """Run ``fn`` in the database's thread: a write of ``nodes``,
        ``listed``, ``current`` or the cursor, which returns whether it
        changed what a current listing holds. Every such write goes through
        here, so that what ``cached_children`` read ahead is never older
        than the rows: a read under way as it runs keeps nothing ahead (its
        snapshot may be from before), and once it changed something, all
        that was read ahead goes. (Until then, a listing read ahead is what
        a read queued behind the write would have seen a moment earlier.)"""
        self._nodes_generation += 1
        changed = True
        try:
            changed = await self._run(fn)
        finally:
            self._nodes_generation += 1
            if changed:
                self._nodes_written = trio.current_time()
                self._ahead.clear()
                self._ahead_nodes = 0
                self._frontier.clear()

    def _fold(self) -> None:
        """Apply what the log holds in one transaction (database thread)."""
        batch = self._log.take()
        if batch is None:
            return
        try:
            with _transaction(self._conn()) as db:
                _apply(db, batch.records, batch.number, self._chunk_root)
        except BaseException:
            self._log.restore(batch)
            raise
        self._log.remove(batch)
        with self._unfolded_lock:
            for kind, values in batch.records:
                if kind != _CHUNK_FILE:
                    continue
                chunk_id = cast(bytes, values[0])
                if self._unfolded.get(chunk_id) is values[-1]:
                    del self._unfolded[chunk_id]

    async def fold(self) -> None:
        """Apply the log to the database now (and write the files of the
        chunks it carries)."""
        await self._run(lambda: None)

    async def write_chunk_files(self, chunk_ids: list[bytes]) -> None:
        """Make sure these chunks have their cache files: fold if one of
        them is still only in the log (before a file is synced or removed)."""
        if any(chunk_id in self._unfolded for chunk_id in chunk_ids):
            await self.fold()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("local state is closed")
        return self._db

    async def aclose(self) -> None:
        """Fold the log and close. On a full disk the log cannot be folded:
        it is closed as it is, and the next open applies it."""

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
                self._log.close()

        def close_reader() -> None:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

        with trio.CancelScope(shield=True):
            try:
                await self.fold()
            except LocalDiskFull as exc:
                log.warning("%s: the local state is updated at the next mount", exc.detail)
            await trio.to_thread.run_sync(close_reader, limiter=self._read_limiter)
            await trio.to_thread.run_sync(close, limiter=self._limiter)

    # -- chunks --------------------------------------------------------------

    async def load_chunks(self) -> list[tuple[bytes, int, bool]]:
        """All known chunks as (id, size, dirty), least recently used first."""

        def q() -> list[tuple[bytes, int, bool]]:
            rows = self._conn().execute("SELECT id, size, dirty FROM chunks ORDER BY atime")
            return [(bytes(i), s, bool(d)) for i, s, d in rows]

        return await self._run(q)

    async def add_chunk(self, chunk_id: bytes, size: int, *, dirty: bool) -> None:
        """Index a chunk file (through the log: a file's close waits for it)."""
        # Wall-clock time: the LRU order must survive restarts.
        await self._append(_CHUNK, (chunk_id, size, int(dirty), time.time_ns()))

    async def add_chunk_file(self, chunk_id: bytes, blob: bytes) -> None:
        """Keep a new (dirty) chunk of at most ``LOGGED_CHUNK`` sealed bytes:
        its bytes go into the log, and the fold writes its cache file before
        the index row that names it, so no row names a missing file. Until
        then ``unfolded_chunk`` answers its bytes."""
        self._write_log(_CHUNK_FILE, (chunk_id, len(blob), 1, time.time_ns(), blob))
        with self._unfolded_lock:
            self._unfolded[chunk_id] = blob
        await self._fold_if_full()

    def unfolded_chunk(self, chunk_id: bytes) -> bytes | None:
        """The sealed bytes of a chunk whose file the log has yet to write."""
        return self._unfolded.get(chunk_id)

    async def mark_clean(self, chunk_ids: list[bytes]) -> None:
        def q() -> None:
            # One transaction: in autocommit mode each row would be one.
            with _transaction(self._conn()) as db:
                db.executemany(
                    "UPDATE chunks SET dirty = 0 WHERE id = ?", [(i,) for i in chunk_ids]
                )

        await self._run(q)

    async def forget_chunks(self, chunk_ids: list[bytes]) -> None:
        def q() -> None:
            with _transaction(self._conn()) as db:
                db.executemany(
                    "DELETE FROM chunks WHERE id = ? AND dirty = 0", [(i,) for i in chunk_ids]
                )

        await self._run(q)

    # -- rollback detection ------------------------------------------------------

    async def load_seen(self) -> dict[bytes, int]:
        def q() -> dict[bytes, int]:
            return {bytes(i): r for i, r in self._conn().execute("SELECT node_id, rev FROM seen")}

        return await self._run(q)

    async def save_seen(self, revisions: list[tuple[bytes, int]]) -> None:
        def q() -> None:
            # One transaction: in autocommit mode every row was a commit of
            # its own, 25x slower, and a cold listing of a big folder waits
            # for this (4 s for 30 000 rows).
            with _transaction(self._conn()) as db:
                db.executemany(_SAVE_SEEN, revisions)

        await self._run(q)

    async def forget_seen(self, node_id: bytes) -> None:
        """Drop what was seen of a node: revisions this device made but the
        server refused (a conflict), which the other device's may not pass."""
        await self._run(
            lambda: self._conn().execute("DELETE FROM seen WHERE node_id = ?", (node_id,))
        )

    # -- the server's nodes: listings without the server -------------------------
    #
    # A ``current`` folder's kept listing is the server's at ``cursor``: the
    # change follower (fs/follow.py) applies each page of the feed here
    # (``apply_changes``) before it moves ``cursor`` on, so a listing can be
    # served from here, with no request, once the follower has caught up.
    # Any other write of a node's row may race with the follower: it passes
    # ``at``, the cursor it read before asking the server. If the cursor has
    # moved since, the follower may have applied a newer change of the node
    # before this older state arrived, so the row's folders stop being
    # current (listed from the server next time) instead of trusting it.

    async def reset_cursor(self, cursor: int) -> None:
        """The feed lost track (or never had it): no listing is current any
        more; follow the feed from ``cursor``."""

        def q() -> bool:
            with _transaction(self._conn()) as db:
                db.execute("DELETE FROM current")
                _set_cursor(db, cursor)
            self.cursor = cursor
            return True

        await self._write_nodes(q)

    async def apply_changes(self, changes: list[Change], cursor: int) -> None:
        """A page of the change feed, up to ``cursor``. A deletion removes
        the node's row (its folder's listing stays exact); any other change
        this database does not already hold makes the node's old and new
        folders not current (their listing is fetched next time: the change
        names the node, not its new state). A change of a node with a change
        of ours pending is settled when ours lands or is dropped: it may be
        our own, come back before the answer to our commit did."""

        def q() -> bool:
            changed = False
            with _transaction(self._conn()) as db:
                for change in changes:
                    ours = db.execute(
                        "SELECT 1 FROM journal WHERE node_id = ?", (change.id,)
                    ).fetchone()
                    if ours is None and change.parent and _created_here(db, change.parent):
                        self._raced_folders.add(change.parent)
                    if change.deleted:
                        db.execute("DELETE FROM nodes WHERE id = ?", (change.id,))
                        db.execute("DELETE FROM current WHERE id = ?", (change.id,))
                        changed = True
                        continue
                    if ours is not None:
                        seen = self._raced.get(change.id)
                        if seen is None or change.version > seen[0]:
                            self._raced[change.id] = (change.version, change.parent)
                        continue
                    row = db.execute(
                        "SELECT parent, version FROM nodes WHERE id = ?", (change.id,)
                    ).fetchone()
                    if row is not None and row[1] >= change.version:
                        continue  # a state this database already holds
                    db.execute("DELETE FROM nodes WHERE id = ?", (change.id,))
                    _not_current(db, change.parent, None if row is None else row[0])
                    changed = True
                if self.cursor is None or cursor > self.cursor:
                    _set_cursor(db, cursor)
                    self.cursor = cursor
            # (Only the cursor moved: the current listings are as exact at
            # the new one, which is what our own commits coming back and a
            # page with no change do.)
            return changed

        await self._write_nodes(q)

    async def save_listing(
        self, folder_id: bytes, nodes: list[RemoteNode], *, at: int | None
    ) -> None:
        """A folder's complete listing from the server, asked for when the
        cursor was ``at``, replaces what was kept of it. A listing that
        names the same versions of the same nodes as what is kept is not
        written again: a version names one state of a node, so the rows
        already hold it (this is the common case on a mount's first
        listings, and the write costs ten times the check)."""

        def q() -> bool:
            db = self._conn()
            fresh = at is not None and at == self.cursor
            same = False
            if db.execute("SELECT 1 FROM listed WHERE id = ?", (folder_id,)).fetchone():
                kept = dict(
                    db.execute("SELECT id, version FROM nodes WHERE parent = ?", (folder_id,))
                )
                same = len(kept) == len(nodes) and all(kept.get(n.id) == n.version for n in nodes)
            with _transaction(db):
                if not same:
                    if not fresh:
                        _not_current(db, *[_parent_of(db, n.id) for n in nodes])
                    db.execute("DELETE FROM nodes WHERE parent = ?", (folder_id,))
                    db.executemany(_SAVE_NODE, [_node_row(n) for n in nodes])
                    db.execute("INSERT OR IGNORE INTO listed VALUES (?)", (folder_id,))
                db.execute(
                    "INSERT OR IGNORE INTO current VALUES (?)"
                    if fresh
                    else "DELETE FROM current WHERE id = ?",
                    (folder_id,),
                )
            # (Made current, the same rows: what was read ahead stands; the
            # folder's own listing was not, as it was not current.)
            return not (same and fresh)

        await self._write_nodes(q)

    async def save_node(self, node: RemoteNode, *, at: int | None) -> None:
        """A node's state from the server, asked for when the cursor was
        ``at`` (kept unless the row holds this version or a newer one)."""

        def q() -> bool:
            with _transaction(self._conn()) as db:
                row = db.execute("SELECT version FROM nodes WHERE id = ?", (node.id,)).fetchone()
                if row is not None and row[0] >= node.version:
                    return False
                if at is None or at != self.cursor:
                    _not_current(db, node.parent, _parent_of(db, node.id))
                db.execute(_SAVE_NODE, _node_row(node))
            return True

        await self._write_nodes(q)

    async def drop_node(self, node_id: bytes) -> None:
        """The node is gone from the server (deletions are final)."""

        def q() -> bool:
            self._conn().execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            return True

        await self._write_nodes(q)

    async def cached_node(self, node_id: bytes) -> RemoteNode | None:
        return (await self.cached_nodes([node_id])).get(node_id)

    async def cached_nodes(self, node_ids: Sequence[bytes]) -> dict[bytes, RemoteNode]:
        """Those of ``node_ids`` the local copy keeps, by id, in one read
        (at most a few hundred ids: one SQL variable each)."""

        def q(db: sqlite3.Connection) -> dict[bytes, RemoteNode]:
            marks = ",".join("?" * len(node_ids))
            rows = db.execute(f"{_NODE_SELECT} WHERE id IN ({marks})", tuple(node_ids))
            return {node.id: node for node in map(_node_from_row, rows)}

        return await self._read(q) if node_ids else {}

    async def cached_children(
        self, folder_id: bytes, *, current: bool = False
    ) -> list[RemoteNode] | None:
        """The folder's children as last listed, or None if it never was
        (``current``: or if that listing is not the server's at ``cursor``).

        A current listing is read with those of the current folders below
        it, depth first, up to ``AHEAD_NODES`` nodes, which are kept until
        asked for: a walk of the tree (``git status``, ``find``, a file
        manager's) asks for them next, and one read of many listings spares
        each folder a thread hop, a transaction and a wait for the event
        loop (docs/performance.md §5)."""
        if not current:
            kept = await self._read(lambda db: _kept_listing(db, folder_id, "listed"))
            return None if kept is None else kept[0]
        # A folder asked for while a read ahead is under way is often in it.
        while (ahead := self._take_ahead(folder_id)) is None and self._reading is not None:
            await self._reading.wait()
        if ahead is not None:
            return ahead
        if folder_id in self._frontier:
            # The walk reached what the last read had no room for: this read
            # goes on with the rest of it.
            del self._frontier[folder_id]
            then, kept = list(self._frontier), []
        else:
            # It went elsewhere: this read starts there, and what was left
            # stays for later.
            then, kept = [], list(self._frontier)
        quiet = trio.current_time() - self._nodes_written >= AHEAD_QUIET
        room = AHEAD_NODES if quiet else 0
        generation = self._nodes_generation
        done = self._reading = trio.Event()
        try:
            children, ahead_now, frontier = await self._read(
                lambda db: _children_and_ahead(db, folder_id, then, room)
            )
        finally:
            self._reading = None
            done.set()
        if generation == self._nodes_generation:
            for folder, listing in ahead_now.items():
                self._take_ahead(folder)
                self._ahead[folder] = listing
                self._ahead_nodes += len(listing) + 1
            while self._ahead_nodes > 2 * AHEAD_NODES:
                self._take_ahead(next(iter(self._ahead)))  # the oldest
            self._frontier = dict.fromkeys((kept + frontier)[-AHEAD_NODES:])
        return children

    def _take_ahead(self, folder_id: bytes) -> list[RemoteNode] | None:
        listing = self._ahead.pop(folder_id, None)
        if listing is not None:
            self._ahead_nodes -= len(listing) + 1
        return listing

    # -- journal -------------------------------------------------------------

    async def load_journal(self) -> list[JournalEntry]:
        def q() -> list[JournalEntry]:
            rows = self._conn().execute(
                "SELECT node_id, seq, op, parent, base_version, meta, content, chunks, "
                "commit_id, sent_commit_id FROM journal ORDER BY seq"
            )
            return [_entry_from_row(r) for r in rows]

        return await self._run(q)

    async def put_entry(
        self, entry: JournalEntry, *, durable: bool = False, rev: int | None = None
    ) -> None:
        """Record the latest state of a node, and ``rev`` as the newest
        revision of it seen (if given). Once this returns the change survives
        a crash of the daemon (it is in the log, cache/statelog.py);
        ``durable`` also makes it survive a power cut (for fsync)."""
        row = (
            entry.node_id,
            entry.seq,
            entry.op,
            entry.parent,
            entry.base_version,
            entry.meta,
            entry.content,
            b"".join(entry.chunks),
            entry.commit_id,
            entry.sent_commit_id,
        )
        await self._append(_ENTRY, (*row, rev))
        if durable:
            await self.sync()

    async def _append(self, kind: bytes, values: tuple[Value, ...]) -> None:
        self._write_log(kind, values)
        await self._fold_if_full()

    def _write_log(self, kind: bytes, values: tuple[Value, ...]) -> None:
        with local_disk(self._path.parent):
            self._log.append(kind, values)

    async def _fold_if_full(self) -> None:
        if len(self._log) >= _FOLD_AT or self._log.size >= _FOLD_BYTES:
            await self.fold()  # bounds the log and the memory it holds

    async def sync(self) -> None:
        """Make everything written so far survive a power cut."""

        def q() -> None:
            # Read to the end: the pragma's row otherwise keeps it running,
            # and the next COMMIT fails, for as long as its cursor lives.
            self._conn().execute("PRAGMA wal_checkpoint(FULL)").fetchall()

        await self._run(q)

    async def entries_committed(self, done: list[tuple[bytes, int, int]]) -> None:
        """The server has these ``(node_id, seq, new_version)``: drop each
        entry, or, if a newer change of the node arrived meanwhile, rebase it
        on the version just committed; keep what landed as the server's
        state of the node. One transaction for a whole batch."""

        def q() -> bool:
            with _transaction(self._conn()) as db:
                for node_id, seq, version in done:
                    if version == 1:
                        # Just created (by this device): on the server it holds
                        # only what this device commits into it (which lands
                        # here too), unless the feed named a child of it first.
                        db.execute("INSERT OR IGNORE INTO listed VALUES (?)", (node_id,))
                        if node_id not in self._raced_folders:
                            db.execute("INSERT OR IGNORE INTO current VALUES (?)", (node_id,))
                    self._raced_folders.discard(node_id)
                    row = db.execute(
                        "SELECT op, parent FROM journal WHERE node_id = ? AND seq = ?",
                        (node_id, seq),
                    ).fetchone()
                    if row is None:
                        continue  # replaced by a newer change, which hides the row until it lands
                    op, parent = row
                    raced = self._raced.pop(node_id, None)
                    if op == "delete":
                        db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
                    elif raced is not None and raced[0] > version:
                        # Another device changed it after us, and the feed
                        # said so before this answer came: trust neither.
                        _not_current(db, parent, raced[1], _parent_of(db, node_id))
                        db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
                    else:
                        db.execute(
                            "INSERT OR REPLACE INTO nodes SELECT node_id, parent, ?, meta, "
                            "content, coalesce(length(content), 0) FROM journal "
                            "WHERE node_id = ? AND seq = ?",
                            (version, node_id, seq),
                        )
                _drop_entries(db, done)
            return bool(done)

        await self._write_nodes(q)

    async def forget_entry(self, node_id: bytes, seq: int) -> None:
        """Drop the journal entry of a node that never reached the server
        (made and removed before it was sent: a temporary file, the name
        git links an object under and then unlinks). Through the log, as
        put_entry: the request does not wait for the database."""
        self._raced.pop(node_id, None)
        self._raced_folders.discard(node_id)
        await self._append(_FORGET, (node_id, seq))

    async def entries_dropped(self, dropped: list[tuple[bytes, int, int]]) -> None:
        """These ``(node_id, seq, server_version)`` will never land: a change
        of a node never sent (the node is gone), or one that lost to another
        device's (the server holds that one, at ``server_version``). The
        node's row and the folders it was in stop being trusted: the feed or
        a listing brings the other device's state."""

        def q() -> bool:
            with _transaction(self._conn()) as db:
                for node_id, _, _ in dropped:
                    raced = self._raced.pop(node_id, None)
                    self._raced_folders.discard(node_id)
                    _not_current(db, _parent_of(db, node_id), None if raced is None else raced[1])
                    db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
                _drop_entries(db, dropped)
            return bool(dropped)

        await self._write_nodes(q)


def _drop_entries(db: sqlite3.Connection, done: list[tuple[bytes, int, int]]) -> None:
    """Remove the journal entries ``done`` names (by seq); a later change of
    the same node is rebased on the server's version."""
    db.executemany(
        "DELETE FROM journal WHERE node_id = ? AND seq = ?",
        [(node_id, seq) for node_id, seq, _ in done],
    )
    db.executemany(
        "UPDATE journal SET base_version = ?, sent_commit_id = NULL WHERE node_id = ?",
        [(version, node_id) for node_id, _, version in done],
    )


def _set_cursor(db: sqlite3.Connection, cursor: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (str(cursor).encode(),))


def _kept_listing(
    db: sqlite3.Connection, folder_id: bytes, table: str
) -> tuple[list[RemoteNode], list[bytes]] | None:
    """The folder's kept nodes and its current folders among them, if
    ``table`` ("listed" or "current") names it."""
    if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (folder_id,)).fetchone() is None:
        return None
    return _listing_and_folders(db, folder_id, -1)


def _children_and_ahead(
    db: sqlite3.Connection, folder_id: bytes, then: list[bytes], room: int
) -> tuple[list[RemoteNode] | None, dict[bytes, list[RemoteNode]], list[bytes]]:
    """The folder's current listing; those of the current folders below it,
    depth first, then of the folders in ``then`` (a stack), up to ``room``
    nodes in all; and the folders left to read (see
    ``LocalState.cached_children``)."""
    kept = _kept_listing(db, folder_id, "current")
    if kept is None:
        return None, {}, []
    children, below = kept
    stack = then + below
    ahead: dict[bytes, list[RemoteNode]] = {}
    while stack and room > 0:
        folder = stack.pop()
        # One row past the room left tells a listing too big to keep.
        listing, folders = _listing_and_folders(db, folder, room + 1)
        if len(listing) > room:
            stack.append(folder)
            break
        ahead[folder] = listing
        room -= len(listing)
        stack += folders
    return children, ahead, stack


def _listing_and_folders(
    db: sqlite3.Connection, folder_id: bytes, limit: int
) -> tuple[list[RemoteNode], list[bytes]]:
    """Up to ``limit`` (-1: all) of the folder's kept nodes, and the ids of
    those of them that are current folders."""
    listing: list[RemoteNode] = []
    folders: list[bytes] = []
    for row in db.execute(_AHEAD_SELECT, (folder_id, limit)):
        listing.append(_node_from_row(row[:-1]))
        if row[-1]:
            folders.append(listing[-1].id)
    return listing, folders


def _parent_of(db: sqlite3.Connection, node_id: bytes) -> bytes | None:
    row = db.execute("SELECT parent FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def _created_here(db: sqlite3.Connection, node_id: bytes) -> bool:
    """Is the node's creation by this device pending (or unconfirmed)?"""
    return (
        db.execute(
            "SELECT 1 FROM journal WHERE node_id = ? AND base_version = 0", (node_id,)
        ).fetchone()
        is not None
    )


def _not_current(db: sqlite3.Connection, *folders: bytes | None) -> None:
    db.executemany("DELETE FROM current WHERE id = ?", [(f,) for f in folders if f is not None])


_NODE_SELECT = "SELECT id, parent, version, meta, content, content_size FROM nodes"
#: A folder's kept nodes, each with whether it is a current folder (only files
#: have content, docs/format.md §13; LIMIT -1: all).
_AHEAD_SELECT = (
    "SELECT n.id, n.parent, n.version, n.meta, n.content, n.content_size, "
    "c.id IS NOT NULL AND n.content IS NULL "
    "FROM nodes n LEFT JOIN current c ON c.id = n.id WHERE n.parent = ? LIMIT ?"
)
_SAVE_NODE = "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)"


def _node_row(n: RemoteNode) -> tuple[Any, ...]:
    return (n.id, n.parent, n.version, n.meta, n.content, n.content_size)


def _node_from_row(row: tuple[Any, ...]) -> RemoteNode:
    node_id, parent, version, meta, content, size = row
    return RemoteNode(
        id=bytes(node_id),
        parent=None if parent is None else bytes(parent),
        version=version,
        meta=bytes(meta),
        content=None if content is None else bytes(content),
        content_size=size,
    )


@contextlib.contextmanager
def local_disk(where: Path) -> Iterator[None]:
    """Turn "no room left" from the disk holding ``where`` (ENOSPC or
    EDQUOT, or SQLite's SQLITE_FULL) into LocalDiskFull: a FUSE request
    answers it as ENOSPC, and background work (uploads, the periodic
    flush) retries later instead of stopping the daemon."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        full = (
            exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if isinstance(exc, OSError)
            else getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        )
        if full:
            raise LocalDiskFull(f"no room left on the disk of {where}") from exc
        raise


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction (the connection is in autocommit mode otherwise)."""
    db.execute("BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_SAVE_SEEN = (
    "INSERT INTO seen VALUES (?, ?) ON CONFLICT(node_id) DO UPDATE SET rev = MAX(rev, excluded.rev)"
)

#: Kinds of log records (cache/statelog.py): a journal entry's row followed
#: by the revision seen (or None), a chunk's row, a journal entry forgotten
#: (node id, seq), and a chunk's row followed by its sealed bytes.
_ENTRY, _CHUNK, _FORGET, _CHUNK_FILE = b"J", b"C", b"F", b"B"
#: A put (or a chunk) waits for a fold once the log holds this many records,
#: or this many bytes: folds otherwise come with the next database call,
#: which the uploader makes soon, but not while the server is unreachable.
_FOLD_AT = 1000
_FOLD_BYTES = 8 << 20
#: New chunks up to this many sealed bytes travel in the log
#: (``add_chunk_file``); larger ones are written by the chunk cache, in a
#: worker thread, before the close that sealed them returns.
LOGGED_CHUNK = 64 * 1024
_PUT_ENTRY = "INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ADD_CHUNK = (
    "INSERT INTO chunks VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
    "dirty = MAX(dirty, excluded.dirty), atime = excluded.atime"
)


def _apply(db: sqlite3.Connection, records: list[Record], number: int, chunk_root: str) -> None:
    """Apply log records in order, and remember that log ``number`` (and
    every one before it) is folded, in the caller's transaction. A logged
    chunk's file is written (again, if a crash came after an earlier fold
    wrote it: the same bytes) under ``chunk_root`` before its row."""
    for kind, values in records:
        if kind == _ENTRY:
            if values[-1] is not None:
                db.execute(_SAVE_SEEN, (values[0], values[-1]))
            db.execute(_PUT_ENTRY, values[:-1])
        elif kind == _CHUNK:
            db.execute(_ADD_CHUNK, values)
        elif kind == _CHUNK_FILE:
            chunk_id, blob = cast(bytes, values[0]), cast(bytes, values[-1])
            write_chunk_file(chunk_path(chunk_root, chunk_id), blob)
            db.execute(_ADD_CHUNK, values[:-1])
        elif kind == _FORGET:
            db.execute("DELETE FROM journal WHERE node_id = ? AND seq = ?", values)
        else:
            raise RuntimeError(f"cache log record of unknown kind {kind!r}")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('log_folded', ?)", (str(number).encode(),))


def _log_folded(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = 'log_folded'").fetchone()
    return 0 if row is None else int(row[0])


def journal_left(path: Path) -> int:
    """Nodes with changes not yet on the server in the database at ``path``
    and its logs, for a daemon that has exited (read only)."""
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        seqs = {bytes(n): s for n, s in db.execute("SELECT node_id, seq FROM journal")}
        folded = _log_folded(db)
    finally:
        db.close()
    for _, records in leftover_logs(path, folded):
        for kind, values in records:
            node_id, seq = values[0], values[1]
            if not isinstance(node_id, bytes):
                continue
            if kind == _ENTRY:
                seqs[node_id] = seq
            elif kind == _FORGET and seqs.get(node_id) == seq:
                del seqs[node_id]
    return len(seqs)


def _entry_from_row(row: tuple[Any, ...]) -> JournalEntry:
    node_id, seq, op, parent, base, meta, content, chunks, commit_id, sent = row
    chunks = bytes(chunks)
    return JournalEntry(
        node_id=bytes(node_id),
        seq=seq,
        op=op,
        parent=None if parent is None else bytes(parent),
        base_version=base,
        meta=None if meta is None else bytes(meta),
        content=None if content is None else bytes(content),
        chunks=tuple(chunks[i : i + 32] for i in range(0, len(chunks), 32)),
        commit_id=bytes(commit_id),
        sent_commit_id=None if sent is None else bytes(sent),
    )
