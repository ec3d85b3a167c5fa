"""The server's metadata: accounts, sessions, nodes and which chunks they use.

:class:`MetadataStore` is the interface the HTTP layer and the garbage
collector use; :class:`SQLiteMetadataStore` implements it. Each method is
one atomic step (a transaction, or a savepoint in a group commit's
transaction), so the rules of ``megafs.wire`` (compare and set, parent
checks, quota, the order of change sequence numbers) hold however requests
interleave, and a second backend (PostgreSQL) only has to provide the same
methods. The SQL
is kept portable where that costs nothing (``ON CONFLICT``, ``WITH
RECURSIVE``, ``length()`` on blobs work in both).

Ids are stored as the lowercase hex the wire uses; everything the client
sealed (kdf aside, which is public by design) is an opaque blob here.
"""

from __future__ import annotations

import json
import queue
import secrets
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from megafs.errors import (
    AlreadyExists,
    CursorExpired,
    InvalidRequest,
    MegafsError,
    NotEmpty,
    NotFound,
    QuotaExceeded,
    VersionConflict,
)
from megafs.server.group import GroupCommit

__all__ = [
    "AccountRow",
    "ChangeRow",
    "MetadataStore",
    "MissingReference",
    "NodeDelete",
    "NodeOp",
    "NodeRow",
    "NodeWrite",
    "RecoveryRow",
    "SQLiteMetadataStore",
    "SessionRow",
    "TotpRow",
]

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

#: Bumped when the schema below changes incompatibly; a store refuses a
#: database written by a newer server instead of misreading it, and brings
#: an older one up to date with ``_MIGRATIONS``.
SCHEMA_VERSION = 3

#: A session's ``last_seen`` is rewritten at most this often, so an active
#: client does not turn every read into a database write.
LAST_SEEN_RESOLUTION = 60

#: SQLite's default limit on ``?`` parameters is far above this; PostgreSQL
#: has none. Batches keep each ``IN (...)`` list cheap to plan.
_IN_BATCH = 500


class MissingReference(NotFound):
    """A node names a parent or chunk this account does not have.

    The wire code stays ``not_found`` (the client reacts the same way: upload
    what is missing, then retry) but the status is 409, because the URL's
    own node is not what is missing.
    """

    http_status = 409


@dataclass(frozen=True)
class AccountRow:
    """An account as stored. ``id`` is internal and never sent to clients."""

    id: int
    email: str
    kdf: dict[str, Any]
    auth_hash: bytes
    keyblob: bytes
    root_id: str
    quota: int
    used: int


@dataclass(frozen=True)
class NodeRow:
    """A node as served. ``content`` is None when the node has none, or when
    a listing left out content larger than its inline limit
    (``content_size`` still tells the size)."""

    id: str
    parent: str | None
    version: int
    meta: bytes
    content: bytes | None
    content_size: int


@dataclass(frozen=True)
class ChangeRow:
    """A node's latest change: its state now (``deleted``: it is gone, and
    ``parent`` and ``version`` are what it had)."""

    id: str
    parent: str | None
    version: int
    seq: int
    deleted: bool


@dataclass(frozen=True)
class SessionRow:
    """A live session. ``id`` is its public name (listings, revocation);
    the token itself is never stored."""

    id: str
    account_id: int
    device: str
    created: int
    last_seen: int
    expires: int


@dataclass(frozen=True)
class TotpRow:
    """An account's TOTP state: ``enabled`` False while a secret waits for
    its first code; ``last_step`` is the newest time step a code was
    accepted for (codes of that step or older are refused)."""

    secret: bytes
    enabled: bool
    last_step: int


@dataclass(frozen=True)
class RecoveryRow:
    """What a recovery key unlocks, found by email in one query (so an
    unknown email costs the same work as a known one)."""

    account_id: int
    auth_hash: bytes
    keyblob: bytes


@dataclass(frozen=True)
class NodeWrite:
    """A validated ``PUT /nodes/{id}`` body."""

    parent: str | None
    expect_version: int
    meta: bytes
    content: bytes | None
    chunks: frozenset[str]
    commit_id: bytes


@dataclass(frozen=True)
class NodeDelete:
    """A validated ``DELETE /nodes/{id}``."""

    expect_version: int


#: One op of a batch: the node id and what to do to it.
NodeOp = tuple[str, NodeWrite | NodeDelete]


