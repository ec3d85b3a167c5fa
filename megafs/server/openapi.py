"""The OpenAPI 3.0 description of the API, served at ``/openapi.json``.

Written by hand from ``megafs.wire`` and built from the same constants the
server validates with, so a request the schema allows is one the server
parses (it may still refuse it on the protocol's rules: a missing parent,
a stale version), and every answer matches the schema. Fuzzers
(schemathesis) rely on both.
"""

from __future__ import annotations

from typing import Any

from megafs import __version__
from megafs.errors import (
    AlreadyExists,
    AuthFailed,
    InvalidRequest,
    MegafsError,
    NotEmpty,
    NotFound,
    QuotaExceeded,
    TooLarge,
    VersionConflict,
)
from megafs.server import validate as v
from megafs.server.auth import AUTH_SECRET_BYTES, KDF_LIMITS, KDF_SALT_BYTES
from megafs.wire import (
    API_PREFIX,
    CHUNK_ID_RE,
    INLINE_CONTENT_MAX,
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_MISSING_IDS,
    NODE_ID_RE,
)

__all__ = ["openapi_document"]

_B64 = "[A-Za-z0-9+/]"


#: Beyond this many groups a pattern leaves the upper bound to maxLength:
#: generators refuse huge repetition counts.
_MAX_COUNTED_GROUPS = 1000


