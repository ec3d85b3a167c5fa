"""The local state's log (cache/statelog.py): a journal entry, its
forgetting or a chunk is kept by a crash of the daemon as soon as the call
returns, before any database transaction; a log outliving its fold is not applied twice; a torn
or failed write loses only itself."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from megafs.cache import JournalEntry, LocalState
from megafs.cache.state import _FOLD_BYTES, LOGGED_CHUNK, journal_left
from megafs.cache.statelog import decode, encode
from megafs.errors import LocalDiskFull
from tests.helpers.tools import fill_disk

A, B = bytes([1]) * 16, bytes([2]) * 16
CHUNK = bytes([7]) * 32


def _entry(node_id: bytes, seq: int, meta: bytes = b"m" * 40) -> JournalEntry:
    return JournalEntry(
        node_id=node_id,
        seq=seq,
        op="put",
        parent=bytes(16),
        base_version=0,
        meta=meta,
        content=None,
        chunks=(CHUNK,),
        commit_id=os.urandom(16),
    )


def _crash_image(cache: Path, into: Path) -> Path:
    """What a crash of the daemon right now would leave: the files as they
    are (the kernel keeps what was written), without a clean close."""
    shutil.copytree(cache, into)
    return into / "state.sqlite3"


def _logs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("state.sqlite3.log.*"))


async def test_a_crash_keeps_every_write_once_the_call_returned(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    state = await LocalState.open(cache / "state.sqlite3")
    try:
        await state.put_entry(_entry(A, 1), rev=3)
        await state.load_journal()  # a database call folds the log
        await state.put_entry(_entry(B, 2))
        await state.put_entry(latest := _entry(A, 3, meta=b"n" * 40), rev=4)
        await state.add_chunk(CHUNK, 1234, dirty=True)
        image = _crash_image(cache, tmp_path / "crashed")
    finally:
        await state.aclose()
    assert _logs(cache) == []  # a clean close folds and removes the log

    assert journal_left(image) == 2  # what `megafs umount` reports of a dead daemon
    again = await LocalState.open(image)
    try:
        journal = {e.node_id: e for e in await again.load_journal()}
        assert set(journal) == {A, B}
        assert journal[A].seq == 3 and journal[A].meta == latest.meta
        assert journal[A].commit_id == latest.commit_id and journal[A].chunks == (CHUNK,)
        assert (await again.load_seen())[A] == 4
        assert (CHUNK, 1234, True) in await again.load_chunks()
    finally:
        await again.aclose()
    assert _logs(image.parent) == []


async def test_a_forgotten_entry_stays_forgotten_across_a_crash(tmp_path: Path) -> None:
    """A node made and removed before it was sent (git's temporary name of
    an object): its entry is forgotten through the log, in order with the
    writes around it, whether the log was folded or a crash left it."""
    cache = tmp_path / "cache"
    state = await LocalState.open(cache / "state.sqlite3")
    try:
        await state.put_entry(_entry(A, 1))
        await state.load_journal()  # folded: the entry is in the database
        await state.forget_entry(A, 1)
        await state.put_entry(_entry(B, 2))
        await state.forget_entry(B, 2)  # put and forgotten within one log
        await state.put_entry(kept := _entry(B, 3))
        await state.forget_entry(B, 2)  # an older seq: the newer entry stays
        image = _crash_image(cache, tmp_path / "crashed")
        assert journal_left(image) == 1  # what `megafs umount` reports of a dead daemon
        assert [e.seq for e in await state.load_journal()] == [3]
    finally:
        await state.aclose()
    again = await LocalState.open(image)
    try:
        (entry,) = await again.load_journal()
        assert (entry.node_id, entry.seq, entry.commit_id) == (B, 3, kept.commit_id)
    finally:
        await again.aclose()


async def test_a_logged_chunk_survives_a_crash_and_its_fold_writes_its_file(
    tmp_path: Path,
) -> None:
    """A small chunk travels in the log: a crash before any fold keeps it,
    and the fold on opening writes its cache file before the row naming it."""
    cache = tmp_path / "cache"
    state = await LocalState.open(cache / "state.sqlite3")
    blob = os.urandom(3000)
    try:
        await state.add_chunk_file(CHUNK, blob)
        await state.put_entry(_entry(A, 1))  # names the chunk
        assert state.unfolded_chunk(CHUNK) == blob
        image = _crash_image(cache, tmp_path / "crashed")
    finally:
        await state.aclose()
    name = CHUNK.hex()
    assert (cache / "chunks" / name[:2] / name).read_bytes() == blob  # a clean close folds
    crashed = image.parent / "chunks" / name[:2] / name
    assert not crashed.exists()

    assert journal_left(image) == 1
    again = await LocalState.open(image)
    try:
        assert crashed.read_bytes() == blob
        assert again.unfolded_chunk(CHUNK) is None
        assert (CHUNK, len(blob), True) in await again.load_chunks()
        assert [e.chunks for e in await again.load_journal()] == [(CHUNK,)]
    finally:
        await again.aclose()


async def test_logged_chunks_are_folded_once_their_bytes_reach_the_bound(
    tmp_path: Path,
) -> None:
    """Their bytes wait in memory until the fold: a writer with no database
    call in between (the server unreachable) folds at ``_FOLD_BYTES``."""
    state = await LocalState.open(tmp_path / "cache" / "state.sqlite3")
    try:
        ids = [os.urandom(32) for _ in range(_FOLD_BYTES // LOGGED_CHUNK + 1)]
        for chunk_id in ids:
            await state.add_chunk_file(chunk_id, os.urandom(LOGGED_CHUNK))
        assert state.unfolded_chunk(ids[0]) is None  # folded: its file is written
        assert state.unfolded_chunk(ids[-1]) is not None  # after the fold: waits for the next
    finally:
        await state.aclose()


async def test_a_fold_that_finds_the_disk_full_keeps_the_logged_chunks(
    small_disk: Path,
) -> None:
    """Their files cannot be written: the fold fails as LocalDiskFull (a
    request answers ENOSPC, background work tries again), the bytes stay
    readable and in the log, and the next fold with room writes them."""
    state = await LocalState.open(small_disk / "cache" / "state.sqlite3")
    try:
        blobs = {os.urandom(32): os.urandom(60_000) for _ in range(3)}
        for chunk_id, blob in blobs.items():
            await state.add_chunk_file(chunk_id, blob)
        filler = fill_disk(small_disk / "filler")
        with pytest.raises(LocalDiskFull):
            await state.fold()
        assert all(state.unfolded_chunk(i) == b for i, b in blobs.items())
        filler.unlink()
        await state.fold()
        for chunk_id, blob in blobs.items():
            assert state.unfolded_chunk(chunk_id) is None
            name = chunk_id.hex()
            assert (small_disk / "cache" / "chunks" / name[:2] / name).read_bytes() == blob
        chunks = await state.load_chunks()
        assert all((i, len(b), True) in chunks for i, b in blobs.items())
    finally:
        await state.aclose()


async def test_closing_on_a_full_disk_leaves_the_log_to_the_next_open(
    small_disk: Path,
) -> None:
    """An unmount on a full disk: the close cannot fold, yet closes, and
    nothing written before it is lost."""
    path = small_disk / "cache" / "state.sqlite3"
    state = await LocalState.open(path)
    blobs = {os.urandom(32): os.urandom(60_000) for _ in range(3)}
    for chunk_id, blob in blobs.items():
        await state.add_chunk_file(chunk_id, blob)
    filler = fill_disk(small_disk / "filler")
    await state.aclose()
    filler.unlink()
    state = await LocalState.open(path)
    try:
        chunks = await state.load_chunks()
        assert all((i, len(b), True) in chunks for i, b in blobs.items())
    finally:
        await state.aclose()


async def test_a_log_left_behind_after_its_fold_is_not_applied_again(tmp_path: Path) -> None:
    """A crash between a fold's commit and the removal of its file: the file
    is skipped by its number, or a committed change would come back (and be
    sent again on a stale base version)."""
    cache = tmp_path / "cache"
    state = await LocalState.open(cache / "state.sqlite3")
    try:
        await state.put_entry(_entry(A, 1))
        [log] = _logs(cache)
        kept = (cache / log).read_bytes()
        await state.entries_committed([(A, 1, 1)])  # folded, then committed
        assert await state.load_journal() == []
        (cache / log).write_bytes(kept)  # as if its removal never happened
        image = _crash_image(cache, tmp_path / "crashed")
    finally:
        await state.aclose()

    assert journal_left(image) == 0
    again = await LocalState.open(image)
    try:
        assert await again.load_journal() == []
    finally:
        await again.aclose()


def test_a_torn_or_damaged_record_ends_the_log() -> None:
    records = [
        (b"J", (A, 5, "put", None, -1, b"", os.urandom(300))),
        (b"C", (CHUNK, 1 << 40, 1, 0)),
    ]
    data = b"".join(encode(k, v) for k, v in records)
    assert list(decode(data)) == records
    assert list(decode(data[:-1])) == records[:1]  # torn by a power cut
    damaged = bytearray(data)
    damaged[-5] ^= 1
    assert list(decode(bytes(damaged))) == records[:1]
    assert list(decode(b"")) == []


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG) for this process: a full disk
    for one file, without a filesystem of its own."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


async def test_a_failed_write_leaves_no_partial_record(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    state = await LocalState.open(cache / "state.sqlite3")
    try:
        await state.put_entry(first := _entry(A, 1))
        [log] = _logs(cache)
        size = (cache / log).stat().st_size
        with _file_size_limit(size + 100), pytest.raises(OSError):
            await state.put_entry(_entry(B, 2, meta=b"x" * 4000))  # written in part only
        assert (cache / log).stat().st_size == size
        await state.put_entry(last := _entry(B, 3))
        image = _crash_image(cache, tmp_path / "crashed")
    finally:
        await state.aclose()

    again = await LocalState.open(image)
    try:
        journal = {e.node_id: e.commit_id for e in await again.load_journal()}
        assert journal == {A: first.commit_id, B: last.commit_id}
    finally:
        await again.aclose()
