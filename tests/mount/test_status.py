"""``megafs status``: the real CLI asking real mount daemons.

Every test runs with its own ``XDG_RUNTIME_DIR`` (a short folder in /tmp:
socket paths are limited to 107 bytes), so the status sockets of other
test runs on this machine never answer here. Other runs' megafs *mounts*
are visible in the shared mount table all the same, so tests listing every
mount only look at their own entries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import daemon_pid

pytestmark = pytest.mark.mount

#: Every key of a status document (docs/cli.md, § megafs status).
KEYS = {
    "format",
    "mountpoint",
    "pid",
    "state",
    "server",
    "email",
    "online",
    "offline_seconds",
    "pending_files",
    "pending_chunks",
    "pending_bytes",
    "cache_used_bytes",
    "cache_limit_bytes",
    "last_error",
    "conflicts",
    "committed",
    "uploaded_chunks",
}


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private XDG_RUNTIME_DIR, inherited by the CLI and the daemons."""
    path = Path(tempfile.mkdtemp(prefix="mfs-run-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def status(drive: Drive, *args: str) -> subprocess.CompletedProcess[str]:
    return drive.cli("status", *args, check=False, timeout=60)


def status_json(drive: Drive, mountpoint: Path) -> dict[str, Any]:
    proc = status(drive, str(mountpoint), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


def wait_status(drive: Drive, what: str, check: Any, deadline: float = 60) -> dict[str, Any]:
    """Poll ``status --json`` until ``check(doc)`` holds."""
    end = time.monotonic() + deadline
    while True:
        doc = status_json(drive, drive.mnt)
        if check(doc):
            return doc
        assert time.monotonic() < end, f"status never showed {what}: {doc}"
        time.sleep(0.2)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def force_unmount(mountpoint: Path) -> None:
    """After the daemon was killed: ``ismount`` is False on a dead FUSE mount
    (stat fails with ENOTCONN), so Drive.cleanup would not unmount it."""
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


# -- a healthy mount ----------------------------------------------------------------


def test_status_of_a_mount(drive: Drive, runtime_dir: Path) -> None:
    drive.mount("--cache-size", "300M")
    data = os.urandom(3 << 20)
    (drive.mnt / "photo.raw").write_bytes(data)
    doc = status_json(drive, drive.mnt)
    assert set(doc) == KEYS
    assert doc["format"] == 1
    assert doc["mountpoint"] == str(drive.mnt.resolve())
    assert doc["pid"] == daemon_pid(drive.config)
    assert doc["state"] == "mounted"
    assert doc["server"] == drive.url
    assert doc["email"] == drive.email
    assert doc["cache_limit_bytes"] == 300 << 20
    assert doc["conflicts"] == []
    assert isinstance(doc["online"], bool)
    for key in ("pending_files", "pending_chunks", "pending_bytes", "cache_used_bytes"):
        assert isinstance(doc[key], int) and doc[key] >= 0, key
    # The 3 MiB file was sealed into the cache when closed; it stays cached
    # after upload (the limit is far away).
    assert doc["cache_used_bytes"] >= len(data)

    done = wait_status(
        drive,
        "everything uploaded",
        lambda d: d["pending_files"] == 0 and d["pending_chunks"] == 0,
    )
    assert done["pending_bytes"] == 0
    assert done["online"] is True and done["offline_seconds"] == 0
    assert done["committed"] >= 1 and done["uploaded_chunks"] >= 3
    assert done["last_error"] is None

    human = status(drive, str(drive.mnt))
    assert human.returncode == 0, human.stderr
    assert str(drive.mnt.resolve()) in human.stdout
    assert drive.email in human.stdout and drive.url in human.stdout
    assert "every change is on the server" in human.stdout
    assert "300.0 MiB" in human.stdout
    # The socket lives in the private runtime dir, and only there.
    sockets = list((runtime_dir / "megafs").glob("*.sock"))
    assert len(sockets) == 1
    assert (runtime_dir / "megafs").stat().st_mode & 0o777 == 0o700
    drive.umount()
    assert list((runtime_dir / "megafs").glob("*.sock")) == []
    one_line_error(status(drive, str(drive.mnt)), 6, "is not mounted")


def test_status_while_offline_and_while_draining(drive: Drive, server: ServerProcess) -> None:
    """With the server down, changes pile up and status says so; after
    ``umount --timeout`` gives up, the daemon still answers ("unmounting")
    until the server is back and the last change is up."""
    drive.mount()
    os.listdir(drive.mnt)  # a folder is listed from the server once, before it goes
    server.kill()
    size = 2 << 20
    for i in range(3):
        (drive.mnt / f"offline-{i}.bin").write_bytes(os.urandom(size))
    doc = wait_status(
        drive,
        "offline with the three files pending",
        lambda d: not d["online"] and d["pending_files"] >= 3,
    )
    assert doc["pending_bytes"] >= 3 * size
    assert doc["pending_chunks"] >= 6
    assert doc["last_error"]
    human = status(drive, str(drive.mnt))
    assert human.returncode == 0 and "OFFLINE" in human.stdout, human.stdout

    proc = drive.cli("umount", str(drive.mnt), "--timeout", "1", check=False)
    assert proc.returncode == 8, proc.stderr
    draining = status_json(drive, drive.mnt)
    assert draining["state"] == "unmounting"
    assert draining["pending_files"] >= 3
    # Gone from the mount table, the draining daemon is still listed.
    listed = json.loads(status(drive, "--json").stdout)
    ours = [d for d in listed if d["mountpoint"] == str(drive.mnt.resolve())]
    assert len(ours) == 1 and ours[0]["state"] == "unmounting", ours

    server.start()
    pid = draining["pid"]
    end = time.monotonic() + 120
    while _alive(pid):
        assert time.monotonic() < end, "the daemon never finished uploading"
        time.sleep(0.2)
    one_line_error(status(drive, str(drive.mnt)), 6, "is not mounted")
    drive.drop_cache()
    drive.mount()
    for i in range(3):
        assert (drive.mnt / f"offline-{i}.bin").stat().st_size == size
    drive.umount()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_status_of_every_mount(drive: Drive, server: ServerProcess, tmp_path: Path) -> None:
    # A space in the path: the mount table escapes it (\040).
    bob = Drive(tmp_path / "bob's drive", server.url, email="bob@example.org")
    bob.signup()
    try:
        drive.mount()
        bob.mount()
        proc = status(drive, "--json")
        docs = json.loads(proc.stdout)
        assert isinstance(docs, list)
        by_mount = {d["mountpoint"]: d for d in docs}
        alice_doc = by_mount[str(drive.mnt.resolve())]
        bob_doc = by_mount[str(bob.mnt.resolve())]
        assert alice_doc["email"] == drive.email and bob_doc["email"] == bob.email
        assert alice_doc["pid"] != bob_doc["pid"]
        # Other test runs' mounts may be listed too; a mount that did not
        # answer (theirs: their sockets are elsewhere) makes the code 9.
        silent = [d for d in docs if "error" in d]
        assert proc.returncode == (9 if silent else 0), proc.stderr
        assert all(set(d) == KEYS for d in docs if "error" not in d)

        human = status(drive)
        assert str(drive.mnt.resolve()) in human.stdout
        assert str(bob.mnt.resolve()) in human.stdout
        bob.umount()
        docs = json.loads(status(drive, "--json").stdout)
        assert str(bob.mnt.resolve()) not in [d["mountpoint"] for d in docs]
        drive.umount()
    finally:
        bob.cleanup()


# -- errors ---------------------------------------------------------------------------


def test_not_a_megafs_mount(drive: Drive, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(status(drive, str(empty)), 6, "is not mounted")
    one_line_error(status(drive, str(tmp_path / "missing")), 6, "does not exist")
    one_line_error(status(drive, "/proc"), 6, "is not a megafs mount")
    one_line_error(status(drive, "/proc", "--json"), 6, "is not a megafs mount")


def test_stopped_and_killed_daemon(drive: Drive) -> None:
    drive.mount()
    pid = daemon_pid(drive.config)
    os.kill(pid, signal.SIGSTOP)
    try:
        # (Without --timeout working, the CLI would wait forever and the
        # subprocess's own 60 s limit would fail the test.)
        proc = status(drive, str(drive.mnt), "--timeout", "1")
        one_line_error(proc, 9, "does not answer")
        assert proc.stdout == ""
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status_json(drive, drive.mnt)["pid"] == pid

    os.kill(pid, signal.SIGKILL)
    try:
        end = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < end
            time.sleep(0.05)
        one_line_error(status(drive, str(drive.mnt)), 9, "not running")
        proc = status(drive, "--json")
        assert proc.returncode == 9
        dead = [d for d in json.loads(proc.stdout) if d["mountpoint"] == str(drive.mnt.resolve())]
        assert len(dead) == 1 and "not running" in dead[0]["error"], dead
        assert "did not answer" in proc.stderr
    finally:
        force_unmount(drive.mnt)
    one_line_error(status(drive, str(drive.mnt)), 6, "is not mounted")
