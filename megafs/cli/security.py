"""Account security commands: ``2fa``, ``sessions``, ``passwd``,
``recovery-key``, and ``login --recovery-key``.

Each acts as the logged-in account (``account.json``) with the remembered
session if there is one (it passed the second factor when it was made),
else with the password (and a two-factor code if the account needs one),
in a session that ends with the command. Whatever can take the account
over (a new password, a recovery key) asks for the password again, so a
stolen remembered session alone cannot.

The recovery key is 32 random bytes shown as base32 groups. From it, HKDF
derives two independent values (like the password's KEK and auth secret):
a key the master key is wrapped under (label ``megafs/v1/recovery``) and a
proof the server keeps a hash of (label ``megafs/v1/recovery-auth``), so the
server can tell who may reset the password without being able to open the
wrap.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from megafs.cli.account import (
    CodeSource,
    Unlocked,
    login,
    login_remembered,
    open_keyblob,
    with_second_factor,
)
from megafs.cli.config import AccountConfig, Credentials, Paths, default_device
from megafs.cli.main import (
    EXIT_AUTH,
    EXIT_NOT_LOGGED_IN,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    read_password,
)
from megafs.crypto import (
    KdfParams,
    derive_password_keys,
    new_kdf_params,
    unwrap_master_key,
    wrap_master_key,
)
from megafs.crypto.keys import hkdf
from megafs.errors import AuthFailed, IntegrityError, MegafsError
from megafs.remote import RemoteClient, SessionInfo
from megafs.wire import TOTP_DIGITS, TOTP_STEP

__all__ = [
    "cmd_2fa_disable",
    "cmd_2fa_enable",
    "cmd_passwd",
    "cmd_recovery_key",
    "cmd_sessions",
    "code_source",
    "forget_remembered",
    "login_with_recovery_key",
    "remember",
]

_RECOVERY_KEY_BYTES = 32
_RECOVERY_KEK_LABEL = b"megafs/v1/recovery"
_RECOVERY_AUTH_LABEL = b"megafs/v1/recovery-auth"
_MIN_PASSWORD_CHARS = 8


# -- shared ---------------------------------------------------------------------------


def code_source(option: str | None) -> CodeSource:
    """The ``--totp-code`` option, else a prompt without echo when there is
    a terminal; called only once the server asks for a code."""

    def code() -> str:
        if option:
            return option
        if not sys.stdin.isatty():
            raise CliError(
                "this account uses two-factor authentication: give --totp-code CODE "
                "(a code from the app, or a recovery code)",
                EXIT_AUTH,
            )
        typed = _ask("Two-factor code (or a recovery code): ").strip()
        if not typed:
            raise CliError("no code given", EXIT_AUTH)
        return typed

    return code


def _ask(prompt: str, *, echo: bool = False) -> str:
    """One line from the terminal; end of input is a clean error."""
    try:
        return input(prompt) if echo else getpass.getpass(prompt)
    except EOFError:
        raise CliError("no answer given") from None


def remember(paths: Paths, account: AccountConfig, unlocked: Unlocked) -> str:
    """Keep the unlocked key and the (long-lived) session; returns where."""
    return Credentials(
        unlocked.keys.master_key, unlocked.keys.root_id, session=unlocked.session
    ).save(paths, account)


async def forget_remembered(paths: Paths, account: AccountConfig | None, *, insecure: bool) -> None:
    """Forget the remembered key and end its session on the server, if the
    server answers at once (best effort: an unreachable server must not
    keep a user from logging out; the session then expires unused)."""
    try:
        creds = Credentials.load(paths, account) if account is not None else None
    except ValueError:  # damaged: nothing to end, but still to forget
        creds = None
    Credentials.forget(paths, account)
    if account is None or creds is None or creds.session is None:
        return
    with contextlib.suppress(MegafsError), trio.move_on_after(10):
        async with RemoteClient(
            account.server, creds.session, timeout=5, retries=0, insecure=insecure
        ) as remote:
            await remote.logout()


def _account(paths: Paths) -> AccountConfig:
    account = AccountConfig.load(paths)
    if account is None:
        raise CliError("not logged in: run `megafs login URL EMAIL` first", EXIT_NOT_LOGGED_IN)
    return account


@dataclass
class _Session:
    remote: RemoteClient
    account: AccountConfig
    unlocked: Unlocked


@asynccontextmanager
async def _open_session(
    paths: Paths, args: argparse.Namespace, password: bytes | None = None
) -> AsyncIterator[_Session]:
    """The logged-in account's remembered session, else a new one from the
    password (``password``, else ``--password-file`` or a prompt) and a
    code; a new session ends on exit."""
    account = _account(paths)
    creds = Credentials.load(paths, account)
    async with RemoteClient(account.server, insecure=args.insecure) as remote:
        if creds is not None:
            unlocked, kept = await login_remembered(remote, account.email, creds, account.device)
            if kept != creds:
                kept.save(paths, account)
            yield _Session(remote, account, unlocked)
            return
        if password is None:
            password = read_password(args.password_file)
        unlocked = await login(
            remote, account.email, password, account.device, code=code_source(args.totp_code)
        )
        try:
            yield _Session(remote, account, unlocked)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(MegafsError):
                await remote.logout()


async def _password_keys(remote: RemoteClient, password: bytes) -> tuple[bytes, Unlocked]:
    """The auth secret of ``password`` and the keys its KEK opens, with the
    parameters the account has now (AuthFailed if it is not the password)."""
    account = await remote.account()
    pw = await trio.to_thread.run_sync(
        derive_password_keys, password, KdfParams.from_json(account.kdf)
    )
    assert remote.token is not None
    return pw.auth_secret, Unlocked(open_keyblob(pw.kek, account), remote.token, account)


def _read_new_password(password_file: str | None) -> bytes:
    """A new password: from the file, else asked twice without echo."""
    if password_file:
        password = read_password(password_file)
    else:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask for the new password: use --new-password-file")
        password = _ask("New password: ").encode()
        if _ask("New password again: ").encode() != password:
            raise CliError("the passwords do not match")
    if len(password) < _MIN_PASSWORD_CHARS:
        raise CliError(f"choose a password of at least {_MIN_PASSWORD_CHARS} characters")
    return password


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


# -- 2fa --------------------------------------------------------------------------------


def cmd_2fa_enable(args: argparse.Namespace, paths: Paths) -> int:
    """Without ``--code``: make a new secret and show it (URI and QR code),
    then ask for a first code if there is a terminal; with ``--code``:
    confirm the secret shown earlier. Either way the recovery codes are
    printed once."""

    async def run() -> None:
        async with _open_session(paths, args) as s:
            code = args.code
            if code is None:
                secret = await s.remote.totp_setup()
                _show_secret(secret, s.account)
                if not sys.stdin.isatty():
                    print(
                        "\nTwo-factor authentication is not on yet: confirm with "
                        "`megafs 2fa enable --code CODE` (a code from the app)."
                    )
                    return
                code = _ask("Code from the app: ", echo=True).strip()
            codes = await s.remote.totp_enable(code)
        print(
            "Two-factor authentication is on: logins now need a code from the app.\n"
            "Recovery codes (each works once instead of a code; keep them somewhere safe, "
            "they are not shown again):"
        )
        for recovery_code in codes:
            print(f"  {recovery_code}")

    trio.run(run)
    return EXIT_OK


def _show_secret(secret: str, account: AccountConfig) -> None:
    """The otpauth:// URI and, when the ``qrcode`` package is there, the
    same as a QR code for the authenticator app to scan."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    issuer = f"megafs {urlsplit(account.server).hostname}"
    uri = TOTP(key, TOTP_DIGITS, SHA1(), TOTP_STEP).get_provisioning_uri(account.email, issuer)
    print(
        "Add this account to your authenticator app: scan the QR code, or enter the key "
        f"{secret}\n{uri}\n"
    )
    try:
        import qrcode
    except ImportError:
        print("(no QR code: the qrcode package is not installed; use the link or the key)")
        return
    qr = qrcode.QRCode(border=2)
    qr.add_data(uri)
    # A terminal gets explicit black and white (right whatever its colours);
    # elsewhere, light blocks on a (typically) dark background.
    qr.print_ascii(out=sys.stdout, tty=sys.stdout.isatty(), invert=not sys.stdout.isatty())


