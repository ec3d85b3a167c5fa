"""The HTTP client of the megafs protocol (``megafs.wire``), over
``transport`` (HTTP/1.1 on trio and h11; httpx parses the server's address
and builds the default TLS context).

Translation happens here, once: ids are bytes above this module and hex
below it; binary values are base64 on the wire; error answers become the
matching :mod:`megafs.errors` class with the server's detail; network
failures, timeouts and server errors are retried (``retry``) and then
become RemoteError or RemoteTimeout, chained from the transport's exception.

Answers are untrusted: bodies are read raw (no decompression, so no
decompression bomb) and capped while streaming (``MAX_CHUNK_BYTES`` for a
chunk, ``MAX_JSON_BYTES`` for JSON), and ``responses`` checks every field.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import trio

from megafs import __version__
from megafs.errors import (
    AuthFailed,
    FormatError,
    InvalidRequest,
    MegafsError,
    RemoteError,
    RemoteTimeout,
    TooLarge,
    error_for_code,
)
from megafs.remote.responses import (
    Account,
    Change,
    RemoteNode,
    Session,
    SessionInfo,
    parse_account,
    parse_batch,
    parse_changes,
    parse_count,
    parse_fetched,
    parse_health,
    parse_keyblob,
    parse_missing,
    parse_node,
    parse_page,
    parse_prelogin,
    parse_recovery_codes,
    parse_session,
    parse_sessions,
    parse_size,
    parse_sizes,
    parse_totp_secret,
    parse_version,
    printable,
)
from megafs.remote.retry import Transient, retrying
from megafs.remote.transport import (
    BodyTooLarge,
    Response,
    Timeouts,
    Transport,
    TransportError,
    TransportTimeout,
    reason,
)
from megafs.wire import (
    API_PREFIX,
    CHANGES_PAGE_MAX,
    CHANGES_WAIT_MAX,
    CHUNK_BATCH_HEADER,
    MAX_BATCH_OPS,
    MAX_CHUNK_BATCH_BYTES,
    MAX_CHUNK_BATCH_ITEMS,
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    MAX_FETCH_ITEMS,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_MISSING_IDS,
    SESSION_ID_RE,
    b64e,
    frame_chunks,
)

__all__ = ["DeleteNode", "PutNode", "RemoteClient"]

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

NODE_ID_BYTES = 16
CHUNK_ID_BYTES = 32

#: Statuses that say "try again later" rather than "no".
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
#: An error answer's body is only read for its code and detail.
_ERROR_BODY_MAX = 64 * 1024
#: JSON larger than this is encoded and parsed in a worker thread.
_INLINE_JSON_BYTES = 1 << 20
#: A batch request is cut before it grows past this much JSON (unless one op
#: alone is larger): the server parses it and applies it in one transaction,
#: which should stay short.
_BATCH_TARGET_BYTES = 8 << 20
#: An op's JSON besides its base64 and chunk ids (field names, ids, numbers).
_OP_OVERHEAD = 256


class RemoteClient:
    """One account's connection to a megafs server.

    ``token`` is the session, set by :meth:`signup` and :meth:`login` (or
    given). Every method may raise RemoteError (RemoteTimeout) once
    ``retries`` retries of a network failure or server error are used up,
    FormatError for a malformed answer, or the error class the server
    answered with (AuthFailed, NotFound, VersionConflict, ...).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        insecure: bool = False,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        """``verify``: how an https:// server's certificate is checked: True
        (Mozilla's CAs from ``certifi``, or ``$SSL_CERT_FILE``), a CA file
        or an SSL context (a private CA, a pinned self-signed certificate). Never off: a client that
        trusts any certificate would hand its token to whoever answers."""
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"not a server address: {base_url!r}") from exc
        if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment:
            raise InvalidRequest(
                f"not a server address: {base_url!r} (expected https://host[:port])"
            )
        if url.scheme == "http" and not insecure and not _is_loopback(url.host):
            raise InvalidRequest(
                f"refusing plain http:// to {url.host}: anyone on the way could read the "
                "session token; use https://, or allow it explicitly (--insecure)"
            )
        self.token = token
        #: Opens a session (sets ``token``) when a request needs one and
        #: there is none yet: a mount started while the server was
        #: unreachable logs in on its first contact, whichever part of the
        #: daemon makes it (cli/main.py). One call at a time; it raises
        #: RemoteError while the server is unreachable. Once a session
        #: exists it is never called again, so a revoked session stays
        #: revoked.
        self.login_on_demand: Callable[[], Awaitable[None]] | None = None
        self._login_lock = trio.Lock()
        self._base = url.raw_path.rstrip(b"/") + API_PREFIX.encode()
        self._retries = retries
        if verify is False:
            raise InvalidRequest("certificate checks cannot be turned off")
        if isinstance(verify, str):
            try:
                verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidRequest(
                    f"cannot use {verify} as trusted certificates: {reason(exc)}"
                ) from exc
        if verify is True:
            # certifi's CAs, or $SSL_CERT_FILE / $SSL_CERT_DIR, as httpx picks them.
            verify = httpx.create_ssl_context(verify=True)
        self._timeouts = Timeouts(timeout, timeout, timeout, timeout)
        self._transport = Transport(
            url.scheme,
            url.raw_host.decode("ascii"),
            url.port or (443 if url.scheme == "https" else 80),
            ssl_context=verify,
            headers=[
                (b"User-Agent", f"megafs/{__version__}".encode()),
                (b"Accept-Encoding", b"identity"),
            ],
        )

    async def __aenter__(self) -> RemoteClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; the client cannot be used afterwards."""
        await self._transport.aclose()

    # -- account ---------------------------------------------------------------------

    async def health(self) -> str:
        """The server's version, if it is up."""
        return parse_health(await self._json("GET", "/health", auth=False))

    async def prelogin(self, email: str) -> dict[str, Any]:
        """The account's KDF parameters (as JSON; ``crypto`` checks them)."""
        return parse_prelogin(await self._json("POST", "/prelogin", {"email": email}, auth=False))

    async def signup(
        self,
        email: str,
        kdf: dict[str, Any],
        auth_secret: bytes,
        keyblob: bytes,
        root_id: bytes,
        root_meta: bytes,
        device: str,
        *,
        long_lived: bool = False,
    ) -> Session:
        """Create the account with its root folder, and log in."""
        body = {
            "email": email,
            "kdf": kdf,
            "auth_secret": b64e(auth_secret),
            "keyblob": b64e(keyblob),
            "root": {"id": _node_hex(root_id), "meta": b64e(root_meta)},
            "device": device,
            "long_lived": long_lived,
        }
        return self._logged_in(parse_session(await self._json("POST", "/signup", body, auth=False)))

    async def login(
        self,
        email: str,
        auth_secret: bytes,
        device: str,
        *,
        code: str | None = None,
        long_lived: bool = False,
    ) -> Session:
        """Open a session. ``code``: a TOTP or recovery code, for an account
        with two-factor authentication (without one it is
        SecondFactorRequired). ``long_lived``: a session for a remembered
        device or a mount, which lives while it is used."""
        body = {
            "email": email,
            "auth_secret": b64e(auth_secret),
            "device": device,
            "code": code,
            "long_lived": long_lived,
        }
        return self._logged_in(parse_session(await self._json("POST", "/login", body, auth=False)))

    def _logged_in(self, session: Session) -> Session:
        self.token = session.token
        return session

    async def logout(self) -> None:
        """End the session on the server and forget the token. A session
        that has already ended (a retry whose first attempt landed, an
        expired token) is not an error."""
        with contextlib.suppress(AuthFailed):
            await self._call("POST", "/logout")
        self.token = None

    async def account(self) -> Account:
        return parse_account(await self._json("GET", "/account"))

    # -- account security -----------------------------------------------------------

    async def totp_setup(self) -> str:
        """A new TOTP secret (base32) that waits for :meth:`totp_enable`."""
        return parse_totp_secret(await self._json("POST", "/2fa/setup"))

    async def totp_enable(self, code: str) -> list[str]:
        """Turn two-factor authentication on with a first code of the
        waiting secret; returns the single-use recovery codes."""
        return parse_recovery_codes(await self._json("POST", "/2fa/enable", {"code": code}))

    async def totp_disable(self, email: str, auth_secret: bytes, code: str) -> None:
        body = {"email": email, "auth_secret": b64e(auth_secret), "code": code}
        await self._call_json("POST", "/2fa/disable", body, auth=False)

    async def sessions(self) -> list[SessionInfo]:
        return parse_sessions(await self._json("GET", "/sessions"))

    async def revoke_session(self, session_id: str) -> None:
        """End one of the account's sessions (NotFound: no such session)."""
        if not SESSION_ID_RE.fullmatch(session_id):
            raise InvalidRequest(f"not a session id: {session_id!r} (16 hex digits)")
        await self._call("DELETE", f"/sessions/{session_id}")

    async def revoke_other_sessions(self) -> int:
        """End every session of the account but this one; returns how many."""
        return parse_count(await self._json("POST", "/sessions/revoke-others"), "revoked")

    async def change_password(
        self, old_auth_secret: bytes, kdf: dict[str, Any], auth_secret: bytes, keyblob: bytes
    ) -> None:
        """Replace the password's proof and the keyblob; the server ends
        every other session."""
        body = {
            "old_auth_secret": b64e(old_auth_secret),
            "kdf": kdf,
            "auth_secret": b64e(auth_secret),
            "keyblob": b64e(keyblob),
        }
        await self._call_json("POST", "/password", body)

    async def set_recovery_key(
        self, auth_secret: bytes, recovery_auth: bytes, keyblob: bytes
    ) -> None:
        body = {
            "auth_secret": b64e(auth_secret),
            "recovery_auth": b64e(recovery_auth),
            "keyblob": b64e(keyblob),
        }
        await self._call_json("PUT", "/recovery", body)

    async def recovery_start(self, email: str, recovery_auth: bytes) -> bytes:
        """The master key's wrap under the recovery key."""
        body = {"email": email, "recovery_auth": b64e(recovery_auth)}
        return parse_keyblob(await self._json("POST", "/recovery/start", body, auth=False))

    async def recovery_finish(
        self,
        email: str,
        recovery_auth: bytes,
        kdf: dict[str, Any],
        auth_secret: bytes,
        keyblob: bytes,
        device: str,
        *,
        code: str | None = None,
        long_lived: bool = False,
    ) -> Session:
        """Set a new password with the recovery key, and log in."""
        body = {
            "email": email,
            "recovery_auth": b64e(recovery_auth),
            "kdf": kdf,
            "auth_secret": b64e(auth_secret),
            "keyblob": b64e(keyblob),
            "device": device,
            "code": code,
            "long_lived": long_lived,
        }
        return self._logged_in(
            parse_session(await self._json("POST", "/recovery/finish", body, auth=False))
        )

    # -- nodes ----------------------------------------------------------------------

    async def get_node(self, node_id: bytes) -> RemoteNode:
        node = parse_node(await self._json("GET", f"/nodes/{_node_hex(node_id)}"))
        if node.id != node_id:
            raise FormatError("malformed server response: asked for one node, got another")
        return node

    async def list_children(self, node_id: bytes) -> list[RemoteNode]:
        """All the children, fetched a page at a time; large content is left
        out (``content`` None)."""
        nodes: list[RemoteNode] = []
        after = ""
        while True:
            query = f"?after={after}" if after else ""
            page, after = parse_page(
                await self._json("GET", f"/nodes/{_node_hex(node_id)}/children{query}"),
                node_id,
                after=after,
            )
            nodes.extend(page)
            if not after:
                return nodes

    async def put_node(
        self,
        node_id: bytes,
        *,
        parent: bytes | None,
        expect_version: int,
        meta: bytes,
        content: bytes | None,
        chunks: Sequence[bytes],
        commit_id: bytes,
    ) -> int:
        """Create (``expect_version`` 0) or replace a node; returns the new
        version. ``parent`` is None only for the root. Retrying the same
        ``commit_id`` is safe: the server answers the version it made."""
        op = PutNode(node_id, parent, expect_version, meta, content, chunks, commit_id)
        body, large = op.fields(), op.json_size() > _INLINE_JSON_BYTES
        return parse_version(
            await self._json("PUT", f"/nodes/{_node_hex(node_id)}", body, large=large)
        )

    async def delete_node(self, node_id: bytes, *, expect_version: int) -> None:
        await self._call(
            "DELETE", f"/nodes/{_node_hex(node_id)}", query={"expect_version": str(expect_version)}
        )

    async def change_cursor(self) -> int:
        """The account's latest change: follow :meth:`changes` from here
        after listing everything (take it before listing, so nothing done
        meanwhile is missed)."""
        return parse_count(await self._json("GET", "/changes/cursor"), "cursor")

    async def changes(
        self, after: int, *, wait: float = 0, limit: int = CHANGES_PAGE_MAX
    ) -> tuple[list[Change], int]:
        """The nodes changed after cursor ``after`` (at most ``limit``, each
        once at its latest change, by seq) and the cursor to ask with next.
        With ``wait`` (seconds, at most ``CHANGES_WAIT_MAX``, whole seconds
        on the wire), the server holds the request until there is a change
        or the wait ends (then the page is empty and the cursor the same).
        A page of ``limit`` changes may have more behind it. Raises
        CursorExpired if the server forgot deletes after ``after``: list
        everything again."""
        if not 0 <= wait <= CHANGES_WAIT_MAX or not 1 <= limit <= CHANGES_PAGE_MAX:
            raise InvalidRequest(
                f"wait must be 0..{CHANGES_WAIT_MAX} s and limit 1..{CHANGES_PAGE_MAX}"
            )
        seconds = math.ceil(wait)
        query = {"after": str(after), "wait": str(seconds), "limit": str(limit)}
        answer = await self._json("GET", "/changes", query=query, wait=seconds)
        return parse_changes(answer, after, limit)

    async def commit_batch(self, ops: Sequence[PutNode | DeleteNode]) -> list[int | MegafsError]:
        """Apply puts and deletes in order, many per request (``POST
        /nodes/batch``, at most ``MAX_BATCH_OPS`` and about
        ``_BATCH_TARGET_BYTES`` of JSON each); an op may name a parent an
        earlier op creates.

        Returns, per op, the new version (0 for a delete) or the error the
        single call would have raised (VersionConflict, NotFound, ...): one
        op failing does not stop the others. Raises, before anything is sent,
        for an op the protocol cannot carry (InvalidRequest, TooLarge); a
        request that fails as a whole (RemoteError, AuthFailed) raises, and
        the ops of earlier requests stay applied. A retry is safe: puts are
        recognised by their ``commit_id``, and a delete that already landed
        answers NotFound.
        """
        bodies = [op.body() for op in ops]
        results: list[int | MegafsError] = []
        start = 0
        while start < len(ops):
            end, size = start, 0
            while end < len(ops) and end - start < MAX_BATCH_OPS:
                size += ops[end].json_size()
                if end > start and size > _BATCH_TARGET_BYTES:
                    break
                end += 1
            answer = await self._json(
                "POST", "/nodes/batch", {"ops": bodies[start:end]}, large=size > _INLINE_JSON_BYTES
            )
            results += parse_batch(answer, [isinstance(op, DeleteNode) for op in ops[start:end]])
            start = end
        return results

    # -- chunks ---------------------------------------------------------------------

    async def missing_chunks(self, ids: Sequence[bytes]) -> set[bytes]:
        """Which of ``ids`` the server does not have (the others it keeps
        for a grace period, for a commit that uses them)."""
        missing: set[bytes] = set()
        for start in range(0, len(ids), MAX_MISSING_IDS):
            batch = [_chunk_hex(chunk_id) for chunk_id in ids[start : start + MAX_MISSING_IDS]]
            answer = await self._json("POST", "/chunks/missing", {"ids": batch})
            missing |= parse_missing(answer, set(batch))
        return missing

    async def put_chunk(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > MAX_CHUNK_BYTES:
            raise TooLarge(f"a chunk may have at most {MAX_CHUNK_BYTES} bytes")
        parse_size(await self._json("PUT", f"/chunks/{_chunk_hex(chunk_id)}", raw=data))

    async def put_chunks(self, chunks: Sequence[tuple[bytes, bytes]]) -> None:
        """Store several ``(chunk id, bytes)`` in one request, each as
        ``put_chunk`` would: small files' chunks, without a request each."""
        if not 1 <= len(chunks) <= MAX_CHUNK_BATCH_ITEMS:
            raise InvalidRequest(f"a chunk batch holds 1..{MAX_CHUNK_BATCH_ITEMS} chunks")
        for chunk_id, data in chunks:
            if not 1 <= len(data) <= MAX_CHUNK_BYTES:
                raise TooLarge(f"a chunk has 1..{MAX_CHUNK_BYTES} bytes")
            _chunk_hex(chunk_id)  # checks the id
        body = frame_chunks(chunks)
        if len(body) > MAX_CHUNK_BATCH_BYTES:
            raise TooLarge(f"a chunk batch has at most {MAX_CHUNK_BATCH_BYTES} bytes")
        answer = await self._json("POST", "/chunks/batch", raw=body)
        parse_sizes(answer, [len(data) for _, data in chunks])

    async def get_chunk(self, chunk_id: bytes) -> bytes | bytearray | memoryview:
        """A chunk's sealed bytes, in the buffer they were received into
        (perhaps a view of a reused one: ``Transport.request``)."""
        return await self._call(
            "GET", f"/chunks/{_chunk_hex(chunk_id)}", cap=MAX_CHUNK_BYTES, pooled=True
        )

    async def get_chunks(self, chunk_ids: Sequence[bytes]) -> dict[bytes, memoryview]:
        """The sealed bytes of up to ``MAX_FETCH_ITEMS`` chunks in one
        request: id -> bytes (views of the one buffer they were received
        into), for those the server has; the others are left out, as
        ``get_chunk`` would raise NotFound for them."""
        if not 1 <= len(chunk_ids) <= MAX_FETCH_ITEMS or len(set(chunk_ids)) < len(chunk_ids):
            raise InvalidRequest(f"a fetch asks for 1..{MAX_FETCH_ITEMS} distinct chunks")
        body = _encode_json({"ids": [_chunk_hex(chunk_id) for chunk_id in chunk_ids]})
        answer = await self._call(
            "POST",
            "/chunks/fetch",
            raw=body,
            content_type="application/json",
            cap=len(chunk_ids) * (CHUNK_BATCH_HEADER + MAX_CHUNK_BYTES),
            pooled=True,
        )
        return parse_fetched(answer, list(chunk_ids))

    # -- transport ------------------------------------------------------------------

    async def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        auth: bool = True,
        large: bool = False,
        query: dict[str, str] | None = None,
        wait: float = 0,
    ) -> Any:
        """Send ``body`` as JSON (or ``raw`` bytes) and parse the JSON answer.
        ``large``: the body is big enough to encode in a worker thread.
        ``wait``: seconds the server may hold the request on purpose, on
        top of the usual timeout."""
        content_type = "application/octet-stream"
        if body is not None:
            raw = await _off_loop(_encode_json, body, large=large)
            content_type = "application/json"
        answer = await self._call(
            method, path, raw=raw, content_type=content_type, auth=auth, query=query, wait=wait
        )
        try:
            return await _off_loop(json.loads, answer, large=len(answer) > _INLINE_JSON_BYTES)
        except (ValueError, RecursionError):
            raise FormatError(f"malformed server response to {method} {path}: not JSON") from None

    async def _call_json(self, method: str, path: str, body: Any, *, auth: bool = True) -> None:
        """Send ``body`` as JSON to a route that answers without a body."""
        await self._call(
            method, path, raw=_encode_json(body), content_type="application/json", auth=auth
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        raw: bytes | None = None,
        content_type: str = "application/octet-stream",
        query: dict[str, str] | None = None,
        auth: bool = True,
        cap: int = MAX_JSON_BYTES,
        wait: float = 0,
        pooled: bool = False,
    ) -> bytes | bytearray | memoryview:
        """One request, retried while it fails transiently; returns the body
        of a 2xx answer or raises. ``wait``: see :meth:`_json`; ``pooled``:
        the body is taken as raw bytes (``Transport.request``)."""
        headers: list[tuple[bytes, bytes]] = []
        if auth:
            if self.token is None and self.login_on_demand is not None:
                async with self._login_lock:
                    if self.token is None and self.login_on_demand is not None:
                        await self.login_on_demand()
            if self.token is None:
                raise AuthFailed("not logged in")
            headers.append((b"Authorization", f"Bearer {self.token}".encode()))
        if raw is not None:
            headers.append((b"Content-Type", content_type.encode()))
        target = self._base + path.encode()
        if query:
            target += b"?" + urlencode(query).encode()
        timeouts = self._timeouts
        if wait:
            timeouts = replace(timeouts, read=timeouts.read + wait)
        what = f"{method} {path}"
        attempt = partial(self._attempt, what, method, target, headers, raw, cap, timeouts, pooled)
        return await retrying(attempt, retries=self._retries, what=what)

    async def _attempt(
        self,
        what: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        raw: bytes | None,
        cap: int,
        timeouts: Timeouts,
        pooled: bool,
    ) -> bytes | bytearray | memoryview:
        started = trio.current_time()
        try:
            response = await self._transport.request(
                method.encode(),
                target,
                headers,
                raw,
                timeouts=timeouts,
                body_cap=cap,
                error_cap=_ERROR_BODY_MAX,
                pooled=pooled,
            )
        except BodyTooLarge as exc:
            if 200 <= exc.status < 300:
                raise FormatError(
                    f"malformed server response to {what}: larger than {cap} bytes"
                ) from None
            # An unreadable error body still has its status.
            response = Response(exc.status, {}, b"")
        except TransportTimeout as exc:
            raise Transient(RemoteTimeout(f"{what}: the server did not answer in time")) from exc
        except TransportError as exc:
            raise Transient(RemoteError(f"{what}: {reason(exc)}")) from exc
        status, body = response.status, response.body
        encoding = response.headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            if 200 <= status < 300:
                named = encoding.decode("ascii", "replace")
                raise FormatError(f"malformed server response to {what}: compressed ({named})")
            body = b""
        log.debug("%s -> %d (%.0f ms)", what, status, (trio.current_time() - started) * 1000)
        if 200 <= status < 300:
            return body
        raise _error_for(status, body, what)


