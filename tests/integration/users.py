"""Fake accounts for the integration tests: everything the client would
derive or seal is random bytes (the server never interprets it); and TOTP
codes computed as an authenticator app would."""

from __future__ import annotations

import base64
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from megafs.remote import RemoteClient, Session
from megafs.wire import TOTP_DIGITS, TOTP_STEP, b64e

__all__ = ["Creds", "User", "clear_of_step_edge", "enable_totp", "new_user", "totp_code"]


@dataclass
class Creds:
    """A fake account: everything the client would derive or seal is random."""

    email: str
    kdf: dict[str, Any]
    auth_secret: bytes
    keyblob: bytes
    root_id: bytes
    root_meta: bytes

    @classmethod
    def random(cls) -> Creds:
        return cls(
            email=f"user-{uuid.uuid4().hex[:12]}@example.org",
            kdf={
                "alg": "argon2id",
                "memory_kib": 65536,
                "iterations": 3,
                "lanes": 4,
                "salt": b64e(os.urandom(16)),
            },
            auth_secret=os.urandom(32),
            keyblob=os.urandom(76),
            root_id=os.urandom(16),
            root_meta=os.urandom(120),
        )

    async def signup(self, client: RemoteClient) -> Session:
        return await client.signup(
            self.email,
            self.kdf,
            self.auth_secret,
            self.keyblob,
            self.root_id,
            self.root_meta,
            "test-device",
        )

    def signup_json(self) -> dict[str, Any]:
        """The signup body as raw JSON, for tests that bend it."""
        return {
            "email": self.email,
            "kdf": self.kdf,
            "auth_secret": b64e(self.auth_secret),
            "keyblob": b64e(self.keyblob),
            "root": {"id": self.root_id.hex(), "meta": b64e(self.root_meta)},
            "device": "test-device",
        }


@dataclass
class User:
    creds: Creds
    session: Session
    client: RemoteClient

    @property
    def root(self) -> bytes:
        return self.creds.root_id


async def new_user(url: str, **client_options: Any) -> User:
    creds = Creds.random()
    client = RemoteClient(url, **client_options)
    return User(creds, await creds.signup(client), client)


async def put_file(
    client: RemoteClient, parent: bytes, chunk: bytes, node: bytes | None = None
) -> bytes:
    """Create a node under ``parent`` that names one stored chunk (its record
    and content are placeholders: the server cannot read them anyway);
    returns the node's id."""
    node = node or os.urandom(16)
    await client.put_node(
        node,
        parent=parent,
        expect_version=0,
        meta=b"m",
        content=b"c",
        chunks=[chunk],
        commit_id=os.urandom(16),
    )
    return node


def totp_code(secret: str, at: float) -> str:
    """The TOTP code an authenticator app shows at Unix time ``at`` for the
    base32 ``secret`` the server handed out."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    return TOTP(key, TOTP_DIGITS, SHA1(), TOTP_STEP).generate(at).decode("ascii")


async def clear_of_step_edge(margin: float = 5.0) -> float:
    """Wait, if need be, until the current TOTP step has at least ``margin``
    seconds left, so the server is still in the step a test computed its
    codes for; returns the time to compute them at."""
    left = TOTP_STEP - time.time() % TOTP_STEP
    if left < margin:
        await trio.sleep(left + 0.1)
    return time.time()


async def enable_totp(client: RemoteClient) -> tuple[str, list[str]]:
    """Turn 2FA on for the client's account, as the CLI does; returns the
    secret and the recovery codes. Uses the code of the step before the
    current one, so the current and next steps stay unused."""
    secret = await client.totp_setup()
    now = await clear_of_step_edge()
    return secret, await client.totp_enable(totp_code(secret, now - TOTP_STEP))