class MetadataStore(ABC):
    """Everything the server knows besides chunk bytes.

    Times are integer Unix seconds passed in by the caller, so the store
    has no clock of its own (tests pass any ``now``). Every method is
    atomic; the ones that change a node or a chunk also keep the account's
    ``used`` byte count exact.
    """

    @abstractmethod
    async def server_secret(self) -> bytes:
        """A random 32-byte secret made when the store was created."""

    # -- accounts and sessions ----------------------------------------------------

    @abstractmethod
    async def create_account(
        self,
        email: str,
        kdf: dict[str, Any],
        auth_hash: bytes,
        keyblob: bytes,
        root_id: str,
        root_meta: bytes,
        *,
        quota: int,
        now: int,
    ) -> AccountRow:
        """Create an account and its root node together.

        Raises AlreadyExists if the email is taken, QuotaExceeded if the
        root node alone exceeds ``quota``.
        """

    @abstractmethod
    async def account_by_email(self, email: str) -> AccountRow | None: ...

    @abstractmethod
    async def account(self, account_id: int) -> AccountRow:
        """Raises NotFound if the account does not exist."""

    @abstractmethod
    async def set_password(
        self,
        account_id: int,
        kdf: dict[str, Any],
        auth_hash: bytes,
        keyblob: bytes,
        *,
        keep_session: str | None,
    ) -> int:
        """Replace the password's parameters, auth hash and keyblob, and end
        every session but ``keep_session``, together; returns how many
        sessions ended."""

    @abstractmethod
    async def add_session(
        self,
        token_hash: bytes,
        session_id: str,
        account_id: int,
        device: str,
        *,
        now: int,
        idle_seconds: int,
    ) -> int:
        """Open a session that expires ``idle_seconds`` after its last use;
        returns its expiry."""

    @abstractmethod
    async def session(self, token_hash: bytes, *, now: int) -> SessionRow | None:
        """A live session (its ``last_seen`` and expiry pushed forward), or
        None if there is no such session or it has expired."""

    @abstractmethod
    async def list_sessions(self, account_id: int, *, now: int) -> list[SessionRow]:
        """The account's live sessions, in the order they were opened."""

    @abstractmethod
    async def delete_session(self, token_hash: bytes) -> bool:
        """Returns whether the session existed."""

    @abstractmethod
    async def revoke_session(self, account_id: int, session_id: str) -> bool:
        """End one of the account's sessions by id; returns whether it existed."""

    @abstractmethod
    async def revoke_other_sessions(self, account_id: int, keep_session: str) -> int:
        """End every session of the account but one; returns how many."""

    @abstractmethod
    async def purge_sessions(self, *, now: int) -> int:
        """Delete expired sessions; returns how many."""

    # -- second factor and recovery ---------------------------------------------

    @abstractmethod
    async def totp(self, account_id: int) -> TotpRow | None: ...

    @abstractmethod
    async def begin_totp(self, account_id: int, secret: bytes) -> None:
        """Store a new secret waiting for its first code (replacing any
        earlier waiting one). Raises AlreadyExists if 2FA is on."""

    @abstractmethod
    async def enable_totp(
        self, account_id: int, secret: bytes, step: int, code_hashes: Sequence[bytes]
    ) -> bool:
        """Turn 2FA on if ``secret`` is still the one waiting (the first
        code was checked against it), with ``step`` as used, replacing the
        recovery codes; returns whether it did."""

    @abstractmethod
    async def use_totp_step(self, account_id: int, step: int) -> bool:
        """Mark ``step`` as used if it is newer than the last one used;
        returns whether it was (False: a replayed or older code)."""

    @abstractmethod
    async def use_recovery_code(self, account_id: int, code_hash: bytes) -> bool:
        """Spend a recovery code; returns whether it was there to spend."""

    @abstractmethod
    async def disable_totp(self, account_id: int) -> None:
        """Forget the TOTP secret and the recovery codes."""

    @abstractmethod
    async def set_recovery_key(
        self, account_id: int, auth_hash: bytes, keyblob: bytes, *, now: int
    ) -> None:
        """Store (or replace) the master key's wrap under a recovery key."""

    @abstractmethod
    async def recovery_by_email(self, email: str) -> RecoveryRow | None: ...

    # -- failed attempts ------------------------------------------------------------

    @abstractmethod
    async def throttle_wait(self, keys: Sequence[str], *, now: int) -> int:
        """Seconds until none of ``keys`` is locked out (0: none is)."""

    @abstractmethod
    async def throttle_failure(
        self, key: str, *, now: int, forget_after: int, lock_seconds: Callable[[int], int]
    ) -> None:
        """Count a failed attempt for ``key`` (counting from zero again if
        the last one is over ``forget_after`` seconds old) and lock it out
        for ``lock_seconds(failures)`` seconds."""

    @abstractmethod
    async def throttle_clear(self, key: str) -> None:
        """Forget the failed attempts of ``key`` (after a success)."""

    @abstractmethod
    async def purge_throttle(self, *, before: int) -> int:
        """Forget keys whose last failure is older than ``before`` and that
        are not locked out; returns how many."""

    # -- nodes --------------------------------------------------------------------

    @abstractmethod
    async def get_node(self, account_id: int, node_id: str) -> NodeRow | None: ...

    @abstractmethod
    async def list_children(
        self, account_id: int, node_id: str, *, inline_max: int, after: str = "", limit: int
    ) -> list[NodeRow] | None:
        """Up to ``limit`` children of a node with ids above ``after``, ordered
        by id, with content only where it is at most ``inline_max`` bytes;
        None if the node does not exist."""

    @abstractmethod
    async def put_node(self, account_id: int, node_id: str, write: NodeWrite, *, now: int) -> int:
        """Create or replace a node (compare-and-set); returns its new version.

        A retry of a write that landed (same ``commit_id``) returns the
        version it made, even if later writes replaced it (within the
        change feed's retention). Raises AlreadyExists,
        NotFound, VersionConflict, MissingReference (parent or chunk),
        InvalidRequest (root rules, cycles) or QuotaExceeded.
        """

    @abstractmethod
    async def delete_node(
        self, account_id: int, node_id: str, *, expect_version: int, now: int
    ) -> None:
        """Delete a node, leaving a tombstone for the change feed. Raises
        NotFound, VersionConflict, NotEmpty, or InvalidRequest for the root."""

    @abstractmethod
    async def apply_node_ops(
        self, account_id: int, ops: Sequence[NodeOp], *, now: int
    ) -> list[int | MegafsError]:
        """Apply puts and deletes in order, in one transaction, each exactly
        as :meth:`put_node` or :meth:`delete_node` would (later ops see what
        earlier ones did). An op that fails leaves no trace and does not stop
        the others. Returns, per op, the new version (0 for a delete) or the
        error the single call would have raised."""

    # -- changes ------------------------------------------------------------------

    @abstractmethod
    async def changes(self, account_id: int, after: int, *, limit: int) -> list[ChangeRow]:
        """Up to ``limit`` of the account's nodes and tombstones changed after
        sequence number ``after``, by sequence number: each node once, at its
        latest change.

        Every node write and delete takes the account's next sequence
        number, and one with a higher number is never visible before one
        with a lower number (the account's counter is updated in the same
        transaction), so a client that follows the pages misses nothing.
        Raises CursorExpired if ``after`` is older than a tombstone that was
        pruned (the client cannot learn about that delete) or newer than
        the account's latest change.
        """

    @abstractmethod
    async def change_cursor(self, account_id: int) -> int:
        """The account's latest sequence number (1 for a new account: its root)."""

    @abstractmethod
    async def change_cursors(self, account_ids: Sequence[int]) -> dict[int, int]:
        """:meth:`change_cursor` of several accounts at once."""

    @abstractmethod
    async def prune_tombstones(self, *, before: int) -> int:
        """Forget deletes made at ``before`` (Unix seconds) or earlier, and
        which writes made which versions then; returns how many deletes.
        Cursors older than a forgotten delete expire."""

    # -- chunks -------------------------------------------------------------------

    @abstractmethod
    async def stored_chunks(self, account_id: int, chunk_ids: Sequence[str]) -> set[str]:
        """Which of ``chunk_ids`` are recorded (nothing is touched)."""

    async def has_chunk(self, account_id: int, chunk_id: str) -> bool:
        return chunk_id in await self.stored_chunks(account_id, [chunk_id])

    @abstractmethod
    async def missing_chunks(
        self, account_id: int, chunk_ids: Sequence[str], *, now: int
    ) -> list[str]:
        """The ids not recorded, in the order given; the others are touched
        (kept from garbage collection for another grace period)."""

    @abstractmethod
    async def add_chunk(self, account_id: int, chunk_id: str, size: int, *, now: int) -> bool:
        """Record a chunk whose bytes are stored; returns True if it is new.

        A new chunk counts towards ``used`` (QuotaExceeded if it does not
        fit); a known one is only touched.
        """

    @abstractmethod
    async def garbage_chunks(self, *, cutoff: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` (account id, chunk id) that no node references and
        that were last touched before ``cutoff``."""

    @abstractmethod
    async def forget_chunk(self, account_id: int, chunk_id: str, *, cutoff: int) -> bool:
        """Delete a chunk's record if it is still garbage (see
        :meth:`garbage_chunks`), releasing its bytes from ``used``; returns
        whether it did."""

    @abstractmethod
    async def aclose(self) -> None: ...


# Column by column; everything the client sealed is opaque here.
_SCHEMA = """
-- Settings of this server instance.
CREATE TABLE IF NOT EXISTS server_config (
    key   TEXT PRIMARY KEY,  -- 'secret': 64 hex digits, keys the fake prelogin salts;
                             -- 'schema_version': the SCHEMA_VERSION that wrote the db
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS accounts (
    id        INTEGER PRIMARY KEY,  -- internal only: names the account's chunk directory
    email     TEXT NOT NULL UNIQUE, -- login name, lower-cased
    kdf       TEXT NOT NULL,        -- the client's Argon2id parameters (JSON), served by
                                    -- prelogin; public by design
    auth_hash BLOB NOT NULL,        -- SHA-256 of the 32-byte auth secret; the secret itself
                                    -- is never stored
    keyblob   BLOB NOT NULL,        -- master key sealed by the client (opaque)
    root_id   TEXT NOT NULL,        -- id of the root node (hex), created with the account
    quota     INTEGER NOT NULL,     -- bytes the account may hold
    used      INTEGER NOT NULL,     -- bytes it holds: every recorded chunk (referenced or
                                    -- not, until collected) plus each node's meta + content
    created   INTEGER NOT NULL,     -- Unix seconds
    change_seq INTEGER NOT NULL DEFAULT 0, -- the sequence number of the account's latest node
                                    -- change (write or delete); each takes the next one
    pruned_seq INTEGER NOT NULL DEFAULT 0  -- the newest sequence number of a pruned tombstone:
                                    -- a change feed cursor below it has missed a delete
);

-- Bearer tokens. Only their hash is stored, so a database leak yields no
-- usable session.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,    -- SHA-256 of the token
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    device     TEXT NOT NULL,       -- label the client gave at login
    created    INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,    -- last use, to within LAST_SEEN_RESOLUTION seconds
    expires    INTEGER NOT NULL,    -- the token is refused from this time on; pushed to
                                    -- last_seen + idle_seconds on use
    id           TEXT NOT NULL,     -- 16 random hex digits: the session's public name
    idle_seconds INTEGER NOT NULL   -- how long the session lives unused
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_id ON sessions(id);
CREATE INDEX IF NOT EXISTS sessions_account ON sessions(account_id);

-- Two-factor authentication (TOTP, RFC 6238). The server must hold the
-- secret to check codes: TOTP guards against a stolen password, not against
-- the server.
CREATE TABLE IF NOT EXISTS totp (
    account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
    secret     BLOB NOT NULL,       -- the authenticator app's key (random bytes)
    enabled    INTEGER NOT NULL,    -- 0: waiting for a first code; 1: required at login
    last_step  INTEGER NOT NULL     -- newest time step (Unix seconds // 30) a code was
                                    -- accepted for; that step and older are refused
);

-- Single-use codes that stand in for a TOTP code; a spent code is deleted.
CREATE TABLE IF NOT EXISTS recovery_codes (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    code_hash  BLOB NOT NULL,       -- SHA-256 of the code (80 random bits)
    PRIMARY KEY (account_id, code_hash)
);

-- The master key's second wrap, under a key derived from a recovery key
-- only the user holds.
CREATE TABLE IF NOT EXISTS recovery_keys (
    account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
    auth_hash  BLOB NOT NULL,       -- SHA-256 of the recovery auth secret (another HKDF
                                    -- output of the recovery key): proves the key
    keyblob    BLOB NOT NULL,       -- sealed by the client (opaque)
    created    INTEGER NOT NULL
);

-- Failed logins (and code or password proofs) per account and per client
-- address, shared by every server process on this database.
CREATE TABLE IF NOT EXISTS throttle (
    key          TEXT PRIMARY KEY,  -- 'account:' + keyed hash of the email (no email is
                                    -- stored, known or not), or 'address:' + address
    failures     INTEGER NOT NULL,  -- failed attempts in a row
    last_failure INTEGER NOT NULL,  -- Unix seconds
    locked_until INTEGER NOT NULL   -- attempts are refused (429) until then
);

-- Files and folders. The server never learns which is which, nor any name.
CREATE TABLE IF NOT EXISTS nodes (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    id         TEXT NOT NULL,       -- 32 hex digits chosen by the client; unique per account
    parent     TEXT,                -- parent node id; NULL for (and only for) the root
    version    INTEGER NOT NULL,    -- 1 when created, +1 per replacement (compare-and-set)
    meta       BLOB NOT NULL,       -- sealed record (opaque)
    content    BLOB,                -- sealed manifest (opaque), or NULL
    commit_id  BLOB NOT NULL,       -- the client's id of the write that made this version,
                                    -- so a retried write is recognised
    updated    INTEGER NOT NULL,    -- Unix seconds of that write
    seq        INTEGER NOT NULL DEFAULT 0, -- the account's change_seq of that write
    PRIMARY KEY (account_id, id)
);
-- A folder's children in id order: one listing page is one index range scan
-- (an index on (account_id, parent) alone made every page scan the account).
DROP INDEX IF EXISTS nodes_parent;
CREATE INDEX IF NOT EXISTS nodes_children ON nodes(account_id, parent, id);
CREATE INDEX IF NOT EXISTS nodes_seq ON nodes(account_id, seq);

-- Which write made which version of a node, so a retry of a write that landed
-- but lost its answer is recognised even after another device replaced it
-- or deleted it (the client then knows its write is in: not a conflict, and
-- not a reason to create the node again). Kept for the change feed's
-- retention period.
CREATE TABLE IF NOT EXISTS commits (
    account_id INTEGER NOT NULL,
    node_id    TEXT NOT NULL,
    commit_id  BLOB NOT NULL,
    version    INTEGER NOT NULL,
    at         INTEGER NOT NULL,    -- Unix seconds of the write: drives pruning
    PRIMARY KEY (account_id, node_id, commit_id)
);
CREATE INDEX IF NOT EXISTS commits_at ON commits(at);

-- Deleted nodes, for the change feed: a client that saw a node must learn
-- it is gone. Kept for a retention period, then pruned (accounts.pruned_seq).
-- A node created again with the same id loses its tombstone.
CREATE TABLE IF NOT EXISTS tombstones (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    id         TEXT NOT NULL,       -- the deleted node's id
    parent     TEXT,                -- its parent and version when deleted
    version    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,    -- the account's change_seq of the delete
    deleted    INTEGER NOT NULL,    -- Unix seconds of the delete: drives pruning
    PRIMARY KEY (account_id, id)
);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(account_id, seq);
CREATE INDEX IF NOT EXISTS tombstones_deleted ON tombstones(deleted);

-- Stored chunks. A chunk is shared by every node of the account that
-- lists it and collected once none does and its grace period is over.
CREATE TABLE IF NOT EXISTS chunks (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    id         TEXT NOT NULL,       -- 64 hex digits (a keyed hash the client computed)
    size       INTEGER NOT NULL,    -- bytes stored
    touched    INTEGER NOT NULL,    -- last upload or missing-probe (Unix seconds)
    PRIMARY KEY (account_id, id)
);
CREATE INDEX IF NOT EXISTS chunks_touched ON chunks(touched);

-- Which chunks a node's current version uses. The foreign keys make the
-- database itself refuse a reference to an unrecorded chunk, and the
-- collection of a referenced one.
CREATE TABLE IF NOT EXISTS node_chunks (
    account_id INTEGER NOT NULL,
    node_id    TEXT NOT NULL,
    chunk_id   TEXT NOT NULL,
    PRIMARY KEY (account_id, node_id, chunk_id),
    FOREIGN KEY (account_id, node_id) REFERENCES nodes(account_id, id) ON DELETE CASCADE,
    FOREIGN KEY (account_id, chunk_id) REFERENCES chunks(account_id, id)
);
CREATE INDEX IF NOT EXISTS node_chunks_chunk ON node_chunks(account_id, chunk_id);
"""

#: From one schema version to the next, run before ``_SCHEMA`` (whose
#: ``IF NOT EXISTS`` statements then add what is new).
_MIGRATIONS = {
    2: """
    ALTER TABLE sessions ADD COLUMN id TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN idle_seconds INTEGER NOT NULL DEFAULT 2592000;
    UPDATE sessions SET id = lower(hex(randomblob(8)));
    """,
    # Existing nodes get distinct sequence numbers (their rowids) and every
    # account a counter above them: a feed from 0 lists them all.
    3: """
    ALTER TABLE accounts ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN pruned_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE nodes SET seq = rowid;
    UPDATE accounts SET change_seq = (SELECT coalesce(max(seq), 0) FROM nodes
                                      WHERE nodes.account_id = accounts.id);
    """,
}

_NODE_BYTES = "length(meta) + coalesce(length(content), 0)"
_SESSION_COLUMNS = "id, account_id, device, created, last_seen, expires"
_ACCOUNT_COLUMNS = "id, email, kdf, auth_hash, keyblob, root_id, quota, used"


def _node_bytes(meta: bytes, content: bytes | None) -> int:
    return len(meta) + len(content or b"")


def _account_row(row: tuple[Any, ...]) -> AccountRow:
    id_, email, kdf, auth_hash, keyblob, root_id, quota, used = row
    return AccountRow(
        id_, email, json.loads(kdf), bytes(auth_hash), bytes(keyblob), root_id, quota, used
    )


def _isolated(db: sqlite3.Connection, fn: Callable[[], T], catch: type[E]) -> T | E:
    """``fn()`` inside a savepoint of the open transaction: if it raises,
    whatever it wrote is undone; a ``catch`` is returned, anything else
    raised. Savepoints nest: a batch's ops are isolated within its job."""
    db.execute("SAVEPOINT isolated")
    done = False
    try:
        result: T | E = fn()
        done = True
    except catch as exc:
        result = exc
    finally:
        if not done:
            db.execute("ROLLBACK TO isolated")
        db.execute("RELEASE isolated")
    return result


def _count_change(db: sqlite3.Connection, account_id: int, growth: int) -> int:
    """Account for a node change that makes the account use ``growth``
    more bytes; returns the change's sequence number. The counter's row
    stays locked until the transaction ends, so changes become visible in
    the order of their numbers (in PostgreSQL too)."""
    return int(
        db.execute(
            "UPDATE accounts SET used = used + ?, change_seq = change_seq + 1 WHERE id = ?"
            " RETURNING change_seq",
            (growth, account_id),
        ).fetchone()[0]
    )


def _batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _IN_BATCH):
        yield items[start : start + _IN_BATCH]


class SQLiteMetadataStore(MetadataStore):
    """:class:`MetadataStore` in one SQLite file (WAL mode), every call in a
    worker thread, so the event loop never waits on the disk.

    Writes go through one connection by group commit (``group``): the calls
    that arrive while a commit is under way are applied together in the next
    transaction, each inside a savepoint (so each still succeeds or fails
    alone, in arrival order), and made durable by one ``COMMIT``: one WAL
    fsync (``synchronous=FULL``) for the whole group. Each call returns only
    after that commit. Reads run on up to ``readers`` connections of their
    own, in read transactions (one snapshot each): WAL lets them proceed
    while a commit waits for the disk.

    Several server processes may share the database: every write
    transaction is ``BEGIN IMMEDIATE`` (SQLite's write lock, waited for up
    to ``busy_timeout``), so groups of different processes take turns, and
    nothing the rules depend on is kept in memory.

    Construction opens (and if needed creates) the database and blocks:
    from async code, construct it with ``trio.to_thread.run_sync``.
    """

    def __init__(self, path: Path, *, readers: int = 4) -> None:
        self._path = path
        self._db = self._connect()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a node the server has answered for survives a power cut,
            # not only a crash of this process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._stored_version()
            migrations = "".join(
                _MIGRATIONS[v] for v in range(version + 1, SCHEMA_VERSION + 1) if version
            )
            self._db.executescript(f"BEGIN IMMEDIATE;{migrations}{_SCHEMA}COMMIT;")
            self._secret = self._init_config()
        except BaseException:
            self._db.close()
            raise
        self._writes = GroupCommit(self._write_group)
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_limiter = trio.CapacityLimiter(readers)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        # Another process (a second server, a maintenance run) may hold the
        # write lock for a while.
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def _stored_version(self) -> int:
        """The schema version of the database (0: a new one). Raises
        DatabaseError for one written by a newer server."""
        if not self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'server_config'"
        ).fetchone():
            return 0
        row = self._db.execute(
            "SELECT value FROM server_config WHERE key = 'schema_version'"
        ).fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the database has schema version {version}; this server knows "
                f"{SCHEMA_VERSION} at most"
            )
        return version

    def _init_config(self) -> bytes:
        with self._transaction() as db:
            config = dict(db.execute("SELECT key, value FROM server_config").fetchall())
            if "secret" not in config:
                config["secret"] = secrets.token_hex(32)
                db.execute(
                    "INSERT INTO server_config (key, value) VALUES ('secret', ?)",
                    (config["secret"],),
                )
            db.execute(
                "INSERT INTO server_config (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
        return bytes.fromhex(config["secret"])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so
        a read-then-write step cannot be overtaken by another process."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` atomically in the next group commit; returns once it is
        durable. ``fn`` must only use the connection it is given."""
        return cast(T, await self._writes.run(fn))

    def _write_group(
        self, jobs: list[Callable[[sqlite3.Connection], object]]
    ) -> list[object | Exception]:
        with self._transaction() as db:
            return [_isolated(db, partial(job, db), Exception) for job in jobs]

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a read transaction (it must not write), concurrently
        with other reads and with the commit under way."""
        return await trio.to_thread.run_sync(self._read_in_thread, fn, limiter=self._read_limiter)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            db = self._readers.get_nowait()
        except queue.Empty:  # fewer connections than the limiter allows readers: one more
            db = self._connect()
            db.execute("PRAGMA query_only=ON")
        try:
            db.execute("BEGIN")
            try:
                return fn(db)
            finally:
                db.execute("ROLLBACK")
        finally:
            self._readers.put(db)

    async def server_secret(self) -> bytes:
        return self._secret

    # -- accounts and sessions ----------------------------------------------------

    async def create_account(
        self,
        email: str,
        kdf: dict[str, Any],
        auth_hash: bytes,
        keyblob: bytes,
        root_id: str,
        root_meta: bytes,
        *,
        quota: int,
        now: int,
    ) -> AccountRow:
        used = _node_bytes(root_meta, None)
        if used > quota:
            raise QuotaExceeded("the quota is smaller than the root folder")

        def create(db: sqlite3.Connection) -> AccountRow:
            if db.execute("SELECT 1 FROM accounts WHERE email = ?", (email,)).fetchone():
                raise AlreadyExists("an account with this email exists")
            account_id = db.execute(
                "INSERT INTO accounts (email, kdf, auth_hash, keyblob, root_id, quota, used,"
                " created, change_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) RETURNING id",
                (email, json.dumps(kdf), auth_hash, keyblob, root_id, quota, used, now),
            ).fetchone()[0]
            db.execute(
                "INSERT INTO nodes (account_id, id, parent, version, meta, content, commit_id,"
                " updated, seq) VALUES (?, ?, NULL, 1, ?, NULL, ?, ?, 1)",
                (account_id, root_id, root_meta, b"", now),
            )
            return AccountRow(account_id, email, kdf, auth_hash, keyblob, root_id, quota, used)

        return await self._write(create)

    async def account_by_email(self, email: str) -> AccountRow | None:
        def find(db: sqlite3.Connection) -> AccountRow | None:
            row = db.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE email = ?", (email,)
            ).fetchone()
            return None if row is None else _account_row(row)

        return await self._read(find)

    async def account(self, account_id: int) -> AccountRow:
        return await self._read(lambda db: self._account(db, account_id))

    @staticmethod
    def _account(db: sqlite3.Connection, account_id: int) -> AccountRow:
        row = db.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        if row is None:
            raise NotFound("no such account")
        return _account_row(row)

    async def set_password(
        self,
        account_id: int,
        kdf: dict[str, Any],
        auth_hash: bytes,
        keyblob: bytes,
        *,
        keep_session: str | None,
    ) -> int:
        def change(db: sqlite3.Connection) -> int:
            if not db.execute(
                "UPDATE accounts SET kdf = ?, auth_hash = ?, keyblob = ? WHERE id = ?",
                (json.dumps(kdf), auth_hash, keyblob, account_id),
            ).rowcount:
                raise NotFound("no such account")
            return int(
                db.execute(
                    "DELETE FROM sessions WHERE account_id = ? AND id IS NOT ?",
                    (account_id, keep_session),
                ).rowcount
            )

        return await self._write(change)

    async def add_session(
        self,
        token_hash: bytes,
        session_id: str,
        account_id: int,
        device: str,
        *,
        now: int,
        idle_seconds: int,
    ) -> int:
        expires = now + idle_seconds
        await self._write(
            lambda db: db.execute(
                "INSERT INTO sessions (token_hash, account_id, device, created, last_seen, expires,"
                " id, idle_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_hash, account_id, device, now, now, expires, session_id, idle_seconds),
            )
        )
        return expires

    async def session(self, token_hash: bytes, *, now: int) -> SessionRow | None:
        def lookup(db: sqlite3.Connection) -> SessionRow | None:
            row = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE token_hash = ? AND expires > ?",
                (token_hash, now),
            ).fetchone()
            return None if row is None else SessionRow(*row)

        def touch(db: sqlite3.Connection) -> SessionRow | None:
            row = db.execute(
                "UPDATE sessions SET last_seen = ?, expires = ? + idle_seconds"
                f" WHERE token_hash = ? AND expires > ? RETURNING {_SESSION_COLUMNS}",
                (now, now, token_hash, now),
            ).fetchone()
            return None if row is None else SessionRow(*row)

        # Most lookups only read; the write (and its commit) comes at most
        # once per LAST_SEEN_RESOLUTION, and re-checks the session is live.
        found = await self._read(lookup)
        if found is None or now - found.last_seen < LAST_SEEN_RESOLUTION:
            return found
        return await self._write(touch)

    async def list_sessions(self, account_id: int, *, now: int) -> list[SessionRow]:
        return await self._read(
            lambda db: [
                SessionRow(*row)
                for row in db.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE account_id = ? AND expires > ?"
                    " ORDER BY created, rowid",
                    (account_id, now),
                )
            ]
        )

    async def delete_session(self, token_hash: bytes) -> bool:
        return await self._write(
            lambda db: (
                db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)).rowcount > 0
            )
        )

    async def revoke_session(self, account_id: int, session_id: str) -> bool:
        return await self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM sessions WHERE account_id = ? AND id = ?", (account_id, session_id)
                ).rowcount
                > 0
            )
        )

    async def revoke_other_sessions(self, account_id: int, keep_session: str) -> int:
        return await self._write(
            lambda db: int(
                db.execute(
                    "DELETE FROM sessions WHERE account_id = ? AND id != ?",
                    (account_id, keep_session),
                ).rowcount
            )
        )

    async def purge_sessions(self, *, now: int) -> int:
        return await self._write(
            lambda db: db.execute("DELETE FROM sessions WHERE expires <= ?", (now,)).rowcount
        )

    # -- second factor and recovery ---------------------------------------------

    async def totp(self, account_id: int) -> TotpRow | None:
        def get(db: sqlite3.Connection) -> TotpRow | None:
            row = db.execute(
                "SELECT secret, enabled, last_step FROM totp WHERE account_id = ?", (account_id,)
            ).fetchone()
            return None if row is None else TotpRow(bytes(row[0]), bool(row[1]), row[2])

        return await self._read(get)

    async def begin_totp(self, account_id: int, secret: bytes) -> None:
        def begin(db: sqlite3.Connection) -> None:
            if db.execute(
                "SELECT 1 FROM totp WHERE account_id = ? AND enabled = 1", (account_id,)
            ).fetchone():
                raise AlreadyExists("two-factor authentication is already on")
            db.execute(
                "INSERT INTO totp (account_id, secret, enabled, last_step)"
                " VALUES (?, ?, 0, 0) ON CONFLICT (account_id) DO UPDATE"
                " SET secret = excluded.secret, last_step = 0",
                (account_id, secret),
            )

        await self._write(begin)

    async def enable_totp(
        self, account_id: int, secret: bytes, step: int, code_hashes: Sequence[bytes]
    ) -> bool:
        def enable(db: sqlite3.Connection) -> bool:
            if not db.execute(
                "UPDATE totp SET enabled = 1, last_step = ? WHERE account_id = ?"
                " AND enabled = 0 AND secret = ?",
                (step, account_id, secret),
            ).rowcount:
                return False
            db.execute("DELETE FROM recovery_codes WHERE account_id = ?", (account_id,))
            db.executemany(
                "INSERT INTO recovery_codes (account_id, code_hash) VALUES (?, ?)",
                ((account_id, code_hash) for code_hash in code_hashes),
            )
            return True

        return await self._write(enable)

    async def use_totp_step(self, account_id: int, step: int) -> bool:
        return await self._write(
            lambda db: (
                db.execute(
                    "UPDATE totp SET last_step = ? WHERE account_id = ? AND enabled = 1"
                    " AND last_step < ?",
                    (step, account_id, step),
                ).rowcount
                > 0
            )
        )

    async def use_recovery_code(self, account_id: int, code_hash: bytes) -> bool:
        return await self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM recovery_codes WHERE account_id = ? AND code_hash = ?",
                    (account_id, code_hash),
                ).rowcount
                > 0
            )
        )

    async def disable_totp(self, account_id: int) -> None:
        def disable(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM totp WHERE account_id = ?", (account_id,))
            db.execute("DELETE FROM recovery_codes WHERE account_id = ?", (account_id,))

        await self._write(disable)

    async def set_recovery_key(
        self, account_id: int, auth_hash: bytes, keyblob: bytes, *, now: int
    ) -> None:
        await self._write(
            lambda db: db.execute(
                "INSERT INTO recovery_keys (account_id, auth_hash, keyblob, created)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE"
                " SET auth_hash = excluded.auth_hash, keyblob = excluded.keyblob,"
                " created = excluded.created",
                (account_id, auth_hash, keyblob, now),
            )
        )

    async def recovery_by_email(self, email: str) -> RecoveryRow | None:
        def find(db: sqlite3.Connection) -> RecoveryRow | None:
            row = db.execute(
                "SELECT r.account_id, r.auth_hash, r.keyblob FROM accounts a"
                " JOIN recovery_keys r ON r.account_id = a.id WHERE a.email = ?",
                (email,),
            ).fetchone()
            return None if row is None else RecoveryRow(row[0], bytes(row[1]), bytes(row[2]))

        return await self._read(find)

    # -- failed attempts ------------------------------------------------------------

    async def throttle_wait(self, keys: Sequence[str], *, now: int) -> int:
        def wait(db: sqlite3.Connection) -> int:
            row = db.execute(
                f"SELECT max(locked_until) FROM throttle WHERE key IN"
                f" ({', '.join('?' * len(keys))})",
                tuple(keys),
            ).fetchone()
            return max(0, (row[0] or 0) - now)

        return await self._read(wait)

    async def throttle_failure(
        self, key: str, *, now: int, forget_after: int, lock_seconds: Callable[[int], int]
    ) -> None:
        def fail(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT failures, last_failure FROM throttle WHERE key = ?", (key,)
            ).fetchone()
            failures = 1 if row is None or now - row[1] > forget_after else row[0] + 1
            db.execute(
                "INSERT INTO throttle (key, failures, last_failure, locked_until)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                " failures = excluded.failures, last_failure = excluded.last_failure,"
                " locked_until = excluded.locked_until",
                (key, failures, now, now + lock_seconds(failures)),
            )

        await self._write(fail)

    async def throttle_clear(self, key: str) -> None:
        await self._write(lambda db: db.execute("DELETE FROM throttle WHERE key = ?", (key,)))

    async def purge_throttle(self, *, before: int) -> int:
        return await self._write(
            lambda db: int(
                db.execute(
                    "DELETE FROM throttle WHERE last_failure < ? AND locked_until < ?",
                    (before, before),
                ).rowcount
            )
        )

    # -- nodes --------------------------------------------------------------------

    async def get_node(self, account_id: int, node_id: str) -> NodeRow | None:
        def get(db: sqlite3.Connection) -> NodeRow | None:
            row = db.execute(
                "SELECT id, parent, version, meta, content FROM nodes"
                " WHERE account_id = ? AND id = ?",
                (account_id, node_id),
            ).fetchone()
            if row is None:
                return None
            id_, parent, version, meta, content = row
            content = None if content is None else bytes(content)
            return NodeRow(id_, parent, version, bytes(meta), content, len(content or b""))

        return await self._read(get)

    async def list_children(
        self, account_id: int, node_id: str, *, inline_max: int, after: str = "", limit: int
    ) -> list[NodeRow] | None:
        def children(db: sqlite3.Connection) -> list[NodeRow] | None:
            if not self._node_exists(db, account_id, node_id):
                return None
            rows = db.execute(
                "SELECT id, parent, version, meta,"
                " CASE WHEN length(content) <= ? THEN content END,"
                " coalesce(length(content), 0)"
                " FROM nodes WHERE account_id = ? AND parent = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (inline_max, account_id, node_id, after, limit),
            ).fetchall()
            return [
                NodeRow(
                    id_,
                    parent,
                    version,
                    bytes(meta),
                    None if content is None else bytes(content),
                    size,
                )
                for id_, parent, version, meta, content, size in rows
            ]

        return await self._read(children)

    @staticmethod
    def _node_exists(db: sqlite3.Connection, account_id: int, node_id: str) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM nodes WHERE account_id = ? AND id = ?", (account_id, node_id)
            ).fetchone()
            is not None
        )

    async def put_node(self, account_id: int, node_id: str, write: NodeWrite, *, now: int) -> int:
        return await self._write(lambda db: self._put_node(db, account_id, node_id, write, now))

    def _put_node(
        self, db: sqlite3.Connection, account_id: int, node_id: str, w: NodeWrite, now: int
    ) -> int:
        current = db.execute(
            f"SELECT version, commit_id, {_NODE_BYTES} FROM nodes WHERE account_id = ? AND id = ?",
            (account_id, node_id),
        ).fetchone()
        if current is not None and bytes(current[1]) == w.commit_id:
            return int(current[0])  # a retry of the write that is already in
        earlier = db.execute(
            "SELECT version FROM commits WHERE account_id = ? AND node_id = ? AND commit_id = ?",
            (account_id, node_id, w.commit_id),
        ).fetchone()
        if earlier is not None:
            # In, and replaced (or deleted) since by a later write.
            return int(earlier[0])
        if w.expect_version == 0:
            if current is not None:
                raise AlreadyExists("the node exists")
        elif current is None:
            raise NotFound("no such node")
        elif current[0] != w.expect_version:
            raise VersionConflict(f"the node is at version {current[0]}")
        account = self._account(db, account_id)
        self._check_parent(db, account, node_id, w.parent)
        chunk_ids = sorted(w.chunks)
        self._check_chunks(db, account_id, chunk_ids)
        growth = _node_bytes(w.meta, w.content) - (current[2] if current else 0)
        if growth > 0 and account.used + growth > account.quota:
            raise QuotaExceeded(f"the account's quota of {account.quota} bytes is full")

        version = 1 if current is None else int(current[0]) + 1
        seq = _count_change(db, account_id, growth)
        db.execute(
            "INSERT INTO nodes (account_id, id, parent, version, meta, content, commit_id,"
            " updated, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, id)"
            " DO UPDATE SET parent = excluded.parent, version = excluded.version,"
            " meta = excluded.meta, content = excluded.content, commit_id = excluded.commit_id,"
            " updated = excluded.updated, seq = excluded.seq",
            (account_id, node_id, w.parent, version, w.meta, w.content, w.commit_id, now, seq),
        )
        db.execute(
            "INSERT OR IGNORE INTO commits VALUES (?, ?, ?, ?, ?)",
            (account_id, node_id, w.commit_id, version, now),
        )
        if current is None:
            db.execute(
                "DELETE FROM tombstones WHERE account_id = ? AND id = ?", (account_id, node_id)
            )
        db.execute(
            "DELETE FROM node_chunks WHERE account_id = ? AND node_id = ?", (account_id, node_id)
        )
        db.executemany(
            "INSERT INTO node_chunks (account_id, node_id, chunk_id) VALUES (?, ?, ?)",
            ((account_id, node_id, chunk_id) for chunk_id in chunk_ids),
        )
        return version

    def _check_parent(
        self, db: sqlite3.Connection, account: AccountRow, node_id: str, parent: str | None
    ) -> None:
        if node_id == account.root_id:
            if parent is not None:
                raise InvalidRequest("the root folder cannot be moved")
            return
        if parent is None:
            raise InvalidRequest("only the root folder has no parent")
        if parent == node_id:
            raise InvalidRequest("a node cannot be its own parent")
        if not self._node_exists(db, account.id, parent):
            raise MissingReference("the parent node does not exist")
        # The new parent's ancestors, up to the root: the node must not be
        # among them, or the move would cut a loop out of the tree.
        loop = db.execute(
            "WITH RECURSIVE ancestors(id) AS ("
            " SELECT ? UNION"
            " SELECT nodes.parent FROM nodes JOIN ancestors"
            " ON nodes.account_id = ? AND nodes.id = ancestors.id"
            " WHERE nodes.parent IS NOT NULL"
            ") SELECT 1 FROM ancestors WHERE id = ?",
            (parent, account.id, node_id),
        ).fetchone()
        if loop is not None:
            raise InvalidRequest("a folder cannot be moved into itself")

    @staticmethod
    def _check_chunks(db: sqlite3.Connection, account_id: int, chunk_ids: Sequence[str]) -> None:
        for batch in _batches(chunk_ids):
            found = db.execute(
                "SELECT count(*) FROM chunks WHERE account_id = ? AND id IN"
                f" ({', '.join('?' * len(batch))})",
                (account_id, *batch),
            ).fetchone()[0]
            if found != len(batch):
                raise MissingReference("the node references a chunk that is not stored")

    async def delete_node(
        self, account_id: int, node_id: str, *, expect_version: int, now: int
    ) -> None:
        await self._write(
            lambda db: self._delete_node(db, account_id, node_id, expect_version, now)
        )

    def _delete_node(
        self, db: sqlite3.Connection, account_id: int, node_id: str, expect_version: int, now: int
    ) -> None:
        row = db.execute(
            f"SELECT version, {_NODE_BYTES}, parent FROM nodes WHERE account_id = ? AND id = ?",
            (account_id, node_id),
        ).fetchone()
        if row is None:
            raise NotFound("no such node")
        if node_id == self._account(db, account_id).root_id:
            raise InvalidRequest("the root folder cannot be deleted")
        if row[0] != expect_version:
            raise VersionConflict(f"the node is at version {row[0]}")
        if db.execute(
            "SELECT 1 FROM nodes WHERE account_id = ? AND parent = ? LIMIT 1",
            (account_id, node_id),
        ).fetchone():
            raise NotEmpty("the folder is not empty")
        db.execute("DELETE FROM nodes WHERE account_id = ? AND id = ?", (account_id, node_id))
        db.execute(
            "INSERT INTO tombstones (account_id, id, parent, version, seq, deleted)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (account_id, node_id, row[2], row[0], _count_change(db, account_id, -row[1]), now),
        )

    async def apply_node_ops(
        self, account_id: int, ops: Sequence[NodeOp], *, now: int
    ) -> list[int | MegafsError]:
        def apply(db: sqlite3.Connection) -> list[int | MegafsError]:
            return [
                _isolated(db, partial(self._apply_op, db, account_id, op, now), MegafsError)
                for op in ops
            ]

        return await self._write(apply)

    def _apply_op(self, db: sqlite3.Connection, account_id: int, op: NodeOp, now: int) -> int:
        node_id, change = op
        if isinstance(change, NodeDelete):
            self._delete_node(db, account_id, node_id, change.expect_version, now)
            return 0
        return self._put_node(db, account_id, node_id, change, now)

    # -- changes ------------------------------------------------------------------

    async def changes(self, account_id: int, after: int, *, limit: int) -> list[ChangeRow]:
        def changed(db: sqlite3.Connection) -> list[ChangeRow]:
            latest, pruned = db.execute(
                "SELECT change_seq, pruned_seq FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            if after < pruned:
                raise CursorExpired(
                    "deletes after this cursor have been forgotten: list everything again"
                )
            if after > latest:
                raise CursorExpired("the cursor is ahead of the account's changes")
            rows = db.execute(
                "SELECT id, parent, version, seq, 0 FROM nodes WHERE account_id = ? AND seq > ?"
                " UNION ALL"
                " SELECT id, parent, version, seq, 1 FROM tombstones"
                " WHERE account_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (account_id, after, account_id, after, limit),
            )
            return [ChangeRow(i, p, v, q, bool(d)) for i, p, v, q, d in rows]

        return await self._read(changed)

    async def change_cursor(self, account_id: int) -> int:
        return (await self.change_cursors([account_id]))[account_id]

    async def change_cursors(self, account_ids: Sequence[int]) -> dict[int, int]:
        def cursors(db: sqlite3.Connection) -> dict[int, int]:
            found: dict[int, int] = {}
            for batch in _batches(account_ids):
                found.update(
                    db.execute(
                        "SELECT id, change_seq FROM accounts WHERE id IN"
                        f" ({', '.join('?' * len(batch))})",
                        tuple(batch),
                    ).fetchall()
                )
            return found

        return await self._read(cursors)

    async def prune_tombstones(self, *, before: int) -> int:
        def prune(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE accounts SET pruned_seq = max(pruned_seq, (SELECT max(seq)"
                " FROM tombstones t WHERE t.account_id = accounts.id AND t.deleted <= ?))"
                " WHERE id IN (SELECT account_id FROM tombstones WHERE deleted <= ?)",
                (before, before),
            )
            db.execute("DELETE FROM commits WHERE at <= ?", (before,))
            return int(db.execute("DELETE FROM tombstones WHERE deleted <= ?", (before,)).rowcount)

        return await self._write(prune)

    # -- chunks -------------------------------------------------------------------

    async def stored_chunks(self, account_id: int, chunk_ids: Sequence[str]) -> set[str]:
        def stored(db: sqlite3.Connection) -> set[str]:
            return {
                row[0]
                for batch in _batches(chunk_ids)
                for row in db.execute(
                    f"SELECT id FROM chunks WHERE account_id = ? AND id IN"
                    f" ({', '.join('?' * len(batch))})",
                    (account_id, *batch),
                )
            }

        return await self._read(stored)

    async def missing_chunks(
        self, account_id: int, chunk_ids: Sequence[str], *, now: int
    ) -> list[str]:
        def missing(db: sqlite3.Connection) -> list[str]:
            present: set[str] = set()
            for batch in _batches(chunk_ids):
                present.update(
                    row[0]
                    for row in db.execute(
                        "UPDATE chunks SET touched = ? WHERE account_id = ? AND id IN"
                        f" ({', '.join('?' * len(batch))}) RETURNING id",
                        (now, account_id, *batch),
                    )
                )
            return [chunk_id for chunk_id in chunk_ids if chunk_id not in present]

        return await self._write(missing)

    async def add_chunk(self, account_id: int, chunk_id: str, size: int, *, now: int) -> bool:
        def add(db: sqlite3.Connection) -> bool:
            if db.execute(
                "UPDATE chunks SET touched = ? WHERE account_id = ? AND id = ?",
                (now, account_id, chunk_id),
            ).rowcount:
                return False
            account = self._account(db, account_id)
            if account.used + size > account.quota:
                raise QuotaExceeded(f"the account's quota of {account.quota} bytes is full")
            db.execute(
                "INSERT INTO chunks (account_id, id, size, touched) VALUES (?, ?, ?, ?)",
                (account_id, chunk_id, size, now),
            )
            db.execute("UPDATE accounts SET used = used + ? WHERE id = ?", (size, account_id))
            return True

        return await self._write(add)

    async def garbage_chunks(self, *, cutoff: int, limit: int) -> list[tuple[int, str]]:
        return await self._read(
            lambda db: [
                (int(account_id), chunk_id)
                for account_id, chunk_id in db.execute(
                    f"SELECT account_id, id FROM chunks c WHERE touched < ? AND {_UNREFERENCED}"
                    " LIMIT ?",
                    (cutoff, limit),
                )
            ]
        )

    async def forget_chunk(self, account_id: int, chunk_id: str, *, cutoff: int) -> bool:
        def forget(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "DELETE FROM chunks AS c WHERE account_id = ? AND id = ? AND touched < ?"
                f" AND {_UNREFERENCED} RETURNING size",
                (account_id, chunk_id, cutoff),
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE accounts SET used = used - ? WHERE id = ?", (row[0], account_id))
            return True

        return await self._write(forget)

    async def aclose(self) -> None:
        """Close every connection; no call may be under way."""

        def close() -> None:
            while not self._readers.empty():
                self._readers.get_nowait().close()
            self._db.close()

        await trio.to_thread.run_sync(close)


_UNREFERENCED = (
    "NOT EXISTS (SELECT 1 FROM node_chunks r WHERE r.account_id = c.account_id"
    " AND r.chunk_id = c.id)"
)
