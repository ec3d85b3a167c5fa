"""Accounts and sessions: who may act as which account.

The password never reaches the server. The client derives, by Argon2id and
HKDF, a 32-byte *auth secret* and sends that; the server keeps only its
SHA-256 (a fast hash is enough: the secret is already a high-entropy key,
and the expensive step is the client's Argon2id). Sessions are random
bearer tokens, also stored only as SHA-256; so are recovery codes and the
recovery key's auth secret. Looking a token or code up by its hash is safe
against timing: how long the lookup takes depends on the hash of an
unguessable value, which tells an attacker nothing about a stored one.
Every other secret comparison uses ``hmac.compare_digest``.

Nothing here tells a stranger whether an email has an account: prelogin
answers an unknown email with parameters derived from a server secret
(stable, so asking twice does not give it away), and a failed login does
the same work (one store lookup, one hash, one constant-time comparison, the
same failure bookkeeping) and gives the same 401 whether the email or the
secret was wrong. Only after the password is proven does the account's
second factor come into play.

Failed proofs (password, TOTP or recovery code, recovery key) count against
the email (whether or not it has an account) and the client address in the
metadata store, so every server process on it sees them; past
``LoginLimits`` they lock the pair out with a growing delay (429). While
locked out, nothing is checked, so a right guess then gains nothing either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from megafs.errors import (
    AlreadyExists,
    AuthFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    SecondFactorRequired,
)
from megafs.server.metadata import AccountRow, MetadataStore, RecoveryRow, SessionRow
from megafs.wire import (
    LONG_SESSION_IDLE_SECONDS,
    RECOVERY_CODES,
    SESSION_IDLE_SECONDS,
    TOTP_DIGITS,
    TOTP_SECRET_BYTES,
    TOTP_SKEW_STEPS,
    TOTP_STEP,
    b64d,
    b64e,
)

__all__ = [
    "AUTH_SECRET_BYTES",
    "DEFAULT_LIMITS",
    "KDF_LIMITS",
    "KDF_SALT_BYTES",
    "SESSION_CACHE_SECONDS",
    "Auth",
    "Caller",
    "LoginLimits",
    "NewSession",
    "check_kdf",
]

AUTH_SECRET_BYTES = 32

#: How long a server process trusts a session it looked up without asking
#: the store again: the longest a session revoked through *another* process
#: sharing the store stays usable here (revocations through this process
#: take effect at once).
SESSION_CACHE_SECONDS = 10

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
_THROTTLE_LABEL = b"megafs throttle\0"

#: ``secrets.token_urlsafe(32)``: 43 characters, no padding.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_TOKEN_BYTES = 32
_SESSION_ID_BYTES = 8
_TOTP_CODE_RE = re.compile(rf"[0-9]{{{TOTP_DIGITS}}}")
#: 10 bytes are exactly 16 base32 characters, shown in groups of four.
_RECOVERY_CODE_BYTES = 10
_RECOVERY_CODE_RE = re.compile(r"[a-z2-7]{16}")


def check_kdf(value: Any) -> dict[str, Any]:
    """Validate KDF parameters (signup, password change); returns them in
    canonical form. Raises InvalidRequest."""
    if not isinstance(value, dict) or set(value) != {"alg", "salt", *KDF_LIMITS}:
        raise InvalidRequest(
            "kdf must have exactly the fields alg, memory_kib, iterations, lanes and salt"
        )
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
    return {"alg": "argon2id", **{name: value[name] for name in KDF_LIMITS}, "salt": value["salt"]}


def _hash(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _token_hash(token: str) -> bytes:
    return _hash(token.encode("ascii"))


#: Compared against when the email has no account, so both cases do the
#: same work.
_NO_ACCOUNT_HASH = _hash(b"megafs: no such account")


@dataclass(frozen=True)
class LoginLimits:
    """How failed proofs are throttled, per email and per client address.

    The first ``*_free`` failures in a row cost nothing; each further one
    locks the key out for ``base_seconds`` doubling up to ``max_seconds``.
    A key's count starts again after ``forget_seconds`` without failures,
    and (for an email) after a success. The address allowance is larger:
    several people may share one address.
    """

    account_free: int = 5
    address_free: int = 20
    base_seconds: int = 30
    max_seconds: int = 3600
    forget_seconds: int = 24 * 3600

    def lock_seconds(self, failures: int, free: int) -> int:
        if failures <= free:
            return 0
        return min(self.max_seconds, self.base_seconds << min(failures - free - 1, 32))


DEFAULT_LIMITS = LoginLimits()


@dataclass(frozen=True)
class NewSession:
    """A session just opened: the token exists only in this answer."""

    token: str
    expires: int
    account: AccountRow


@dataclass(frozen=True)
class Caller:
    """Who made an authenticated request: the account and its session."""

    account_id: int
    session_id: str


class _SessionCache:
    """Sessions this process looked up recently, by token hash, so most
    requests authenticate without a store call.

    An entry is trusted for ``SESSION_CACHE_SECONDS`` (and never past the
    session's expiry). Whatever ends sessions in this process drops the
    entries concerned once the store has ended them, before it answers, so
    here a revocation takes effect at once; one made through another server
    process sharing the store takes effect here within
    ``SESSION_CACHE_SECONDS``. A lookup that raced a revocation (it read the
    store before the revocation committed) is not cached: every drop bumps
    ``generation``, and :meth:`put` refuses an entry looked up in an older
    one. While an entry is trusted the store does not see the session used,
    so ``last_seen`` lags by up to as much (on top of
    ``LAST_SEEN_RESOLUTION``).
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        # token hash -> (session, trio time it was looked up); oldest first
        self._entries: dict[bytes, tuple[SessionRow, float]] = {}
        self.generation = 0

    def get(self, token_hash: bytes, *, now: int) -> SessionRow | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        session, fetched = entry
        if trio.current_time() - fetched > SESSION_CACHE_SECONDS or session.expires <= now:
            del self._entries[token_hash]
            return None
        return session

    def put(self, token_hash: bytes, session: SessionRow, generation: int) -> None:
        """Cache ``session``, looked up when :attr:`generation` was
        ``generation``."""
        if generation != self.generation:
            return
        self._entries.pop(token_hash, None)
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[token_hash] = (session, trio.current_time())

    def forget(self, token_hash: bytes) -> None:
        self.generation += 1
        self._entries.pop(token_hash, None)

    def forget_account(self, account_id: int) -> None:
        self.generation += 1
        for token_hash in [h for h, (s, _) in self._entries.items() if s.account_id == account_id]:
            del self._entries[token_hash]


class Auth:
    """Signup, login, second factor, sessions, password changes and
    recovery over a :class:`MetadataStore`. Sessions are cached briefly in
    memory (:class:`_SessionCache`)."""

    def __init__(self, meta: MetadataStore, *, limits: LoginLimits = DEFAULT_LIMITS) -> None:
        self._meta = meta
        self._limits = limits
        self._sessions = _SessionCache()

    # -- logging in -------------------------------------------------------------------

    async def prelogin(self, email: str) -> dict[str, Any]:
        """The account's KDF parameters, or convincing fake ones."""
        account = await self._meta.account_by_email(email)
        if account is not None:
            return account.kdf
        key = await self._meta.server_secret()
        salt = hmac.digest(key, _FAKE_SALT_LABEL + email.encode(), "sha256")[:_FAKE_SALT_BYTES]
        return {**_FAKE_KDF, "salt": b64e(salt)}

    async def signup(
        self,
        email: str,
        kdf: dict[str, Any],
        auth_secret: bytes,
        keyblob: bytes,
        root_id: str,
        root_meta: bytes,
        device: str,
        *,
        quota: int,
        long_lived: bool = False,
    ) -> NewSession:
        """Create the account with its root node, and open a session.

        A retry of a signup that already succeeded (same secret, keyblob and
        root) logs in instead of failing, so a lost answer is harmless.
        """
        auth_hash = _hash(auth_secret)
        try:
            account = await self._meta.create_account(
                email, kdf, auth_hash, keyblob, root_id, root_meta, quota=quota, now=_now()
            )
        except AlreadyExists:
            existing = await self._meta.account_by_email(email)
            if existing is None or not (
                hmac.compare_digest(existing.auth_hash, auth_hash)
                and existing.keyblob == keyblob
                and existing.root_id == root_id
            ):
                raise
            account = existing
        return await self._open_session(account, device, long_lived=long_lived)

    async def login(
        self,
        email: str,
        auth_secret: bytes,
        device: str,
        *,
        code: str | None,
        long_lived: bool,
        client: str,
    ) -> NewSession:
        """Raises AuthFailed, the same way for an unknown email and a wrong
        secret; SecondFactorRequired for a right password without a needed
        code; RateLimited while the email or the address is locked out."""
        async with self._throttled(email, client):
            account = await self._check_password(email, auth_secret)
            await self._check_second_factor(account.id, code)
        return await self._open_session(account, device, long_lived=long_lived)

    async def _check_password(self, email: str, auth_secret: bytes) -> AccountRow:
        account = await self._meta.account_by_email(email)
        expected = account.auth_hash if account is not None else _NO_ACCOUNT_HASH
        if not hmac.compare_digest(expected, _hash(auth_secret)) or account is None:
            raise AuthFailed("wrong email or password")
        return account

    async def _check_second_factor(self, account_id: int, code: str | None) -> None:
        """Accept ``code`` (TOTP or recovery code) if the account has 2FA.
        Raises SecondFactorRequired without a code, AuthFailed for a wrong
        or replayed one."""
        totp = await self._meta.totp(account_id)
        if totp is None or not totp.enabled:
            return
        if code is None:
            raise SecondFactorRequired(
                "this account uses two-factor authentication: a code is needed"
            )
        normalized = _normalize_code(code)
        if _RECOVERY_CODE_RE.fullmatch(normalized):
            accepted = await self._meta.use_recovery_code(account_id, _hash(normalized.encode()))
        else:
            step = _matching_step(totp.secret, normalized, _now())
            accepted = step is not None and await self._meta.use_totp_step(account_id, step)
        if not accepted:
            raise AuthFailed("wrong or already used two-factor code")

    async def _open_session(
        self, account: AccountRow, device: str, *, long_lived: bool
    ) -> NewSession:
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        idle = LONG_SESSION_IDLE_SECONDS if long_lived else SESSION_IDLE_SECONDS
        expires = await self._meta.add_session(
            _token_hash(token),
            secrets.token_hex(_SESSION_ID_BYTES),
            account.id,
            device,
            now=_now(),
            idle_seconds=idle,
        )
        return NewSession(token, expires, account)

    @asynccontextmanager
    async def _throttled(self, email: str, client: str) -> AsyncIterator[None]:
        """Refuse while ``email`` or ``client`` is locked out; count a
        failed proof inside against both; a success clears the email's
        count (not the address's, or logging in to one's own account would
        reset it between guesses at others)."""
        limits = self._limits
        account_key = await self._account_key(email)
        address_key = _address_key(client)
        wait = await self._meta.throttle_wait([account_key, address_key], now=_now())
        if wait:
            raise RateLimited(f"too many failed attempts; try again in {wait} s", retry_after=wait)
        try:
            yield
        except (AuthFailed, PermissionDenied) as exc:
            if not isinstance(exc, SecondFactorRequired):
                now = _now()
                for key, free in (
                    (account_key, limits.account_free),
                    (address_key, limits.address_free),
                ):
                    await self._meta.throttle_failure(
                        key,
                        now=now,
                        forget_after=limits.forget_seconds,
                        lock_seconds=partial(limits.lock_seconds, free=free),
                    )
            raise
        await self._meta.throttle_clear(account_key)

    async def _account_key(self, email: str) -> str:
        """The email's throttle key: a keyed hash, so the table names no
        email, and an unknown one is counted like a known one."""
        key = await self._meta.server_secret()
        return "account:" + hmac.digest(key, _THROTTLE_LABEL + email.encode(), "sha256")[:16].hex()

    # -- sessions ---------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an ``Authorization: Bearer`` header value. Raises
        AuthFailed for a missing, malformed, unknown, revoked or expired
        token."""
        token_hash = _token_hash(_bearer_token(authorization))
        now = _now()
        session = self._sessions.get(token_hash, now=now)
        if session is None:
            generation = self._sessions.generation
            session = await self._meta.session(token_hash, now=now)
            if session is None:
                raise AuthFailed("the session is unknown or has expired; log in again")
            self._sessions.put(token_hash, session, generation)
        return Caller(session.account_id, session.id)

    async def logout(self, authorization: str | None) -> None:
        """End the session; raises AuthFailed if there is none."""
        token_hash = _token_hash(_bearer_token(authorization))
        try:
            if not await self._meta.delete_session(token_hash):
                raise AuthFailed("the session is unknown or has expired")
        finally:
            self._sessions.forget(token_hash)

    async def sessions(self, caller: Caller) -> list[SessionRow]:
        return await self._meta.list_sessions(caller.account_id, now=_now())

    async def revoke_session(self, caller: Caller, session_id: str) -> None:
        """Raises NotFound for a session of no (or another) account."""
        try:
            if not await self._meta.revoke_session(caller.account_id, session_id):
                raise NotFound("no such session")
        finally:
            self._sessions.forget_account(caller.account_id)

    async def revoke_other_sessions(self, caller: Caller) -> int:
        try:
            return await self._meta.revoke_other_sessions(caller.account_id, caller.session_id)
        finally:
            self._sessions.forget_account(caller.account_id)

    # -- two-factor authentication ----------------------------------------------------

    async def begin_totp(self, caller: Caller) -> str:
        """A new TOTP secret (base32, as authenticator apps take it), waiting
        for its first code. Raises AlreadyExists if 2FA is on."""
        secret = secrets.token_bytes(TOTP_SECRET_BYTES)
        await self._meta.begin_totp(caller.account_id, secret)
        return base64.b32encode(secret).decode("ascii").rstrip("=")

    async def enable_totp(self, caller: Caller, code: str, client: str) -> list[str]:
        """Turn 2FA on with the first code of the waiting secret; returns
        the new recovery codes (the server keeps only their hashes).
        Raises PermissionDenied for a wrong code, NotFound if no secret
        waits, AlreadyExists if 2FA is on."""
        account = await self._meta.account(caller.account_id)
        async with self._throttled(account.email, client):
            totp = await self._meta.totp(caller.account_id)
            if totp is None:
                raise NotFound("no two-factor setup is waiting: start with /2fa/setup")
            if totp.enabled:
                raise AlreadyExists("two-factor authentication is already on")
            step = _matching_step(totp.secret, _normalize_code(code), _now())
            if step is None:
                raise PermissionDenied("wrong two-factor code")
            codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
            hashes = [_hash(_normalize_code(c).encode()) for c in codes]
            if not await self._meta.enable_totp(caller.account_id, totp.secret, step, hashes):
                raise PermissionDenied("the two-factor setup changed meanwhile; start again")
        return codes

    async def disable_totp(self, email: str, auth_secret: bytes, code: str, client: str) -> None:
        """Turn 2FA off: needs the password and a code, like a login."""
        async with self._throttled(email, client):
            account = await self._check_password(email, auth_secret)
            totp = await self._meta.totp(account.id)
            if totp is None or not totp.enabled:
                raise NotFound("two-factor authentication is not on")
            await self._check_second_factor(account.id, code)
        await self._meta.disable_totp(account.id)

    # -- password and recovery --------------------------------------------------------

    async def change_password(
        self,
        caller: Caller,
        old_auth_secret: bytes,
        kdf: dict[str, Any],
        auth_secret: bytes,
        keyblob: bytes,
        client: str,
    ) -> None:
        """Replace the password (its parameters, auth hash and keyblob) and
        end every other session, atomically. The current password must be
        proven again: a stolen session alone cannot take the account over."""
        account = await self._meta.account(caller.account_id)
        async with self._throttled(account.email, client):
            if not hmac.compare_digest(account.auth_hash, _hash(old_auth_secret)):
                raise PermissionDenied("the current password is wrong")
        try:
            await self._meta.set_password(
                caller.account_id, kdf, _hash(auth_secret), keyblob, keep_session=caller.session_id
            )
        finally:
            self._sessions.forget_account(caller.account_id)

    async def set_recovery_key(
        self,
        caller: Caller,
        auth_secret: bytes,
        recovery_auth: bytes,
        keyblob: bytes,
        client: str,
    ) -> None:
        """Store the master key's wrap under a recovery key (replacing an
        earlier one). Needs the password, like a password change: a recovery
        key can reset it."""
        account = await self._meta.account(caller.account_id)
        async with self._throttled(account.email, client):
            if not hmac.compare_digest(account.auth_hash, _hash(auth_secret)):
                raise PermissionDenied("the password is wrong")
        await self._meta.set_recovery_key(
            caller.account_id, _hash(recovery_auth), keyblob, now=_now()
        )

    async def recovery_keyblob(self, email: str, recovery_auth: bytes, client: str) -> bytes:
        """The wrap under the recovery key, for whoever proves that key.
        Fails like a login (same 401 for an unknown email, no recovery key
        or a wrong one)."""
        async with self._throttled(email, client):
            return (await self._check_recovery(email, recovery_auth)).keyblob

    async def recover(
        self,
        email: str,
        recovery_auth: bytes,
        kdf: dict[str, Any],
        auth_secret: bytes,
        keyblob: bytes,
        device: str,
        *,
        code: str | None,
        long_lived: bool,
        client: str,
    ) -> NewSession:
        """Set a new password with the recovery key (and the second factor,
        if the account has one), end every session, and open a new one."""
        async with self._throttled(email, client):
            row = await self._check_recovery(email, recovery_auth)
            await self._check_second_factor(row.account_id, code)
        try:
            await self._meta.set_password(
                row.account_id, kdf, _hash(auth_secret), keyblob, keep_session=None
            )
        finally:
            self._sessions.forget_account(row.account_id)
        account = await self._meta.account(row.account_id)
        return await self._open_session(account, device, long_lived=long_lived)

    async def _check_recovery(self, email: str, recovery_auth: bytes) -> RecoveryRow:
        row = await self._meta.recovery_by_email(email)
        expected = row.auth_hash if row is not None else _NO_ACCOUNT_HASH
        if not hmac.compare_digest(expected, _hash(recovery_auth)) or row is None:
            raise AuthFailed("wrong email or recovery key")
        return row


def _matching_step(secret: bytes, code: str, now: int) -> int | None:
    """The time step within the allowed skew whose TOTP code is ``code``.
    Every candidate is computed and compared in constant time, so the
    answer's timing does not say which step (if any) matched."""
    if not _TOTP_CODE_RE.fullmatch(code):
        return None
    totp = TOTP(secret, TOTP_DIGITS, SHA1(), TOTP_STEP)
    current = now // TOTP_STEP
    found = None
    for step in range(current - TOTP_SKEW_STEPS, current + TOTP_SKEW_STEPS + 1):
        if hmac.compare_digest(totp.generate(step * TOTP_STEP), code.encode("ascii")):
            found = step
    return found


def _normalize_code(code: str) -> str:
    """Codes as people type them: spaces, dashes and case do not matter."""
    return code.replace("-", "").replace(" ", "").lower()


def _new_recovery_code() -> str:
    text = base64.b32encode(secrets.token_bytes(_RECOVERY_CODE_BYTES)).decode("ascii").lower()
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def _address_key(client: str) -> str:
    """The client address's throttle key; an IPv6 client is counted by its
    /64, which one subscriber usually holds whole."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return "address:" + client[:64]
    if address.version == 6:
        return f"address:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address:{address}"


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        raise AuthFailed("a bearer token is required")
    return token


def _now() -> int:
    return int(time.time())