@dataclass(frozen=True)
class PutNode:
    """A batch op: create (``expect_version`` 0) or replace a node, as
    :meth:`RemoteClient.put_node` does."""

    id: bytes
    parent: bytes | None
    expect_version: int
    meta: bytes
    content: bytes | None
    chunks: Sequence[bytes]
    commit_id: bytes

    def body(self) -> dict[str, Any]:
        """The op as JSON. Raises InvalidRequest or TooLarge for values the
        protocol cannot carry."""
        return {"op": "put", "id": _node_hex(self.id), **self.fields()}

    def fields(self) -> dict[str, Any]:
        """The body of ``PUT /nodes/{id}``."""
        if len(self.meta) > MAX_META_BYTES or len(self.content or b"") > MAX_CONTENT_BYTES:
            raise TooLarge("the node's record or manifest is larger than the protocol allows")
        return {
            "parent": None if self.parent is None else _node_hex(self.parent),
            "expect_version": self.expect_version,
            "meta": b64e(self.meta),
            "content": None if self.content is None else b64e(self.content),
            "chunks": [_chunk_hex(chunk_id) for chunk_id in self.chunks],
            "commit_id": b64e(self.commit_id),
        }

    def json_size(self) -> int:
        """About the size of :meth:`body` encoded (a little more)."""
        sealed = len(self.meta) + len(self.content or b"") + len(self.commit_id)
        return _OP_OVERHEAD + sealed * 4 // 3 + (2 * CHUNK_ID_BYTES + 3) * len(self.chunks)


