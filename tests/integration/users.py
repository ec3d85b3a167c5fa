"""Fake accounts for the integration tests: everything the client would
derive or seal is random bytes (the server never interprets it)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from megafs.remote import RemoteClient, Session
from megafs.wire import b64e

__all__ = ["Creds", "User", "new_user"]


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
            kdf={"alg": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4,
                 "salt": b64e(os.urandom(16))},
            auth_secret=os.urandom(32),
            keyblob=os.urandom(76),
            root_id=os.urandom(16),
            root_meta=os.urandom(120),
        )

    async def signup(self, client: RemoteClient) -> Session:
        return await client.signup(self.email, self.kdf, self.auth_secret, self.keyblob,
                                   self.root_id, self.root_meta, "test-device")

    def signup_json(self) -> dict[str, Any]:
        """The signup body as raw JSON, for tests that bend it."""
        return {
            "email": self.email, "kdf": self.kdf, "auth_secret": b64e(self.auth_secret),
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
