"""What the server answers, parsed without trusting it.

The server is untrusted (docs/threat-model): every field of every answer is
checked for presence, type, id format, base64 and the size limits of
``megafs.wire`` before anything else sees it. Any deviation is a
FormatError naming the field, never a KeyError or TypeError escaping to a
caller. These checks are about shape only: whether the contents are
genuine is for ``crypto`` to decide.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from megafs.errors import FormatError, MegafsError, error_for_code
from megafs.wire import (
    CHANGES_PAGE_MAX,
    CHUNK_BATCH_HEADER,
    CHUNK_ID_RE,
    LIST_PAGE_MAX,
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    MAX_META_BYTES,
    NODE_ID_RE,
    NODE_OP_ERRORS,
    RECOVERY_CODE_RE,
    RECOVERY_CODES,
    SESSION_ID_RE,
    TOTP_SECRET_BYTES,
    b64d,
)

__all__ = [
    "Account",
    "Change",
    "RemoteNode",
    "Session",
    "SessionInfo",
    "parse_account",
    "parse_batch",
    "parse_changes",
    "parse_count",
    "parse_fetched",
    "parse_health",
    "parse_keyblob",
    "parse_missing",
    "parse_node",
    "parse_page",
    "parse_prelogin",
    "parse_recovery_codes",
    "parse_session",
    "parse_sessions",
    "parse_size",
    "parse_sizes",
    "parse_totp_secret",
    "parse_version",
    "printable",
]

#: Integers the server sends fit a signed 64-bit column.
_MAX_INT = 2**63 - 1
#: Tokens go back to the server in a header: only characters that are safe
#: there (no CR/LF a hostile server could use to inject headers).
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.~+/=-]{16,512}")
_KDF_INTS = ("memory_kib", "iterations", "lanes")
#: Server text that ends up on a terminal: no control characters (escape
#: sequences), bounded.
_PRINTABLE_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,200}")
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DETAIL_MAX_CHARS = 300
#: Far above any keyblob format; only bounds what is read.
_KEYBLOB_MAX_BYTES = 4096
#: A TOTP secret as base32 without padding.
_TOTP_SECRET_RE = re.compile(rf"[A-Z2-7]{{{-(-TOTP_SECRET_BYTES * 8 // 5)}}}")


@dataclass(frozen=True)
class Account:
    email: str
    kdf: dict[str, Any]
    keyblob: bytes
    root_id: bytes
    quota: int
    used: int


@dataclass(frozen=True)
class Session:
    token: str
    expires: int
    account: Account


@dataclass(frozen=True)
class SessionInfo:
    """One of the account's sessions, as ``GET /sessions`` lists it; times
    are Unix seconds; ``current`` marks the session that asked."""

    id: str
    device: str
    created: int
    last_seen: int
    expires: int
    current: bool


@dataclass(frozen=True)
class RemoteNode:
    """A node as the server holds it. ``content`` is None when the node has
    none, or (in listings) when it is larger than ``wire.INLINE_CONTENT_MAX``:
    then ``content_size`` is non-zero and ``get_node`` fetches it."""

    id: bytes
    parent: bytes | None
    version: int
    meta: bytes
    content: bytes | None
    content_size: int


@dataclass(frozen=True)
class Change:
    """A node's latest change in the account's change feed: the node as it
    is now (``deleted``: it is gone, with the parent and version it had)."""

    id: bytes
    parent: bytes | None
    version: int
    seq: int
    deleted: bool


class _Fields:
    """One JSON object from the server, read field by field."""

    def __init__(self, value: Any, what: str) -> None:
        if not isinstance(value, dict):
            raise _bad(what, "is not an object")
        self._obj = value
        self._what = what

    def _get(self, key: str) -> Any:
        if key not in self._obj:
            raise _bad(f"{self._what}.{key}", "is missing")
        return self._obj[key]

    def _fail(self, key: str, problem: str) -> FormatError:
        return _bad(f"{self._what}.{key}", problem)

    def obj(self, key: str) -> _Fields:
        return _Fields(self._get(key), f"{self._what}.{key}")

    def items(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._fail(key, "is not a list")
        return value

    def integer(self, key: str, *, low: int = 0) -> int:
        value = self._get(key)
        if type(value) is not int or not low <= value <= _MAX_INT:
            raise self._fail(key, f"is not an integer >= {low}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._fail(key, "is not a string")
        return value

    def matching(self, key: str, pattern: re.Pattern[str], what: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self._fail(key, f"is not {what}")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._fail(key, "is not true or false")
        return value

    def true(self, key: str) -> None:
        if self._get(key) is not True:
            raise self._fail(key, "is not true")

    def blob(self, key: str, *, max_bytes: int | None = None) -> bytes:
        try:
            data = b64d(self._get(key))
        except ValueError:
            raise self._fail(key, "is not base64") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise self._fail(key, f"is larger than {max_bytes} bytes")
        return data

    def blob_or_none(self, key: str, *, max_bytes: int) -> bytes | None:
        return None if self._get(key) is None else self.blob(key, max_bytes=max_bytes)

    def node_id(self, key: str) -> bytes:
        value = self._get(key)
        if not isinstance(value, str) or not NODE_ID_RE.fullmatch(value):
            raise self._fail(key, "is not a node id")
        return bytes.fromhex(value)

    def node_id_or_none(self, key: str) -> bytes | None:
        return None if self._get(key) is None else self.node_id(key)


def _bad(field: str, problem: str) -> FormatError:
    return FormatError(f"malformed server response: {field} {problem}")


def parse_health(value: Any) -> str:
    """The server's version."""
    fields = _Fields(value, "health")
    fields.true("ok")
    return fields.text("version")


