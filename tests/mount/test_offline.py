"""Working without the server (issue #6): a mount started or left running
while the server is down reads what is cached, queues changes in the
journal (ENOSPC once they fill the cache, never a hang) and puts them all
on the server once it is back. Real server, real mounts, real CLI."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import wait_for

pytestmark = pytest.mark.mount

EXIT_AUTH = 3
EXIT_PENDING = 8


def _read_tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for a folder)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _status(drive: Drive) -> dict[str, Any]:
    return json.loads(drive.cli("status", str(drive.mnt), "--json").stdout)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _umount_offline(drive: Drive) -> None:
    """`umount --timeout` returns (exit 8) while the server is down, the
    daemon keeping the changes; a further SIGTERM stops it, leaving them in
    the journal for the next mount."""
    pid = _status(drive)["pid"]
    done = drive.cli("umount", str(drive.mnt), "--timeout", "1", check=False)
    assert done.returncode == EXIT_PENDING, done.stderr
    assert not os.path.ismount(drive.mnt)
    assert not _gone(pid), "the daemon gave up its changes"
    os.kill(pid, signal.SIGTERM)
    wait_for("the daemon to exit", lambda: _gone(pid), timeout=30)


def test_offline_start_changes_and_sync(
    drive: Drive, server: ServerProcess, tmp_path: Path
) -> None:
    big = os.urandom(3 * CHUNK_SIZE + 123)
    drive.mount()
    (drive.mnt / "docs").mkdir()
    (drive.mnt / "old").mkdir()
    files = {
        "keep.txt": b"kept while offline\n",
        "big.bin": big,
        "docs/a.txt": b"A" * 5000,
        "docs/b.txt": b"to be deleted offline",
        "old/x.txt": b"x",
    }
    for rel, data in files.items():
        (drive.mnt / rel).write_bytes(data)
    drive.umount()

    server.stop()
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    refused = drive.cli(
        "mount",
        str(drive.mnt),
        "--password-file",
        str(wrong),
        "--cache-dir",
        str(drive.cache),
        check=False,
    )
    assert refused.returncode == EXIT_AUTH, refused.stderr
    assert not os.path.ismount(drive.mnt)

    started = drive.mount()
    assert "started offline" in started.stderr
    mnt = drive.mnt
    # Cached files read as they were.
    assert (mnt / "big.bin").read_bytes() == big
    assert (mnt / "docs/a.txt").read_bytes() == files["docs/a.txt"]
    # Changes of every kind, with ids made here.
    new_big = os.urandom(2 * CHUNK_SIZE + 7)
    (mnt / "new.txt").write_bytes(b"written offline")
    (mnt / "new-big.bin").write_bytes(new_big)
    with open(mnt / "keep.txt", "ab") as f:
        f.write(b"and appended to\n")
    (mnt / "moved").mkdir()
    (mnt / "big.bin").rename(mnt / "moved/big.bin")
    (mnt / "docs/a.txt").rename(mnt / "docs/a-renamed.txt")
    (mnt / "docs/b.txt").unlink()
    (mnt / "old/x.txt").unlink()
    (mnt / "old").rmdir()
    (mnt / "fresh/sub").mkdir(parents=True)
    (mnt / "fresh/sub/f.txt").write_bytes(b"deep")
    expected = {
        "docs": None,
        "docs/a-renamed.txt": files["docs/a.txt"],
        "fresh": None,
        "fresh/sub": None,
        "fresh/sub/f.txt": b"deep",
        "keep.txt": b"kept while offline\nand appended to\n",
        "moved": None,
        "moved/big.bin": big,
        "new-big.bin": new_big,
        "new.txt": b"written offline",
    }
    assert _read_tree(mnt) == expected
    status = _status(drive)
    assert status["online"] is False
    assert status["pending_files"] > 0
    _umount_offline(drive)

    # Started offline again, from the cache and the journal the last run left.
    started = drive.mount()
    assert "started offline" in started.stderr
    assert _read_tree(mnt) == expected
    _umount_offline(drive)

    server.start()
    started = drive.mount()
    assert "offline" not in started.stderr
    assert _read_tree(mnt) == expected
    drive.umount()  # returns once every change is on the server

    drive.drop_cache()
    drive.mount()
    assert _read_tree(mnt) == expected
    drive.umount()


def test_server_stops_while_mounted(drive: Drive, server: ServerProcess) -> None:
    drive.mount()
    mnt = drive.mnt
    cached = os.urandom(CHUNK_SIZE + 1)
    (mnt / "cached.bin").write_bytes(cached)
    (mnt / "dir").mkdir()
    (mnt / "dir/small.txt").write_bytes(b"small")
    wait_for("the first files to upload", lambda: _status(drive)["pending_files"] == 0, timeout=90)

    server.stop()
    later = os.urandom(2 * CHUNK_SIZE)
    (mnt / "later.bin").write_bytes(later)
    (mnt / "dir/small.txt").rename(mnt / "dir/renamed.txt")
    (mnt / "dir/more.txt").write_bytes(b"more")
    assert (mnt / "cached.bin").read_bytes() == cached
    wait_for("the mount to notice", lambda: _status(drive)["online"] is False, timeout=90)
    assert _status(drive)["pending_files"] > 0

    server.start()

    def synced() -> bool:
        s = _status(drive)
        return bool(s["online"] and s["pending_files"] == 0 and s["pending_chunks"] == 0)

    wait_for("the changes to reach the server", synced, timeout=90)
    expected = {
        "cached.bin": cached,
        "dir": None,
        "dir/more.txt": b"more",
        "dir/renamed.txt": b"small",
        "later.bin": later,
    }
    assert _read_tree(mnt) == expected
    drive.umount()

    drive.drop_cache()
    drive.mount()
    assert _read_tree(mnt) == expected
    drive.umount()


def test_enospc_when_changes_fill_the_cache_offline(drive: Drive, server: ServerProcess) -> None:
    """Remembered login (no password at mount), a 3 MiB cache, no server."""
    drive.cli(
        "login", drive.url, drive.email, "--password-file", str(drive.password_file), "--remember"
    )
    drive.mount()
    (drive.mnt / "seed.txt").write_bytes(b"seen online")  # the root is listed, so cached
    drive.umount()
    server.stop()

    started = drive.mount("--cache-size", "3M")
    assert "started offline" in started.stderr
    mnt = drive.mnt
    first = os.urandom(CHUNK_SIZE + 99)
    (mnt / "first.bin").write_bytes(first)
    too_much = os.urandom(8 * CHUNK_SIZE)
    with pytest.raises(OSError) as failure, open(mnt / "too-much.bin", "wb") as f:
        f.write(too_much)
        f.flush()
    assert failure.value.errno == errno.ENOSPC
    # What was queued before is intact, and small changes still fit.
    assert (mnt / "first.bin").read_bytes() == first
    (mnt / "note.txt").write_bytes(b"still writable")

    server.start()
    wait_for("room in the cache", lambda: _status(drive)["pending_chunks"] == 0, timeout=90)
    # Online, a file larger than the cache goes through: writes wait for
    # uploads to make room.
    (mnt / "too-much.bin").write_bytes(too_much)
    drive.umount()

    drive.drop_cache()
    drive.mount()
    assert (mnt / "first.bin").read_bytes() == first
    assert (mnt / "too-much.bin").read_bytes() == too_much
    assert (mnt / "note.txt").read_bytes() == b"still writable"
    assert (mnt / "seed.txt").read_bytes() == b"seen online"
    drive.umount()
