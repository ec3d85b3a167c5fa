"""Failed logins are throttled per email and per client address, in the
metadata store; an unknown email and a wrong password fail the same way,
through the same steps."""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio

from megafs.errors import AuthFailed, RateLimited
from megafs.remote import RemoteClient
from megafs.server import MetadataStore, SQLiteMetadataStore
from megafs.server.auth import Auth, LoginLimits
from megafs.wire import API_PREFIX, b64e
from tests.helpers.server import ServerProcess, running_server
from tests.integration.users import (
    Creds,
    clear_of_step_edge,
    enable_totp,
    new_user,
    totp_code,
)

PER_ACCOUNT = 3
PER_ADDRESS = 8


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path / "data",
        args=(
            "--failed-logins-per-account",
            str(PER_ACCOUNT),
            "--failed-logins-per-address",
            str(PER_ADDRESS),
        ),
    ) as srv:
        yield srv


async def _login(url: str, email: str, secret: bytes) -> None:
    async with RemoteClient(url) as client:
        await client.login(email, secret, "test")


async def test_an_account_is_locked_out_after_failures(strict_server: ServerProcess) -> None:
    url = strict_server.url
    alice, bob = (await new_user(url), await new_user(url))
    for user in (alice, bob):
        await user.client.aclose()
    # A success starts the count again.
    for _ in range(PER_ACCOUNT - 1):
        with pytest.raises(AuthFailed):
            await _login(url, alice.creds.email, os.urandom(32))
    await _login(url, alice.creds.email, alice.creds.auth_secret)
    for _ in range(PER_ACCOUNT):
        with pytest.raises(AuthFailed):
            await _login(url, alice.creds.email, os.urandom(32))
    # One failure past the allowance locks the email out, right password or not.
    with pytest.raises(AuthFailed):
        await _login(url, alice.creds.email, os.urandom(32))
    with pytest.raises(RateLimited, match="try again in"):
        await _login(url, alice.creds.email, alice.creds.auth_secret)

    async with httpx.AsyncClient(base_url=url + API_PREFIX) as http:
        answer = await http.post(
            "/login",
            json={
                "email": alice.creds.email,
                "auth_secret": b64e(alice.creds.auth_secret),
                "device": "d",
            },
        )
    assert answer.status_code == 429
    assert answer.json()["error"] == "rate_limited"
    assert 0 < int(answer.headers["retry-after"]) <= 30
    await _login(url, bob.creds.email, bob.creds.auth_secret)  # others are not affected


async def test_unknown_emails_count_like_known_ones(strict_server: ServerProcess) -> None:
    """Locking out is keyed by the email, known or not: a lockout does not
    tell whether the account exists."""
    email = f"nobody-{uuid.uuid4().hex[:8]}@example.org"
    for _ in range(PER_ACCOUNT + 1):
        with pytest.raises(AuthFailed):
            await _login(strict_server.url, email, os.urandom(32))
    with pytest.raises(RateLimited):
        await _login(strict_server.url, email, os.urandom(32))


async def test_an_address_is_locked_out_across_emails(strict_server: ServerProcess) -> None:
    user = await new_user(strict_server.url)
    await user.client.aclose()
    for i in range(PER_ADDRESS + 1):  # one failure per email: no email is locked
        with pytest.raises(AuthFailed):
            await _login(strict_server.url, f"guess{i}@example.org", os.urandom(32))
    with pytest.raises(RateLimited):
        await _login(strict_server.url, user.creds.email, user.creds.auth_secret)


async def test_other_proofs_count_too(strict_server: ServerProcess) -> None:
    """Wrong codes and recovery-key guesses are failed logins as well."""
    user = await new_user(strict_server.url)
    async with user.client:
        await enable_totp(user.client)
        async with RemoteClient(strict_server.url) as client:
            with pytest.raises(AuthFailed):
                await client.login(user.creds.email, user.creds.auth_secret, "d", code="000000")
            with pytest.raises(AuthFailed):
                await client.totp_disable(user.creds.email, user.creds.auth_secret, "000000")
            with pytest.raises(AuthFailed):
                await client.recovery_start(user.creds.email, os.urandom(32))
            with pytest.raises(AuthFailed):
                await client.login(user.creds.email, os.urandom(32), "d")
            with pytest.raises(RateLimited):
                await client.login(user.creds.email, user.creds.auth_secret, "d", code="000000")


# -- the same steps for an unknown email and a wrong password ---------------------------


class _Recording:
    """A metadata store that notes which of its methods are called."""

    def __init__(self, inner: MetadataStore) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return call


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteMetadataStore]:
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, tmp_path / "meta.sqlite3")
    try:
        yield meta
    finally:
        await meta.aclose()


async def test_unknown_email_and_wrong_password_take_the_same_path(
    store: SQLiteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing is not asserted (it would be flaky); what makes it uniform is:
    the same store calls, one hash and one constant-time comparison in both
    cases, and the same answer. An account with 2FA fails the same way too
    (its second factor is looked at only after the password)."""
    recording = _Recording(store)
    auth = Auth(cast(MetadataStore, recording), limits=LoginLimits(account_free=100))
    creds, with_2fa = Creds.random(), Creds.random()
    for c in (creds, with_2fa):
        await auth.signup(
            c.email,
            c.kdf,
            c.auth_secret,
            c.keyblob,
            c.root_id.hex(),
            c.root_meta,
            "d",
            quota=1 << 20,
        )
    session = await auth.login(
        with_2fa.email, with_2fa.auth_secret, "d", code=None, long_lived=False, client="127.0.0.1"
    )
    caller = await auth.authenticate(f"Bearer {session.token}")
    secret = await auth.begin_totp(caller)
    now = await clear_of_step_edge()
    await auth.enable_totp(caller, totp_code(secret, now), "127.0.0.1")

    counts = {"sha256": 0, "compare_digest": 0}

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(hashlib, "sha256", counting("sha256", hashlib.sha256))
    monkeypatch.setattr(hmac, "compare_digest", counting("compare_digest", hmac.compare_digest))

    traces = []
    for email in (creds.email, f"nobody-{uuid.uuid4().hex[:8]}@example.org", with_2fa.email):
        recording.calls.clear()
        counts.update(sha256=0, compare_digest=0)
        with pytest.raises(AuthFailed) as failed:
            await auth.login(
                email, os.urandom(32), "d", code=None, long_lived=False, client="127.0.0.1"
            )
        traces.append(
            (list(recording.calls), dict(counts), type(failed.value), failed.value.detail)
        )
    assert traces[0] == traces[1] == traces[2]
    calls, hashed, cls, detail = traces[0]
    assert "account_by_email" in calls and "throttle_failure" in calls
    assert hashed == {"sha256": 1, "compare_digest": 1}
    assert (cls, detail) == (AuthFailed, "wrong email or password")


async def test_locked_out_attempts_check_nothing(store: SQLiteMetadataStore) -> None:
    """While locked out, the store is not even asked for the account: a
    right guess then gains an attacker nothing."""
    recording = _Recording(store)
    auth = Auth(cast(MetadataStore, recording), limits=LoginLimits(account_free=0))
    with pytest.raises(AuthFailed):
        await auth.login(
            "x@example.org", os.urandom(32), "d", code=None, long_lived=False, client="10.0.0.1"
        )
    recording.calls.clear()
    with pytest.raises(RateLimited) as limited:
        await auth.login(
            "x@example.org", os.urandom(32), "d", code=None, long_lived=False, client="10.0.0.2"
        )
    assert "account_by_email" not in recording.calls
    assert 0 < limited.value.retry_after <= 30
