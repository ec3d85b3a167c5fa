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
    CursorExpired,
    InvalidRequest,
    MegafsError,
    NotEmpty,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    SecondFactorRequired,
    TooLarge,
    VersionConflict,
)
from megafs.server import validate as v
from megafs.server.auth import AUTH_SECRET_BYTES, KDF_LIMITS, KDF_SALT_BYTES
from megafs.wire import (
    API_PREFIX,
    CHANGES_PAGE_MAX,
    CHANGES_WAIT_MAX,
    CHUNK_BATCH_HEADER,
    CHUNK_ID_RE,
    INLINE_CONTENT_MAX,
    LIST_PAGE_MAX,
    MAX_BATCH_OPS,
    MAX_CHUNK_BATCH_BYTES,
    MAX_CHUNK_BATCH_ITEMS,
    MAX_CHUNK_BYTES,
    MAX_CONTENT_BYTES,
    MAX_FETCH_ITEMS,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_MISSING_IDS,
    NODE_ID_RE,
    NODE_OP_ERRORS,
    RECOVERY_CODE_RE,
    RECOVERY_CODES,
    SESSION_ID_RE,
    TOTP_SECRET_BYTES,
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
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _int(low: int = 0, high: int = v.MAX_INT) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


_NODE_ID = {"type": "string", "pattern": NODE_ID_RE.pattern}
_CHUNK_ID = {"type": "string", "pattern": CHUNK_ID_RE.pattern}
_EMAIL = {
    "type": "string",
    "maxLength": v.EMAIL_MAX_CHARS,
    "pattern": v.EMAIL_PATTERN,
    "description": "login name; compared case-insensitively",
}
_DEVICE = {
    "type": "string",
    "maxLength": v.DEVICE_MAX_CHARS,
    "pattern": v.TEXT_PATTERN,
    "description": "a label for the session, e.g. the host name",
}
_AUTH_SECRET = _b64(
    AUTH_SECRET_BYTES,
    AUTH_SECRET_BYTES,
    "proof of the password, derived by the client (Argon2id + HKDF)",
)
_RECOVERY_AUTH = _b64(
    AUTH_SECRET_BYTES, AUTH_SECRET_BYTES, "proof of the recovery key, derived by the client (HKDF)"
)
_KEYBLOB = _b64(1, v.KEYBLOB_MAX_BYTES, "the master key sealed by the client")
_CODE = {
    "type": "string",
    "maxLength": v.CODE_MAX_CHARS,
    "pattern": v.TEXT_PATTERN,
    "description": "a TOTP code or a recovery code",
}
_LONG_LIVED = {
    "type": "boolean",
    "description": "a session for a remembered device or a mount: it expires "
    "only after a long time unused",
}

_SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": {
                "type": "string",
                "enum": sorted(
                    {
                        MegafsError.code,
                        NotFound.code,
                        AlreadyExists.code,
                        NotEmpty.code,
                        VersionConflict.code,
                        AuthFailed.code,
                        InvalidRequest.code,
                        TooLarge.code,
                        QuotaExceeded.code,
                        CursorExpired.code,
                        SecondFactorRequired.code,
                        RateLimited.code,
                        PermissionDenied.code,
                    }
                ),
            },
            "detail": {"type": "string"},
        }
    ),
    "Kdf": _object(
        {
            "alg": {"type": "string", "enum": ["argon2id"]},
            **{name: _int(low, high) for name, (low, high) in KDF_LIMITS.items()},
            "salt": _b64(*KDF_SALT_BYTES, "Argon2id salt"),
        }
    ),
    "Account": _object(
        {
            "email": {"type": "string"},
            "kdf": _ref("Kdf"),
            "keyblob": _KEYBLOB,
            "root_id": _NODE_ID,
            "quota": _int(),
            "used": _int(),
        }
    ),
    "Session": _object(
        {
            "token": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_-]{43}$",
                "description": "bearer token for the Authorization header",
            },
            "expires": {"type": "integer", "description": "Unix seconds"},
            "account": _ref("Account"),
        }
    ),
    "SessionInfo": _object(
        {
            "id": {"type": "string", "pattern": SESSION_ID_RE.pattern},
            "device": _DEVICE,
            "created": _int(),
            "last_seen": _int(),
            "expires": _int(),
            "current": {"type": "boolean", "description": "the session that asked"},
        }
    ),
    "Change": _object(
        {
            "id": _NODE_ID,
            "parent": {**_NODE_ID, "nullable": True, "description": "null for the root"},
            "version": _int(1),
            "seq": _int(1),
            "deleted": {
                "type": "boolean",
                "description": "the node is gone; parent and version are what it had",
            },
        }
    ),
    "Node": _object(
        {
            "id": _NODE_ID,
            "parent": {**_NODE_ID, "nullable": True, "description": "null for the root"},
            "version": _int(1),
            "meta": _b64(0, MAX_META_BYTES, "sealed record"),
            "content": {
                **_b64(0, MAX_CONTENT_BYTES, "sealed manifest"),
                "nullable": True,
                "description": f"null if the node has none or, in listings, if it is "
                f"larger than {INLINE_CONTENT_MAX} bytes",
            },
            "content_size": _int(0, MAX_CONTENT_BYTES),
        }
    ),
}


