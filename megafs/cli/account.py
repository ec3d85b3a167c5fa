"""Account operations on the client side: sign up, unlock, log in.

The password never leaves this module's locals: it becomes, through
Argon2id, the KEK (opens the keyblob) and the auth secret (proves the
password to the server).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

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
from megafs.errors import AuthFailed, IntegrityError
from megafs.remote import RemoteClient

__all__ = ["Unlocked", "login", "login_remembered", "signup"]


@dataclass(frozen=True)
class Unlocked:
    """A logged-in client and the account's keys."""

    auth_secret: bytes
    keys: AccountKeys


async def signup(
    remote: RemoteClient, email: str, password: bytes, device: str, *, uid: int, gid: int
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
    await remote.signup(
        email,
        params.to_json(),
        pw.auth_secret,
        wrap_master_key(pw.kek, master_key, root_id),
        root_id,
        seal_record(keys.root_folder_key, root_id, NO_PARENT, root),
        device,
    )
    return Unlocked(pw.auth_secret, keys)


async def login(remote: RemoteClient, email: str, password: bytes, device: str) -> Unlocked:
    """Log in with the password. A wrong password is AuthFailed, whether the
    server or the keyblob notices."""
    params = KdfParams.from_json(await remote.prelogin(email))
    pw = await trio.to_thread.run_sync(derive_password_keys, password, params)
    session = await remote.login(email, pw.auth_secret, device)
    try:
        master_key, root_id = unwrap_master_key(pw.kek, session.account.keyblob)
    except IntegrityError:
        raise AuthFailed("the account's key does not open with this password") from None
    if root_id != session.account.root_id:
        raise IntegrityError("the server names another root folder than the account key")
    return Unlocked(pw.auth_secret, AccountKeys.from_master(master_key, root_id))


async def login_remembered(
    remote: RemoteClient, email: str, auth_secret: bytes, keys: AccountKeys, device: str
) -> Unlocked:
    session = await remote.login(email, auth_secret, device)
    if session.account.root_id != keys.root_id:
        raise IntegrityError("the server names another root folder than the account key")
    return Unlocked(auth_secret, keys)