def cmd_2fa_disable(args: argparse.Namespace, paths: Paths) -> int:
    """Needs the password and a code (TOTP or recovery), like a login."""
    account = _account(paths)
    password = read_password(args.password_file)
    code = code_source(args.code)

    async def run() -> None:
        async with RemoteClient(account.server, insecure=args.insecure) as remote:
            params = KdfParams.from_json(await remote.prelogin(account.email))
            pw = await trio.to_thread.run_sync(derive_password_keys, password, params)
            await remote.totp_disable(account.email, pw.auth_secret, code())

    trio.run(run)
    print("two-factor authentication is off")
    return EXIT_OK


# -- sessions ---------------------------------------------------------------------------


def cmd_sessions(args: argparse.Namespace, paths: Paths) -> int:
    """List the sessions, or end one (``revoke ID``) or all others
    (``revoke --all-others``)."""
    revoking = getattr(args, "sessions_command", None) == "revoke"
    if revoking and (args.id is None) == (not args.all_others):
        raise CliError("give a session ID or --all-others (not both)", EXIT_USAGE)

    async def run() -> None:
        async with _open_session(paths, args) as s:
            if not revoking:
                _print_sessions(await s.remote.sessions())
            elif args.all_others:
                count = await s.remote.revoke_other_sessions()
                print(f"{count} other session{'s' if count != 1 else ''} ended")
            else:
                await s.remote.revoke_session(args.id)
                print(f"session {args.id} ended")

    trio.run(run)
    return EXIT_OK