def _kdf(fields: _Fields) -> dict[str, Any]:
    """The KDF parameters, in the server's JSON form; whether they are
    acceptable is ``crypto``'s decision (it refuses a downgrade)."""
    out: dict[str, Any] = {"alg": fields.text("alg")}
    for name in _KDF_INTS:
        out[name] = fields.integer(name)
    fields.blob("salt")
    out["salt"] = fields.text("salt")
    return out


def parse_prelogin(value: Any) -> dict[str, Any]:
    return _kdf(_Fields(value, "prelogin").obj("kdf"))


def _account(fields: _Fields) -> Account:
    return Account(
        email=fields.text("email"),
        kdf=_kdf(fields.obj("kdf")),
        keyblob=fields.blob("keyblob"),
        root_id=fields.node_id("root_id"),
        quota=fields.integer("quota"),
        used=fields.integer("used"),
    )


def parse_account(value: Any) -> Account:
    return _account(_Fields(value, "account"))


def parse_session(value: Any) -> Session:
    fields = _Fields(value, "session")
    token = fields.text("token")
    if not _TOKEN_RE.fullmatch(token):
        raise _bad("session.token", "has unexpected characters or length")
    return Session(token, fields.integer("expires"), _account(fields.obj("account")))


def parse_node(value: Any, *, listed: bool = False, what: str = "node") -> RemoteNode:
    """A node; ``listed`` for listings, where large content is left out."""
    fields = _Fields(value, what)
    node = RemoteNode(
        id=fields.node_id("id"),
        parent=fields.node_id_or_none("parent"),
        version=fields.integer("version", low=1),
        meta=fields.blob("meta", max_bytes=MAX_META_BYTES),
        content=fields.blob_or_none("content", max_bytes=MAX_CONTENT_BYTES),
        content_size=fields.integer("content_size"),
    )
    if node.content is not None:
        consistent = node.content_size == len(node.content)
    else:
        consistent = node.content_size == 0 or (listed and node.content_size <= MAX_CONTENT_BYTES)
    if not consistent:
        raise _bad(f"{what}.content_size", "does not match the content")
    return node


def parse_page(value: Any, parent: bytes, *, after: str) -> tuple[list[RemoteNode], str]:
    """One page of ``parent``'s children and the ``after`` of the next page
    ("" on the last). Each node must name ``parent``, ids must rise strictly
    from ``after`` (so pages cannot repeat or loop), and ``next`` must be the
    page's last id."""
    fields = _Fields(value, "listing")
    items = fields.items("nodes")
    if len(items) > LIST_PAGE_MAX:
        raise _bad("listing.nodes", "is longer than a page")
    nodes = [
        parse_node(item, listed=True, what=f"listing.nodes[{i}]") for i, item in enumerate(items)
    ]
    if any(node.parent != parent for node in nodes):
        raise _bad("listing.nodes", "contains a node of another folder")
    ids = [node.id.hex() for node in nodes]
    if any(b <= a for a, b in zip([after, *ids], ids, strict=False)):
        raise _bad("listing.nodes", "is not in rising id order after the cursor")
    more = value.get("next") if isinstance(value, dict) else None
    if more is not None and (not nodes or more != ids[-1]):
        raise _bad("listing.next", "does not name the page's last node")
    return nodes, more or ""


def parse_version(value: Any) -> int:
    return _Fields(value, "put").integer("version", low=1)


def parse_batch(value: Any, deletes: list[bool]) -> list[int | MegafsError]:
    """The results of a batch whose ops are deletes where ``deletes`` says
    so: one per op, each a version (at least 1 for a put, 0 for a delete) or
    the error of one of ``NODE_OP_ERRORS`` the op failed with."""
    items = _Fields(value, "batch").items("results")
    if len(items) != len(deletes):
        raise _bad("batch.results", f"has {len(items)} results for {len(deletes)} ops")
    results: list[int | MegafsError] = []
    for i, (item, delete) in enumerate(zip(items, deletes, strict=True)):
        fields = _Fields(item, f"batch.results[{i}]")
        if isinstance(item, dict) and "error" in item:
            code = fields.text("error")
            if code not in NODE_OP_ERRORS:
                raise _bad(f"batch.results[{i}].error", "is not an error a node op can have")
            results.append(error_for_code(code, 0)(printable(fields.text("detail")) or code))
        elif delete:
            if fields.integer("version") != 0:
                raise _bad(f"batch.results[{i}].version", "is not 0 for a delete")
            results.append(0)
        else:
            results.append(fields.integer("version", low=1))
    return results


