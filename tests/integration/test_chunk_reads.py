"""The chunk cache's reads from the real server (cache/chunks.py), seen
through a proxy: a download's plaintext reaches its reader before the
download's cache file is written, a read of the same chunk meanwhile waits
for that file instead of downloading it again, a store of the same content
shares that file, the cache stops only after the files it was writing, and
a file that cannot be written costs the reader nothing."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from megafs.cache import ChunkCache, LocalState
from megafs.cache.chunkfiles import chunk_path
from megafs.crypto import AccountKeys, open_chunk, seal_chunk
from megafs.remote import RemoteClient
from tests.helpers.proxy import Proxy
from tests.integration.users import User

KEYS = AccountKeys.from_master(os.urandom(32), os.urandom(16))
SIZE = 100_000
#: After this long a held cache file is let go, so that code that makes a
#: read wait for its file (shielded from cancellation) fails a test's
#: assertions instead of hanging it.
WATCHDOG = 10
CHUNK_REQUESTS = r"/v1/chunks/([0-9a-f]{64}|fetch)"


class HeldKeeps(ChunkCache):
    """The chunk cache, with the cache file of every download held until
    ``gate`` is set, and then failing with ``failure`` if there is one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = trio.Event()
        self.failure: Exception | None = None

    async def _write_file(
        self, chunk_id: bytes, blob: bytes | bytearray | memoryview, *, dirty: bool
    ) -> None:
        if not dirty:
            await self.gate.wait()
            if self.failure is not None:
                raise self.failure
        await super()._write_file(chunk_id, blob, dirty=dirty)


async def _stored(user: User, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` chunks on the server: (secret, plaintext) each."""
    chunks = [seal_chunk(KEYS, os.urandom(SIZE)) for _ in range(count)]
    await user.client.put_chunks([(c.chunk_id, c.blob) for c in chunks])
    return [(c.secret, open_chunk(KEYS, c.secret, c.blob)) for c in chunks]


@asynccontextmanager
async def _cache(user: User, proxy: Proxy, directory: Path) -> AsyncIterator[HeldKeeps]:
    """A cache whose plaintext LRU holds one chunk, reading through ``proxy``."""
    state = await LocalState.open(directory / "state.sqlite3")
    try:
        async with (
            RemoteClient(proxy.url, user.client.token) as remote,
            trio.open_nursery() as watchdog,
        ):
            cache = HeldKeeps(state, remote, KEYS, limit_bytes=1 << 30, memory_bytes=SIZE)
            await cache.load()
            watchdog.start_soon(_open_later, cache.gate)
            yield cache
            watchdog.cancel_scope.cancel()
    finally:
        await state.aclose()


async def _open_later(gate: trio.Event) -> None:
    await trio.sleep(WATCHDOG)
    gate.set()


def _file(directory: Path, secret: bytes) -> Path:
    return Path(chunk_path(str(directory / "chunks"), KEYS.chunk_id(secret)))


async def test_a_download_is_read_before_its_cache_file_is_written(
    alice: User, proxy: Proxy, tmp_path: Path
) -> None:
    """The reader does not wait for the cache file, and the cache, stopped
    meanwhile, ends only once the file is written and indexed."""
    [(secret, data)] = await _stored(alice, 1)
    stopping = trio.Event()
    stopped = False

    async def open_gate() -> None:
        await stopping.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped
        cache.gate.set()

    async with _cache(alice, proxy, tmp_path) as cache, trio.open_nursery() as outer:
        outer.start_soon(open_gate)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(2 * WATCHDOG):
                assert await cache.read(secret) == data
            assert not cache.gate.is_set()
            assert cache.statistics()["disk_chunks"] == 0
            assert not _file(tmp_path, secret).exists()
            stopping.set()
            nursery.cancel_scope.cancel()
        stopped = True
        assert cache.statistics()["disk_chunks"] == 1
        assert open_chunk(KEYS, secret, _file(tmp_path, secret).read_bytes()) == data


async def test_a_chunk_read_again_while_its_file_is_written_is_downloaded_once(
    alice: User, proxy: Proxy, tmp_path: Path
) -> None:
    """Out of memory (the LRU holds one chunk) but not yet on disk: the
    second read waits for the file and reads it."""
    (first, first_data), (second, second_data) = await _stored(alice, 2)
    async with _cache(alice, proxy, tmp_path) as cache, trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        with trio.fail_after(2 * WATCHDOG):
            assert await cache.read(first) == first_data
            assert await cache.read(second) == second_data  # first leaves the LRU
            assert not cache.gate.is_set()
            got: list[bytes] = []

            async def read_again() -> None:
                got.append(await cache.read(first))

            nursery.start_soon(read_again)
            await trio.testing.wait_all_tasks_blocked()
            assert not got
            cache.gate.set()
            while not got:
                await trio.sleep(0.01)
        assert got == [first_data]
        assert len(proxy.find(path=CHUNK_REQUESTS)) == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), RuntimeError("a bug")],
    ids=["disk error", "bug"],
)
async def test_a_download_whose_file_cannot_be_written_is_read_all_the_same(
    alice: User, proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    """An I/O error of the cache's disk (or a bug) is said, and reaches
    neither the reader nor the cache's task, which would stop the mount;
    the next read after the LRU let the chunk go downloads it again."""
    (first, first_data), (second, second_data) = await _stored(alice, 2)
    async with _cache(alice, proxy, tmp_path) as cache:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.failure = failure
            cache.gate.set()
            with trio.fail_after(10), caplog.at_level(logging.WARNING, "megafs.cache.chunks"):
                assert await cache.read(first) == first_data
                while "not cached" not in caplog.text:
                    await trio.sleep(0.01)
                assert not _file(tmp_path, first).exists()
                cache.failure = None
                assert await cache.read(second) == second_data
                assert await cache.read(first) == first_data
            nursery.cancel_scope.cancel()
        assert len(proxy.find(path=CHUNK_REQUESTS)) == 3
        assert cache.statistics()["disk_chunks"] == 2
        assert open_chunk(KEYS, first, _file(tmp_path, first).read_bytes()) == first_data


async def test_a_store_of_a_chunk_whose_download_is_being_written_shares_its_file(
    alice: User, proxy: Proxy, tmp_path: Path
) -> None:
    """Saving content the cache is writing from a download (a file copied
    as soon as it was read): the store waits for that write, writes no
    file of its own, and has nothing to upload (the server has it)."""
    [(secret, data)] = await _stored(alice, 1)
    async with _cache(alice, proxy, tmp_path) as cache:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(2 * WATCHDOG):
                assert await cache.read(secret) == data
                stored: list[tuple[bytes, bytes, bool]] = []

                async def store() -> None:
                    stored.append(await cache.store(data))

                nursery.start_soon(store)
                await trio.testing.wait_all_tasks_blocked()
                assert not stored and not cache.gate.is_set()
                cache.gate.set()
                while not stored:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert stored == [(secret, KEYS.chunk_id(secret), False)]
        assert cache.statistics()["disk_chunks"] == 1
        assert not cache.dirty_ids
        assert open_chunk(KEYS, secret, _file(tmp_path, secret).read_bytes()) == data