def _print_sessions(sessions: list[SessionInfo]) -> None:
    print(f"  {'ID':16}  {'CREATED':16}  {'LAST SEEN':16}  {'EXPIRES':16}  DEVICE")
    for session in sessions:
        mark = "*" if session.current else " "
        print(
            f"{mark} {session.id:16}  {_when(session.created):16}  "
            f"{_when(session.last_seen):16}  {_when(session.expires):16}  {session.device}"
        )
    print("(* marks the session this command used: this machine's remembered one, if any)")


# -- password and recovery key ----------------------------------------------------------


def cmd_passwd(args: argparse.Namespace, paths: Paths) -> int:
    """New Argon2id parameters and salt, the same master key re-wrapped
    under the new KEK, the new auth secret: one request, which also ends
    every other session. No file is re-encrypted."""
    old = read_password(args.password_file)
    new = _read_new_password(args.new_password_file)

    async def run() -> None:
        async with _open_session(paths, args, old) as s:
            old_auth, unlocked = await _password_keys(s.remote, old)
            params = new_kdf_params()
            pw = await trio.to_thread.run_sync(derive_password_keys, new, params)
            keyblob = wrap_master_key(pw.kek, unlocked.keys.master_key, unlocked.keys.root_id)
            await s.remote.change_password(old_auth, params.to_json(), pw.auth_secret, keyblob)
            # The keyblob kept for offline mounts must open with the new
            # password only, as the server's does.
            s.account.with_offline(params.to_json(), keyblob, unlocked.keys.root_id).save(paths)

    trio.run(run)
    print(
        "password changed; every other session (other devices, mounts) has ended: log in "
        "there again"
    )
    return EXIT_OK


@dataclass(frozen=True)
class _RecoveryKeys:
    kek: bytes
    auth: bytes

    @classmethod
    def derive(cls, recovery_key: bytes) -> _RecoveryKeys:
        return cls(
            hkdf(recovery_key, _RECOVERY_KEK_LABEL), hkdf(recovery_key, _RECOVERY_AUTH_LABEL)
        )


