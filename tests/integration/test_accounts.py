"""Signup, login, sessions and prelogin against the real server."""

from __future__ import annotations

import hashlib
import os
import sqlite3

import httpx
import pytest

from megafs.errors import AlreadyExists, AuthFailed, InvalidRequest
from megafs.remote import RemoteClient
from megafs.wire import MAX_CHUNK_BYTES, b64e
from tests.helpers.server import ServerProcess
from tests.integration.users import Creds, User


async def test_health(server: ServerProcess) -> None:
    async with RemoteClient(server.url) as client:
        assert await client.health() == "0.1.0"


async def test_signup_login_account(server: ServerProcess) -> None:
    creds = Creds.random()
    async with RemoteClient(server.url) as client:
        session = await creds.signup(client)
        assert client.token == session.token
        assert session.account.email == creds.email
        assert session.account.kdf == creds.kdf
        assert session.account.keyblob == creds.keyblob
        assert session.account.root_id == creds.root_id
        assert session.account.used == len(creds.root_meta)
        root = await client.get_node(creds.root_id)
        assert (root.parent, root.version, root.meta, root.content) == (
            None,
            1,
            creds.root_meta,
            None,
        )

    async with RemoteClient(server.url) as client:
        login = await client.login(creds.email.upper(), creds.auth_secret, "laptop")
        assert login.token != session.token
        assert login.account == session.account
        assert await client.account() == session.account


async def test_signup_twice(server: ServerProcess) -> None:
    """The same signup again (a retry after a lost answer) logs in; a
    different one for a taken email is refused."""
    creds = Creds.random()
    async with RemoteClient(server.url) as client:
        first = await creds.signup(client)
        again = await creds.signup(client)
        assert again.account == first.account and again.token != first.token
        other = Creds.random()
        other.email = creds.email
        with pytest.raises(AlreadyExists):
            await other.signup(client)


async def test_wrong_secret_and_unknown_email_look_the_same(
    alice: User, server: ServerProcess, raw: httpx.AsyncClient
) -> None:
    wrong_secret = {"email": alice.creds.email, "auth_secret": b64e(os.urandom(32)), "device": "d"}
    unknown_email = {**wrong_secret, "email": "nobody-" + alice.creds.email}
    answers = [await raw.post("/login", json=body) for body in (wrong_secret, unknown_email)]
    assert [a.status_code for a in answers] == [401, 401]
    assert (
        answers[0].json()
        == answers[1].json()
        == {"error": "auth_failed", "detail": "wrong email or password"}
    )
    async with RemoteClient(server.url) as client:
        with pytest.raises(AuthFailed):
            await client.login(alice.creds.email, os.urandom(32), "d")


async def test_prelogin(alice: User, server: ServerProcess) -> None:
    async with RemoteClient(server.url) as client:
        assert await client.prelogin(alice.creds.email) == alice.creds.kdf
        fake = await client.prelogin("nobody@example.org")
        assert await client.prelogin("NoBody@example.org") == fake  # stable
        assert await client.prelogin("nobody2@example.org") != fake
        assert fake.keys() == alice.creds.kdf.keys()
        assert {k: v for k, v in fake.items() if k != "salt"} == {
            "alg": "argon2id",
            "memory_kib": 65536,
            "iterations": 3,
            "lanes": 4,
        }
        assert len(fake["salt"]) == len(alice.creds.kdf["salt"])


async def test_logout_ends_the_session(alice: User, server: ServerProcess) -> None:
    token = alice.client.token
    await alice.client.logout()
    assert alice.client.token is None
    with pytest.raises(AuthFailed, match="not logged in"):
        await alice.client.account()
    async with RemoteClient(server.url, token) as stale:
        with pytest.raises(AuthFailed):
            await stale.account()
        await stale.logout()  # already ended: not an error


async def test_garbage_and_expired_tokens(
    alice: User, server: ServerProcess, raw: httpx.AsyncClient
) -> None:
    for header in (
        "",
        "Bearer",
        "Bearer x",
        "Basic abc",
        "Bearer " + "A" * 43,
        f"Bearer {alice.client.token}\u00e9",
    ):
        headers = {b"Authorization": header.encode("latin-1")} if header else {}
        answer = await raw.get("/account", headers=headers)
        assert answer.status_code == 401, header
        assert answer.json()["error"] == "auth_failed"
        assert answer.headers["www-authenticate"] == "Bearer"

    assert alice.client.token is not None
    token_hash = hashlib.sha256(alice.client.token.encode()).digest()
    with sqlite3.connect(server.data_dir / "meta.sqlite3") as db:
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("UPDATE sessions SET expires = 0 WHERE token_hash = ?", (token_hash,))
    db.close()
    with pytest.raises(AuthFailed, match="expired"):
        await alice.client.account()
    with pytest.raises(AuthFailed):  # answered before the upload is read: still a clean 401
        await alice.client.put_chunk(os.urandom(32), bytes(MAX_CHUNK_BYTES))


@pytest.mark.parametrize(
    "change",
    [
        {"email": "not-an-email"},
        {"email": "a b@example.org"},
        {"device": ""},
        {"device": "line\nbreak"},
        {"auth_secret": "AAAA"},
        {"keyblob": ""},
        {
            "kdf": {
                "alg": "argon2i",
                "memory_kib": 65536,
                "iterations": 3,
                "lanes": 4,
                "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            }
        },
        {
            "kdf": {
                "alg": "argon2id",
                "memory_kib": 1024,
                "iterations": 3,
                "lanes": 4,
                "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            }
        },
        {
            "kdf": {
                "alg": "argon2id",
                "memory_kib": 65536,
                "iterations": 0,
                "lanes": 4,
                "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            }
        },
        {
            "kdf": {
                "alg": "argon2id",
                "memory_kib": 65536,
                "iterations": 3,
                "lanes": 17,
                "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            }
        },
        {
            "kdf": {
                "alg": "argon2id",
                "memory_kib": 65536,
                "iterations": 3,
                "lanes": True,
                "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            }
        },
        {
            "kdf": {
                "alg": "argon2id",
                "memory_kib": 65536,
                "iterations": 3,
                "lanes": 4,
                "salt": "AAAA",
            }
        },
        {"kdf": {"alg": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}},
        {"root": {"id": "00" * 16}},
        {"root": {"id": "AB" * 16, "meta": ""}},
        {"extra": 1},
    ],
)
async def test_signup_validation(raw: httpx.AsyncClient, change: dict[str, object]) -> None:
    body = {**Creds.random().signup_json(), **change}
    answer = await raw.post("/signup", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"


async def test_client_refuses_plain_http_to_a_remote_host() -> None:
    for url in ("http://drive.example.org", "http://10.0.0.1:8377", "http://[2001:db8::1]/"):
        with pytest.raises(InvalidRequest, match="plain http"):
            RemoteClient(url)
    for url in (
        "http://127.0.0.1:1",
        "http://127.8.9.10",
        "http://localhost:8377",
        "http://[::1]:8377",
        "https://drive.example.org",
    ):
        await RemoteClient(url).aclose()
    await RemoteClient("http://drive.example.org", insecure=True).aclose()
    for url in ("ftp://drive.example.org", "drive.example.org", "https://"):
        with pytest.raises(InvalidRequest):
            RemoteClient(url)
