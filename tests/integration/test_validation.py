"""Malformed requests are 400 (or 413 for an oversized body), never a 500;
the OpenAPI document describes every route."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
import trio

from megafs.wire import (
    API_PREFIX,
    MAX_CHUNK_BYTES,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_MISSING_IDS,
    b64e,
)
from tests.helpers.server import ServerProcess
from tests.integration.users import User

NODE = "ab" * 16
CHUNK = "cd" * 32


def auth(user: User) -> dict[str, str]:
    return {"Authorization": f"Bearer {user.client.token}"}


def node_body(user: User, **change: Any) -> dict[str, Any]:
    return {
        "parent": user.root.hex(),
        "expect_version": 0,
        "meta": b64e(b"m"),
        "content": None,
        "chunks": [],
        "commit_id": b64e(os.urandom(16)),
        **change,
    }


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/nodes/xyz"),
        ("GET", f"/nodes/{NODE.upper()}"),
        ("GET", f"/nodes/{NODE}0"),
        ("GET", f"/nodes/{NODE}%0A"),
        ("GET", "/nodes/xyz/children"),
        ("DELETE", f"/nodes/{NODE[:-1]}?expect_version=1"),
        ("DELETE", f"/nodes/{NODE}"),
        ("DELETE", f"/nodes/{NODE}?expect_version=0"),
        ("DELETE", f"/nodes/{NODE}?expect_version=-1"),
        ("DELETE", f"/nodes/{NODE}?expect_version=1e3"),
        ("DELETE", f"/nodes/{NODE}?expect_version=99999999999999999999999"),
        ("GET", f"/chunks/{CHUNK[:-2]}"),
    ],
)
async def test_bad_ids_in_paths(
    alice: User, raw: httpx.AsyncClient, method: str, path: str
) -> None:
    answer = await raw.request(method, path, headers=auth(alice))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "change",
    [
        {"parent": "zz"},
        {"parent": 5},
        {"expect_version": -1},
        {"expect_version": "1"},
        {"expect_version": 1.0},
        {"expect_version": True},
        {"expect_version": 2**70},
        {"meta": "not base64!"},
        {"meta": "AAA"},
        {"meta": None},
        {"meta": b64e(bytes(MAX_META_BYTES + 1))},
        {"content": 7},
        {"content": "@@@@"},
        {"chunks": "ab"},
        {"chunks": [CHUNK.upper()]},
        {"chunks": [None]},
        {"commit_id": b64e(b"short")},
        {"commit_id": b64e(bytes(65))},
        {"surprise": True},
    ],
)
async def test_bad_node_bodies(alice: User, raw: httpx.AsyncClient, change: dict[str, Any]) -> None:
    answer = await raw.put(f"/nodes/{NODE}", json=node_body(alice, **change), headers=auth(alice))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"ids": 5}',
        b'{"ids": ["x"]}',
        b'"text"',
        b"[" * 100_000,
        b'{"ids": [], "more": 1}',
        b'{"ids": [' + b"1" * 5000 + b"]}",
        json.dumps({"ids": ["\ud800"]}).encode(),
    ],
)
async def test_bad_json(alice: User, raw: httpx.AsyncClient, body: bytes) -> None:
    answer = await raw.post("/chunks/missing", content=body, headers=auth(alice))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


async def test_strings_a_database_cannot_hold(raw: httpx.AsyncClient) -> None:
    body = json.dumps({"email": "\ud800@example.org"}).encode()
    answer = await raw.post("/prelogin", content=body)
    assert answer.status_code == 400, answer.text


async def test_oversized_bodies(alice: User, raw: httpx.AsyncClient, server: ServerProcess) -> None:
    # Streamed without a length: cut off once over the limit.
    async def too_much() -> Any:
        for _ in range(MAX_CHUNK_BYTES // 65536 + 1):
            yield bytes(65536)

    answer = await raw.put(f"/chunks/{CHUNK}", content=too_much(), headers=auth(alice))
    assert answer.status_code == 413
    assert answer.json()["error"] == "too_large"
    assert await alice.client.missing_chunks([bytes.fromhex(CHUNK)]) == {bytes.fromhex(CHUNK)}

    # Announced by Content-Length: refused before the body is sent.
    for path, limit in ((f"/chunks/{CHUNK}", MAX_CHUNK_BYTES), ("/prelogin", MAX_JSON_BYTES)):
        method = "PUT" if "chunks" in path else "POST"
        status, body = await _headers_only(
            server, method, API_PREFIX + path, limit + 1, str(alice.client.token)
        )
        assert status == 413, body
        assert json.loads(body)["error"] == "too_large"


async def test_early_answers_leave_the_connection_usable(
    alice: User, raw: httpx.AsyncClient
) -> None:
    """Answers given before the body was read (401, 400, 413) still let the
    client send it all and read the answer, and the connection carries the
    next request."""
    big = {"ids": ["ab" * 32] * (MAX_MISSING_IDS + 1)}
    for _ in range(5):
        for headers, body, status in (
            ({"Authorization": "Bearer " + "x" * 43}, big, 401),
            (auth(alice), big, 400),
        ):
            answer = await raw.post("/chunks/missing", json=body, headers=headers)
            assert answer.status_code == status
            assert (await raw.get("/health")).status_code == 200
        answer = await raw.put(
            f"/chunks/{CHUNK}", content=bytes(MAX_CHUNK_BYTES + 1), headers=auth(alice)
        )
        assert answer.status_code == 413
        assert (await raw.get("/health")).status_code == 200


async def _headers_only(
    server: ServerProcess, method: str, path: str, length: int, token: str
) -> tuple[int, bytes]:
    """Send only the head of a request announcing ``length`` bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            part = await stream.receive_some()
            if not part:
                break
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_unknown_routes_and_methods(raw: httpx.AsyncClient) -> None:
    answer = await raw.get("/nothing")
    assert (answer.status_code, answer.json()["error"]) == (404, "not_found")
    for method, path, allow in (
        ("PATCH", "/health", "GET, HEAD"),
        ("POST", f"/nodes/{NODE}", "DELETE, GET, HEAD, PUT"),
        ("GET", "/chunks/missing", "POST"),
    ):
        answer = await raw.request(method, path)
        assert (answer.status_code, answer.json()["error"]) == (405, "invalid_request")
        assert answer.headers["allow"] == allow


