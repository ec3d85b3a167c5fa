"""A mount whose session dies (issue #7): revoked from another device of the
same account, or ended by a password change there. The mount keeps working
locally, its writes wait in the journal, ``megafs status`` says what
happened and what to do, the daemon log says it once, the daemon never
tries to log in by itself, the unmount keeps the journal (exit code 8) and
frees the cache directory, and after logging in again and mounting, every
change reaches the server (read back from another device). Real server,
real mounts, real CLI."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess

pytestmark = pytest.mark.mount

EXIT_PENDING = 8
NEW_PASSWORD = "a brand new password, changed elsewhere"


def _status(drive: Drive) -> dict[str, Any]:
    return json.loads(drive.cli("status", str(drive.mnt), "--json").stdout)


def _wait_status(drive: Drive, what: str, check: Any, timeout: float = 90) -> dict[str, Any]:
    """Poll ``status --json`` until ``check(doc)``; a generous deadline, not a
    timing claim."""
    deadline = time.monotonic() + timeout
    while True:
        doc = _status(drive)
        if check(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}; last status: {doc}")
        time.sleep(0.2)


def _read_tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for a folder)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def _logins(server: ServerProcess) -> list[str]:
    """The server's log lines of login requests (one per request)."""
    return [line for line in server.log().splitlines() if "path=/v1/login " in line]


def _refused(server: ServerProcess) -> list[str]:
    """The server's log lines of requests refused for their session."""
    return [line for line in server.log().splitlines() if " status=401 " in line]


def _end_the_session(how: str, drive: Drive, phone: Drive) -> None:
    """From ``phone`` (another device of the account), end the session the
    mount of ``drive`` uses."""
    pw = ("--password-file", str(phone.password_file))
    if how == "revoke-id":
        listed = phone.cli("sessions", *pw).stdout
        others = re.findall(r"^  ([0-9a-f]{16}) ", listed, re.MULTILINE)
        assert len(others) == 1, f"expected the mount's session only:\n{listed}"
        phone.cli("sessions", "revoke", others[0], *pw)
    else:
        new = phone.root / "new-password"
        new.write_text(NEW_PASSWORD + "\n")
        phone.cli("passwd", *pw, "--new-password-file", str(new))
        for device in (drive, phone):
            device.password_file.write_text(NEW_PASSWORD + "\n")


@pytest.mark.parametrize(
    ("how", "remember"),
    # (``sessions revoke --all-others`` ends sessions as ``passwd`` does:
    # tests/integration/test_sessions.py covers the command.)
    [("revoke-id", True), ("passwd", False)],
)
def test_a_mount_whose_session_dies(
    drive: Drive, server: ServerProcess, tmp_path: Path, how: str, remember: bool
) -> None:
    login = ("login", drive.url, drive.email, "--password-file", str(drive.password_file))
    if remember:
        drive.cli(*login, "--remember")
    drive.mount()
    mnt = drive.mnt
    (mnt / "before.txt").write_bytes(b"on the server\n")
    pid = _wait_status(drive, "the first upload", lambda s: s["pending_files"] == 0)["pid"]

    phone = Drive(tmp_path / "phone", server.url, email=drive.email)
    try:
        phone.login()
        _end_the_session(how, drive, phone)
        logins_before = len(_logins(server))
        refused_before = len(_refused(server))

        # Writes of every kind still succeed, locally.
        with open(mnt / "before.txt", "ab") as f:
            f.write(b"and appended to after the session died\n")
        (mnt / "after.txt").write_bytes(b"written after the session died")
        (mnt / "made/deep").mkdir(parents=True)
        (mnt / "made/deep/f.bin").write_bytes(os.urandom(70_000))
        expected = _read_tree(mnt)
        assert expected["before.txt"] == (
            b"on the server\nand appended to after the session died\n"
        )

        doc = _wait_status(
            drive, "the mount to report the dead session", lambda s: s["last_error"] is not None
        )
        error = doc["last_error"]
        assert error.startswith("AuthFailed: this mount's session has ended"), error
        for advice in ("revoked", "password was changed", "log in again", "mount again"):
            assert advice in error, error
        assert doc["online"] is False and doc["pending_files"] > 0
        # Said once in the log, not once per retry.
        deadline = time.monotonic() + 60
        while len(_refused(server)) < refused_before + 2:
            assert time.monotonic() < deadline, "the daemon stopped asking the server"
            time.sleep(0.2)
        said = [line for line in drive.daemon_log().splitlines() if "refused the session" in line]
        assert len(said) == 1, drive.daemon_log()
        # The daemon never logs in by itself: no failed login counts against
        # the account.
        assert len(_logins(server)) == logins_before, _logins(server)

        # The unmount does not wait for what cannot upload: the daemon
        # stops, keeping the journal, and frees the cache for the next mount.
        done = drive.cli("umount", str(mnt), "--timeout", "60", check=False)
        assert done.returncode == EXIT_PENDING, (done.stdout, done.stderr)
        assert "journal" in done.stderr
        assert not os.path.ismount(mnt)
        assert _gone(pid)
        assert "still in the journal" in drive.daemon_log()

        # Log in again, mount: everything goes up.
        if remember:
            drive.cli(*login, "--remember")
        drive.mount()
        assert _read_tree(mnt) == expected
        drive.umount()  # returns once every change is on the server

        # Another device, its own cache: every change is there.
        phone.mount()
        assert _read_tree(phone.mnt) == expected
        phone.umount()
    finally:
        phone.cleanup()
