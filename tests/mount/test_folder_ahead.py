"""Read-ahead across a folder's files on real mounts: once two files of a
folder are read whole in the folder's order (by name, or as readdir lists
them), the first chunks of the files after them are fetched before they
are opened; files read out of order fetch nothing of the others; and what
was fetched ahead never stands in for bytes written since.

As in ``test_readahead.py``, what the daemon fetched is seen from outside:
every chunk it downloads lands in its disk cache under its own id.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from megafs.cache.readahead import WINDOW
from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import wait_for
from tests.mount.test_readahead import _cached_ids, _chunk_requests

pytestmark = pytest.mark.mount

#: Two chunks each: a file's own read-ahead fetches its second chunk, never
#: another file's.
SIZE = 2 * CHUNK_SIZE - 100


def _folder_cold(drive: Drive, count: int, seed: int, size: int = SIZE) -> dict[str, bytes]:
    """A folder of ``count`` files of ``size`` bytes, stored, and the drive
    remounted on an empty cache (the folder's own order is then the
    server's, not the order the files were written in)."""
    rng = random.Random(seed)
    files = {f"p{i:03d}.jpg": rng.randbytes(size) for i in range(count)}
    drive.mount()
    (drive.mnt / "photos").mkdir()
    for name, data in files.items():
        (drive.mnt / "photos" / name).write_bytes(data)
    drive.umount()
    drive.drop_cache()
    drive.mount()
    return files


def _read_whole(drive: Drive, path: Path, expected: bytes) -> None:
    """Read a file as cat does (the kernel asks a chunk at a time), and
    wait for its chunks' cache files, written behind the read."""
    before = len(_cached_ids(drive))
    assert path.read_bytes() == expected
    wait_for(f"{path.name}'s cache files", lambda: len(_cached_ids(drive)) >= before + 2)


def test_files_read_whole_in_name_order_fetch_the_next_ones_ahead(drive: Drive) -> None:
    files = _folder_cold(drive, 12, seed=1)
    folder = drive.mnt / "photos"
    names = sorted(files)
    _read_whole(drive, folder / names[0], files[names[0]])
    _read_whole(drive, folder / names[1], files[names[1]])
    # Two files in name order: the next ones' chunks come without a read,
    # as many as one reader's window (the first chunks of a later file).
    wait_for("the next files, fetched ahead", lambda: len(_cached_ids(drive)) == 4 + WINDOW)
    # Each further file read tops the window up, to the end of the folder.
    for name in names[2:6]:
        assert (folder / name).read_bytes() == files[name]
    wait_for("the rest of the folder", lambda: len(_cached_ids(drive)) == 2 * len(files))
    # A file fetched ahead and then rewritten reads as written.
    files[names[9]] = random.Random(2).randbytes(SIZE + 5)
    (folder / names[9]).write_bytes(files[names[9]])
    for name in names:
        assert (folder / name).read_bytes() == files[name], name
    drive.umount()
    drive.drop_cache()
    drive.mount()
    for name in names:
        assert (folder / name).read_bytes() == files[name], name
    drive.umount()


def test_a_folder_of_thousands_of_files_is_followed_too(drive: Drive) -> None:
    """A camera's folder holds thousands of files: 5 000 small ones (no
    chunks of their own) and 12 photos after them by name."""
    rng = random.Random(6)
    photos = {f"p{i:03d}.jpg": rng.randbytes(SIZE) for i in range(12)}
    drive.mount()
    folder = drive.mnt / "dcim"
    folder.mkdir()
    for i in range(5000):
        (folder / f"a{i:05d}.txt").write_bytes(b"%d" % i)
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    drive.umount()
    drive.drop_cache()
    drive.mount()
    assert len(os.listdir(folder)) == 5012
    names = sorted(photos)
    _read_whole(drive, folder / names[0], photos[names[0]])
    _read_whole(drive, folder / names[1], photos[names[1]])
    wait_for("the next photos, fetched ahead", lambda: len(_cached_ids(drive)) == 4 + WINDOW)
    for name in names[2:]:
        assert (folder / name).read_bytes() == photos[name], name
    wait_for("every photo", lambda: len(_cached_ids(drive)) == 2 * len(photos))
    drive.umount()


def test_files_of_one_chunk_are_fetched_ahead_a_few_to_a_request(
    drive: Drive, server: ServerProcess
) -> None:
    """Each file read whole would make room for one more chunk ahead; the
    window is topped up only once four fit, so that they travel in one
    ``POST /chunks/fetch``: 24 files of one chunk read cold in at most
    half as many requests (about one each otherwise)."""
    files = _folder_cold(drive, 24, seed=5, size=CHUNK_SIZE // 2)
    folder = drive.mnt / "photos"
    offset = server.log_path.stat().st_size
    for name in sorted(files):
        assert (folder / name).read_bytes() == files[name], name
    gets, fetches = _chunk_requests(server, offset)
    assert fetches and gets + fetches <= 12, (gets, fetches)
    drive.umount()


def _listed_as(drive: Drive, numbers: tuple[int, ...], seed: int, read: int) -> dict[str, bytes]:
    """A cold folder of ``len(numbers)`` files whose readdir order is
    ``p{n:03d}.jpg`` for ``numbers`` (after a fresh mount the order is the
    server's, by node id, and renaming every file in that order keeps it:
    a renamed name goes to the end); then the first ``read`` of them as
    listed are read whole, and the window after them must be fetched."""
    files = _folder_cold(drive, len(numbers), seed=seed)
    folder = drive.mnt / "photos"
    listed = os.listdir(folder)
    assert sorted(listed) == sorted(files)
    renamed = [f"p{n:03d}.jpg" for n in numbers]
    for i, name in enumerate(listed):
        os.rename(folder / name, folder / f"t{i}")
    for i, name in enumerate(renamed):
        os.rename(folder / f"t{i}", folder / name)
    assert os.listdir(folder) == renamed
    files = {new: files[old] for old, new in zip(listed, renamed, strict=True)}
    for name in renamed[:read]:
        _read_whole(drive, folder / name, files[name])
    wait_for("the next files, fetched ahead", lambda: len(_cached_ids(drive)) == 2 * read + WINDOW)
    return files


def test_files_read_whole_as_readdir_lists_them_fetch_the_next_ones_ahead(
    drive: Drive,
) -> None:
    """``cp -r`` and ``tar`` follow the folder's own order. The first two
    files as listed follow each other by name too, four names apart, the
    second near the end: the listing, where they are next to each other,
    is the order to follow (by name only one file would come after)."""
    numbers = (10, 14, 0, 5, 1, 8, 3, 12, 6, 2, 15, 9, 4, 11, 7, 13)
    files = _listed_as(drive, numbers, seed=3, read=2)
    for name in list(files)[2:]:
        assert (drive.mnt / "photos" / name).read_bytes() == files[name], name
    drive.umount()


def test_a_stream_that_guessed_the_wrong_order_goes_on_in_the_right_one(drive: Drive) -> None:
    """The first two files as listed are the last two by name: name order
    is guessed (as close, and nothing after it to fetch). The third file
    read, next as listed, is out of that order and turns the stream to the
    listing's at once: the window after it is fetched."""
    _listed_as(drive, (14, 15, 0, 5, 1, 8, 3, 12, 6, 2, 10, 9, 4, 11, 7, 13), seed=7, read=3)
    drive.umount()


def _out_of_order(
    names: list[str], listed: list[str], after: str | None, candidates: list[str], count: int
) -> list[str]:
    """Up to ``count`` of ``candidates``, in their order, each neither among
    the 8 files after the one before it (the first: after ``after``) by
    name nor as listed (where a program that skips some files would still
    be in order). Candidates in descending name order never follow by name,
    so only the listing can leave some out."""

    def follows(a: str, b: str) -> bool:
        return any(0 < order.index(b) - order.index(a) <= 8 for order in (names, listed))

    picked: list[str] = []
    for name in candidates:
        previous = picked[-1] if picked else after
        if len(picked) < count and (previous is None or not follows(previous, name)):
            picked.append(name)
    return picked


def _first_chunks(drive: Drive) -> tuple[int, int]:
    """Cached chunks that are a file's first (a whole chunk, files being
    ``SIZE`` long), and those that are a second (shorter)."""
    root = drive.cache / "chunks"
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".tmp"]
    first = sum(1 for size in sizes if size >= CHUNK_SIZE)
    return first, len(sizes) - first


def _read_start(path: Path, expected: bytes) -> None:
    """Read a file's first page, as a file manager sniffing its type does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, 4096, 0) == expected[:4096]
    finally:
        os.close(fd)


def test_files_begun_in_order_fetch_the_first_chunk_of_the_next_ones(drive: Drive) -> None:
    """A program reading the start of each file (types, tags, a photo's
    metadata) needs each file's first chunk only: once two files are begun
    in order, the first chunks of the next ones are fetched, a window's
    worth of files, and topped up as further files are begun; no second
    chunk is."""
    files = _folder_cold(drive, 30, seed=8)
    folder = drive.mnt / "photos"
    names = sorted(files)
    for name in names[:2]:
        _read_start(folder / name, files[name])
    wait_for("the next files' first chunks", lambda: _first_chunks(drive) == (2 + WINDOW, 0))
    for name in names[2:6]:
        _read_start(folder / name, files[name])
    wait_for("the window, topped up", lambda: _first_chunks(drive) == (6 + WINDOW, 0))
    drive.umount()


def test_files_read_out_of_order_whole_or_in_part_fetch_nothing_of_the_others(
    drive: Drive,
) -> None:
    files = _folder_cold(drive, 30, seed=4)
    folder = drive.mnt / "photos"
    names = sorted(files)
    listed = os.listdir(folder)
    begun = _out_of_order(names, listed, None, names[14::-1], 4)
    for name in begun:
        _read_start(folder / name, files[name])
    wait_for("the pages' chunks", lambda: len(_cached_ids(drive)) == len(begun))
    # Whole, but each out of order (the last file begun included): only
    # their own chunks are fetched.
    picked = _out_of_order(names, listed, begun[-1], names[:14:-1], 5)
    for name in picked:
        _read_whole(drive, folder / name, files[name])
    assert len(begun) >= 2 and len(picked) >= 2
    assert len(_cached_ids(drive)) == len(begun) + 2 * len(picked)
    drive.umount()
