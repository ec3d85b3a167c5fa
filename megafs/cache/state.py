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
    meta(key TEXT PK, value BLOB)  -- format version of this database

All calls run in a worker thread behind a limiter of one: SQLite is blocking
and the trio thread serves FUSE requests.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from megafs.remote import RemoteNode

__all__ = ["JournalEntry", "LocalState"]

_T = TypeVar("_T")
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
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None

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
        self._db = db

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("local state is closed")
        return self._db

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with trio.CancelScope(shield=True):
            await self._run(close)

    # -- chunks --------------------------------------------------------------

    async def load_chunks(self) -> list[tuple[bytes, int, bool]]:
        """All known chunks as (id, size, dirty), least recently used first."""

        def q() -> list[tuple[bytes, int, bool]]:
            rows = self._conn().execute("SELECT id, size, dirty FROM chunks ORDER BY atime")
            return [(bytes(i), s, bool(d)) for i, s, d in rows]

        return await self._run(q)

    async def add_chunk(self, chunk_id: bytes, size: int, *, dirty: bool) -> None:
        def q() -> None:
            self._conn().execute(
                "INSERT INTO chunks VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "dirty = MAX(dirty, excluded.dirty), atime = excluded.atime",
                # Wall-clock time: the LRU order must survive restarts.
                (chunk_id, size, int(dirty), time.time_ns()),
            )

        await self._run(q)

    async def mark_clean(self, chunk_ids: list[bytes]) -> None:
        def q() -> None:
            self._conn().executemany(
                "UPDATE chunks SET dirty = 0 WHERE id = ?", [(i,) for i in chunk_ids]
            )

        await self._run(q)

    async def forget_chunks(self, chunk_ids: list[bytes]) -> None:
        def q() -> None:
            self._conn().executemany(
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

    # -- the server's nodes, for working offline ----------------------------------

    async def save_listing(self, folder_id: bytes, nodes: list[RemoteNode]) -> None:
        """A folder's complete listing from the server replaces what was
        kept of it. A listing that names the same versions of the same
        nodes as what is kept is not written again: a version names one
        state of a node, so the rows already hold it (this is the common
        case on a mount's first listings, and the write costs ten times
        the check)."""

        def q() -> None:
            db = self._conn()
            if db.execute("SELECT 1 FROM listed WHERE id = ?", (folder_id,)).fetchone():
                kept = dict(
                    db.execute("SELECT id, version FROM nodes WHERE parent = ?", (folder_id,))
                )
                if len(kept) == len(nodes) and all(kept.get(n.id) == n.version for n in nodes):
                    return
            with _transaction(db):
                db.execute("DELETE FROM nodes WHERE parent = ?", (folder_id,))
                db.executemany(_SAVE_NODE, [_node_row(n) for n in nodes])
                db.execute("INSERT OR IGNORE INTO listed VALUES (?)", (folder_id,))

        await self._run(q)

    async def save_node(self, node: RemoteNode) -> None:
        await self._run(lambda: self._conn().execute(_SAVE_NODE, _node_row(node)))

    async def drop_node(self, node_id: bytes) -> None:
        await self._run(lambda: self._conn().execute("DELETE FROM nodes WHERE id = ?", (node_id,)))

    async def cached_node(self, node_id: bytes) -> RemoteNode | None:
        def q() -> RemoteNode | None:
            row = self._conn().execute(f"{_NODE_SELECT} WHERE id = ?", (node_id,)).fetchone()
            return None if row is None else _node_from_row(row)

        return await self._run(q)

    async def cached_children(self, folder_id: bytes) -> list[RemoteNode] | None:
        """The folder's children as last listed, or None if it never was."""

        def q() -> list[RemoteNode] | None:
            db = self._conn()
            if db.execute("SELECT 1 FROM listed WHERE id = ?", (folder_id,)).fetchone() is None:
                return None
            rows = db.execute(f"{_NODE_SELECT} WHERE parent = ?", (folder_id,))
            return [_node_from_row(r) for r in rows]

        return await self._run(q)

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
        revision of it seen (if given), in one transaction. ``durable`` makes
        the database sync to disk before returning (for fsync); otherwise the
        write survives a crash of the daemon but not a power cut."""

        def q() -> None:
            with _transaction(self._conn()) as db:
                if rev is not None:
                    db.execute(_SAVE_SEEN, (entry.node_id, rev))
                db.execute(
                    "INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
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
                    ),
                )
            if durable:
                self._conn().execute("PRAGMA wal_checkpoint(FULL)")

        await self._run(q)

    async def sync(self) -> None:
        """Make everything written so far survive a power cut."""
        await self._run(lambda: self._conn().execute("PRAGMA wal_checkpoint(FULL)"))

    async def entries_committed(self, done: list[tuple[bytes, int, int]]) -> None:
        """The server has these ``(node_id, seq, new_version)``: drop each
        entry, or, if a newer change of the node arrived meanwhile, rebase it
        on the version just committed. One transaction for a whole batch."""

        def q() -> None:
            with _transaction(self._conn()) as db:
                # What landed is now the server's state of the node.
                db.executemany(
                    "INSERT OR REPLACE INTO nodes SELECT node_id, parent, ?, meta, content, "
                    "coalesce(length(content), 0) FROM journal "
                    "WHERE node_id = ? AND seq = ? AND op = 'put'",
                    [(version, node_id, seq) for node_id, seq, version in done],
                )
                db.executemany(
                    "DELETE FROM nodes WHERE id = ? AND EXISTS (SELECT 1 FROM journal "
                    "WHERE node_id = ? AND seq = ? AND op = 'delete')",
                    [(node_id, node_id, seq) for node_id, seq, _ in done],
                )
                # A node this device created holds, on the server, only what
                # this device commits into it (which lands in ``nodes`` too):
                # its listing is known, for offline use.
                db.executemany(
                    "INSERT OR IGNORE INTO listed SELECT node_id FROM journal "
                    "WHERE node_id = ? AND seq = ? AND op = 'put' AND base_version = 0",
                    [(node_id, seq) for node_id, seq, _ in done],
                )
                db.executemany(
                    "DELETE FROM journal WHERE node_id = ? AND seq = ?",
                    [(node_id, seq) for node_id, seq, _ in done],
                )
                db.executemany(
                    "UPDATE journal SET base_version = ?, sent_commit_id = NULL WHERE node_id = ?",
                    [(version, node_id) for node_id, _, version in done],
                )

        await self._run(q)


_NODE_SELECT = "SELECT id, parent, version, meta, content, content_size FROM nodes"
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
