"""The chunk cache's writes (cache/chunks.py): one content stored by two
writers at once is written once, and a write an earlier run left half-done
is cleaned up."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from megafs.cache import ChunkCache, LocalState
from megafs.crypto import AccountKeys, open_chunk
from megafs.remote import RemoteClient


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


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[HeldWrites]:
    state = await LocalState.open(tmp_path / "state.sqlite3")
    try:
        async with RemoteClient("http://127.0.0.1:9") as remote:  # never called
            cache = HeldWrites(tmp_path / "chunks", state, remote, KEYS, limit_bytes=1 << 30)
            await cache.load()
            yield cache
    finally:
        await state.aclose()


async def test_one_content_stored_twice_at_once_is_written_once(cache: HeldWrites) -> None:
    # Small enough to be sealed on the event loop: both stores reach the
    # cache file deterministically. Each seal has its own nonce, so two
    # writes of the file would be two different blobs.
    data = os.urandom(1000)
    results: list[tuple[bytes, bytes, bool]] = []

    async def store() -> None:
        results.append(await cache.store(data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store)
        nursery.start_soon(store)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.writes == 1  # the second store waits for the first
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
    _, chunk_id, _ = await cache.store(os.urandom(1000))
    name = chunk_id.hex()
    leftover = tmp_path / "chunks" / name[:2] / f"{name}.0badcafe.tmp"
    leftover.write_bytes(b"half a chunk")
    await cache.load()
    assert not leftover.exists()
    assert (tmp_path / "chunks" / name[:2] / name).exists()
