"""Password, account and chunk keys (threat model rules 2-4 and 6).

The password goes through Argon2id with per-account parameters and yields,
through HKDF with distinct labels, two independent values: the KEK, which
never leaves the client, and the auth secret, which the server keeps only a
hash of. The KEK wraps a random master key (and pins the id of the root
folder, so a server cannot hand out another root). Changing the password
re-wraps only this "keyblob".

Every other account key comes from the master key through HKDF.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from megafs.crypto.aead import seal, unseal
from megafs.errors import FormatError, IntegrityError

__all__ = [
    "DEFAULT_KDF",
    "MIN_KDF",
    "AccountKeys",
    "KdfParams",
    "PasswordKeys",
    "derive_password_keys",
    "new_kdf_params",
    "new_key",
    "new_node_id",
    "unwrap_master_key",
    "wrap_master_key",
]

_KEYBLOB_AD = b"megafs/v1/keyblob"
KEY_BYTES = 32
NODE_ID_BYTES = 16


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored per account on the server (in the clear)."""

    memory_kib: int
    iterations: int
    lanes: int
    salt: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "alg": "argon2id",
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
            "salt": base64.b64encode(self.salt).decode("ascii"),
        }

    @classmethod
    def from_json(cls, obj: Any) -> KdfParams:
        """Parse parameters a server sent and refuse anything below MIN_KDF.

        This is the downgrade check of rule 1/3: a server offering weaker
        parameters (to make a stolen auth secret cheaper to brute-force) is
        refused before the password is touched.
        """
        try:
            if obj["alg"] != "argon2id":
                raise FormatError(f"unknown key derivation {obj['alg']!r}")
            params = cls(
                memory_kib=_int(obj["memory_kib"]),
                iterations=_int(obj["iterations"]),
                lanes=_int(obj["lanes"]),
                salt=base64.b64decode(obj["salt"], validate=True),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise FormatError("malformed key derivation parameters") from exc
        params.check()
        return params

    def check(self) -> None:
        m = MIN_KDF
        if (
            self.memory_kib < m.memory_kib
            or self.iterations < m.iterations
            or self.lanes < m.lanes
            or len(self.salt) < len(m.salt)
        ):
            raise FormatError("the server offered key derivation parameters below the minimum")
        if self.memory_kib > 4 * 1024 * 1024 or self.iterations > 64 or self.lanes > 16:
            raise FormatError("key derivation parameters are implausibly large")


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError("expected an integer")
    return value


#: OWASP's minimum for Argon2id (19 MiB, 2 passes); a client refuses less.
MIN_KDF = KdfParams(memory_kib=19456, iterations=2, lanes=1, salt=b"\0" * 16)
#: What new accounts get: 64 MiB, 3 passes, 4 lanes (about 0.2 s on 2 cores).
DEFAULT_KDF = KdfParams(memory_kib=65536, iterations=3, lanes=4, salt=b"\0" * 16)


def new_kdf_params() -> KdfParams:
    return KdfParams(
        DEFAULT_KDF.memory_kib, DEFAULT_KDF.iterations, DEFAULT_KDF.lanes, os.urandom(16)
    )


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def new_node_id() -> bytes:
    return os.urandom(NODE_ID_BYTES)


def hkdf(key: bytes, label: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-Expand-SHA256: one label, one purpose (rule 2)."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=label).derive(key)


@dataclass(frozen=True)
class PasswordKeys:
    kek: bytes
    auth_secret: bytes


def derive_password_keys(password: bytes, params: KdfParams) -> PasswordKeys:
    """Argon2id, then HKDF into the KEK and the auth secret. CPU-heavy: run
    it in a worker thread."""
    params.check()
    root = Argon2id(
        salt=params.salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    ).derive(password)
    return PasswordKeys(kek=hkdf(root, b"megafs/v1/kek"), auth_secret=hkdf(root, b"megafs/v1/auth"))


def wrap_master_key(
    kek: bytes, master_key: bytes, root_id: bytes, *, nonce: bytes | None = None
) -> bytes:
    """The keyblob: master key and root folder id sealed under the KEK."""
    if len(master_key) != KEY_BYTES or len(root_id) != NODE_ID_BYTES:
        raise ValueError("bad master key or root id length")
    return seal(kek, master_key + root_id, _KEYBLOB_AD, nonce=nonce)


def unwrap_master_key(kek: bytes, keyblob: bytes) -> tuple[bytes, bytes]:
    """Open a keyblob; returns (master key, root id). A wrong password shows
    up here as IntegrityError."""
    plain = unseal(kek, keyblob, _KEYBLOB_AD)
    if len(plain) != KEY_BYTES + NODE_ID_BYTES:
        raise IntegrityError()
    return plain[:KEY_BYTES], plain[KEY_BYTES:]


@dataclass(frozen=True)
class AccountKeys:
    """Keys derived from the master key; none of them ever leaves the client."""

    master_key: bytes
    root_id: bytes
    chunk_mac_key: bytes
    chunk_id_key: bytes
    root_folder_key: bytes

    @classmethod
    def from_master(cls, master_key: bytes, root_id: bytes) -> AccountKeys:
        return cls(
            master_key=master_key,
            root_id=root_id,
            chunk_mac_key=hkdf(master_key, b"megafs/v1/chunk-mac"),
            chunk_id_key=hkdf(master_key, b"megafs/v1/chunk-id"),
            root_folder_key=hkdf(master_key, b"megafs/v1/root-folder"),
        )

    def chunk_secret(self, plaintext: bytes) -> bytes:
        """HMAC of a chunk's plaintext under an account key.

        Equal chunks in one account get equal secrets (so they are stored
        once); nobody without the account's keys can compute or test it.
        """
        return hmac.new(self.chunk_mac_key, plaintext, hashlib.sha256).digest()

    def chunk_id(self, secret: bytes) -> bytes:
        """The name the server knows a chunk by: a keyed hash of its secret."""
        return _chunk_id(self.chunk_id_key, secret)


@functools.lru_cache(maxsize=16384)
def _chunk_id(chunk_id_key: bytes, secret: bytes) -> bytes:
    # Cached: every read of a chunk looks it up by id, and a random reader's
    # 4 KiB reads of one chunk would otherwise hash its secret each time.
    # Process memory only (4 MiB at most), like the other derived keys.
    return hmac.digest(chunk_id_key, secret, "sha256")
