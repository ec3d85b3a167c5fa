"""Accounts and sessions: who may act as which account.

The password never reaches the server. The client derives, by Argon2id and
HKDF, a 32-byte *auth secret* and sends that; the server keeps only its
SHA-256 (a fast hash is enough: the secret is already a high-entropy key,
and the expensive step is the client's Argon2id). Sessions are random
bearer tokens, also stored only as SHA-256.

Nothing here tells a stranger whether an email has an account: prelogin
answers an unknown email with parameters derived from a server secret
(stable, so asking twice does not give it away), and a failed login is the
same 401 whether the email or the secret was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from megafs.errors import AlreadyExists, AuthFailed, InvalidRequest
from megafs.server.metadata import AccountRow, MetadataStore
from megafs.wire import b64d, b64e

__all__ = [
    "AUTH_SECRET_BYTES",
    "KDF_LIMITS",
    "KDF_SALT_BYTES",
    "SESSION_SECONDS",
    "Auth",
    "NewSession",
    "check_kdf",
]

AUTH_SECRET_BYTES = 32
SESSION_SECONDS = 30 * 24 * 3600

#: Accepted Argon2id parameters at signup, (minimum, maximum). The lower
#: bounds refuse nonsense; the client enforces its own, stricter minimum (it
#: must not trust the server for that).
KDF_LIMITS = {"memory_kib": (8192, 4 * 1024 * 1024), "iterations": (1, 64), "lanes": (1, 16)}
KDF_SALT_BYTES = (16, 64)

#: What prelogin answers for an unknown email: the client's defaults, so a
#: fake answer looks like a typical real one.
_FAKE_KDF = {"alg": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
_FAKE_SALT_BYTES = 16
_FAKE_SALT_LABEL = b"megafs prelogin salt\0"

#: ``secrets.token_urlsafe(32)``: 43 characters, no padding.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_TOKEN_BYTES = 32


def check_kdf(value: Any) -> dict[str, Any]:
    """Validate signup KDF parameters; returns them in canonical form.
    Raises InvalidRequest."""
    if not isinstance(value, dict) or set(value) != {"alg", "salt", *KDF_LIMITS}:
        raise InvalidRequest("kdf must have exactly the fields alg, memory_kib, iterations, "
                             "lanes and salt")
    if value["alg"] != "argon2id":
        raise InvalidRequest("kdf.alg must be 'argon2id'")
    for name, (low, high) in KDF_LIMITS.items():
        if type(value[name]) is not int or not low <= value[name] <= high:
            raise InvalidRequest(f"kdf.{name} must be an integer in {low}..{high}")
    try:
        salt = b64d(value["salt"])
    except ValueError:
        raise InvalidRequest("kdf.salt must be base64") from None
    low, high = KDF_SALT_BYTES
    if not low <= len(salt) <= high:
        raise InvalidRequest(f"kdf.salt must be {low}..{high} bytes")
    return {"alg": "argon2id", **{name: value[name] for name in KDF_LIMITS},
            "salt": value["salt"]}


def _hash(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _token_hash(token: str) -> bytes:
    return _hash(token.encode("ascii"))


@dataclass(frozen=True)
class NewSession:
    """A session just opened: the token exists only in this answer."""

    token: str
    expires: int
    account: AccountRow


class Auth:
    """Signup, login and token checks over a :class:`MetadataStore`."""

    def __init__(self, meta: MetadataStore, *, session_seconds: int = SESSION_SECONDS) -> None:
        self._meta = meta
        self._session_seconds = session_seconds

    async def prelogin(self, email: str) -> dict[str, Any]:
        """The account's KDF parameters, or convincing fake ones."""
        account = await self._meta.account_by_email(email)
        if account is not None:
            return account.kdf
        key = await self._meta.server_secret()
        salt = hmac.digest(key, _FAKE_SALT_LABEL + email.encode(), "sha256")[:_FAKE_SALT_BYTES]
        return {**_FAKE_KDF, "salt": b64e(salt)}

    async def signup(
        self, email: str, kdf: dict[str, Any], auth_secret: bytes, keyblob: bytes,
        root_id: str, root_meta: bytes, device: str, *, quota: int,
    ) -> NewSession:
        """Create the account with its root node, and open a session.

        A retry of a signup that already succeeded (same secret, keyblob and
        root) logs in instead of failing, so a lost answer is harmless.
        """
        auth_hash = _hash(auth_secret)
        try:
            account = await self._meta.create_account(
                email, kdf, auth_hash, keyblob, root_id, root_meta, quota=quota, now=_now())
        except AlreadyExists:
            existing = await self._meta.account_by_email(email)
            if existing is None or not (
                hmac.compare_digest(existing.auth_hash, auth_hash)
                and existing.keyblob == keyblob and existing.root_id == root_id
            ):
                raise
            account = existing
        return await self._open_session(account, device)

    async def login(self, email: str, auth_secret: bytes, device: str) -> NewSession:
        """Raises AuthFailed, the same way for an unknown email and a wrong
        secret."""
        account = await self._meta.account_by_email(email)
        expected = account.auth_hash if account is not None else _hash(b"no such account")
        if not hmac.compare_digest(expected, _hash(auth_secret)) or account is None:
            raise AuthFailed("wrong email or password")
        return await self._open_session(account, device)

    async def _open_session(self, account: AccountRow, device: str) -> NewSession:
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        now = _now()
        expires = now + self._session_seconds
        await self._meta.add_session(_token_hash(token), account.id, device, now=now,
                                     expires=expires)
        return NewSession(token, expires, account)

    async def authenticate(self, authorization: str | None) -> int:
        """The account id of an ``Authorization: Bearer`` header value.
        Raises AuthFailed for a missing, malformed, unknown or expired token."""
        token = _bearer_token(authorization)
        account_id = await self._meta.session_account(_token_hash(token), now=_now())
        if account_id is None:
            raise AuthFailed("the session is unknown or has expired; log in again")
        return account_id

    async def logout(self, authorization: str | None) -> None:
        """End the session; raises AuthFailed if there is none."""
        if not await self._meta.delete_session(_token_hash(_bearer_token(authorization))):
            raise AuthFailed("the session is unknown or has expired")


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        raise AuthFailed("a bearer token is required")
    return token


def _now() -> int:
    return int(time.time())
