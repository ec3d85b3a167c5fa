"""A remounted drive lists folders from its local copy of the server's
listings, which the change feed keeps exact: no request for a folder no
one changed, and every change another device made meanwhile shows.

What is checked is the tree a user sees (names, kinds, contents) against
the other device's, and which folders cost a listing request (from the
server's request log), never a time.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.drive import Drive
from tests.helpers.proxy import (
    Error,
    Forward,
    Hook,
    Proxy,
    ProxyRequest,
    ProxyResponse,
    running_proxy,
)
from tests.helpers.server import ServerProcess
from tests.mount.test_crash import kill_daemon, wait_uploaded

pytestmark = pytest.mark.mount

_GET_NODE = re.compile(rb"request method=GET path=/v1/nodes/[0-9a-f]{32}(/children)? status=200")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> file content (None for a folder)."""
    seen: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            seen[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                seen[os.path.relpath(path, root)] = f.read()
    return seen


def _mount_and_walk(
    drive: Drive, server: ServerProcess, *, nodes: int | None = None
) -> tuple[dict[str, bytes | None], int]:
    """Mount ``drive`` on its cache and walk it, reading every file: the
    tree it shows, and how many folder listings that cost the server (from
    its request log). ``nodes``: how many single nodes it may have fetched."""
    mark = server.log_path.stat().st_size
    drive.mount()
    tree = _tree(drive.mnt)
    fetched = _GET_NODE.findall(server.log_since(mark))
    if nodes is not None:
        assert fetched.count(b"") == nodes, fetched
    return tree, fetched.count(b"/children")


@contextmanager
def _laptop_and_desktop(root: Path, url: str) -> Iterator[tuple[Drive, Drive]]:
    """Two devices of one account, neither mounted yet."""
    laptop = Drive(root / "laptop", url)
    desktop = Drive(root / "desktop", url)
    laptop.signup()
    desktop.login()
    try:
        yield laptop, desktop
    finally:
        laptop.cleanup()
        desktop.cleanup()


def _make(root: Path) -> None:
    for folder in ("docs", "photos/2026", "photos/2025", "music", "untouched/deep"):
        (root / folder).mkdir(parents=True)
    for i in range(5):
        (root / "docs" / f"note-{i}.txt").write_bytes(b"note %d\n" % i)
        (root / "photos/2026" / f"img-{i}.jpg").write_bytes(os.urandom(3000 + i))
        (root / "untouched/deep" / f"f{i}").write_bytes(b"still %d" % i)
    (root / "music" / "song.ogg").write_bytes(os.urandom(70_000))
    (root / "photos/2025" / "old.jpg").write_bytes(b"old")
    (root / "untouched" / "readme").write_bytes(b"read me")


def test_a_remount_lists_unchanged_folders_locally_and_sees_other_devices_changes(
    tmp_path: Path, server: ServerProcess
) -> None:
    with _laptop_and_desktop(tmp_path, server.url) as (laptop, desktop):
        laptop.mount()
        _make(laptop.mnt)
        made = _tree(laptop.mnt)
        laptop.umount()

        # Nothing changed: the whole tree comes from the local copy.
        # (The root's own node is fetched at every mount; the files' contents,
        # too big to travel in a listing, come from the local copy too.)
        assert _mount_and_walk(laptop, server, nodes=1) == (made, 0)
        laptop.umount()

        # Another device changes some folders while the laptop is away.
        desktop.mount()
        b = desktop.mnt
        (b / "docs" / "new.txt").write_bytes(b"made on the desktop")
        (b / "docs" / "note-0.txt").rename(b / "docs" / "renamed.txt")
        (b / "docs" / "note-1.txt").write_bytes(b"rewritten")
        (b / "photos/2026" / "img-0.jpg").unlink()
        (b / "photos/2026" / "img-1.jpg").rename(b / "photos/2025" / "moved.jpg")
        (b / "music" / "song.ogg").unlink()
        (b / "music").rmdir()
        (b / "fresh").mkdir()
        (b / "fresh" / "inside").write_bytes(b"new folder, new file")
        expected = _tree(b)
        desktop.umount()

        # Listed again: the root, docs, both photo folders (a child left or
        # came in) and the new folder; not "photos", "untouched" or
        # "untouched/deep". A deletion alone (music's song) needs no listing.
        assert _mount_and_walk(laptop, server) == (expected, 5)
        laptop.umount()


def test_a_feed_that_forgot_deletes_makes_a_remount_list_everything_again(
    tmp_path: Path, server: ServerProcess
) -> None:
    with _laptop_and_desktop(tmp_path, server.url) as (laptop, desktop):
        laptop.mount()
        _make(laptop.mnt)
        laptop.umount()

        desktop.mount()
        for i in range(5):
            (desktop.mnt / "untouched/deep" / f"f{i}").unlink()
        (desktop.mnt / "untouched/deep").rmdir()
        expected = _tree(desktop.mnt)
        desktop.umount()
        # Restarted with no retention, the server forgets those deletes, so
        # the laptop's cursor expires: nothing it kept can be trusted.
        server.stop()
        server.args += ["--change-retention-days", "0"]
        started = server.log_path.stat().st_size
        server.start()
        deadline = time.monotonic() + 30  # the first collection runs as the server starts
        while b"tombstones deleted" not in server.log_path.read_bytes()[started:]:
            assert time.monotonic() < deadline, "no garbage collection"
            time.sleep(0.1)

        folders = sum(1 for v in expected.values() if v is None) + 1
        assert _mount_and_walk(laptop, server) == (expected, folders)


def test_a_damaged_kept_manifest_is_fetched_again(tmp_path: Path, server: ServerProcess) -> None:
    with _laptop_and_desktop(tmp_path, server.url) as (laptop, _):
        laptop.mount()
        _make(laptop.mnt)
        made = _tree(laptop.mnt)
        laptop.umount()
        # Flip one byte of every kept manifest too big to stay in memory
        # with its listing (the photos): they no longer open.
        with sqlite3.connect(laptop.cache / "state.sqlite3") as db:
            rows = db.execute("SELECT id, content FROM nodes WHERE length(content) > 1024")
            damaged = [(bytes(c[:-1]) + bytes([c[-1] ^ 1]), i) for i, c in rows.fetchall()]
            assert damaged
            db.executemany("UPDATE nodes SET content = ? WHERE id = ?", damaged)
        # Each is fetched from the server instead: the right bytes, a log line.
        assert _mount_and_walk(laptop, server, nodes=1 + len(damaged)) == (made, 0)
        assert laptop.daemon_log().count("the kept manifest does not open") == len(damaged)
        laptop.umount()


def _land_while_listing(proxy: Proxy) -> tuple[threading.Event, Hook]:
    """Hold the next node commit until a folder listing has been asked of
    the server, and that listing's answer until the commit has landed: a
    change of ours lands between a listing and its answer. Returns the
    event set once it landed, and the listing's hook."""
    listed, landed = threading.Event(), threading.Event()

    def listing(request: ProxyRequest, forward: Forward) -> ProxyResponse:
        answer = forward()
        listed.set()
        landed.wait(30)
        time.sleep(0.5)  # the daemon takes in the commit's answer first
        return answer

    def commit(request: ProxyRequest, forward: Forward) -> ProxyResponse:
        listed.wait(30)
        answer = forward()
        landed.set()
        return answer

    proxy.on(commit, method="POST", path="/v1/nodes/batch", times=1)
    hook = proxy.on(listing, method="GET", path=r"/v1/nodes/[0-9a-f]{32}/children", times=1)
    return landed, hook


def test_a_folder_listed_while_the_last_runs_files_land_shows_them(
    tmp_path: Path, server: ServerProcess
) -> None:
    """A file saved in an earlier run, still in the journal, lands on the
    server while its folder is being listed for the first time: the
    listing is made before it lands and answered after. The file shows,
    readable; it used to be in neither the listing nor, by then, the
    journal, and was missing until the next mount."""
    with (
        running_proxy(server.url) as proxy,
        _laptop_and_desktop(tmp_path, proxy.url) as (laptop, desktop),
    ):
        laptop.mount()
        (laptop.mnt / "docs").mkdir()
        (laptop.mnt / "docs" / "old.txt").write_bytes(b"on the server")
        laptop.umount()

        refused = proxy.on(lambda *_: Error(503), method="POST", path="/v1/nodes/batch")
        laptop.mount()
        (laptop.mnt / "docs" / "new.txt").write_bytes(b"in the journal")
        kill_daemon(laptop)
        refused.remove()

        # Another device adds to docs, so the laptop lists it from the server.
        desktop.mount()
        (desktop.mnt / "docs" / "theirs.txt").write_bytes(b"from the desktop")
        desktop.umount()

        landed, listing = _land_while_listing(proxy)
        laptop.mount()
        assert sorted(os.listdir(laptop.mnt / "docs")) == ["new.txt", "old.txt", "theirs.txt"]
        assert listing.calls == 1 and landed.is_set()
        assert (laptop.mnt / "docs" / "new.txt").read_bytes() == b"in the journal"
        laptop.umount()


def test_a_file_landing_while_the_feed_lists_again_stays(
    tmp_path: Path, server: ServerProcess
) -> None:
    """The change feed loses track of a mounted drive (410), so the daemon
    lists its loaded folders again and drops what is gone from them. A file
    saved just before, landing on the server between that listing and its
    answer, is not gone: it stays, readable."""
    with running_proxy(server.url) as proxy:
        drive = Drive(tmp_path / "alice", proxy.url)
        drive.signup()
        try:
            expire = threading.Event()

            def feed(request: ProxyRequest, forward: Forward) -> ProxyResponse:
                if expire.is_set():
                    expire.clear()
                    return ProxyResponse.json_answer(
                        {"error": "cursor_expired", "detail": "forgotten"}, 410
                    )
                # No long polls: the daemon asks again every half second.
                return forward(
                    request.replace(path=re.sub(r"wait=[0-9.]+", "wait=0", request.path))
                )

            proxy.on(feed, method="GET", path="/v1/changes")
            drive.mount()
            (drive.mnt / "old.txt").write_bytes(b"on the server")
            wait_uploaded(drive)
            landed, relisted = _land_while_listing(proxy)
            (drive.mnt / "new.txt").write_bytes(b"landing")
            expire.set()
            deadline = time.monotonic() + 30
            while not (relisted.calls and landed.is_set()):
                assert time.monotonic() < deadline, "the folders were not listed again"
                time.sleep(0.1)
            time.sleep(1)  # the listing's answer is applied
            assert sorted(os.listdir(drive.mnt)) == ["new.txt", "old.txt"]
            assert (drive.mnt / "new.txt").read_bytes() == b"landing"
            drive.umount()
        finally:
            drive.cleanup()