async def test_openapi_describes_every_route(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/openapi.json")
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["openapi"].startswith("3.")
    operations = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    p = API_PREFIX
    assert operations == {
        ("GET", f"{p}/health"),
        ("POST", f"{p}/prelogin"),
        ("POST", f"{p}/signup"),
        ("POST", f"{p}/login"),
        ("POST", f"{p}/logout"),
        ("GET", f"{p}/account"),
        ("GET", f"{p}/nodes/{{id}}"),
        ("PUT", f"{p}/nodes/{{id}}"),
        ("DELETE", f"{p}/nodes/{{id}}"),
        ("GET", f"{p}/nodes/{{id}}/children"),
        ("POST", f"{p}/nodes/batch"),
        ("GET", f"{p}/changes"),
        ("GET", f"{p}/changes/cursor"),
        ("POST", f"{p}/chunks/missing"),
        ("POST", f"{p}/chunks/batch"),
        ("POST", f"{p}/chunks/fetch"),
        ("PUT", f"{p}/chunks/{{id}}"),
        ("GET", f"{p}/chunks/{{id}}"),
        ("POST", f"{p}/2fa/setup"),
        ("POST", f"{p}/2fa/enable"),
        ("POST", f"{p}/2fa/disable"),
        ("GET", f"{p}/sessions"),
        ("POST", f"{p}/sessions/revoke-others"),
        ("DELETE", f"{p}/sessions/{{id}}"),
        ("POST", f"{p}/password"),
        ("PUT", f"{p}/recovery"),
        ("POST", f"{p}/recovery/start"),
        ("POST", f"{p}/recovery/finish"),
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"], (method, path)
            assert ("security" in op) == (
                path
                not in {
                    f"{p}/health",
                    f"{p}/prelogin",
                    f"{p}/signup",
                    f"{p}/login",
                    f"{p}/2fa/disable",
                    f"{p}/recovery/start",
                    f"{p}/recovery/finish",
                }
            ), (method, path)
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(doc)}
    assert refs <= doc["components"]["schemas"].keys()


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["$ref"]] if "$ref" in value else []
        return own + [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []
