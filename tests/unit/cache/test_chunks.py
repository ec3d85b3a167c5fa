"""The chunk cache's writes (cache/chunks.py): one content stored by two
writers at once is written once, a write an earlier run left half-done is
cleaned up, a small chunk's file is written by the local state's log
unless its disk is short of room, and a disk that runs short of room gets
back the room of chunks the server has."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from megafs.cache import ChunkCache, LocalState
from megafs.cache.state import LOGGED_CHUNK
from megafs.crypto import AccountKeys, open_chunk
from megafs.errors import LocalDiskFull, NotFound
from megafs.remote import RemoteClient
from tests.helpers.tools import fill_disk


class HeldWrites(ChunkCache):
    """The chunk cache, with every cache file write held until ``gate``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = trio.Event()
        self.writes = 0

    async def _write_file(self, chunk_id: bytes, blob: bytes, *, dirty: bool) -> None:
        self.writes += 1
        await self.gate.wait()
        await super()._write_file(chunk_id, blob, dirty=dirty)


KEYS = AccountKeys.from_master(os.urandom(32), os.urandom(16))


@contextlib.asynccontextmanager
async def _held_cache(directory: Path) -> AsyncIterator[HeldWrites]:
    """A loaded cache (and its local state) in ``directory``."""
    state = await LocalState.open(directory / "state.sqlite3")
    try:
        async with RemoteClient("http://127.0.0.1:9") as remote:  # never called
            cache = HeldWrites(state, remote, KEYS, limit_bytes=1 << 30)
            await cache.load()
            yield cache
    finally:
        await state.aclose()


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[HeldWrites]:
    async with _held_cache(tmp_path) as cache:
        yield cache


async def test_one_content_stored_twice_at_once_is_written_once(cache: HeldWrites) -> None:
    # Larger than LOGGED_CHUNK: sealed in a worker thread and written to its
    # file before the store returns, so a second store of the same content
    # can arrive meanwhile. (A smaller chunk is stored with no checkpoint at
    # all: no other store can come between.) Each seal has its own nonce, so
    # two writes of the file would be two different blobs.
    data = os.urandom(LOGGED_CHUNK + 1000)
    results: list[tuple[bytes, bytes, bool]] = []

    async def store() -> None:
        results.append(await cache.store(data))

    def second_store_waits() -> bool:
        return any(done.statistics().tasks_waiting for done in cache._writing.values())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store)
        nursery.start_soon(store)
        with trio.fail_after(10):
            while not (cache.writes == 1 and second_store_waits()):
                await trio.sleep(0.01)
        cache.gate.set()
    assert cache.writes == 1
    (secret, chunk_id, new), again = results
    assert again == (secret, chunk_id, True)  # still waiting for upload
    assert new
    assert open_chunk(KEYS, secret, (await cache.sealed_blobs([chunk_id]))[0]) == data


async def test_a_write_cut_short_by_a_crash_is_removed_at_load(
    cache: HeldWrites, tmp_path: Path
) -> None:
    cache.gate.set()
    _, chunk_id, _ = await cache.store(os.urandom(LOGGED_CHUNK + 1))  # written by the store
    name = chunk_id.hex()
    leftover = tmp_path / "chunks" / name[:2] / f"{name}.0badcafe.tmp"
    leftover.write_bytes(b"half a chunk")
    await cache.load()
    assert not leftover.exists()
    assert (tmp_path / "chunks" / name[:2] / name).exists()


async def test_a_new_chunk_is_uploaded_from_memory_until_the_server_has_it(
    cache: HeldWrites, tmp_path: Path
) -> None:
    """A new chunk's upload does not read back the file its store just
    wrote; the bytes are let go once the server has them."""
    cache.gate.set()
    data = os.urandom(LOGGED_CHUNK + 1)
    secret, chunk_id, _ = await cache.store(data)
    name = chunk_id.hex()
    (tmp_path / "chunks" / name[:2] / name).unlink()  # not where the upload looks
    assert open_chunk(KEYS, secret, (await cache.sealed_blobs([chunk_id]))[0]) == data
    await cache.mark_uploaded([chunk_id])
    with pytest.raises(NotFound):
        await cache.sealed_blobs([chunk_id])


