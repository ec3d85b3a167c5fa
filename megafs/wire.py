"""The HTTP protocol between the megafs client and server.

Shared by ``megafs.remote`` (the client) and ``megafs.server``; neither
defines a path, limit or JSON field of its own. Everything the server stores
about a file or folder is opaque ciphertext made by the client: the server
sees node ids, parent ids, version numbers, chunk ids and sizes, nothing else.

Encoding: JSON bodies; binary values are standard base64 (with padding);
node ids are 16 random bytes as 32 lowercase hex digits; chunk ids are 32
bytes as 64 lowercase hex digits. Errors are ``{"error": code, "detail":
text}`` with the status of the matching class in :mod:`megafs.errors`.
Authenticated routes take ``Authorization: Bearer <token>``.

Routes (all under ``API_PREFIX``)::

    GET    /health                     -> {"ok": true, "version": str}
    POST   /prelogin   {email}         -> {"kdf": KDF}
    POST   /signup     {email, kdf, auth_secret, keyblob, root: {id, meta}, device}
                                       -> 201 Session
    POST   /login      {email, auth_secret, device, [code], [long_lived]}  -> Session
    POST   /logout                     -> 204
    GET    /account                    -> Account
    POST   /2fa/setup                  -> {"secret": base32}   (pending until enabled)
    POST   /2fa/enable {code}          -> {"recovery_codes": [str]}
    POST   /2fa/disable {email, auth_secret, code}  -> 204
    GET    /sessions                   -> {"sessions": [SessionInfo]}
    POST   /sessions/revoke-others     -> {"revoked": int}
    DELETE /sessions/{id}              -> 204
    POST   /password {old_auth_secret, kdf, auth_secret, keyblob}  -> 204
    PUT    /recovery {auth_secret, recovery_auth, keyblob}  -> 204
    POST   /recovery/start {email, recovery_auth}  -> {"keyblob": b64}
    POST   /recovery/finish {email, recovery_auth, kdf, auth_secret, keyblob, device,
                             [code], [long_lived]}  -> Session
    GET    /nodes/{id}                 -> Node (with content)
    GET    /nodes/{id}/children?after=ID&limit=N
                                       -> {"nodes": [Node], "next": ID | null}
                                          (by id, after ``after``; content only
                                          when small; ``next`` names the last
                                          node when more may follow)
    PUT    /nodes/{id} {parent, expect_version, meta, content, chunks, commit_id}
                                       -> {"version": int}
    DELETE /nodes/{id}?expect_version=N  -> 204
    POST   /nodes/batch {ops: [Op]}    -> {"results": [Result]}  (one per op, in order)
    GET    /changes?after=SEQ&wait=S&limit=N
                                       -> {"changes": [Change], "cursor": SEQ}
    GET    /changes/cursor             -> {"cursor": SEQ}
    POST   /chunks/missing {ids}       -> {"missing": [id]}
    PUT    /chunks/{id}    raw body    -> 201 {"size": int}
    POST   /chunks/batch   raw body: (id: 32 bytes, size: u32 big-endian, bytes) ...
                                       -> 201 {"sizes": [int]}  (one per chunk, in order)
    GET    /chunks/{id}                -> raw body

    KDF     = {alg: "argon2id", memory_kib, iterations, lanes, salt}
    Session = {token, expires, account: Account}
    Account = {email, kdf, keyblob, root_id, quota, used}
    Node    = {id, parent, version, meta, content, content_size}
    SessionInfo = {id, device, created, last_seen, expires, current}
    Op      = {op: "put", id, parent, expect_version, meta, content, chunks, commit_id}
            | {op: "delete", id, expect_version}
    Result  = {version: int} (0 for a delete) | {error: code, detail: text}
    Change  = {id, parent, version, seq, deleted: bool}

Accounts (docs/api.md and docs/security.md say why):

- ``code`` is a TOTP code (``TOTP_DIGITS`` digits, RFC 6238, SHA-1,
  ``TOTP_STEP`` seconds, ``TOTP_SKEW_STEPS`` steps of clock skew either way,
  each time step accepted once) or one of the single-use recovery codes
  ``/2fa/enable`` returned. A right password without a needed code is 401
  ``second_factor_required``; a wrong password is 401 ``auth_failed``.
- Failed attempts are counted per account and per client address; past a
  few, the route answers 429 ``rate_limited`` with ``Retry-After``.
- ``long_lived`` sessions (remembered devices, mounts) expire after
  ``LONG_SESSION_IDLE_SECONDS`` without use, others after
  ``SESSION_IDLE_SECONDS``.
- ``/password`` and ``/recovery/finish`` end every other session.

Semantics:

- ``PUT /nodes/{id}`` is compare-and-set: ``expect_version`` 0 creates (409
  ``already_exists`` if the node exists), N>0 replaces version N (409
  ``version_conflict`` otherwise). A retry of a commit that already landed
  (same ``commit_id`` as a version of the node, even one replaced since)
  answers that version, so a lost response never turns into a conflict. ``parent`` must be an
  existing node of the same account, not the node itself or below it.
  ``chunks`` lists every chunk id the content references; each must already
  be stored (409 ``not_found`` otherwise) so a committed node never points
  at missing data.
- ``DELETE`` of a node with children is 409 ``not_empty``; the root cannot
  be deleted.
- ``POST /nodes/batch`` applies up to ``MAX_BATCH_OPS`` puts and deletes in
  order, each exactly as its single route would (an op may name a parent an
  earlier op created), in one transaction. An op that fails changes nothing
  and does not stop the others: its result is ``{error, detail}`` with the
  code the single route would answer (one of ``NODE_OP_ERRORS``). A
  malformed op fails the whole request with 400 before anything is applied.
- ``POST /chunks/missing`` answers which ids are not stored and marks the
  others as recently used, so garbage collection keeps them for at least
  ``CHUNK_GRACE_SECONDS`` while the client commits a node that uses them.
- ``POST /chunks/batch`` stores up to ``MAX_CHUNK_BATCH_ITEMS`` chunks
  (a body of at most ``MAX_CHUNK_BATCH_BYTES``), each exactly as ``PUT
  /chunks/{id}`` would: small files' chunks in one request instead of one
  each. A malformed body stores nothing (400); a chunk refused for the quota
  fails the request with 507, and the chunks stored before it stay stored
  (storing one again is harmless, so the client sends the batch again).
- ``POST /chunks/fetch`` answers up to ``MAX_FETCH_ITEMS`` chunks in one
  body, framed as a chunk batch, in the order asked; a chunk the account
  does not have is left out (its ``GET`` would be 404). A reader ahead of
  the network gets its next chunks in fewer requests.
- Another account's node or chunk is always 404, never 403: existence is
  not revealed.
- The change feed: every node write or delete takes the account's next
  sequence number (``seq``, from 1: the root). ``GET /changes`` answers the
  nodes changed after ``after`` in seq order, each once at its latest
  change (``deleted``: it is gone; ``parent`` and ``version`` as it was),
  at most ``limit`` (default and most ``CHANGES_PAGE_MAX``); ``cursor`` is
  the last seq answered (``after`` if none), the ``after`` of the next
  call. With ``wait`` > 0 (at most ``CHANGES_WAIT_MAX`` seconds) and
  nothing to answer, the server holds the request until a change or the
  wait ends. Deletes are kept for a retention period (server option, 30
  days by default); a cursor older than a forgotten delete, or ahead of the
  account, is 410 ``cursor_expired``: list everything again. ``GET
  /changes/cursor`` is the current seq: take it *before* listing, then
  follow the feed from it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

__all__ = [
    "API_PREFIX",
    "CHANGES_PAGE_MAX",
    "CHANGES_WAIT_MAX",
    "CHUNK_BATCH_HEADER",
    "CHUNK_GRACE_SECONDS",
    "CHUNK_ID_RE",
    "INLINE_CONTENT_MAX",
    "LIST_PAGE_MAX",
    "LONG_SESSION_IDLE_SECONDS",
    "MAX_BATCH_OPS",
    "MAX_CHUNK_BATCH_BYTES",
    "MAX_CHUNK_BATCH_ITEMS",
    "MAX_CHUNK_BYTES",
    "MAX_CONTENT_BYTES",
    "MAX_FETCH_ITEMS",
    "MAX_JSON_BYTES",
    "MAX_META_BYTES",
    "MAX_MISSING_IDS",
    "NODE_ID_RE",
    "NODE_OP_ERRORS",
    "RECOVERY_CODES",
    "RECOVERY_CODE_RE",
    "SESSION_IDLE_SECONDS",
    "SESSION_ID_RE",
    "TOTP_DIGITS",
    "TOTP_SECRET_BYTES",
    "TOTP_SKEW_STEPS",
    "TOTP_STEP",
    "b64d",
    "b64e",
    "frame_chunks",
]

API_PREFIX = "/v1"

#: Plaintext chunk size is 1 MiB (see docs/format.md); a sealed chunk adds a
#: small header, so the server accepts a little more.
MAX_CHUNK_BYTES = (1 << 20) + 4096
#: ``POST /chunks/batch``: each chunk is its 32-byte id and its size (u32,
#: big-endian) followed by its bytes. A source tree's files are mostly a
#: few KiB: one request for many spares the server and the client a
#: request's work per file. The body stays small enough to hold in memory
#: like a chunk's.
CHUNK_BATCH_HEADER = 36
MAX_CHUNK_BATCH_ITEMS = 256
MAX_CHUNK_BATCH_BYTES = 4 * 1024 * 1024
#: ``POST /chunks/fetch``: chunks in one answer, which is then at most
#: about as large as an upload batch. The server's cost is mostly per
#: request (about 1.4 ms of CPU for a request, 0.5 ms more for a MiB).
MAX_FETCH_ITEMS = 4
#: A sealed node record (name, attributes, key, xattrs).
MAX_META_BYTES = 256 * 1024
#: A sealed manifest: 32 bytes per chunk plus a small header, so this covers
#: a 1 TiB file.
MAX_CONTENT_BYTES = 32 * 1024 * 1024 + 4096
#: Any JSON request body.
MAX_JSON_BYTES = 48 * 1024 * 1024
#: Listings carry a node's content when it is at most this many bytes, which
#: saves small files a round trip on open.
INLINE_CONTENT_MAX = 4096
#: Children per listing page (the default and the most a client may ask).
LIST_PAGE_MAX = 1000
MAX_MISSING_IDS = 10_000
#: Changes per ``GET /changes`` page (the default and the most a client may ask).
CHANGES_PAGE_MAX = 1000
#: The longest ``GET /changes`` may wait for a change, in seconds: well
#: under the timeouts of proxies on the way.
CHANGES_WAIT_MAX = 30
#: Ops per ``POST /nodes/batch``: enough to amortise a request and a
#: transaction over many small files, few enough that one batch holds the
#: database's write lock only briefly. The body is bounded by MAX_JSON_BYTES
#: like any other, so every op a single ``PUT`` accepts fits in a batch.
MAX_BATCH_OPS = 500
#: The error codes a batch op can answer: those of ``PUT`` and ``DELETE
#: /nodes/{id}`` (``not_found`` covers both "no such node" and "a parent or
#: chunk is missing", as the single routes' 404 and 409 do).
NODE_OP_ERRORS = frozenset(
    {
        "already_exists",
        "invalid_request",
        "not_empty",
        "not_found",
        "quota_exceeded",
        "version_conflict",
    }
)
CHUNK_GRACE_SECONDS = 3600

#: A session expires after this long without a request (sliding).
SESSION_IDLE_SECONDS = 30 * 24 * 3600
#: The same for long-lived sessions: a remembered device or a running mount,
#: which must not need the password (or a 2FA code) again while in use.
LONG_SESSION_IDLE_SECONDS = 365 * 24 * 3600

#: TOTP (RFC 6238) as authenticator apps implement it by default.
TOTP_DIGITS = 6
TOTP_STEP = 30
#: Codes of this many steps before or after the server's are accepted too.
TOTP_SKEW_STEPS = 1
#: 160 bits, the HMAC-SHA-1 block-friendly size RFC 4226 recommends.
TOTP_SECRET_BYTES = 20
#: Single-use recovery codes handed out when 2FA is enabled.
RECOVERY_CODES = 10
#: 16 base32 characters (80 bits) in four groups: ``abcd-efgh-ijkl-mnop``.
RECOVERY_CODE_RE = re.compile(r"^[a-z2-7]{4}(?:-[a-z2-7]{4}){3}$")

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: 8 random bytes as 16 lowercase hex digits: names a session in listings.
SESSION_ID_RE = re.compile(r"^[0-9a-f]{16}$")
CHUNK_ID_RE = re.compile(r"^[0-9a-f]{64}$")


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict base64 decoding; raises ``ValueError`` on anything malformed."""
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def frame_chunks(chunks: Iterable[tuple[bytes, bytes | bytearray | memoryview]]) -> bytes:
    """``(chunk id, bytes)`` pairs framed as a chunk batch (an upload's body,
    a fetch's answer): each its 32-byte id, its size as a big-endian u32,
    its bytes. The caller checks ids and sizes."""
    parts: list[bytes | bytearray | memoryview] = []
    for chunk_id, data in chunks:
        parts += (chunk_id, len(data).to_bytes(4, "big"), data)
    return b"".join(parts)