#: The fields of ``PUT /nodes/{id}``, also those of a batch's put op.
_NODE_WRITE = {
    "parent": {**_NODE_ID, "nullable": True, "description": "null only for the root"},
    "expect_version": _int(0),
    "meta": _b64(0, MAX_META_BYTES, "sealed record"),
    "content": {**_b64(0, MAX_CONTENT_BYTES, "sealed manifest"), "nullable": True},
    "chunks": {
        "type": "array",
        "items": _CHUNK_ID,
        "description": "every chunk the content references",
    },
    "commit_id": _b64(*v.COMMIT_ID_BYTES, "the client's id for this write"),
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _chunk_ids(low: int, high: int) -> dict[str, Any]:
    """A JSON body listing ``low..high`` chunk ids."""
    ids = {"type": "array", "items": _CHUNK_ID, "minItems": low, "maxItems": high}
    return _body(_object({"ids": ids}))


def _binary(description: str) -> dict[str, Any]:
    """A raw answer."""
    return {
        "description": description,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }


def _binary_body(description: str, min_bytes: int, max_bytes: int) -> dict[str, Any]:
    """A raw request body of ``min_bytes..max_bytes`` bytes."""
    schema = {"type": "string", "format": "binary", "minLength": min_bytes, "maxLength": max_bytes}
    return {
        "required": True,
        "description": description,
        "content": {"application/octet-stream": {"schema": schema}},
    }


def _body(schema: dict[str, Any], limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    return {"required": True, "description": f"at most {limit} bytes", **_json(schema)}


_ERROR_TEXT = {
    400: "malformed request, or refused by the protocol's rules",
    401: "missing, unknown or expired session, or wrong credentials (code "
    "second_factor_required: right password, a two-factor code is needed)",
    403: "wrong two-factor code or password proof",
    404: "no such node, chunk or session in this account",
    409: "already exists, version conflict, folder not empty, or (code not_found) a "
    "referenced parent or chunk is not stored",
    410: "the cursor is too old (deletes after it were forgotten) or ahead of the "
    "account: list everything again",
    413: "request body too large",
    429: "too many failed attempts; see the Retry-After header",
    507: "quota exceeded",
}


def _optional(schema: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``schema`` (an object) with further properties that may be left out."""
    return {**schema, "properties": {**schema["properties"], **optional}}


def _op(
    operation_id: str,
    summary: str,
    responses: dict[int, dict[str, Any]],
    *,
    errors: tuple[int, ...],
    auth: bool = True,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {
            **{str(status): answer for status, answer in responses.items()},
            **{
                str(status): {"description": _ERROR_TEXT[status], **_json(_ref("Error"))}
                for status in sorted({*errors, *((401,) if auth else ())})
            },
        },
    }
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
    return {
        "links": {
            name: {"operationId": op, "parameters": params} for name, (op, params) in links.items()
        }
    }


def openapi_document() -> dict[str, Any]:
    p = API_PREFIX
    no_content = {"description": "done"}
    node_id, chunk_id = _id_param(_NODE_ID), _id_param(_CHUNK_ID)
    this_node = {"id": "$request.path.id"}
    root = {"id": "$response.body#/root_id"}
    health = _op(
        "health",
        "liveness",
        {
            200: {
                "description": "up",
                **_json(
                    _object(
                        {"ok": {"type": "boolean", "enum": [True]}, "version": {"type": "string"}}
                    )
                ),
            }
        },
        errors=(),
        auth=False,
    )
    prelogin = _op(
        "prelogin",
        "the account's key derivation parameters (stable fake ones for unknown emails)",
        {200: {"description": "parameters", **_json(_object({"kdf": _ref("Kdf")}))}},
        errors=(400, 413),
        auth=False,
        body=_body(_object({"email": _EMAIL})),
    )
    signup = _op(
        "signup",
        "create an account and its root folder; a repeated identical signup logs in",
        {201: {"description": "created and logged in", **_json(_ref("Session"))}},
        errors=(400, 409, 413, 507),
        auth=False,
        body=_body(
            _optional(
                _object(
                    {
                        "email": _EMAIL,
                        "kdf": _ref("Kdf"),
                        "auth_secret": _AUTH_SECRET,
                        "keyblob": _KEYBLOB,
                        "root": _object(
                            {"id": _NODE_ID, "meta": _b64(0, MAX_META_BYTES, "sealed root record")}
                        ),
                        "device": _DEVICE,
                    }
                ),
                long_lived=_LONG_LIVED,
            )
        ),
    )
    login = _op(
        "login",
        "open a session (with a two-factor code if the account has 2FA)",
        {200: {"description": "logged in", **_json(_ref("Session"))}},
        errors=(400, 401, 413, 429),
        auth=False,
        body=_body(
            _optional(
                _object({"email": _EMAIL, "auth_secret": _AUTH_SECRET, "device": _DEVICE}),
                code={**_CODE, "nullable": True},
                long_lived=_LONG_LIVED,
            )
        ),
    )
    totp_setup = _op(
        "totpSetup",
        "a new TOTP secret, waiting for a first code (/2fa/enable)",
        {
            200: {
                "description": "the secret",
                **_json(
                    _object(
                        {
                            "secret": {
                                "type": "string",
                                "pattern": f"^[A-Z2-7]{{{-(-TOTP_SECRET_BYTES * 8 // 5)}}}$",
                                "description": "base32, for the authenticator app",
                            }
                        }
                    )
                ),
            }
        },
        errors=(409,),
    )
    totp_enable = _op(
        "totpEnable",
        "turn two-factor authentication on with a first code",
        {
            200: {
                "description": "on; the single-use recovery codes (shown once)",
                **_json(
                    _object(
                        {
                            "recovery_codes": {
                                "type": "array",
                                "minItems": RECOVERY_CODES,
                                "maxItems": RECOVERY_CODES,
                                "items": {"type": "string", "pattern": RECOVERY_CODE_RE.pattern},
                            }
                        }
                    )
                ),
            }
        },
        errors=(400, 403, 404, 409, 413, 429),
        body=_body(_object({"code": _CODE})),
    )
    totp_disable = _op(
        "totpDisable",
        "turn two-factor authentication off (password and a code)",
        {204: {"description": "off"}},
        errors=(400, 401, 404, 413, 429),
        auth=False,
        body=_body(_object({"email": _EMAIL, "auth_secret": _AUTH_SECRET, "code": _CODE})),
    )
    sessions = _op(
        "listSessions",
        "the account's sessions",
        {
            200: {
                "description": "oldest first",
                **_json(_object({"sessions": {"type": "array", "items": _ref("SessionInfo")}})),
            }
        },
        errors=(),
    )
    revoke_others = _op(
        "revokeOtherSessions",
        "end every session of the account but this one",
        {200: {"description": "how many ended", **_json(_object({"revoked": _int()}))}},
        errors=(),
    )
    revoke = _op(
        "revokeSession",
        "end one of the account's sessions",
        {204: no_content},
        errors=(400, 404),
        parameters=_id_param({"type": "string", "pattern": SESSION_ID_RE.pattern}),
    )
    password = _op(
        "changePassword",
        "new password parameters, proof and keyblob; ends every other session",
        {204: no_content},
        errors=(400, 403, 413, 429),
        body=_body(
            _object(
                {
                    "old_auth_secret": _AUTH_SECRET,
                    "kdf": _ref("Kdf"),
                    "auth_secret": _AUTH_SECRET,
                    "keyblob": _KEYBLOB,
                }
            )
        ),
    )
    recovery = _op(
        "setRecoveryKey",
        "store the master key's wrap under a recovery key",
        {204: no_content},
        errors=(400, 403, 413, 429),
        body=_body(
            _object(
                {"auth_secret": _AUTH_SECRET, "recovery_auth": _RECOVERY_AUTH, "keyblob": _KEYBLOB}
            )
        ),
    )
    recovery_start = _op(
        "recoveryStart",
        "the master key's wrap under the recovery key",
        {200: {"description": "the wrap", **_json(_object({"keyblob": _KEYBLOB}))}},
        errors=(400, 401, 413, 429),
        auth=False,
        body=_body(_object({"email": _EMAIL, "recovery_auth": _RECOVERY_AUTH})),
    )
    recovery_finish = _op(
        "recoveryFinish",
        "set a new password with the recovery key; ends every session",
        {200: {"description": "logged in", **_json(_ref("Session"))}},
        errors=(400, 401, 413, 429),
        auth=False,
        body=_body(
            _optional(
                _object(
                    {
                        "email": _EMAIL,
                        "recovery_auth": _RECOVERY_AUTH,
                        "kdf": _ref("Kdf"),
                        "auth_secret": _AUTH_SECRET,
                        "keyblob": _KEYBLOB,
                        "device": _DEVICE,
                    }
                ),
                code={**_CODE, "nullable": True},
                long_lived=_LONG_LIVED,
            )
        ),
    )
    logout = _op("logout", "end this session", {204: no_content}, errors=())
    account = _op(
        "getAccount",
        "this account",
        {
            200: {
                "description": "account",
                **_json(_ref("Account")),
                **_links(GetRoot=("getNode", root), ListRoot=("listChildren", root)),
            }
        },
        errors=(),
    )
    get_node = _op(
        "getNode",
        "a node with its content",
        {200: {"description": "node", **_json(_ref("Node"))}},
        errors=(400, 404),
        parameters=node_id,
    )
    put_node = _op(
        "putNode",
        "create (expect_version 0) or replace (expect_version = current) a node",
        {
            200: {
                "description": "the new version",
                **_json(_object({"version": _int(1)})),
                **_links(
                    GetNode=("getNode", this_node),
                    ListChildren=("listChildren", this_node),
                    DeleteNode=(
                        "deleteNode",
                        {**this_node, "expect_version": "$response.body#/version"},
                    ),
                ),
            }
        },
        errors=(400, 404, 409, 413, 507),
        parameters=node_id,
        body=_body(_object(_NODE_WRITE)),
    )
    batch = _op(
        "batchNodes",
        "apply up to MAX_BATCH_OPS node puts and deletes in order, in one transaction; "
        "each op succeeds or fails on its own",
        {
            200: {
                "description": "one result per op, in order",
                **_json(
                    _object(
                        {
                            "results": {
                                "type": "array",
                                "maxItems": MAX_BATCH_OPS,
                                "items": {
                                    "oneOf": [
                                        _object({"version": _int(0)}),
                                        _object(
                                            {
                                                "error": {
                                                    "type": "string",
                                                    "enum": sorted(NODE_OP_ERRORS),
                                                },
                                                "detail": {"type": "string"},
                                            }
                                        ),
                                    ]
                                },
                            }
                        }
                    )
                ),
            }
        },
        errors=(400, 413),
        body=_body(
            _object(
                {
                    "ops": {
                        "type": "array",
                        "maxItems": MAX_BATCH_OPS,
                        "items": {
                            "oneOf": [
                                _object(
                                    {
                                        "op": {"type": "string", "enum": ["put"]},
                                        "id": _NODE_ID,
                                        **_NODE_WRITE,
                                    }
                                ),
                                _object(
                                    {
                                        "op": {"type": "string", "enum": ["delete"]},
                                        "id": _NODE_ID,
                                        "expect_version": _int(1),
                                    }
                                ),
                            ]
                        },
                    }
                }
            )
        ),
    )
    delete_node = _op(
        "deleteNode",
        "delete a node (not the root, not a non-empty folder)",
        {204: no_content},
        errors=(400, 404, 409),
        parameters=[
            *node_id,
            {"name": "expect_version", "in": "query", "required": True, "schema": _int(1)},
        ],
    )
    list_children = _op(
        "listChildren",
        "a node's children, a page at a time",
        {
            200: {
                "description": "children with ids above `after`, ordered by id; `next` is the "
                "`after` of the next page, null on the last",
                **_json(
                    _object(
                        {
                            "nodes": {
                                "type": "array",
                                "items": _ref("Node"),
                                "maxItems": LIST_PAGE_MAX,
                            },
                            "next": {**_NODE_ID, "nullable": True},
                        }
                    )
                ),
            }
        },
        errors=(400, 404),
        parameters=[
            *node_id,
            {"name": "after", "in": "query", "required": False, "schema": _NODE_ID},
            {"name": "limit", "in": "query", "required": False, "schema": _int(1, LIST_PAGE_MAX)},
        ],
    )
    changes = _op(
        "listChanges",
        "the nodes changed after a cursor, by sequence number; with wait, held until "
        "there are some or the wait ends",
        {
            200: {
                "description": "each node once, at its latest change; `cursor` is the last "
                "seq answered (`after` if none): the `after` of the next call",
                **_json(
                    _object(
                        {
                            "changes": {
                                "type": "array",
                                "items": _ref("Change"),
                                "maxItems": CHANGES_PAGE_MAX,
                            },
                            "cursor": _int(),
                        }
                    )
                ),
            }
        },
        errors=(400, 410),
        parameters=[
            {"name": "after", "in": "query", "required": True, "schema": _int()},
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "schema": _int(0, CHANGES_WAIT_MAX),
                "description": "seconds to wait for a change if there is none",
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": _int(1, CHANGES_PAGE_MAX),
            },
        ],
    )
    change_cursor = _op(
        "changeCursor",
        "the account's latest change sequence number: where a fresh client starts",
        {200: {"description": "the cursor", **_json(_object({"cursor": _int()}))}},
        errors=(),
    )
    missing = _op(
        "missingChunks",
        "which chunks are not stored; the stored ones are kept for another grace period",
        {
            200: {
                "description": "the missing ids",
                **_json(_object({"missing": {"type": "array", "items": _CHUNK_ID}})),
            }
        },
        errors=(400, 413),
        body=_chunk_ids(0, MAX_MISSING_IDS),
    )
    put_chunk = _op(
        "putChunk",
        "store a chunk (idempotent)",
        {
            201: {
                "description": "stored",
                **_json(_object({"size": _int()})),
                **_links(GetChunk=("getChunk", this_node)),
            }
        },
        errors=(400, 413, 507),
        parameters=chunk_id,
        body=_binary_body(f"1..{MAX_CHUNK_BYTES} bytes", 1, MAX_CHUNK_BYTES),
    )
    put_chunks = _op(
        "putChunks",
        "store several chunks, each as putChunk would (idempotent)",
        {
            201: {
                "description": "stored: each chunk's size, in order",
                **_json(_object({"sizes": {"type": "array", "items": _int(1, MAX_CHUNK_BYTES)}})),
            }
        },
        errors=(400, 413, 507),
        body=_binary_body(
            f"1..{MAX_CHUNK_BATCH_ITEMS} chunks, each its id (32 bytes), its size "
            f"(u32, big-endian, 1..{MAX_CHUNK_BYTES}) and its bytes",
            CHUNK_BATCH_HEADER + 1,
            MAX_CHUNK_BATCH_BYTES,
        ),
    )
    fetch_chunks = _op(
        "fetchChunks",
        "several chunks' bytes in one answer; those not stored are left out",
        {
            200: _binary(
                "the stored chunks, in the order asked, each its id (32 bytes), its size"
                f" (u32, big-endian, 1..{MAX_CHUNK_BYTES}) and its bytes"
            )
        },
        errors=(400, 413),
        body=_chunk_ids(1, MAX_FETCH_ITEMS),
    )
    get_chunk = _op(
        "getChunk",
        "a chunk's bytes",
        {200: _binary("the chunk")},
        errors=(400, 404),
        parameters=chunk_id,
    )
    paths = {
        f"{p}/health": {"get": health},
        f"{p}/prelogin": {"post": prelogin},
        f"{p}/signup": {"post": signup},
        f"{p}/login": {"post": login},
        f"{p}/logout": {"post": logout},
        f"{p}/account": {"get": account},
        f"{p}/2fa/setup": {"post": totp_setup},
        f"{p}/2fa/enable": {"post": totp_enable},
        f"{p}/2fa/disable": {"post": totp_disable},
        f"{p}/sessions": {"get": sessions},
        f"{p}/sessions/revoke-others": {"post": revoke_others},
        f"{p}/sessions/{{id}}": {"delete": revoke},
        f"{p}/password": {"post": password},
        f"{p}/recovery": {"put": recovery},
        f"{p}/recovery/start": {"post": recovery_start},
        f"{p}/recovery/finish": {"post": recovery_finish},
        f"{p}/nodes/batch": {"post": batch},
        f"{p}/nodes/{{id}}": {"get": get_node, "put": put_node, "delete": delete_node},
        f"{p}/nodes/{{id}}/children": {"get": list_children},
        f"{p}/changes": {"get": changes},
        f"{p}/changes/cursor": {"get": change_cursor},
        f"{p}/chunks/missing": {"post": missing},
        f"{p}/chunks/batch": {"post": put_chunks},
        f"{p}/chunks/fetch": {"post": fetch_chunks},
        f"{p}/chunks/{{id}}": {"put": put_chunk, "get": get_chunk},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "megafs",
            "version": __version__,
            "description": "Storage API of megafs: the server sees only ids, versions, "
            "sizes and ciphertext. See docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
