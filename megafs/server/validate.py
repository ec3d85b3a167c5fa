"""Reading and checking what clients send.

Every request value passes through here (KDF parameters through
``auth.check_kdf``) before it reaches a store: malformed input must never
turn into a 500 or into a value the database cannot hold. Only a body over its
size limit is TooLarge (413); any field of the wrong type, format or size is
InvalidRequest (400). Limits the protocol fixes come from ``megafs.wire``;
the ones below bound fields the wire leaves open.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from contextlib import aclosing
from typing import Any

import trio
from starlette.requests import ClientDisconnect, Request

from megafs.errors import InvalidRequest, TooLarge
from megafs.wire import (
    CHUNK_BATCH_HEADER,
    CHUNK_ID_RE,
    MAX_CHUNK_BATCH_ITEMS,
    MAX_CHUNK_BYTES,
    MAX_JSON_BYTES,
    NODE_ID_RE,
    b64d,
)

__all__ = [
    "CODE_MAX_CHARS",
    "COMMIT_ID_BYTES",
    "DEVICE_MAX_CHARS",
    "EMAIL_MAX_CHARS",
    "EMAIL_PATTERN",
    "KEYBLOB_MAX_BYTES",
    "MAX_INT",
    "TEXT_PATTERN",
    "blob",
    "boolean",
    "chunk_batch",
    "chunk_id",
    "email",
    "exact_fields",
    "integer",
    "node_id",
    "optional_text",
    "read_body",
    "read_json",
    "text",
]

EMAIL_MAX_CHARS = 254
DEVICE_MAX_CHARS = 200
#: A TOTP or recovery code as typed (with spaces or dashes).
CODE_MAX_CHARS = 64
#: A keyblob is a sealed 48-byte value; this leaves room for other formats.
KEYBLOB_MAX_BYTES = 4096
COMMIT_ID_BYTES = (8, 64)
#: Exact in JSON everywhere (IEEE doubles), and inside a 64-bit database column.
MAX_INT = 2**53 - 1

#: Bodies larger than this are parsed in a worker thread, so a big node
#: upload does not stall every other request.
_INLINE_JSON_BYTES = 1 << 20
#: Written with ASCII ranges only, so JSON Schema (ECMA) engines read them
#: exactly as Python does; ``openapi`` publishes the same patterns.
EMAIL_PATTERN = r"^[^@\x00-\x20\x7f]+@[^@\x00-\x20\x7f]+$"
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_EMAIL_RE = re.compile(EMAIL_PATTERN)
_TEXT_RE = re.compile(TEXT_PATTERN)
_LENGTH_RE = re.compile(r"[0-9]{1,19}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with TooLarge as soon as it is known to
    exceed ``limit`` bytes (from Content-Length, or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _LENGTH_RE.fullmatch(declared):
            raise InvalidRequest("malformed Content-Length")
        if int(declared) > limit:
            raise TooLarge(f"the body exceeds {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for part in stream:
                size += len(part)
                if size > limit:
                    raise TooLarge(f"the body exceeds {limit} bytes")
                parts.append(part)
    except ClientDisconnect:
        raise InvalidRequest("the request body was cut short") from None
    return b"".join(parts)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, at most ``MAX_JSON_BYTES``."""
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        if len(body) <= _INLINE_JSON_BYTES:
            value = json.loads(body)
        else:
            value = await trio.to_thread.run_sync(json.loads, body)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the body must be a JSON object")
    return value


def exact_fields(
    obj: Any, names: Collection[str], what: str, *, optional: Collection[str] = ()
) -> dict[str, Any]:
    """``obj`` as an object with exactly the fields ``names``, plus any of
    ``optional`` (which then read as None when absent)."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{what} must be an object")
    if not set(names) <= obj.keys() <= {*names, *optional}:
        missing = sorted(set(names) - obj.keys())
        extra = sorted(obj.keys() - {*names, *optional})
        raise InvalidRequest(
            f"{what}: "
            + "; ".join(
                f"{label} {', '.join(keys)}"
                for label, keys in (("missing", missing), ("unknown", extra))
                if keys
            )
        )
    return {**dict.fromkeys(optional), **obj}


def node_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NODE_ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must be a node id (32 lowercase hex digits)")
    return value


def chunk_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not CHUNK_ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must be a chunk id (64 lowercase hex digits)")
    return value


def chunk_ids(value: Any, *, low: int, high: int) -> list[str]:
    """A body's ``ids``: a list of ``low..high`` chunk ids, each kept once,
    in order."""
    if not isinstance(value, list) or not low <= len(value) <= high:
        bounds = f"at most {high}" if low == 0 else f"{low}..{high}"
        raise InvalidRequest(f"ids must be a list of {bounds} chunk ids")
    return list(dict.fromkeys(chunk_id(item, "ids[]") for item in value))


def chunk_batch(body: bytes) -> list[tuple[str, bytes]]:
    """A ``POST /chunks/batch`` body as (chunk id, bytes) pairs, in order:
    1..``MAX_CHUNK_BATCH_ITEMS`` chunks, each a 32-byte id, a big-endian
    u32 size of 1..``MAX_CHUNK_BYTES`` and that many bytes, with nothing
    after the last."""
    chunks: list[tuple[str, bytes]] = []
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        what = f"chunk {len(chunks)} of the batch"
        if len(chunks) == MAX_CHUNK_BATCH_ITEMS:
            raise InvalidRequest(f"a batch holds at most {MAX_CHUNK_BATCH_ITEMS} chunks")
        start = offset + CHUNK_BATCH_HEADER
        if start > len(body):
            raise InvalidRequest(f"{what} is cut short in its header")
        size = int.from_bytes(view[start - 4 : start], "big")
        if not 1 <= size <= MAX_CHUNK_BYTES:
            raise InvalidRequest(f"{what} must have 1..{MAX_CHUNK_BYTES} bytes, not {size}")
        offset = start + size
        if offset > len(body):
            raise InvalidRequest(f"{what} is cut short")
        chunks.append(
            (view[start - CHUNK_BATCH_HEADER : start - 4].hex(), bytes(view[start:offset]))
        )
    if not chunks:
        raise InvalidRequest("a batch holds at least one chunk")
    return chunks


def blob(value: Any, what: str, *, max_bytes: int, min_bytes: int = 0) -> bytes:
    """Base64 text decoded, of ``min_bytes..max_bytes`` bytes."""
    try:
        data = b64d(value)
    except ValueError:
        raise InvalidRequest(f"{what} must be base64") from None
    if not min_bytes <= len(data) <= max_bytes:
        raise InvalidRequest(f"{what} must be {min_bytes}..{max_bytes} bytes")
    return data


def integer(value: Any, what: str, *, low: int = 0, high: int = MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"{what} must be an integer in {low}..{high}")
    return value


def text(value: Any, what: str, *, max_chars: int) -> str:
    """A non-empty single-line string that UTF-8 can encode (JSON can carry
    lone surrogates, which no database column can)."""
    if not isinstance(value, str) or len(value) > max_chars or not _TEXT_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must be 1..{max_chars} characters without control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode text") from None
    return value


def optional_text(value: Any, what: str, *, max_chars: int) -> str | None:
    return None if value is None else text(value, what, max_chars=max_chars)


def boolean(value: Any, what: str) -> bool:
    """An optional flag: absent (None) is False."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be true or false")
    return value


def email(value: Any) -> str:
    """An email address, lower-cased: accounts are found case-insensitively."""
    address = text(value, "email", max_chars=EMAIL_MAX_CHARS)
    if not _EMAIL_RE.fullmatch(address):
        raise InvalidRequest("email must look like name@domain")
    return address.lower()