def cmd_recovery_key(args: argparse.Namespace, paths: Paths) -> int:
    """Make a new recovery key (replacing any earlier one) and print it once."""
    password = read_password(args.password_file)
    recovery_key = os.urandom(_RECOVERY_KEY_BYTES)
    derived = _RecoveryKeys.derive(recovery_key)

    async def run() -> None:
        async with _open_session(paths, args, password) as s:
            auth_secret, unlocked = await _password_keys(s.remote, password)
            keyblob = wrap_master_key(derived.kek, unlocked.keys.master_key, unlocked.keys.root_id)
            await s.remote.set_recovery_key(auth_secret, derived.auth, keyblob)

    trio.run(run)
    print(
        "Your recovery key (shown only now; any earlier one no longer works):\n\n"
        f"  {format_recovery_key(recovery_key)}\n\n"
        "With it, `megafs login URL EMAIL --recovery-key` sets a new password if you forget "
        "yours. Keep it offline (on paper). Without the password and this key your files "
        "cannot be recovered by anyone."
    )
    return EXIT_OK


def format_recovery_key(key: bytes) -> str:
    text = base64.b32encode(key).decode("ascii").rstrip("=")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def parse_recovery_key(text: str) -> bytes:
    """The key as typed: groups, spaces and case do not matter."""
    compact = "".join(text.split()).replace("-", "").upper()
    try:
        key = base64.b32decode(compact + "=" * (-len(compact) % 8))
    except ValueError:
        key = b""
    if len(key) != _RECOVERY_KEY_BYTES:
        raise CliError("that is not a recovery key (13 groups of letters and digits)", EXIT_AUTH)
    return key


def _read_recovery_key(key_file: str | None) -> bytes:
    if key_file:
        try:
            return parse_recovery_key(Path(key_file).read_text())
        except OSError as exc:
            raise CliError(f"cannot read the recovery key file: {exc.strerror}") from None
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the recovery key: use --recovery-key-file")
    return parse_recovery_key(_ask("Recovery key: "))


def login_with_recovery_key(args: argparse.Namespace, paths: Paths) -> int:
    """``login --recovery-key``: open the master key's second wrap with the
    recovery key, wrap it under a new password, and have the server take
    the new password (ending every session) and log in."""
    derived = _RecoveryKeys.derive(_read_recovery_key(args.recovery_key_file))
    new = _read_new_password(args.password_file)
    device = default_device()
    account = AccountConfig(server=args.url, email=args.email, device=device)

    async def run() -> None:
        async with RemoteClient(args.url, insecure=args.insecure) as remote:
            wrapped = await remote.recovery_start(args.email, derived.auth)
            try:
                master_key, root_id = unwrap_master_key(derived.kek, wrapped)
            except IntegrityError:
                raise AuthFailed("the account's key does not open with this recovery key") from None
            params = new_kdf_params()
            pw = await trio.to_thread.run_sync(derive_password_keys, new, params)
            keyblob = wrap_master_key(pw.kek, master_key, root_id)
            session = await with_second_factor(
                lambda c: remote.recovery_finish(
                    args.email,
                    derived.auth,
                    params.to_json(),
                    pw.auth_secret,
                    keyblob,
                    device,
                    code=c,
                    long_lived=args.remember,
                ),
                code_source(args.totp_code),
            )
            if session.account.root_id != root_id:
                raise IntegrityError("the server names another root folder than the account key")
            await forget_remembered(paths, AccountConfig.load(paths), insecure=args.insecure)
            account.with_offline(params.to_json(), keyblob, root_id).save(paths)
            if args.remember:
                unlocked = Unlocked(
                    open_keyblob(pw.kek, session.account), session.token, session.account
                )
                print(f"account keys remembered in {remember(paths, account, unlocked)}")
            else:
                await remote.logout()

    trio.run(run)
    print(f"password reset; every session of {args.email} has ended; logged in on {args.url}")
    return EXIT_OK
