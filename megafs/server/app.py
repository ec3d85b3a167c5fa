"""The HTTP API of ``megafs.wire`` as a Starlette application.

Each handler authenticates, validates (``validate``), calls one store
operation and serializes the answer; the rules themselves (compare and set,
quotas, isolation) live in the stores, which scope every query by account.
Errors are raised as :class:`MegafsError` and turned into ``{"error",
"detail"}`` answers in one place; anything else is logged and answered
with a bare 500.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from megafs import __version__
from megafs.errors import AuthFailed, InvalidRequest, MegafsError, NotFound, RateLimited
from megafs.server import validate as v
from megafs.server.auth import (
    AUTH_SECRET_BYTES,
    DEFAULT_LIMITS,
    Auth,
    Caller,
    LoginLimits,
    NewSession,
    check_kdf,
)
from megafs.server.chunks import ChunkStore
from megafs.server.feed import ChangeWatch
from megafs.server.metadata import (
    AccountRow,
    MetadataStore,
    NodeDelete,
    NodeOp,
    NodeRow,
    NodeWrite,
    SessionRow,
)
from megafs.server.openapi import openapi_document
from megafs.wire import (
    API_PREFIX,
    CHANGES_PAGE_MAX,
    CHANGES_WAIT_MAX,
    INLINE_CONTENT_MAX,
    LIST_PAGE_MAX,
    MAX_BATCH_OPS,
    MAX_CHUNK_BATCH_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    MAX_FETCH_ITEMS,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_MISSING_IDS,
    NODE_ID_RE,
    SESSION_ID_RE,
    b64e,
    frame_chunks,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_NODE_FIELDS = ("parent", "expect_version", "meta", "content", "chunks", "commit_id")
#: See :class:`_Boundary`: unread request bodies up to this size are drained.
_DRAIN_MAX = MAX_JSON_BYTES
_DRAIN_SECONDS = 10.0


def create_app(
    meta: MetadataStore,
    chunks: ChunkStore,
    *,
    default_quota: int,
    limits: LoginLimits = DEFAULT_LIMITS,
    stopping: trio.Event | None = None,
) -> Starlette:
    """The megafs API over the given stores; new accounts get ``default_quota``
    bytes; failed logins are throttled by ``limits``; once ``stopping`` is
    set, long polls of the change feed answer at once. The stores stay owned
    by the caller (the app never closes them)."""
    api = _Api(
        meta, chunks, default_quota, limits, stopping if stopping is not None else trio.Event()
    )
    p = API_PREFIX
    routes = [
        Route(path, _Resource(handlers))
        for path, handlers in {
            f"{p}/health": {"GET": api.health},
            f"{p}/prelogin": {"POST": api.prelogin},
            f"{p}/signup": {"POST": api.signup},
            f"{p}/login": {"POST": api.login},
            f"{p}/logout": {"POST": api.logout},
            f"{p}/account": {"GET": api.account},
            f"{p}/2fa/setup": {"POST": api.totp_setup},
            f"{p}/2fa/enable": {"POST": api.totp_enable},
            f"{p}/2fa/disable": {"POST": api.totp_disable},
            f"{p}/sessions": {"GET": api.sessions},
            # Before sessions/{id}, which would take "revoke-others" for a (bad) id.
            f"{p}/sessions/revoke-others": {"POST": api.revoke_other_sessions},
            f"{p}/sessions/{{id}}": {"DELETE": api.revoke_session},
            f"{p}/password": {"POST": api.change_password},
            f"{p}/recovery": {"PUT": api.set_recovery_key},
            f"{p}/recovery/start": {"POST": api.recovery_start},
            f"{p}/recovery/finish": {"POST": api.recovery_finish},
            # Before nodes/{id}, which would take "batch" for a (bad) id.
            f"{p}/nodes/batch": {"POST": api.batch_nodes},
            f"{p}/nodes/{{id}}": {
                "GET": api.get_node,
                "PUT": api.put_node,
                "DELETE": api.delete_node,
            },
            f"{p}/nodes/{{id}}/children": {"GET": api.list_children},
            f"{p}/changes": {"GET": api.changes},
            f"{p}/changes/cursor": {"GET": api.change_cursor},
            # Before chunks/{id}, which would take these names for (bad) chunk ids.
            f"{p}/chunks/missing": {"POST": api.missing_chunks},
            f"{p}/chunks/batch": {"POST": api.put_chunks},
            f"{p}/chunks/fetch": {"POST": api.fetch_chunks},
            f"{p}/chunks/{{id}}": {"PUT": api.put_chunk, "GET": api.get_chunk},
            "/openapi.json": {"GET": api.openapi},
        }.items()
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Boundary)],
        exception_handlers={MegafsError: _megafs_error, HTTPException: _http_error},
    )
    app.router.redirect_slashes = False
    return app


class _Api:
    def __init__(
        self,
        meta: MetadataStore,
        chunks: ChunkStore,
        default_quota: int,
        limits: LoginLimits,
        stopping: trio.Event,
    ) -> None:
        self._meta = meta
        self._chunks = chunks
        self._auth = Auth(meta, limits=limits)
        if not 0 <= default_quota <= v.MAX_INT:
            raise ValueError(f"the default quota must be 0..{v.MAX_INT} bytes")
        self._quota = default_quota
        self._openapi = openapi_document()
        self._watch = ChangeWatch(meta, stopping=stopping)

    async def _caller(self, request: Request) -> Caller:
        return await self._auth.authenticate(request.headers.get("authorization"))

    async def _account_id(self, request: Request) -> int:
        return (await self._caller(request)).account_id

    # -- unauthenticated -------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "version": __version__})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def prelogin(self, request: Request) -> Response:
        body = v.exact_fields(await v.read_json(request), ("email",), "body")
        return JSONResponse({"kdf": await self._auth.prelogin(v.email(body["email"]))})

    async def signup(self, request: Request) -> Response:
        body = v.exact_fields(
            await v.read_json(request),
            ("email", "kdf", "auth_secret", "keyblob", "root", "device"),
            "body",
            optional=("long_lived",),
        )
        root = v.exact_fields(body["root"], ("id", "meta"), "root")
        session = await self._auth.signup(
            v.email(body["email"]),
            check_kdf(body["kdf"]),
            _auth_secret(body["auth_secret"]),
            _keyblob(body["keyblob"]),
            v.node_id(root["id"], "root.id"),
            v.blob(root["meta"], "root.meta", max_bytes=MAX_META_BYTES),
            v.text(body["device"], "device", max_chars=v.DEVICE_MAX_CHARS),
            quota=self._quota,
            long_lived=v.boolean(body["long_lived"], "long_lived"),
        )
        return JSONResponse(_session_json(session), status_code=201)

    async def login(self, request: Request) -> Response:
        body = v.exact_fields(
            await v.read_json(request),
            ("email", "auth_secret", "device"),
            "body",
            optional=("code", "long_lived"),
        )
        session = await self._auth.login(
            v.email(body["email"]),
            _auth_secret(body["auth_secret"]),
            v.text(body["device"], "device", max_chars=v.DEVICE_MAX_CHARS),
            code=v.optional_text(body["code"], "code", max_chars=v.CODE_MAX_CHARS),
            long_lived=v.boolean(body["long_lived"], "long_lived"),
            client=_client(request),
        )
        return JSONResponse(_session_json(session))

    async def totp_disable(self, request: Request) -> Response:
        body = v.exact_fields(await v.read_json(request), ("email", "auth_secret", "code"), "body")
        await self._auth.disable_totp(
            v.email(body["email"]),
            _auth_secret(body["auth_secret"]),
            v.text(body["code"], "code", max_chars=v.CODE_MAX_CHARS),
            _client(request),
        )
        return Response(status_code=204)

    async def recovery_start(self, request: Request) -> Response:
        body = v.exact_fields(await v.read_json(request), ("email", "recovery_auth"), "body")
        keyblob = await self._auth.recovery_keyblob(
            v.email(body["email"]),
            _auth_secret(body["recovery_auth"], "recovery_auth"),
            _client(request),
        )
        return JSONResponse({"keyblob": b64e(keyblob)})

    async def recovery_finish(self, request: Request) -> Response:
        body = v.exact_fields(
            await v.read_json(request),
            ("email", "recovery_auth", "kdf", "auth_secret", "keyblob", "device"),
            "body",
            optional=("code", "long_lived"),
        )
        session = await self._auth.recover(
            v.email(body["email"]),
            _auth_secret(body["recovery_auth"], "recovery_auth"),
            check_kdf(body["kdf"]),
            _auth_secret(body["auth_secret"]),
            _keyblob(body["keyblob"]),
            v.text(body["device"], "device", max_chars=v.DEVICE_MAX_CHARS),
            code=v.optional_text(body["code"], "code", max_chars=v.CODE_MAX_CHARS),
            long_lived=v.boolean(body["long_lived"], "long_lived"),
            client=_client(request),
        )
        return JSONResponse(_session_json(session))

    # -- authenticated --------------------------------------------------------------

    async def logout(self, request: Request) -> Response:
        await self._auth.logout(request.headers.get("authorization"))
        return Response(status_code=204)

    async def account(self, request: Request) -> Response:
        account = await self._meta.account(await self._account_id(request))
        return JSONResponse(_account_json(account))

    async def totp_setup(self, request: Request) -> Response:
        caller = await self._caller(request)
        return JSONResponse({"secret": await self._auth.begin_totp(caller)})

    async def totp_enable(self, request: Request) -> Response:
        caller = await self._caller(request)
        body = v.exact_fields(await v.read_json(request), ("code",), "body")
        codes = await self._auth.enable_totp(
            caller, v.text(body["code"], "code", max_chars=v.CODE_MAX_CHARS), _client(request)
        )
        return JSONResponse({"recovery_codes": codes})

    async def sessions(self, request: Request) -> Response:
        caller = await self._caller(request)
        rows = await self._auth.sessions(caller)
        return JSONResponse({"sessions": [_session_info_json(row, caller) for row in rows]})

    async def revoke_other_sessions(self, request: Request) -> Response:
        caller = await self._caller(request)
        return JSONResponse({"revoked": await self._auth.revoke_other_sessions(caller)})

    async def revoke_session(self, request: Request) -> Response:
        caller = await self._caller(request)
        session_id = request.path_params["id"]
        if not SESSION_ID_RE.fullmatch(session_id):
            raise InvalidRequest("the session id in the path must be 16 lowercase hex digits")
        await self._auth.revoke_session(caller, session_id)
        return Response(status_code=204)

    async def change_password(self, request: Request) -> Response:
        caller = await self._caller(request)
        body = v.exact_fields(
            await v.read_json(request), ("old_auth_secret", "kdf", "auth_secret", "keyblob"), "body"
        )
        await self._auth.change_password(
            caller,
            _auth_secret(body["old_auth_secret"], "old_auth_secret"),
            check_kdf(body["kdf"]),
            _auth_secret(body["auth_secret"]),
            _keyblob(body["keyblob"]),
            _client(request),
        )
        return Response(status_code=204)

    async def set_recovery_key(self, request: Request) -> Response:
        caller = await self._caller(request)
        body = v.exact_fields(
            await v.read_json(request), ("auth_secret", "recovery_auth", "keyblob"), "body"
        )
        await self._auth.set_recovery_key(
            caller,
            _auth_secret(body["auth_secret"]),
            _auth_secret(body["recovery_auth"], "recovery_auth"),
            _keyblob(body["keyblob"]),
            _client(request),
        )
        return Response(status_code=204)

    async def get_node(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        node = await self._meta.get_node(account_id, _path_node_id(request))
        if node is None:
            raise NotFound("no such node")
        return JSONResponse(_node_json(node))

    async def list_children(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        after = request.query_params.get("after", "")
        if after and not NODE_ID_RE.fullmatch(after):
            raise InvalidRequest("the query parameter after must be a node id")
        limit = _query_int(request, "limit", default=LIST_PAGE_MAX, low=1, high=LIST_PAGE_MAX)
        nodes = await self._meta.list_children(
            account_id,
            _path_node_id(request),
            inline_max=INLINE_CONTENT_MAX,
            after=after,
            limit=limit,
        )
        if nodes is None:
            raise NotFound("no such node")
        more = nodes[-1].id if len(nodes) == limit else None
        return JSONResponse({"nodes": [_node_json(node) for node in nodes], "next": more})

    async def put_node(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        node_id = _path_node_id(request)
        write = _node_write(v.exact_fields(await v.read_json(request), _NODE_FIELDS, "body"), "")
        version = await self._meta.put_node(account_id, node_id, write, now=_now())
        self._watch.changed(account_id)
        return JSONResponse({"version": version})

    async def delete_node(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        node_id = _path_node_id(request)
        expect = _query_int(request, "expect_version", low=1)
        await self._meta.delete_node(account_id, node_id, expect_version=expect, now=_now())
        self._watch.changed(account_id)
        return Response(status_code=204)

    async def batch_nodes(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        ops = v.exact_fields(await v.read_json(request), ("ops",), "body")["ops"]
        if not isinstance(ops, list) or len(ops) > MAX_BATCH_OPS:
            raise InvalidRequest(f"ops must be a list of at most {MAX_BATCH_OPS} ops")
        parsed = [_node_op(op, f"ops[{i}]") for i, op in enumerate(ops)]
        results = await self._meta.apply_node_ops(account_id, parsed, now=_now())
        self._watch.changed(account_id)
        return JSONResponse(
            {
                "results": [
                    {"error": r.code, "detail": r.detail}
                    if isinstance(r, MegafsError)
                    else {"version": r}
                    for r in results
                ]
            }
        )

    async def changes(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        after = _query_int(request, "after")
        wait = _query_int(request, "wait", default=0, high=CHANGES_WAIT_MAX)
        limit = _query_int(request, "limit", default=CHANGES_PAGE_MAX, low=1, high=CHANGES_PAGE_MAX)
        deadline = trio.current_time() + wait
        async with self._watch.watching(account_id) as watched:
            while True:
                generation = watched.generation
                changes = await self._meta.changes(account_id, after, limit=limit)
                if changes or trio.current_time() >= deadline or self._watch.stopping:
                    break
                await self._watch.wait_beyond(watched, generation, after, deadline=deadline)
        return JSONResponse(
            {
                "changes": [
                    {
                        "id": c.id,
                        "parent": c.parent,
                        "version": c.version,
                        "seq": c.seq,
                        "deleted": c.deleted,
                    }
                    for c in changes
                ],
                "cursor": changes[-1].seq if changes else after,
            }
        )

    async def change_cursor(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        return JSONResponse({"cursor": await self._meta.change_cursor(account_id)})

    async def missing_chunks(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        body = v.exact_fields(await v.read_json(request), ("ids",), "body")
        unique = v.chunk_ids(body["ids"], low=0, high=MAX_MISSING_IDS)
        missing = await self._meta.missing_chunks(account_id, unique, now=_now())
        return JSONResponse({"missing": missing})

    async def put_chunk(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        chunk_id = _path_chunk_id(request)
        data = await v.read_body(request, MAX_CHUNK_BYTES)
        if not data:
            raise InvalidRequest("a chunk cannot be empty")
        await self._store_chunk(account_id, chunk_id, data)
        return JSONResponse({"size": len(data)}, status_code=201)

    async def put_chunks(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        chunks = v.chunk_batch(await v.read_body(request, MAX_CHUNK_BATCH_BYTES))
        refused: list[MegafsError] = []

        async def store(chunk_id: str, data: bytes) -> None:
            try:
                await self._store_chunk(account_id, chunk_id, data)
            except MegafsError as exc:
                refused.append(exc)

        # All at once: the stores' group commits take them together.
        async with trio.open_nursery() as nursery:
            for chunk_id, data in chunks:
                nursery.start_soon(store, chunk_id, data)
        if refused:
            raise refused[0]
        return JSONResponse({"sizes": [len(data) for _, data in chunks]}, status_code=201)

    async def fetch_chunks(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        body = v.exact_fields(await v.read_json(request), ("ids",), "body")
        unique = v.chunk_ids(body["ids"], low=1, high=MAX_FETCH_ITEMS)
        found = await self._read_chunks(account_id, unique)
        body = frame_chunks((bytes.fromhex(chunk_id), data) for chunk_id, data in found)
        return Response(body, media_type="application/octet-stream")

    async def _read_chunks(self, account_id: int, chunk_ids: list[str]) -> list[tuple[str, bytes]]:
        """(id, bytes) of the chunks of ``chunk_ids`` the account has, in
        order: recorded, and still held by the chunk store."""
        stored = await self._meta.stored_chunks(account_id, chunk_ids)
        found = [chunk_id for chunk_id in chunk_ids if chunk_id in stored]
        if not found:
            return []  # a 404 costs no worker-thread call in the chunk store
        datas = await self._chunks.get_many(account_id, found)
        return [
            (chunk_id, data)
            for chunk_id, data in zip(found, datas, strict=True)
            if data is not None
        ]

    async def _store_chunk(self, account_id: int, chunk_id: str, data: bytes) -> None:
        """Store a chunk and record it (idempotent: an id stored already
        keeps its first bytes and is only refreshed)."""
        async with self._chunks.locked(account_id, chunk_id):
            stored = await self._meta.has_chunk(account_id, chunk_id) and await self._chunks.exists(
                account_id, chunk_id
            )
            if not stored:
                await self._chunks.put(account_id, chunk_id, data)
            try:
                await self._meta.add_chunk(account_id, chunk_id, len(data), now=_now())
            except MegafsError:
                # Not recorded (quota): the bytes must not stay behind unaccounted.
                await self._chunks.delete(account_id, chunk_id)
                raise

    async def get_chunk(self, request: Request) -> Response:
        account_id = await self._account_id(request)
        chunk_id = _path_chunk_id(request)
        found = await self._read_chunks(account_id, [chunk_id])
        if not found:
            raise NotFound("no such chunk")
        return Response(found[0][1], media_type="application/octet-stream")


def _now() -> int:
    return int(time.time())


def _node_write(body: dict[str, Any], prefix: str) -> NodeWrite:
    """A ``PUT /nodes/{id}`` body (or a batch's put op, whose field names
    are reported under ``prefix``) whose fields are known to be exactly
    ``_NODE_FIELDS``."""
    if not isinstance(body["chunks"], list):
        raise InvalidRequest(f"{prefix}chunks must be a list of chunk ids")
    low, high = v.COMMIT_ID_BYTES
    content = body["content"]
    return NodeWrite(
        parent=None if body["parent"] is None else v.node_id(body["parent"], f"{prefix}parent"),
        expect_version=v.integer(body["expect_version"], f"{prefix}expect_version"),
        meta=v.blob(body["meta"], f"{prefix}meta", max_bytes=MAX_META_BYTES),
        content=None
        if content is None
        else v.blob(content, f"{prefix}content", max_bytes=MAX_CONTENT_BYTES),
        chunks=frozenset(v.chunk_id(item, f"{prefix}chunks[]") for item in body["chunks"]),
        commit_id=v.blob(body["commit_id"], f"{prefix}commit_id", min_bytes=low, max_bytes=high),
    )


def _node_op(value: Any, what: str) -> NodeOp:
    """One op of ``POST /nodes/batch``."""
    kind = value.get("op") if isinstance(value, dict) else None
    if kind == "put":
        op = v.exact_fields(value, ("op", "id", *_NODE_FIELDS), what)
        return v.node_id(op["id"], f"{what}.id"), _node_write(op, f"{what}.")
    if kind == "delete":
        op = v.exact_fields(value, ("op", "id", "expect_version"), what)
        expect = v.integer(op["expect_version"], f"{what}.expect_version", low=1)
        return v.node_id(op["id"], f"{what}.id"), NodeDelete(expect)
    raise InvalidRequest(f'{what} must be an object whose op is "put" or "delete"')


def _query_int(
    request: Request, name: str, *, default: int | None = None, low: int = 0, high: int = v.MAX_INT
) -> int:
    """An integer query parameter in ``low..high``; required unless it has a
    ``default``."""
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 16:
        raise InvalidRequest(f"the query parameter {name} must be a number")
    return v.integer(int(raw), f"the query parameter {name}", low=low, high=high)


def _path_node_id(request: Request) -> str:
    return v.node_id(request.path_params["id"], "the node id in the path")


def _path_chunk_id(request: Request) -> str:
    return v.chunk_id(request.path_params["id"], "the chunk id in the path")


def _auth_secret(value: Any, what: str = "auth_secret") -> bytes:
    return v.blob(value, what, min_bytes=AUTH_SECRET_BYTES, max_bytes=AUTH_SECRET_BYTES)


def _keyblob(value: Any) -> bytes:
    return v.blob(value, "keyblob", min_bytes=1, max_bytes=v.KEYBLOB_MAX_BYTES)


def _client(request: Request) -> str:
    """The client's address (the proxy's X-Forwarded-For entry when the
    server runs with ``behind_proxy``), which failed logins count against."""
    return request.client.host if request.client else "unknown"


def _account_json(account: AccountRow) -> dict[str, Any]:
    return {
        "email": account.email,
        "kdf": account.kdf,
        "keyblob": b64e(account.keyblob),
        "root_id": account.root_id,
        "quota": account.quota,
        "used": account.used,
    }


def _session_json(session: NewSession) -> dict[str, Any]:
    return {
        "token": session.token,
        "expires": session.expires,
        "account": _account_json(session.account),
    }


def _session_info_json(row: SessionRow, caller: Caller) -> dict[str, Any]:
    return {
        "id": row.id,
        "device": row.device,
        "created": row.created,
        "last_seen": row.last_seen,
        "expires": row.expires,
        "current": row.id == caller.session_id,
    }


def _node_json(node: NodeRow) -> dict[str, Any]:
    return {
        "id": node.id,
        "parent": node.parent,
        "version": node.version,
        "meta": b64e(node.meta),
        "content": None if node.content is None else b64e(node.content),
        "content_size": node.content_size,
    }


async def _megafs_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MegafsError)
    headers = None
    if isinstance(exc, AuthFailed):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail}, status_code=exc.http_status, headers=headers
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) in our format."""
    assert isinstance(exc, HTTPException)
    code = NotFound.code if exc.status_code == 404 else InvalidRequest.code
    return JSONResponse(
        {"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


_UNLOGGABLE_RE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_LOGGED_PATH_CHARS = 200


def _loggable(path: str) -> str:
    """A client-chosen path fit for one log line: no control characters or
    spaces (no forged lines or fields), bounded."""
    return _UNLOGGABLE_RE.sub("?", path[:_LOGGED_PATH_CHARS])


Handler = Callable[[Request], Awaitable[Response]]


class _Resource:
    """Every method of one path. A method the path lacks is 405 with an
    ``Allow`` header naming all it has (one Route per method would name
    only its own, and a route further down could claim the request)."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._apps = {method: request_response(handler) for method, handler in handlers.items()}
        if "GET" in self._apps:
            self._apps["HEAD"] = self._apps["GET"]
        self._allow = ", ".join(sorted(self._apps))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._apps.get(scope["method"])
        if app is None:
            raise HTTPException(405, headers={"Allow": self._allow})
        await app(scope, receive, send)


class _Boundary:
    """The outermost layer of every request:

    - one INFO line per request, as ``key=value`` pairs (method, path,
      status, milliseconds, client address), never headers, query strings
      or bodies (tokens, auth secrets, codes, emails);
    - the last resort for unexpected exceptions: logged with their
      traceback, answered with a 500 that reveals nothing;
    - a request body the app left unread (it answered early: 401, 413, a bad
      id) is read and dropped after the answer is sent and before the
      response ends, up to ``_DRAIN_MAX`` bytes, so the client can finish
      sending, read the answer and reuse the connection. (Hypercorn would
      otherwise close the connection under the client without telling it.)
      A larger or unbounded body gets ``Connection: close`` instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = trio.current_time()
        status: int | None = None
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        drainable = length.isascii() and length.isdigit() and int(length) <= _DRAIN_MAX
        body_done = (length == "0" or not length) and "transfer-encoding" not in headers

        async def receive_and_note() -> Message:
            nonlocal body_done
            message = await receive()
            body_done = body_done or not message.get("more_body", False)
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if not body_done and not drainable:
                    message = {
                        **message,
                        "headers": [*message.get("headers", ()), (b"connection", b"close")],
                    }
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body")
                and not body_done
                and drainable
            ):
                # The client gets the whole answer now; the response ends (and
                # Hypercorn may reuse the connection) once the body is read.
                await send({**message, "more_body": True})
                with trio.move_on_after(_DRAIN_SECONDS):
                    while not body_done:
                        await receive_and_note()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        try:
            await self._app(scope, receive_and_note, send_and_note)
        except Exception:
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            if status is None:
                await JSONResponse(
                    {"error": MegafsError.code, "detail": "internal server error"}, status_code=500
                )(scope, receive_and_note, send_and_note)
        finally:
            client = scope.get("client") or ("-",)
            log.info(
                "request method=%s path=%s status=%s ms=%.0f client=%s",
                scope["method"],
                _loggable(scope["path"]),
                status or "-",
                (trio.current_time() - started) * 1000,
                client[0],
            )