@dataclass(frozen=True)
class DeleteNode:
    """A batch op: delete a node at ``expect_version``, as
    :meth:`RemoteClient.delete_node` does."""

    id: bytes
    expect_version: int

    def body(self) -> dict[str, Any]:
        return {"op": "delete", "id": _node_hex(self.id), "expect_version": self.expect_version}

    def json_size(self) -> int:
        return _OP_OVERHEAD


def _error_for(status: int, body: bytes, what: str) -> MegafsError | Transient:
    """The exception for an error answer: the class its code names (or,
    failing that, its status), with its detail made printable; server
    errors are Transient."""
    code, detail = "", ""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        code, detail = (
            item if isinstance(item := value.get(key), str) else "" for key in ("error", "detail")
        )
    detail = printable(detail) or f"HTTP {status}"
    if status in _TRANSIENT_STATUSES:
        cls = RemoteTimeout if status == 504 else RemoteError
        return Transient(cls(f"{what}: server error {status}: {detail}"))
    return error_for_code(code, status)(detail)


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _off_loop(fn: Callable[[A], R], arg: A, *, large: bool) -> R:
    """``fn(arg)``, in a worker thread when the input is large, so that
    encoding or parsing megabytes does not stall the event loop."""
    return await trio.to_thread.run_sync(fn, arg) if large else fn(arg)


def _node_hex(node_id: bytes) -> str:
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        raise InvalidRequest(f"a node id is {NODE_ID_BYTES} bytes")
    return node_id.hex()


def _chunk_hex(chunk_id: bytes) -> str:
    if not isinstance(chunk_id, bytes) or len(chunk_id) != CHUNK_ID_BYTES:
        raise InvalidRequest(f"a chunk id is {CHUNK_ID_BYTES} bytes")
    return chunk_id.hex()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
