"""The authorization matrix: every route of the OpenAPI document, asked
with no session, with a revoked session and with another account's
session, answers 401 or 404 (or, for the other account, only about that
account's own things), never the first account's data.

Driven from ``openapi_document()``: a new route fails here until it is
given its expectations below."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from megafs.remote import RemoteClient
from megafs.server import openapi_document
from megafs.wire import b64e
from tests.helpers.server import ServerProcess
from tests.integration.users import Creds, User, new_user

NODE_META, NODE_CONTENT, CHUNK_BYTES = b"alice's record", b"alice's manifest", b"alice's chunk"


@dataclass
class Alice:
    user: User
    node: bytes
    chunk: bytes
    session_id: str
    revoked_token: str

    def secrets(self) -> list[str]:
        """Strings that must not appear in any answer to someone else."""
        creds = self.user.creds
        return [
            creds.email,
            b64e(creds.keyblob),
            b64e(creds.root_meta),
            b64e(NODE_META),
            b64e(NODE_CONTENT),
            self.session_id,
            CHUNK_BYTES.decode(),
            self.user.root.hex(),
            self.node.hex(),
        ]


@pytest.fixture
async def alice(server: ServerProcess) -> AsyncIterator[Alice]:
    user = await new_user(server.url)
    async with user.client as client:
        chunk, node = os.urandom(32), os.urandom(16)
        await client.put_chunk(chunk, CHUNK_BYTES)
        await client.put_node(
            node,
            parent=user.root,
            expect_version=0,
            meta=NODE_META,
            content=NODE_CONTENT,
            chunks=[chunk],
            commit_id=os.urandom(16),
        )
        (session,) = [s for s in await client.sessions() if s.current]
        async with RemoteClient(server.url) as other:
            await other.login(user.creds.email, user.creds.auth_secret, "soon revoked")
            revoked = other.token
            assert revoked is not None
            await other.logout()
        yield Alice(user, node, chunk, session.id, revoked)


def _concrete(path: str, op: dict[str, Any], alice: Alice) -> tuple[str, dict[str, str]]:
    """The path with alice's id of the right kind, and required query values."""
    query = {}
    for param in op.get("parameters", []):
        pattern = param["schema"].get("pattern", "")
        if param["in"] == "path":
            value = {32: alice.node.hex(), 64: alice.chunk.hex(), 16: alice.session_id}[
                int(pattern.split("{")[1].split("}")[0])
            ]
            path = path.replace("{" + param["name"] + "}", value)
        elif param["required"]:
            query[param["name"]] = "1"
    return path, query


def _bodies(alice: Alice) -> dict[str, Any]:
    """A valid body per operation, aimed at alice's things where it names any."""
    creds = alice.user.creds
    wrong = b64e(os.urandom(32))
    signup = {**Creds.random().signup_json(), "email": creds.email}
    return {
        "prelogin": {"email": creds.email},
        "signup": signup,
        "login": {"email": creds.email, "auth_secret": wrong, "device": "d"},
        "totpEnable": {"code": "123456"},
        "totpDisable": {"email": creds.email, "auth_secret": wrong, "code": "123456"},
        "changePassword": {
            "old_auth_secret": wrong,
            "kdf": creds.kdf,
            "auth_secret": wrong,
            "keyblob": b64e(b"k"),
        },
        "setRecoveryKey": {"auth_secret": wrong, "recovery_auth": wrong, "keyblob": b64e(b"k")},
        "recoveryStart": {"email": creds.email, "recovery_auth": wrong},
        "recoveryFinish": {
            "email": creds.email,
            "recovery_auth": wrong,
            "kdf": creds.kdf,
            "auth_secret": wrong,
            "keyblob": b64e(b"k"),
            "device": "d",
        },
        "putNode": {
            "parent": alice.user.root.hex(),
            "expect_version": 1,
            "meta": b64e(b"bob"),
            "content": None,
            "chunks": [],
            "commit_id": b64e(os.urandom(16)),
        },
        "batchNodes": {
            "ops": [
                {
                    "op": "put",
                    "id": alice.node.hex(),
                    "parent": alice.user.root.hex(),
                    "expect_version": 1,
                    "meta": b64e(b"bob"),
                    "content": None,
                    "chunks": [alice.chunk.hex()],
                    "commit_id": b64e(os.urandom(16)),
                },
                {
                    "op": "put",
                    "id": os.urandom(16).hex(),
                    "parent": alice.node.hex(),
                    "expect_version": 0,
                    "meta": b64e(b"bob"),
                    "content": None,
                    "chunks": [],
                    "commit_id": b64e(os.urandom(16)),
                },
                {"op": "delete", "id": alice.node.hex(), "expect_version": 1},
            ]
        },
        "missingChunks": {"ids": [alice.chunk.hex()]},
        "fetchChunks": {"ids": [alice.chunk.hex()]},
        "putChunk": b"bob's bytes",
        "putChunks": alice.chunk + len(b"bob's bytes").to_bytes(4, "big") + b"bob's bytes",
    }


