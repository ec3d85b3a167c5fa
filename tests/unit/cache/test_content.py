"""Sealing behind a sequential writer (cache/content.py): finished chunks
are sealed while the writer goes on, a write or truncation that reaches a
chunk whose seal is in flight is never undone by it, the writer waits once
it is too far ahead, and a random writer's chunks are left alone.

The chunk cache is the real one; its ``store`` can be held at a gate (fault
injection: a slow disk or a busy core), so a seal stays in flight while the
test writes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from megafs.cache import ChunkCache, FileContent, LocalState, Sealer
from megafs.cache.content import MAX_DIRTY_CHUNKS
from megafs.crypto import CHUNK_SIZE, AccountKeys, Manifest
from megafs.remote import RemoteClient

MiB = CHUNK_SIZE
EMPTY = Manifest(size=0, chunk_size=CHUNK_SIZE, chunks=())


class GatedCache(ChunkCache):
    """The chunk cache, with every store held until ``gate`` is set."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = trio.Event()
        self.gate.set()
        #: Stores started (counted before the gate).
        self.calls = 0

    async def store(self, plaintext: bytes) -> tuple[bytes, bytes, bool]:
        self.calls += 1
        await self.gate.wait()
        return await super().store(plaintext)


class Fixture:
    def __init__(self, cache: GatedCache, sealer: Sealer, fresh: ChunkCache) -> None:
        self.cache = cache
        self.sealer = sealer
        #: A second cache on the same directory, with nothing in memory.
        self.fresh = fresh
        self.new_chunks: list[bytes] = []

    def content(self, manifest: Manifest = EMPTY, *, sealer: bool = True) -> FileContent:
        return FileContent(
            self.cache,
            manifest,
            on_new_chunk=self.new_chunks.append,
            sealer=self.sealer if sealer else None,
        )

    async def read_back(self, manifest: Manifest) -> bytes:
        """The content a new mount reads for ``manifest`` from the cache
        files (each chunk decrypted and verified)."""
        await self.fresh.load()
        content = FileContent(self.fresh, manifest, on_new_chunk=self.new_chunks.append)
        return bytes(await content.read(0, manifest.size))


@pytest.fixture
async def fx(tmp_path: Path) -> AsyncIterator[Fixture]:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        # Never called: a store only seals and writes the cache.
        async with RemoteClient("http://127.0.0.1:9") as remote:
            keys = AccountKeys.from_master(os.urandom(32), os.urandom(16))
            cache = GatedCache(state, remote, keys, limit_bytes=1 << 30)
            await cache.load()
            fresh = ChunkCache(state, remote, keys, limit_bytes=1 << 30)
            sealer = Sealer()
            async with trio.open_nursery() as nursery:
                await nursery.start(sealer.run)
                yield Fixture(cache, sealer, fresh)
                nursery.cancel_scope.cancel()
    finally:
        await state.aclose()


def _chunk(i: int) -> bytes:
    return bytes([i + 1]) * MiB


async def test_a_sequential_writer_s_finished_chunks_are_sealed_before_the_close(
    fx: Fixture,
) -> None:
    content = fx.content()
    data = b"".join(_chunk(i) for i in range(4)) + b"tail"
    for at in range(0, len(data), 128 * 1024):
        await content.write(at, data[at : at + 128 * 1024])
    # Chunks 0-3 are behind the writer, two at a time; 4 is being written.
    with trio.fail_after(10):
        while len(fx.new_chunks) < 4:
            await trio.sleep(0.01)
    assert fx.cache.calls == 4
    assert content.dirty_bytes == len(b"tail")
    manifest = await content.seal()
    assert len(fx.new_chunks) == 5
    assert await fx.read_back(manifest) == data


async def test_a_write_into_a_chunk_being_sealed_is_kept(fx: Fixture) -> None:
    content = fx.content()
    fx.cache.gate = trio.Event()
    await content.write(0, _chunk(0))
    await content.write(MiB, _chunk(1))
    await trio.testing.wait_all_tasks_blocked()  # chunk 0's seal waits at the gate
    await content.write(100, b"rewritten while in flight")
    fx.cache.gate.set()
    manifest = await content.seal()
    want = bytearray(_chunk(0) + _chunk(1))
    want[100 : 100 + 25] = b"rewritten while in flight"
    assert await fx.read_back(manifest) == want


async def test_a_truncation_through_chunks_being_sealed_is_kept(fx: Fixture) -> None:
    content = fx.content()
    fx.cache.gate = trio.Event()
    for i in range(3):
        await content.write(i * MiB, _chunk(i))
    await trio.testing.wait_all_tasks_blocked()  # chunks 0 and 1 wait at the gate
    await content.truncate(MiB // 2)
    await content.write(MiB // 2, b"grown again")
    fx.cache.gate.set()
    manifest = await content.seal()
    assert manifest.size == MiB // 2 + 11
    assert await fx.read_back(manifest) == _chunk(0)[: MiB // 2] + b"grown again"


async def test_a_writer_ahead_of_its_seals_waits_with_bounded_memory(fx: Fixture) -> None:
    content = fx.content()
    fx.cache.gate = trio.Event()
    data = b"".join(_chunk(i) for i in range(MAX_DIRTY_CHUNKS + 4))
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            for at in range(0, len(data), MiB):
                await content.write(at, data[at : at + MiB])

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        # Held by its seals: at most one buffer over the limit.
        assert content.dirty_bytes == (MAX_DIRTY_CHUNKS + 1) * MiB
        assert fx.cache.calls == 2
        fx.cache.gate.set()
    manifest = await content.seal()
    assert await fx.read_back(manifest) == data


async def test_equal_chunks_sealed_at_once_are_stored_whole(fx: Fixture) -> None:
    # Chunks with equal content share one id (deduplication): the two seals
    # in flight store it at the same time, and the cache file must be one
    # of their blobs, not a mix of both.
    content = fx.content()
    data = os.urandom(32) * (3 * MiB // 32)
    for _ in range(5):
        for at in range(0, len(data), MiB):
            await content.write(at, data[at : at + MiB])
        await content.truncate(0)
    for at in range(0, len(data), MiB):
        await content.write(at, data[at : at + MiB])
    manifest = await content.seal()
    assert len(set(manifest.chunks)) == 1
    assert await fx.read_back(manifest) == data


async def test_a_random_writer_s_chunks_wait_for_the_close(fx: Fixture) -> None:
    content = fx.content()
    for i in (2, 0, 5, 3):
        await content.write(i * MiB, _chunk(i))
    await trio.testing.wait_all_tasks_blocked()
    assert fx.cache.calls == 0
    manifest = await content.seal()
    assert len(fx.new_chunks) == 4  # 1 and 4 are holes
    assert manifest.chunks[1] is None and manifest.chunks[4] is None


async def test_without_the_sealer_a_writer_seals_in_its_own_request(fx: Fixture) -> None:
    content = fx.content(sealer=False)
    data = b"".join(_chunk(i) for i in range(MAX_DIRTY_CHUNKS + 2))
    for at in range(0, len(data), MiB):
        await content.write(at, data[at : at + MiB])
    # Past the limit, all but the chunk being written were sealed in the write.
    assert len(fx.new_chunks) == MAX_DIRTY_CHUNKS
    manifest = await content.seal()
    assert await fx.read_back(manifest) == data
