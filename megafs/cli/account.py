"""Account operations on the client side: sign up, unlock, log in.

The password never leaves this module's locals: it becomes, through
Argon2id, the KEK (opens the keyblob) and the auth secret (proves the
password to the server). A two-factor code is asked for (through a
:data:`CodeSource`) only once the server has said the password is right
and a code is needed, so accounts without 2FA never see a prompt.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from megafs.cli.config import Credentials
from megafs.crypto import (
    NO_PARENT,
    AccountKeys,
    KdfParams,
    Kind,
    NodeRecord,
    derive_password_keys,
    new_kdf_params,
    new_key,
    new_node_id,
    seal_record,
    unwrap_master_key,
    wrap_master_key,
)
from megafs.errors import AuthFailed, IntegrityError, SecondFactorRequired
from megafs.remote import Account, RemoteClient

__all__ = [
    "CodeSource",
    "Unlocked",
    "login",
    "login_remembered",
    "open_keyblob",
    "signup",
    "with_second_factor",
]

T = TypeVar("T")

#: Gives a TOTP or recovery code when the server asks for one (a prompt,
#: or the ``--totp-code`` option); raises if there is none to give.
CodeSource = Callable[[], str]


@dataclass(frozen=True)
class Unlocked:
    """A logged-in client: the account's keys, the session it holds, and
    the account as the server showed it (kept for offline starts)."""

    keys: AccountKeys
    session: str
    account: Account


async def signup(
    remote: RemoteClient,
    email: str,
    password: bytes,
    device: str,
    *,
    uid: int,
    gid: int,
    long_lived: bool = False,
) -> Unlocked:
    params = new_kdf_params()
    pw = await trio.to_thread.run_sync(derive_password_keys, password, params)
    master_key = new_key()
    root_id = new_node_id()
    keys = AccountKeys.from_master(master_key, root_id)
    now = time.time_ns()
    root = NodeRecord(
        kind=Kind.DIR,
        name=b"",
        key=new_key(),
        mode=0o755,
        uid=uid,
        gid=gid,
        atime_ns=now,
        mtime_ns=now,
        ctime_ns=now,
        size=0,
        rev=1,
    )
    session = await remote.signup(
        email,
        params.to_json(),
        pw.auth_secret,
        wrap_master_key(pw.kek, master_key, root_id),
        root_id,
        seal_record(keys.root_folder_key, root_id, NO_PARENT, root),
        device,
        long_lived=long_lived,
    )
    return Unlocked(keys, session.token, session.account)


async def with_second_factor(
    attempt: Callable[[str | None], Awaitable[T]], code: CodeSource | None
) -> T:
    """``attempt(None)``; if the server wants a two-factor code, again with
    one from ``code`` (without one, SecondFactorRequired propagates)."""
    try:
        return await attempt(None)
    except SecondFactorRequired:
        if code is None:
            raise
        return await attempt(code())


async def login(
    remote: RemoteClient,
    email: str,
    password: bytes,
    device: str,
    *,
    code: CodeSource | None = None,
    long_lived: bool = False,
) -> Unlocked:
    """Log in with the password (and a code from ``code`` if the account
    has 2FA). A wrong password is AuthFailed, whether the server or the
    keyblob notices."""
    params = KdfParams.from_json(await remote.prelogin(email))
    pw = await trio.to_thread.run_sync(derive_password_keys, password, params)
    session = await with_second_factor(
        lambda c: remote.login(email, pw.auth_secret, device, code=c, long_lived=long_lived), code
    )
    return Unlocked(open_keyblob(pw.kek, session.account), session.token, session.account)


def open_keyblob(kek: bytes, account: Account) -> AccountKeys:
    """The account's keys from its keyblob; AuthFailed if ``kek`` does not
    open it, IntegrityError if the server names another root folder."""
    try:
        master_key, root_id = unwrap_master_key(kek, account.keyblob)
    except IntegrityError:
        raise AuthFailed("the account's key does not open with this password") from None
    if root_id != account.root_id:
        raise IntegrityError("the server names another root folder than the account key")
    return AccountKeys.from_master(master_key, root_id)


async def login_remembered(
    remote: RemoteClient, email: str, creds: Credentials, device: str
) -> tuple[Unlocked, Credentials]:
    """Use the remembered session; returns the unlocked account and the
    credentials to keep (new ones when an entry from an earlier megafs,
    which kept the auth secret, was traded for a session)."""
    keys = AccountKeys.from_master(creds.master_key, creds.root_id)
    try:
        if creds.session is None:
            assert creds.auth_secret is not None
            account = (
                await remote.login(email, creds.auth_secret, device, long_lived=True)
            ).account
            creds = Credentials(creds.master_key, creds.root_id, session=remote.token)
        else:
            remote.token = creds.session
            account = await remote.account()
    except SecondFactorRequired:
        raise AuthFailed(
            "the remembered login predates two-factor authentication: run "
            "`megafs login URL EMAIL --remember` again"
        ) from None
    except AuthFailed:
        raise AuthFailed(
            "the remembered login was revoked or has expired: run "
            "`megafs login URL EMAIL --remember` again"
        ) from None
    if account.root_id != keys.root_id:
        raise IntegrityError("the server names another root folder than the account key")
    assert remote.token is not None
    return Unlocked(keys, remote.token, account), creds
