"""``megafs``: the command line.

Every failure is one line on stderr and a documented exit code (see
docs/cli.md), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from megafs import __version__
from megafs.cli.account import Unlocked
from megafs.cli.config import AccountConfig, Credentials, Paths, default_device
from megafs.crypto import AccountKeys, KdfParams, derive_password_keys
from megafs.errors import AuthFailed, MegafsError, RateLimited, RemoteError, SecondFactorRequired
from megafs.remote import Account, RemoteClient

__all__ = ["main"]

log = logging.getLogger("megafs")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_LOGGED_IN = 5
EXIT_MOUNTPOINT = 6
EXIT_NO_FUSE = 7
EXIT_PENDING = 8
EXIT_NO_ANSWER = 9


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _exit_code_for(exc: MegafsError) -> int:
    if isinstance(exc, AuthFailed | RateLimited):
        return EXIT_AUTH
    if isinstance(exc, RemoteError):
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5G or 512M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value * units[unit])


# -- password input ------------------------------------------------------------------


def read_password(password_file: str | None, *, confirm: bool = False) -> bytes:
    """From ``--password-file`` (first line), else a prompt without echo."""
    if password_file:
        try:
            text = Path(password_file).read_text().split("\n", 1)[0]
        except OSError as exc:
            raise CliError(f"cannot read password file: {exc.strerror}") from None
        if not text:
            raise CliError("the password file is empty")
        return text.encode()
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password: use --password-file")
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password again: ") != password:
        raise CliError("the passwords do not match")
    if not password:
        raise CliError("empty password")
    return password.encode()


# -- commands --------------------------------------------------------------------------


def cmd_signup(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.account import signup

    password = read_password(args.password_file, confirm=True)
    if len(password) < 8:
        raise CliError("choose a password of at least 8 characters")
    device = default_device()

    async def run() -> None:
        async with RemoteClient(args.url, insecure=args.insecure) as remote:
            unlocked = await signup(
                remote,
                args.email,
                password,
                device,
                uid=os.getuid(),
                gid=os.getgid(),
                long_lived=args.remember,
            )
            await _record_account(args, paths, device, remote, unlocked)

    trio.run(run)
    print(f"account {args.email} created on {args.url}")
    return EXIT_OK


async def _record_account(
    args: argparse.Namespace, paths: Paths, device: str, remote: RemoteClient, unlocked: Unlocked
) -> None:
    """After signup or login: this account replaces any other in the config
    dir; with --remember its key and session stay, else the session ends."""
    from megafs.cli.security import forget_remembered, remember

    await forget_remembered(paths, AccountConfig.load(paths), insecure=args.insecure)
    server = unlocked.account
    account = AccountConfig(server=args.url, email=args.email, device=device)
    account.with_offline(server.kdf, server.keyblob, server.root_id).save(paths)
    if args.remember:
        print(f"account keys remembered in {remember(paths, account, unlocked)}")
    else:
        await remote.logout()


def cmd_login(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.account import login
    from megafs.cli.security import code_source, login_with_recovery_key

    if args.recovery_key or args.recovery_key_file:
        return login_with_recovery_key(args, paths)
    password = read_password(args.password_file)
    device = default_device()

    async def run() -> None:
        async with RemoteClient(args.url, insecure=args.insecure) as remote:
            unlocked = await login(
                remote,
                args.email,
                password,
                device,
                code=code_source(args.totp_code),
                long_lived=args.remember,
            )
            await _record_account(args, paths, device, remote, unlocked)

    trio.run(run)
    print(f"logged in as {args.email} on {args.url}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.security import forget_remembered

    # The account's address was accepted at login (with --insecure if it had to be).
    trio.run(partial(forget_remembered, paths, AccountConfig.load(paths), insecure=True))
    paths.account_file.unlink(missing_ok=True)
    print("logged out; remembered keys removed")
    return EXIT_OK


def _check_mountpoint(mountpoint: Path) -> None:
    if not Path("/dev/fuse").exists():
        raise CliError(
            "/dev/fuse is missing: install fuse3 (and load the fuse module)", EXIT_NO_FUSE
        )
    if not mountpoint.exists():
        raise CliError(f"mountpoint {mountpoint} does not exist", EXIT_MOUNTPOINT)
    if not mountpoint.is_dir():
        raise CliError(f"mountpoint {mountpoint} is not a directory", EXIT_MOUNTPOINT)
    if _is_mounted(mountpoint):
        raise CliError(f"{mountpoint} is already mounted", EXIT_MOUNTPOINT)
    if any(mountpoint.iterdir()):
        raise CliError(f"mountpoint {mountpoint} is not empty", EXIT_MOUNTPOINT)


def _is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        pass
    return os.path.ismount(mountpoint)


def _unescape(path: str) -> str:
    return (
        path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def cmd_mount(args: argparse.Namespace, paths: Paths) -> int:
    mountpoint = Path(args.mountpoint).absolute()
    account = AccountConfig.load(paths)
    if account is None:
        raise CliError("not logged in: run `megafs login URL EMAIL` first", EXIT_NOT_LOGGED_IN)
    _check_mountpoint(mountpoint)
    creds = Credentials.load(paths, account)
    password = None if creds is not None else read_password(args.password_file)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Paths.default_cache_dir(account)
    job = _MountJob(
        paths,
        account,
        mountpoint,
        cache_dir,
        args.cache_size,
        creds,
        password,
        args.fsync_timeout,
        args.insecure,
        args.totp_code,
        private=args.private,
    )
    if args.foreground:
        return job.run_foreground()
    return job.run_background()


class _MountJob:
    """Unlock, mount and serve; in the foreground or as a daemon."""

    def __init__(
        self,
        paths: Paths,
        account: AccountConfig,
        mountpoint: Path,
        cache_dir: Path,
        cache_size: int,
        creds: Credentials | None,
        password: bytes | None,
        fsync_timeout: float,
        insecure: bool,
        totp_code: str | None,
        *,
        private: bool = False,
    ) -> None:
        self.paths = paths
        self.private = private
        self.account = account
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.creds = creds
        self.password = password
        self.fsync_timeout = fsync_timeout
        self.insecure = insecure
        self.totp_code = totp_code
        #: Why the mount started offline, or None if it reached the server.
        self.offline_reason: str | None = None

    async def serve(self, on_ready: Callable[[], None]) -> None:
        """Mount with the remembered session, or with a long-lived one
        opened with the password (and a code) and ended at unmount: either
        lives as long as the mount uses it, so the mount never needs the
        password or a code again.

        If the server cannot be reached (a RemoteError: refused, timed out,
        5xx; a wrong password or a revoked session still fails), the mount
        starts offline from the local cache: with the remembered key and
        session, or with the password and the keyblob kept from the last
        online login (``offline_reason`` says why).
        """
        from megafs.fs import run_mount

        async with RemoteClient(self.account.server, insecure=self.insecure) as remote:
            try:
                keys = await self._unlock(remote)
            except RemoteError as exc:
                keys = await self._unlock_offline(remote, exc)
                self.offline_reason = exc.detail
                log.warning("the server cannot be reached (%s): starting offline", exc.detail)
            finally:
                self.password = None

            def ready() -> None:
                self._write_pid_file()
                on_ready()

            try:
                await run_mount(
                    remote,
                    keys,
                    self.mountpoint,
                    self.cache_dir,
                    cache_size=self.cache_size,
                    fsync_timeout=self.fsync_timeout,
                    allow_other=not self.private,
                    on_ready=ready,
                    server_url=self.account.server,
                    email=self.account.email,
                )
            finally:
                self.paths.pid_file(self.mountpoint).unlink(missing_ok=True)
                remote.login_on_demand = None  # no login just to log out
                if self.creds is None and remote.token is not None:
                    # (The remembered session outlives the mount.)
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(5),
                        contextlib.suppress(MegafsError),
                    ):
                        await remote.logout()

    async def _unlock(self, remote: RemoteClient) -> AccountKeys:
        """Log in (remembered session, or password and code) and keep what an
        offline start needs."""
        from megafs.cli.account import login, login_remembered
        from megafs.cli.security import code_source

        if self.creds is not None:
            unlocked, kept = await login_remembered(
                remote, self.account.email, self.creds, self.account.device
            )
            if kept != self.creds:
                kept.save(self.paths, self.account)
        else:
            assert self.password is not None
            unlocked = await login(
                remote,
                self.account.email,
                self.password,
                self.account.device,
                code=code_source(self.totp_code),
                long_lived=True,
            )
        self.keep_for_offline(unlocked.account)
        return unlocked.keys

    async def _unlock_offline(self, remote: RemoteClient, exc: RemoteError) -> AccountKeys:
        """The account's keys without the server (``exc``: why not with it).

        Remembered: the kept key and session, used as they are once the
        server answers. Password: Argon2id with the kept parameters (checked
        against the client minimum, as the server's are) opens the kept
        keyblob, so a wrong password fails here as it would online; the auth
        secret waits in memory for the first contact (:class:`_DeferredLogin`).
        """
        from megafs.cli.account import open_keyblob

        if self.creds is not None:
            if self.creds.session is None:
                # An entry from an earlier megafs: it must be traded for a
                # session first, which needs the server.
                raise exc
            remote.token = self.creds.session
            return AccountKeys.from_master(self.creds.master_key, self.creds.root_id)
        kept = self.account.offline
        if kept is None:
            raise RemoteError(
                f"{exc.detail}; this machine cannot start offline before one mount or "
                "login has reached the server"
            ) from exc
        assert self.password is not None
        params = KdfParams.from_json(kept.kdf)
        pw = await trio.to_thread.run_sync(derive_password_keys, self.password, params)
        server = Account(self.account.email, kept.kdf, kept.keyblob, kept.root_id, 0, 0)
        keys = open_keyblob(pw.kek, server)
        remote.login_on_demand = _DeferredLogin(
            self, remote, pw.auth_secret, keys.root_id, self.totp_code
        )
        return keys

    def keep_for_offline(self, server: Account) -> None:
        """Record the server's KDF parameters and keyblob in the account
        config, unless the user has logged out or into another account
        meanwhile (a deferred login must not bring the config back)."""
        current = AccountConfig.load(self.paths)
        if current is None or (current.server, current.email) != (
            self.account.server,
            self.account.email,
        ):
            return
        self.account = current.with_offline(server.kdf, server.keyblob, server.root_id)
        self.account.save(self.paths)

    def _write_pid_file(self) -> None:
        self.paths.mounts_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.paths.pid_file(self.mountpoint).write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "mountpoint": str(self.mountpoint),
                    "cache_dir": str(self.cache_dir),
                }
            )
        )

    def run_foreground(self) -> int:
        def ready() -> None:
            print(
                f"megafs: {self.mountpoint} is mounted (Ctrl-C or `megafs umount` to stop)",
                file=sys.stderr,
                flush=True,
            )
            if self.offline_reason is not None:
                print(_offline_line(self.offline_reason), file=sys.stderr, flush=True)
            _notify_systemd()

        return _run_guarded(lambda: self.serve(ready))

    def run_background(self) -> int:
        """Fork a daemon and return once it reports the mount live (or why
        not). Forking happens before any thread exists."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            os.setsid()
            self._detach()
            report = os.fdopen(write_fd, "w")

            def ready() -> None:
                offline = self.offline_reason
                report.write("OK\n" if offline is None else f"OK offline {offline}\n")
                report.flush()
                report.close()

            code = _run_guarded(lambda: self.serve(ready), report=report)
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as report:
            message = report.read()
        if message.startswith("OK"):
            print(
                f"megafs: {self.mountpoint} is mounted (daemon pid {pid}); "
                f"`megafs umount {self.mountpoint}` to stop"
            )
            if message.startswith("OK offline "):
                print(_offline_line(message.removeprefix("OK offline ").strip()), file=sys.stderr)
            return EXIT_OK
        _, status = os.waitpid(pid, 0)
        if message.startswith("ERR "):
            code_text, _, text = message[4:].partition(" ")
            raise CliError(text.strip(), int(code_text))
        raise CliError(
            f"the mount daemon exited early (status {status}); see {self.cache_dir / 'daemon.log'}"
        )

    def _detach(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_fd = os.open(
            self.cache_dir / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        _configure_logging(verbose=logging.getLogger().level <= logging.DEBUG, daemon=True)


def _offline_line(reason: str) -> str:
    """The one line that says a mount started without the server."""
    return (
        f"megafs: started offline, from the local cache (the server cannot be reached: "
        f"{reason}); changes upload once it is back"
    )


#: After a failed attempt, a deferred login lets this long pass before the
#: next (every request meanwhile fails at once, as offline).
_LOGIN_RETRY = 2.0


class _DeferredLogin:
    """The login a mount started offline with the password owes the server
    (``RemoteClient.login_on_demand``): the first request that reaches the
    server opens the mount's session, whichever part of the daemon makes it.

    The auth secret lives in this object only, in memory, and is dropped
    once the session is open or the login is refused. A refusal (the
    account needs a two-factor code, or the password was changed elsewhere)
    is final: trying again unattended would only count failed logins
    against the account. The mount then keeps working from the local cache
    and every request fails with RemoteError naming the reason, which
    ``megafs status`` shows as its last error.
    """

    def __init__(
        self,
        job: _MountJob,
        remote: RemoteClient,
        auth_secret: bytes,
        root_id: bytes,
        code: str | None,
    ) -> None:
        self._job = job
        self._remote = remote
        self._secret: bytes | None = auth_secret
        self._root_id = root_id
        #: A code given with the mount is tried once (it expires in a minute).
        self._code = code
        self._refused: str | None = None
        self._quiet_until = -math.inf
        self._last_error = ""

    async def __call__(self) -> None:
        if self._refused is not None:
            raise RemoteError(self._refused)
        if trio.current_time() < self._quiet_until:
            raise RemoteError(self._last_error)
        assert self._secret is not None
        account = self._job.account
        code, self._code = self._code, None
        try:
            session = await self._remote.login(
                account.email, self._secret, account.device, code=code, long_lived=True
            )
        except SecondFactorRequired:
            self._refuse("the account needs a two-factor code: mount again with --totp-code")
        except AuthFailed as exc:
            self._refuse(f"the server refused the login ({exc.detail}): mount again")
        except (RemoteError, RateLimited) as exc:
            self._quiet_until = trio.current_time() + _LOGIN_RETRY
            self._last_error = f"not logged in yet: {exc.detail}"
            raise RemoteError(self._last_error) from exc
        self._secret = None
        if session.account.root_id != self._root_id:
            self._remote.token = None
            self._refuse("the server names another root folder than the account key")
        log.info("the server is reachable: logged in")
        await trio.to_thread.run_sync(self._job.keep_for_offline, session.account)

    def _refuse(self, reason: str) -> NoReturn:
        self._secret = None
        self._refused = f"not logged in: {reason}"
        log.error("%s; the mount keeps working locally", self._refused)
        raise RemoteError(self._refused)


def _notify_systemd() -> None:
    """READY=1 for Type=notify units (no-op elsewhere)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def _run_guarded(fn: Callable[[], Awaitable[None]], report=None) -> int:  # type: ignore[no-untyped-def]
    """Run a trio main; turn known failures into one line and an exit code
    (sent through ``report`` too, for a waiting parent)."""
    from megafs.fs import MountError

    def fail(message: str, code: int) -> int:
        if report is not None and not report.closed:
            report.write(f"ERR {code} {message}\n")
            report.close()
        print(f"megafs: {message}", file=sys.stderr)
        return code

    try:
        trio.run(fn)
    except MountError as exc:
        return fail(str(exc), EXIT_MOUNTPOINT)
    except MegafsError as exc:
        return fail(_describe(exc), _exit_code_for(exc))
    except CliError as exc:
        return fail(str(exc), exc.code)
    except Exception as exc:
        log.exception("unexpected failure")
        return fail(f"unexpected error: {exc}", EXIT_ERROR)
    return EXIT_OK


def _describe(exc: MegafsError) -> str:
    if isinstance(exc, AuthFailed | RateLimited):
        return f"login failed: {exc.detail}"
    if isinstance(exc, RemoteError):
        return f"cannot reach the server: {exc.detail}"
    return exc.detail


def cmd_umount(args: argparse.Namespace, paths: Paths) -> int:
    """Unmount, then wait until the daemon has put every pending change on
    the server and exited."""
    import subprocess

    mountpoint = Path(args.mountpoint).absolute()
    pid = _daemon_pid(paths, mountpoint)
    cache_dir = _daemon_cache_dir(paths, mountpoint)
    if not _is_mounted(mountpoint):
        if pid is None:
            raise CliError(f"{mountpoint} is not mounted", EXIT_MOUNTPOINT)
    else:
        done = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise CliError(
                done.stderr.strip().removeprefix("fusermount3: ") or f"cannot unmount {mountpoint}",
                EXIT_MOUNTPOINT,
            )
    if pid is None:
        print(f"{mountpoint} unmounted")
        return EXIT_OK
    started = time.monotonic()
    told = False
    while _alive(pid):
        waited = time.monotonic() - started
        if args.timeout and waited > args.timeout:
            raise CliError(
                "unmounted, but changes are still uploading; they stay in the "
                "journal and finish on the next mount",
                EXIT_PENDING,
            )
        if not told and waited > 2:
            print("waiting for pending changes to reach the server...", file=sys.stderr)
            told = True
        time.sleep(0.1)
    left = _journal_left(cache_dir)
    if left:
        # The daemon stopped without uploading them: its session was refused
        # (or a second signal stopped it); its log says which.
        raise CliError(
            f"unmounted, but {left} changes did not reach the server (the daemon stopped: "
            f"see {cache_dir / 'daemon.log' if cache_dir else 'its log'}); they stay in the "
            "journal and upload on the next mount (if the session ended, log in again first)",
            EXIT_PENDING,
        )
    print(f"{mountpoint} unmounted; every change is on the server")
    return EXIT_OK


def _daemon_cache_dir(paths: Paths, mountpoint: Path) -> Path | None:
    """The cache directory the mount's pid file names (None if unknown)."""
    try:
        return Path(json.loads(paths.pid_file(mountpoint).read_text())["cache_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _journal_left(cache_dir: Path | None) -> int:
    """Changes an exited daemon left in its journal (0 if none or unknown):
    a daemon whose session the server refused stops without them."""
    import sqlite3

    from megafs.cache.state import journal_left

    if cache_dir is None or not (cache_dir / "state.sqlite3").exists():
        return 0
    try:
        return journal_left(cache_dir / "state.sqlite3")
    except (sqlite3.Error, OSError, ValueError):
        return 0


def _daemon_pid(paths: Paths, mountpoint: Path) -> int | None:
    try:
        data = json.loads(paths.pid_file(mountpoint).read_text())
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # our own child that has exited but is not reaped yet
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.status import cmd_status as status

    return status(args, paths)


def cmd_server(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.server.run import run_server, security_options

    return run_server(
        Path(args.data), args.listen, default_quota=args.quota, **security_options(args)
    )


def cmd_quickstart(args: argparse.Namespace, paths: Paths) -> int:
    from megafs.cli.quickstart import quickstart

    return quickstart(args, paths)


# -- wiring ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megafs",
        description="An end-to-end encrypted cloud drive, mounted as an ordinary folder.",
    )
    parser.add_argument("--version", action="version", version=f"megafs {__version__}")
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="configuration directory (default: $MEGAFS_CONFIG_DIR, else the "
        "XDG config dir, ~/.config/megafs)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common_auth(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="server address, e.g. https://drive.example.org")
        p.add_argument("email", help="account email")
        p.add_argument(
            "--password-file",
            metavar="F",
            help="read the password from the first line of F instead of asking",
        )
        p.add_argument(
            "--remember",
            action="store_true",
            help="keep the unlocked account key (desktop keyring, else a 0600 file) "
            "so mount needs no password",
        )
        p.add_argument(
            "--insecure", action="store_true", help="allow plain http:// to a non-loopback server"
        )

    from megafs.cli import security
    from megafs.server.run import add_security_arguments

    def session_options(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        """For commands that act as the logged-in account. ``nested``: on a
        sub-action, where a default would override the same option given
        before the action's name."""
        unset: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
        p.add_argument(
            "--password-file",
            metavar="F",
            **unset,
            help="read the password from the first line of F instead of asking "
            "(without remembered credentials, or where the password is needed again)",
        )
        p.add_argument(
            "--totp-code",
            metavar="CODE",
            help="two-factor code (or a recovery code) for the login, if the account needs one",
            **unset,
        )
        p.add_argument(
            "--insecure",
            action="store_true",
            help="allow plain http:// to a non-loopback server",
            **unset,
        )

    p = sub.add_parser(
        "signup",
        help="create an account on a server",
        description="Create an account. The password never leaves this "
        "machine; forgetting it makes the data unrecoverable.",
    )
    common_auth(p)
    p.set_defaults(func=cmd_signup)

    p = sub.add_parser(
        "login",
        help="log in to an existing account",
        description="Check the password (and the two-factor code, if the account "
        "has 2FA) against the server and record the account in the config dir. "
        "With --recovery-key, set a new password with the recovery key instead "
        "(--password-file then gives the new password).",
    )
    common_auth(p)
    p.add_argument(
        "--totp-code",
        metavar="CODE",
        help="two-factor code from the app, or a recovery code (asked for if needed)",
    )
    p.add_argument(
        "--recovery-key",
        action="store_true",
        help="forgot the password: set a new one with the recovery key (asked for)",
    )
    p.add_argument(
        "--recovery-key-file",
        metavar="F",
        help="like --recovery-key, reading the key from F",
    )
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="forget the account and any remembered key")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser(
        "mount",
        help="mount the drive on a folder",
        description="Mount the drive. Returns once the mount is live, unless --foreground.",
    )
    p.add_argument("mountpoint", help="an existing empty folder")
    p.add_argument("--password-file", metavar="F", help="read the password from F")
    p.add_argument(
        "--totp-code",
        metavar="CODE",
        help="two-factor code for a mount with the password (asked for with --foreground "
        "on a terminal; not needed with remembered credentials)",
    )
    p.add_argument(
        "--foreground",
        action="store_true",
        help="stay in the foreground (for systemd and debugging)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="D",
        help="local cache and journal (default: XDG cache dir, per account)",
    )
    p.add_argument(
        "--cache-size",
        metavar="SIZE",
        type=parse_size,
        default=parse_size("5G"),
        help="limit for cached data, e.g. 10G (default 5G); data not yet uploaded is never "
        "evicted, and writes get ENOSPC once it fills the cache while the server is unreachable",
    )
    p.add_argument(
        "--fsync-timeout",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="fsync fails with EIO after the server was unreachable this long (default 60)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="allow plain http:// to a non-loopback server"
    )
    p.add_argument(
        "--private",
        action="store_true",
        help="only the mounting user may enter the mount (default: every user, with permission "
        "bits checked by the kernel as on ext4, where FUSE allows it)",
    )
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount and finish uploads",
        description="Unmount; returns after every pending change is on the "
        "server and the daemon has exited.",
    )
    p.add_argument("mountpoint")
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=0,
        help="give up waiting for uploads after this long (exit code 8); they "
        "finish on the next mount (default: wait)",
    )
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "status",
        help="show how mounts are doing: pending uploads, cache, errors",
        description="Ask the daemon of MOUNTPOINT (default: of every megafs mount of "
        "this user) whether it is online, what waits for upload, how full the cache "
        "is, the last error and any conflicts. Exit code 9 if a daemon does not answer.",
    )
    p.add_argument("mountpoint", nargs="?", help="a megafs mount (default: all of them)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts (keys documented in docs/cli.md)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="how long to wait for each daemon's answer (default 5)",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "server",
        help="run the megafs server",
        description="Serve encrypted storage over HTTP. Stores only ciphertext.",
    )
    p.add_argument(
        "--data", metavar="DIR", required=True, help="directory for the database and chunks"
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:8377",
        help="address to listen on (default 127.0.0.1:8377)",
    )
    p.add_argument(
        "--quota",
        metavar="SIZE",
        type=parse_size,
        default=parse_size("50G"),
        help="storage quota of new accounts (default 50G)",
    )
    add_security_arguments(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser(
        "2fa",
        help="turn two-factor authentication on or off",
        description="Two-factor authentication (TOTP, any authenticator app): logins "
        "then need a code besides the password. It guards the account against a "
        "stolen password, not against the server (docs/security.md).",
    )
    twofa = p.add_subparsers(dest="twofa_command", required=True, metavar="ACTION")
    q = twofa.add_parser(
        "enable",
        help="show a new secret (QR code), then turn 2FA on with a first code",
        description="Without --code: make a new secret, show it as a link and a "
        "QR code, and ask for a first code (without a terminal, stop there). With "
        "--code: turn 2FA on with a code of the secret shown last. Prints "
        "single-use recovery codes once.",
    )
    q.add_argument("--code", metavar="CODE", help="a code from the app, for the secret shown")
    session_options(q)
    q.set_defaults(func=security.cmd_2fa_enable)
    q = twofa.add_parser(
        "disable",
        help="turn 2FA off (needs the password and a code)",
        description="Turn two-factor authentication off; needs the password and a "
        "code from the app or a recovery code.",
    )
    q.add_argument("--code", metavar="CODE", help="a code from the app, or a recovery code")
    q.add_argument("--password-file", metavar="F", help="read the password from F")
    q.add_argument(
        "--insecure", action="store_true", help="allow plain http:// to a non-loopback server"
    )
    q.set_defaults(func=security.cmd_2fa_disable)

    p = sub.add_parser(
        "sessions",
        help="list the account's sessions, or end some",
        description="List the account's sessions (devices, mounts, logins); * marks "
        "the one this command used. `sessions revoke ID` ends one, `sessions revoke "
        "--all-others` every other one; an ended session is refused at once.",
    )
    session_options(p)
    p.set_defaults(func=security.cmd_sessions)
    actions = p.add_subparsers(dest="sessions_command", metavar="ACTION")
    q = actions.add_parser("revoke", help="end a session (or all others)")
    q.add_argument("id", nargs="?", help="the session's ID, as listed")
    q.add_argument("--all-others", action="store_true", help="every session but this one")
    session_options(q, nested=True)
    q.set_defaults(func=security.cmd_sessions)

    p = sub.add_parser(
        "passwd",
        help="change the password",
        description="Change the password: the account key is re-wrapped under the "
        "new one (no file is re-encrypted) and every other session ends.",
    )
    session_options(p)
    p.add_argument(
        "--new-password-file", metavar="F", help="read the new password from F instead of asking"
    )
    p.set_defaults(func=security.cmd_passwd)

    p = sub.add_parser(
        "recovery-key",
        help="make a recovery key (resets a forgotten password)",
        description="Make a random recovery key and print it once; the server keeps "
        "the account key wrapped under it. `megafs login URL EMAIL --recovery-key` "
        "then sets a new password. A new key replaces the old one. Without the "
        "password and the recovery key, the data cannot be recovered.",
    )
    session_options(p)
    p.set_defaults(func=security.cmd_recovery_key)

    p = sub.add_parser(
        "quickstart",
        help="local server + account + mount, in one step",
        description="Start a server on this machine (reused if running), create "
        "an account on first run (its key remembered), and mount.",
    )
    p.add_argument("mountpoint", nargs="?", default=str(Path.home() / "Mega"))
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:8377",
        help="where the local server listens (default 127.0.0.1:8377)",
    )
    p.add_argument("--cache-size", metavar="SIZE", type=parse_size, default=parse_size("5G"))
    p.set_defaults(func=cmd_quickstart)
    return parser


def _configure_logging(*, verbose: bool, daemon: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO if daemon else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "megafs: %(message)s"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("hpack", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    daemon_like = args.command == "server" or getattr(args, "foreground", False)
    _configure_logging(verbose=args.verbose, daemon=daemon_like)
    if args.command != "server":
        # `megafs ... | head` ends quietly. Not the server: with SIGPIPE at its
        # default, a client closing its connection while the server wrote an
        # answer killed the whole server (exit -13) instead of one request.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    paths = Paths.from_option(args.config_dir)
    try:
        code = args.func(args, paths)
    except CliError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        code = exc.code
    except MegafsError as exc:
        print(f"megafs: {_describe(exc)}", file=sys.stderr)
        code = _exit_code_for(exc)
    except ValueError as exc:
        print(f"megafs: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
