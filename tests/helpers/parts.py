"""A device's client parts below the tree, as a mount runs them, without FUSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from megafs.cache import ChunkCache, LocalState, Uploader
from megafs.crypto import AccountKeys
from megafs.remote import RemoteClient


@asynccontextmanager
async def local_parts(
    remote: RemoteClient, keys: AccountKeys, state_dir: Path
) -> AsyncIterator[tuple[LocalState, ChunkCache, Uploader]]:
    """The local state, chunk cache and uploader of one run of a device,
    remembering what they saw in ``state_dir`` across runs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state = await LocalState.open(state_dir / "state.sqlite3")
    try:
        chunks = ChunkCache(state, remote, keys, limit_bytes=1 << 30)
        await chunks.load()
        uploader = Uploader(remote, state, chunks)
        await uploader.load()
        yield state, chunks, uploader
    finally:
        await state.aclose()