def parse_changes(value: Any, after: int, limit: int) -> tuple[list[Change], int]:
    """A page of the change feed asked with cursor ``after`` and at most
    ``limit`` changes, and the next cursor. Sequence numbers must rise
    strictly from ``after`` (so a feed cannot repeat or go back), and the
    cursor must be the last of them (``after`` for an empty page)."""
    fields = _Fields(value, "changes")
    items = fields.items("changes")
    if len(items) > min(limit, CHANGES_PAGE_MAX):
        raise _bad("changes.changes", "is longer than the page asked for")
    changes = []
    for i, item in enumerate(items):
        change = _Fields(item, f"changes.changes[{i}]")
        changes.append(
            Change(
                id=change.node_id("id"),
                parent=change.node_id_or_none("parent"),
                version=change.integer("version", low=1),
                seq=change.integer("seq", low=1),
                deleted=change.boolean("deleted"),
            )
        )
    seqs = [after, *(c.seq for c in changes)]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        raise _bad("changes.changes", "is not in rising seq order after the cursor")
    if fields.integer("cursor") != seqs[-1]:
        raise _bad("changes.cursor", "is not the last seq of the page")
    return changes, seqs[-1]


def printable(text: str) -> str:
    """Server text fit for a terminal: control characters (escape
    sequences) replaced, bounded."""
    return _UNPRINTABLE_RE.sub(" ", text)[:_DETAIL_MAX_CHARS].strip()


def parse_size(value: Any) -> int:
    return _Fields(value, "chunk").integer("size")


def parse_sizes(value: Any, sent: list[int]) -> None:
    """A chunk batch's answer: the size of every chunk sent, in order."""
    if _Fields(value, "chunks").items("sizes") != sent:
        raise _bad("chunks.sizes", "are not the sizes of the chunks sent")


def parse_fetched(
    body: bytes | bytearray | memoryview, asked: list[bytes]
) -> dict[bytes, memoryview]:
    """A ``POST /chunks/fetch`` answer: chunk id -> its bytes (views of
    ``body``, not copies), for each asked id the server has. The chunks
    come framed as in an upload batch, each at most once and in the order
    asked; anything else is a FormatError."""
    view = memoryview(body)
    found: dict[bytes, memoryview] = {}
    pending = iter(asked)
    offset = 0
    while offset < len(view):
        start = offset + CHUNK_BATCH_HEADER
        if start > len(view):
            raise _bad("chunks", "are cut short in a header")
        chunk_id = bytes(view[offset : start - 4])
        size = int.from_bytes(view[start - 4 : start], "big")
        offset = start + size
        if chunk_id not in pending:  # consumes the iterator up to it: in order, once
            raise _bad("chunks", "hold one that was not asked for, or out of order")
        if not 1 <= size <= MAX_CHUNK_BYTES or offset > len(view):
            raise _bad("chunks", "hold one of a wrong size")
        found[chunk_id] = view[start:offset]
    return found


def parse_missing(value: Any, asked: set[str]) -> set[bytes]:
    """The missing chunk ids; each must be one that was asked about."""
    items = _Fields(value, "missing").items("missing")
    if not all(
        isinstance(item, str) and CHUNK_ID_RE.fullmatch(item) and item in asked for item in items
    ):
        raise _bad("missing.missing", "contains an id that was not asked about")
    return {bytes.fromhex(item) for item in items}


def parse_totp_secret(value: Any) -> str:
    return _Fields(value, "2fa").matching("secret", _TOTP_SECRET_RE, "a TOTP secret")


def parse_recovery_codes(value: Any) -> list[str]:
    items = _Fields(value, "2fa").items("recovery_codes")
    if len(items) != RECOVERY_CODES or not all(
        isinstance(item, str) and RECOVERY_CODE_RE.fullmatch(item) for item in items
    ):
        raise _bad("2fa.recovery_codes", f"is not a list of {RECOVERY_CODES} recovery codes")
    return items


def parse_sessions(value: Any) -> list[SessionInfo]:
    """The account's sessions; exactly one is the current one."""
    sessions = []
    for i, item in enumerate(_Fields(value, "sessions").items("sessions")):
        fields = _Fields(item, f"sessions[{i}]")
        sessions.append(
            SessionInfo(
                id=fields.matching("id", SESSION_ID_RE, "a session id"),
                device=fields.matching("device", _PRINTABLE_RE, "printable text"),
                created=fields.integer("created"),
                last_seen=fields.integer("last_seen"),
                expires=fields.integer("expires"),
                current=fields.boolean("current"),
            )
        )
    if sum(session.current for session in sessions) != 1:
        raise _bad("sessions", "does not mark exactly one session as current")
    return sessions


def parse_count(value: Any, key: str) -> int:
    return _Fields(value, "answer").integer(key)


def parse_keyblob(value: Any) -> bytes:
    return _Fields(value, "recovery").blob("keyblob", max_bytes=_KEYBLOB_MAX_BYTES)