def _b64(min_bytes: int, max_bytes: int, description: str) -> dict[str, Any]:
    """Base64 (standard alphabet, padded) of ``min_bytes..max_bytes`` bytes,
    as a pattern: n bytes are n // 3 groups of four characters, then ``XX==``
    or ``XXX=`` for a remainder of one or two bytes. Exact, except that for
    large values maxLength bounds the length (to within two bytes)."""
    alternatives = []
    for remainder, tail in ((0, ""), (1, f"{_B64}{{2}}=="), (2, f"{_B64}{{3}}=")):
        low = max(0, -(-(min_bytes - remainder) // 3))
        high = (max_bytes - remainder) // 3
        if high > _MAX_COUNTED_GROUPS:
            alternatives.append(f"(?:{_B64}{{4}}){{{low},}}{tail}")
        elif high >= low:
            alternatives.append(f"(?:{_B64}{{4}}){{{low},{high}}}{tail}")
    return {
        "type": "string",
        "pattern": f"^(?:{'|'.join(alternatives)})$",
        "maxLength": -(-max_bytes // 3) * 4,
        "description": f"{description}: base64 of {min_bytes}..{max_bytes} bytes",
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _int(low: int = 0, high: int = v.MAX_INT) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


_NODE_ID = {"type": "string", "pattern": NODE_ID_RE.pattern}
_CHUNK_ID = {"type": "string", "pattern": CHUNK_ID_RE.pattern}
_EMAIL = {"type": "string", "maxLength": v.EMAIL_MAX_CHARS, "pattern": v.EMAIL_PATTERN,
          "description": "login name; compared case-insensitively"}
_DEVICE = {"type": "string", "maxLength": v.DEVICE_MAX_CHARS, "pattern": v.TEXT_PATTERN,
           "description": "a label for the session, e.g. the host name"}
_AUTH_SECRET = _b64(AUTH_SECRET_BYTES, AUTH_SECRET_BYTES,
                    "proof of the password, derived by the client (Argon2id + HKDF)")

_SCHEMAS: dict[str, Any] = {
    "Error": _object({
        "error": {"type": "string", "enum": sorted({
            MegafsError.code, NotFound.code, AlreadyExists.code, NotEmpty.code,
            VersionConflict.code, AuthFailed.code, InvalidRequest.code, TooLarge.code,
            QuotaExceeded.code,
        })},
        "detail": {"type": "string"},
    }),
    "Kdf": _object({
        "alg": {"type": "string", "enum": ["argon2id"]},
        **{name: _int(low, high) for name, (low, high) in KDF_LIMITS.items()},
        "salt": _b64(*KDF_SALT_BYTES, "Argon2id salt"),
    }),
    "Account": _object({
        "email": {"type": "string"},
        "kdf": _ref("Kdf"),
        "keyblob": _b64(1, v.KEYBLOB_MAX_BYTES, "the master key sealed by the client"),
        "root_id": _NODE_ID,
        "quota": _int(),
        "used": _int(),
    }),
    "Session": _object({
        "token": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$",
                  "description": "bearer token for the Authorization header"},
        "expires": {"type": "integer", "description": "Unix seconds"},
        "account": _ref("Account"),
    }),
    "Node": _object({
        "id": _NODE_ID,
        "parent": {**_NODE_ID, "nullable": True, "description": "null for the root"},
        "version": _int(1),
        "meta": _b64(0, MAX_META_BYTES, "sealed record"),
        "content": {**_b64(0, MAX_CONTENT_BYTES, "sealed manifest"), "nullable": True,
                    "description": f"null if the node has none or, in listings, if it is "
                                   f"larger than {INLINE_CONTENT_MAX} bytes"},
        "content_size": _int(0, MAX_CONTENT_BYTES),
    }),
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any], limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    return {"required": True, "description": f"at most {limit} bytes", **_json(schema)}


_ERROR_TEXT = {
    400: "malformed request, or refused by the protocol's rules",
    401: "missing, unknown or expired session, or wrong credentials",
    404: "no such node or chunk in this account",
    409: "already exists, version conflict, folder not empty, or (code not_found) a "
         "referenced parent or chunk is not stored",
    413: "request body too large",
    507: "quota exceeded",
}


def _op(operation_id: str, summary: str, responses: dict[int, dict[str, Any]], *,
        errors: tuple[int, ...], auth: bool = True, body: dict[str, Any] | None = None,
        parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "responses": {
        **{str(status): answer for status, answer in responses.items()},
        **{str(status): {"description": _ERROR_TEXT[status], **_json(_ref("Error"))}
           for status in sorted({*errors, *((401,) if auth else ())})},
    }}
    if auth:
        op["security"] = [{"bearer": []}]
    if body is not None:
        op["requestBody"] = body
    if parameters:
        op["parameters"] = parameters
    return op


def _id_param(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "id", "in": "path", "required": True, "schema": schema}]


def _links(**links: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """Response links (for stateful fuzzing): name=(operationId, parameters)."""
    return {"links": {name: {"operationId": op, "parameters": params}
                      for name, (op, params) in links.items()}}


def openapi_document() -> dict[str, Any]:
    p = API_PREFIX
    no_content = {"description": "done"}
    node_id, chunk_id = _id_param(_NODE_ID), _id_param(_CHUNK_ID)
    this_node = {"id": "$request.path.id"}
    root = {"id": "$response.body#/root_id"}
    health = _op("health", "liveness", {200: {"description": "up", **_json(_object({
        "ok": {"type": "boolean", "enum": [True]}, "version": {"type": "string"}}))}},
        errors=(), auth=False)
    prelogin = _op(
        "prelogin",
        "the account's key derivation parameters (stable fake ones for unknown emails)",
        {200: {"description": "parameters", **_json(_object({"kdf": _ref("Kdf")}))}},
        errors=(400, 413), auth=False, body=_body(_object({"email": _EMAIL})))
    signup = _op(
        "signup", "create an account and its root folder; a repeated identical signup logs in",
        {201: {"description": "created and logged in", **_json(_ref("Session"))}},
        errors=(400, 409, 413, 507), auth=False, body=_body(_object({
            "email": _EMAIL, "kdf": _ref("Kdf"), "auth_secret": _AUTH_SECRET,
            "keyblob": _b64(1, v.KEYBLOB_MAX_BYTES, "the master key sealed by the client"),
            "root": _object({"id": _NODE_ID,
                             "meta": _b64(0, MAX_META_BYTES, "sealed root record")}),
            "device": _DEVICE,
        })))
    login = _op(
        "login", "open a session", {200: {"description": "logged in", **_json(_ref("Session"))}},
        errors=(400, 401, 413), auth=False,
        body=_body(_object({"email": _EMAIL, "auth_secret": _AUTH_SECRET, "device": _DEVICE})))
    logout = _op("logout", "end this session", {204: no_content}, errors=())
    account = _op("getAccount", "this account", {200: {
        "description": "account", **_json(_ref("Account")),
        **_links(GetRoot=("getNode", root), ListRoot=("listChildren", root))}}, errors=())
    get_node = _op("getNode", "a node with its content",
                   {200: {"description": "node", **_json(_ref("Node"))}},
                   errors=(400, 404), parameters=node_id)
    put_node = _op(
        "putNode", "create (expect_version 0) or replace (expect_version = current) a node",
        {200: {"description": "the new version", **_json(_object({"version": _int(1)})),
               **_links(GetNode=("getNode", this_node), ListChildren=("listChildren", this_node),
                        DeleteNode=("deleteNode", {**this_node,
                                                   "expect_version": "$response.body#/version"}))}},
        errors=(400, 404, 409, 413, 507), parameters=node_id, body=_body(_object({
            "parent": {**_NODE_ID, "nullable": True, "description": "null only for the root"},
            "expect_version": _int(0),
            "meta": _b64(0, MAX_META_BYTES, "sealed record"),
            "content": {**_b64(0, MAX_CONTENT_BYTES, "sealed manifest"), "nullable": True},
            "chunks": {"type": "array", "items": _CHUNK_ID,
                       "description": "every chunk the content references"},
            "commit_id": _b64(*v.COMMIT_ID_BYTES, "the client's id for this write"),
        })))
    delete_node = _op(
        "deleteNode", "delete a node (not the root, not a non-empty folder)", {204: no_content},
        errors=(400, 404, 409), parameters=[*node_id, {
            "name": "expect_version", "in": "query", "required": True, "schema": _int(1)}])
    list_children = _op(
        "listChildren", "a node's children", {200: {
            "description": "children, ordered by id",
            **_json(_object({"nodes": {"type": "array", "items": _ref("Node")}}))}},
        errors=(400, 404), parameters=node_id)
    missing = _op(
        "missingChunks",
        "which chunks are not stored; the stored ones are kept for another grace period",
        {200: {"description": "the missing ids", **_json(_object({
            "missing": {"type": "array", "items": _CHUNK_ID}}))}},
        errors=(400, 413), body=_body(_object({
            "ids": {"type": "array", "items": _CHUNK_ID, "maxItems": MAX_MISSING_IDS}})))
    put_chunk = _op(
        "putChunk", "store a chunk (idempotent)", {201: {
            "description": "stored", **_json(_object({"size": _int()})),
            **_links(GetChunk=("getChunk", this_node))}},
        errors=(400, 413, 507), parameters=chunk_id, body={
            "required": True, "description": f"1..{MAX_CHUNK_BYTES} bytes",
            "content": {"application/octet-stream": {"schema": {
                "type": "string", "format": "binary", "minLength": 1,
                "maxLength": MAX_CHUNK_BYTES}}}})
    get_chunk = _op(
        "getChunk", "a chunk's bytes", {200: {"description": "the chunk", "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        errors=(400, 404), parameters=chunk_id)
    paths = {
        f"{p}/health": {"get": health},
        f"{p}/prelogin": {"post": prelogin},
        f"{p}/signup": {"post": signup},
        f"{p}/login": {"post": login},
        f"{p}/logout": {"post": logout},
        f"{p}/account": {"get": account},
        f"{p}/nodes/{{id}}": {"get": get_node, "put": put_node, "delete": delete_node},
        f"{p}/nodes/{{id}}/children": {"get": list_children},
        f"{p}/chunks/missing": {"post": missing},
        f"{p}/chunks/{{id}}": {"put": put_chunk, "get": get_chunk},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "megafs", "version": __version__,
                 "description": "Storage API of megafs: the server sees only ids, versions, "
                                "sizes and ciphertext. See docs/api.md."},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
