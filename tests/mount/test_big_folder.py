"""One folder with tens of thousands of entries, end to end (issue #4).

The test has no timing assertion. It guards against quadratic costs in two
ways that do not depend on the machine's speed:

- it counts the server requests a cold listing costs (from the server's
  request log): listing N entries must cost about N / ``LIST_PAGE_MAX``
  page requests and no request per entry, however fast the machine is;
- it is sized (``ENTRIES``) so that the whole test takes well under a
  minute while every step is linear, and minutes once one step becomes
  quadratic in the folder's size: a regression shows up as a test that
  suddenly dominates the suite's run time.

``scripts/bench-bigdir`` measures the same steps at 10 000 to 100 000
entries (docs/posix.md, "Big folders").
"""

from __future__ import annotations

import errno
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megafs.wire import LIST_PAGE_MAX
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess

pytestmark = pytest.mark.mount

#: Ten listing pages. Creating them is most of the test's run time (about
#: 3 ms per file on a loaded 2-core machine).
ENTRIES = 10_000
#: Names the kernel and megafs must carry through the same big folder:
#: the longest allowed, bytes that are not UTF-8, and a few look-alikes.
ODD_NAMES = [
    b"L" * 255,
    b"\xff\xfe not utf-8 \x80",
    b"-leading dash",
    b"new\nline",
    b" spaced ",
    b"\xc3\xa9t\xc3\xa9 (utf-8)",
]
_REQUEST = re.compile(rb"request method=(\S+) path=(\S+) status=(\S+)")
_NODE_ID = re.compile(rb"[0-9a-f]{32}")


def _create(folder: Path, names: list[bytes]) -> None:
    """Create empty files, four threads at a time: each ``open`` waits for
    the daemon, so a few in flight keep it busy without a slow loop."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY

    def make(chunk: list[bytes]) -> None:
        for name in chunk:
            os.close(os.open(name, flags, 0o644, dir_fd=fd))

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(make, [names[i::4] for i in range(4)]))
    finally:
        os.close(fd)


def _stat_all(folder: Path, names: list[bytes]) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.stat(name, dir_fd=fd)
    finally:
        os.close(fd)


def _requests_since(server: ServerProcess, offset: int) -> Counter[tuple[str, str]]:
    """Requests the server logged after byte ``offset`` of its log, by
    method and path shape (node ids replaced by ``ID``)."""
    text = server.log_since(offset)
    counts: Counter[tuple[str, str]] = Counter()
    for method, path, _ in _REQUEST.findall(text):
        counts[(method.decode(), _NODE_ID.sub(b"ID", path).decode())] += 1
    return counts


def test_big_folder_lists_and_looks_up_in_linear_cost(drive: Drive, server: ServerProcess) -> None:
    drive.mount()
    big = drive.mnt / "big"
    big.mkdir()
    names = [b"entry-%05d" % i for i in range(ENTRIES)]
    _create(big, names + ODD_NAMES)
    (big / "sub").mkdir()
    everything = {*names, *ODD_NAMES, b"sub"}

    # Warm: the daemon and the kernel know every entry.
    assert set(os.listdir(os.fsencode(big))) == everything
    assert os.stat(big).st_nlink == 3  # its name, its ".", and "sub/.."
    with pytest.raises(OSError) as err:
        os.stat(big / ("x" * 256))
    assert err.value.errno == errno.ENAMETOOLONG
    rng = random.Random(4)
    removed = rng.sample(names, 1000)
    _unlink(big, removed)
    everything -= set(removed)
    kept = sorted(everything - {b"sub"})

    # Cold: a new daemon with an empty cache gets the folder from the server.
    drive.umount()
    drive.drop_cache()
    mark = server.log_path.stat().st_size
    drive.mount()
    # Lookups first, in random order: the first one loads the folder, and
    # no readdir has told the kernel any name yet, so each reaches megafs.
    _stat_all(big, rng.sample(kept, len(kept)))
    assert os.stat(big / "sub").st_nlink == 2
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(big), name), "rb") as f:
            assert f.read() == b""
    missing = [b"missing-%05d" % i for i in range(1000)] + removed[:200] + [b"L" * 254]
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in missing:
            with pytest.raises(FileNotFoundError):
                os.stat(name, dir_fd=fd)
    finally:
        os.close(fd)
    assert set(os.listdir(os.fsencode(big))) == everything
    assert os.stat(big).st_nlink == 3
    requests = _requests_since(server, mark)
    drive.umount()

    # The folder came in pages of LIST_PAGE_MAX (one more if the last page
    # is full: only a short page says there is no more), the root in one;
    # no node was fetched one by one.
    pages = len(everything) // LIST_PAGE_MAX + 1
    listings = sum(n for (_, path), n in requests.items() if path.endswith("/children"))
    assert listings == pages + 1, requests
    assert requests[("GET", "/v1/nodes/ID")] <= 3, requests
    assert sum(requests.values()) <= pages + 20, requests


def _unlink(folder: Path, names: list[bytes]) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