#: Routes without a session: what they answer when given alice's email and
#: anything but her secrets.
UNAUTHENTICATED = {
    "health": {200},
    "prelogin": {200},
    "signup": {409},
    "login": {401},
    "totpDisable": {401},
    "recoveryStart": {401},
    "recoveryFinish": {401},
}

#: Routes with a session, asked by another account (bob) about alice's
#: things: 404 where they name one of them; otherwise they act on bob's own
#: account (or refuse bob's missing proof), which alice never notices.
OTHER_ACCOUNT = {
    "logout": {204},
    "getAccount": {200},
    "totpSetup": {200},
    "totpEnable": {404},
    "listSessions": {200},
    "revokeOtherSessions": {200},
    "revokeSession": {404},
    "changePassword": {403},
    "setRecoveryKey": {403},
    "getNode": {404},
    "putNode": {404},
    "deleteNode": {404},
    "listChildren": {404},
    "batchNodes": {200},  # each op's result is not_found, see test_batch
    "listChanges": {200},
    "changeCursor": {200},  # bob's own feed
    "missingChunks": {200},
    "putChunk": {201},
    "putChunks": {201},  # into bob's own account
    "getChunk": {404},
    "fetchChunks": {200},  # alice's chunk left out: bob has none of that id
}


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in openapi_document()["paths"].items()
        for method, op in item.items()
    ]


def test_every_route_has_expectations() -> None:
    ids = {op["operationId"] for _, _, op in _operations()}
    secured = {op["operationId"] for _, _, op in _operations() if "security" in op}
    assert secured == OTHER_ACCOUNT.keys()
    assert ids - secured == UNAUTHENTICATED.keys()


async def _request(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    op: dict[str, Any],
    alice: Alice,
    token: str | None,
) -> httpx.Response:
    url, query = _concrete(path, op, alice)
    body = _bodies(alice).get(op["operationId"])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes):
        return await http.request(method, url, params=query, headers=headers, content=body)
    return await http.request(method, url, params=query, headers=headers, json=body)


@pytest.mark.parametrize(
    ("method", "path", "op"), _operations(), ids=[f"{m} {p}" for m, p, _ in _operations()]
)
async def test_matrix(
    server: ServerProcess, alice: Alice, method: str, path: str, op: dict[str, Any]
) -> None:
    bob = Creds.random()
    async with (
        httpx.AsyncClient(base_url=server.url) as http,
        RemoteClient(server.url) as bob_client,
    ):
        bob_token = (await bob.signup(bob_client)).token
        if "security" not in op:
            answers = {
                "no session": (
                    await _request(http, method, path, op, alice, None),
                    UNAUTHENTICATED[op["operationId"]],
                )
            }
        else:
            answers = {
                "no session": (await _request(http, method, path, op, alice, None), {401}),
                "revoked session": (
                    await _request(http, method, path, op, alice, alice.revoked_token),
                    {401},
                ),
                "other account": (
                    await _request(http, method, path, op, alice, bob_token),
                    OTHER_ACCOUNT[op["operationId"]],
                ),
            }
    for who, (answer, expected) in answers.items():
        assert answer.status_code in expected, (who, answer.status_code, answer.text)
        text = answer.text + base64.b64encode(answer.content).decode()
        for secret in alice.secrets():
            assert secret not in text, (who, secret)

    # Whatever was asked, alice's things are as they were.
    client = alice.user.client
    node = await client.get_node(alice.node)
    assert (node.meta, node.content, node.version) == (NODE_META, NODE_CONTENT, 1)
    assert await client.get_chunk(alice.chunk) == CHUNK_BYTES
    assert alice.session_id in {s.id for s in await client.sessions()}
    assert (await client.account()).keyblob == alice.user.creds.keyblob