async def test_a_small_chunk_is_written_by_the_logs_fold_and_read_meanwhile(
    cache: HeldWrites, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    secret, chunk_id, new = await cache.store(data)
    assert new and cache.writes == 0  # no worker thread, no file yet
    name = chunk_id.hex()
    path = tmp_path / "chunks" / name[:2] / name
    assert not path.exists()
    cache._plain.clear()  # read it from where it is kept, not from memory
    assert await cache.read(secret) == data
    assert open_chunk(KEYS, secret, (await cache.sealed_blobs([chunk_id]))[0]) == data
    # An fsync makes its file first, then syncs it.
    await cache.sync_files([chunk_id])
    assert path.exists()
    assert open_chunk(KEYS, secret, path.read_bytes()) == data
    assert cache._state.unfolded_chunk(chunk_id) is None
    assert (chunk_id, len(path.read_bytes()), True) in await cache._state.load_chunks()


async def test_on_a_disk_short_of_room_a_small_chunk_is_written_before_the_store_returns(
    small_disk: Path,
) -> None:
    """Below ``DISK_MARGIN`` free, a logged chunk's later file write could
    fail after its close succeeded: the store writes the file itself, and a
    full disk is its error (ENOSPC), not a fold's."""
    async with _held_cache(small_disk) as cache:
        cache.gate.set()
        _, chunk_id, _ = await cache.store(os.urandom(1000))
        assert cache.writes == 1 and cache._state.unfolded_chunk(chunk_id) is None


def _file(disk: Path, chunk_id: bytes) -> Path:
    name = chunk_id.hex()
    return disk / "chunks" / name[:2] / name


async def test_a_disk_that_runs_short_of_room_gets_back_the_room_of_uploaded_chunks(
    small_disk: Path,
) -> None:
    """Whatever fills the disk, the cache gives back chunks the server has,
    least recently used first, and never one waiting for upload."""
    async with _held_cache(small_disk) as cache:
        cache.gate.set()
        stored = [await cache.store(os.urandom(LOGGED_CHUNK + 1)) for _ in range(3)]
        uploaded, waiting = [s[1] for s in stored[:2]], stored[2][1]
        await cache.mark_uploaded(uploaded)
        fill_disk(small_disk / "filler")
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(10):
                while any(_file(small_disk, i).exists() for i in uploaded):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert _file(small_disk, waiting).exists()
        assert [c[0] for c in await cache._state.load_chunks()] == [waiting]
        assert cache.statistics()["disk_chunks"] == 1


async def test_a_new_chunk_on_a_full_disk_takes_the_room_of_an_uploaded_one(
    small_disk: Path,
) -> None:
    async with _held_cache(small_disk) as cache:
        cache.gate.set()
        uploaded = [(await cache.store(os.urandom(LOGGED_CHUNK + 1)))[1] for _ in range(4)]
        await cache.mark_uploaded(uploaded)
        filler = fill_disk(small_disk / "filler")
        data = os.urandom(LOGGED_CHUNK + 1)
        secret, chunk_id, new = await cache.store(data)  # no ENOSPC
        assert new and not any(_file(small_disk, i).exists() for i in uploaded)
        assert open_chunk(KEYS, secret, _file(small_disk, chunk_id).read_bytes()) == data
        # With nothing left to give back, a full disk is the store's error.
        filler.unlink()
        fill_disk(small_disk / "filler")
        with pytest.raises(LocalDiskFull):
            await cache.store(os.urandom(LOGGED_CHUNK + 1))
        assert _file(small_disk, chunk_id).exists()
        assert not list(small_disk.glob("chunks/*/*.tmp"))  # nor half a file


async def test_a_give_back_that_fails_is_tried_again_and_said_once(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The task that keeps room runs for the whole mount: a failure of the
    disk (injected: the first three tries) is logged once, never stops it."""
    async with _held_cache(small_disk) as cache:
        cache.gate.set()
        _, uploaded, _ = await cache.store(os.urandom(LOGGED_CHUNK + 1))
        await cache.mark_uploaded([uploaded])
        evict_clean = cache._evict_clean
        failures = 0

        async def failing(excess: int) -> int:
            nonlocal failures
            if failures < 3:
                failures += 1
                raise OSError(errno.EIO, "Input/output error")
            return await evict_clean(excess)

        cache._evict_clean = failing  # type: ignore[method-assign]
        fill_disk(small_disk / "filler")
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(20):
                while _file(small_disk, uploaded).exists():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert failures == 3
        said = [r for r in caplog.records if "could not give back" in r.getMessage()]
        assert len(said) == 1, said
