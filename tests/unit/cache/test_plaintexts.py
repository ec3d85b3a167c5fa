"""The plaintext LRU recycles the buffers of chunks it decrypted, and never
one that a reader still views (megafs/cache/chunks.py, ``_Plaintexts``).

Chunks are stored, then read back from their cache files by a second
cache over the same local state, so each read decrypts into a buffer the
LRU hands out. A buffer is followed by ``id`` only while it is alive (in
the LRU or among its spares), so an id cannot have been reused meanwhile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from megafs.cache import ChunkCache, LocalState
from megafs.crypto import CHUNK_SIZE, AccountKeys
from megafs.remote import RemoteClient

KEYS = AccountKeys.from_master(os.urandom(32), os.urandom(16))


@contextlib.asynccontextmanager
async def _cache(directory: Path, chunks_in_memory: int) -> AsyncIterator[ChunkCache]:
    state = await LocalState.open(directory / "state.sqlite3")
    try:
        async with RemoteClient("http://127.0.0.1:9") as remote:  # never called
            cache = ChunkCache(
                state, remote, KEYS, limit_bytes=1 << 30, memory_bytes=chunks_in_memory * CHUNK_SIZE
            )
            await cache.load()
            yield cache
    finally:
        await state.aclose()


async def _stored(directory: Path, count: int) -> list[tuple[bytes, bytes]]:
    """(secret, plaintext) of ``count`` full chunks stored in ``directory``."""
    stored = []
    async with _cache(directory, 1) as cache:
        for _ in range(count):
            data = os.urandom(CHUNK_SIZE)
            secret, _, _ = await cache.store(data)
            stored.append((secret, data))
    return stored


async def test_a_chunk_a_reader_still_views_is_not_overwritten(tmp_path: Path) -> None:
    chunks = await _stored(tmp_path, 8)
    async with _cache(tmp_path, 2) as cache:
        held = []
        for secret, _ in chunks:
            held.append(await cache.read(secret))  # each pushes older ones out
        # Every chunk left the LRU while viewed: none was decrypted into.
        assert [bytes(view) for view in held] == [data for _, data in chunks]
        assert not cache._plain._spares


async def test_a_slice_of_a_chunk_keeps_its_buffer(tmp_path: Path) -> None:
    chunks = await _stored(tmp_path, 6)
    async with _cache(tmp_path, 2) as cache:
        (first, data), *rest = chunks
        piece = (await cache.read(first))[4096:8192]  # what a FUSE read replies with
        for secret, _ in rest:
            await cache.read(secret)
        assert bytes(piece) == data[4096:8192]


async def test_a_chunk_no_one_views_lends_its_buffer_to_the_next(tmp_path: Path) -> None:
    chunks = await _stored(tmp_path, 4)
    async with _cache(tmp_path, 2) as cache:
        for secret, _ in chunks[:3]:
            await cache.read(secret)  # the third pushes the first out
        (spare,) = cache._plain._spares
        assert spare == chunks[0][1]  # the first chunk's buffer, not cleared
        spare_id = id(spare)
        del spare
        secret, data = chunks[3]
        view = await cache.read(secret)
        assert isinstance(view, memoryview) and view.readonly
        assert id(view.obj) == spare_id
        assert bytes(view) == data
        # The buffer the fourth pushed out (the second chunk's) is next.
        assert [bytes(b) for b in cache._plain._spares] == [chunks[1][1]]
