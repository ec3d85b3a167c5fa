"""Chunk bytes: opaque ciphertext blobs, stored per account.

:class:`ChunkStore` is the interface (an object store such as S3 fits it:
put, get, delete, exists by key); :class:`LocalChunkStore` keeps one file per
chunk. Whether a chunk *exists for the protocol* is decided by the metadata
store; the bytes are written before the chunk is recorded and deleted after
it is forgotten, so a recorded chunk always has its bytes. The
:meth:`ChunkStore.locked` section keeps those two-step changes of one chunk
from interleaving (an upload racing the garbage collector).
"""

from __future__ import annotations

import errno
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from megafs.errors import NotFound

__all__ = ["ChunkStore", "LocalChunkStore"]


@dataclass
class _Waiters:
    lock: trio.Lock = field(default_factory=trio.Lock)
    count: int = 0


class ChunkStore(ABC):
    """Chunk bytes keyed by (account id, chunk id). Ids are validated by the
    caller (64 lowercase hex digits)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[int, str], _Waiters] = {}

    @asynccontextmanager
    async def locked(self, account_id: int, chunk_id: str) -> AsyncIterator[None]:
        """Hold while changing whether one chunk exists (write + record, or
        forget + delete). In-process: one server process per store."""
        key = (account_id, chunk_id)
        waiters = self._locks.setdefault(key, _Waiters())
        waiters.count += 1
        try:
            async with waiters.lock:
                yield
        finally:
            waiters.count -= 1
            if not waiters.count:
                del self._locks[key]

    @abstractmethod
    async def put(self, account_id: int, chunk_id: str, data: bytes) -> None:
        """Store durably (replacing any earlier bytes) before returning."""

    @abstractmethod
    async def get(self, account_id: int, chunk_id: str) -> bytes:
        """Raises NotFound if absent."""

    @abstractmethod
    async def delete(self, account_id: int, chunk_id: str) -> None:
        """Absent is not an error."""

    @abstractmethod
    async def exists(self, account_id: int, chunk_id: str) -> bool: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and the like."""


class LocalChunkStore(ChunkStore):
    """Chunks as files: ``DIR/chunks/<account id>/<id[:2]>/<id>``.

    Each file is written to a temporary name, fsynced and renamed into
    place (then the directory is fsynced), so a chunk is either absent or
    complete, even after a crash. File I/O runs in worker threads, at most
    ``max_threads`` at once.
    """

    def __init__(self, root: Path, *, max_threads: int = 8) -> None:
        super().__init__()
        self._root = root / "chunks"
        self._root.mkdir(parents=True, exist_ok=True)
        self._limiter = trio.CapacityLimiter(max_threads)

    def _path(self, account_id: int, chunk_id: str) -> Path:
        return self._root / str(account_id) / chunk_id[:2] / chunk_id

    async def put(self, account_id: int, chunk_id: str, data: bytes) -> None:
        path = self._path(account_id, chunk_id)
        await trio.to_thread.run_sync(_write_atomically, path, data, limiter=self._limiter)

    async def get(self, account_id: int, chunk_id: str) -> bytes:
        path = self._path(account_id, chunk_id)
        try:
            return await trio.to_thread.run_sync(path.read_bytes, limiter=self._limiter)
        except FileNotFoundError:
            raise NotFound("no such chunk") from None

    async def delete(self, account_id: int, chunk_id: str) -> None:
        path = self._path(account_id, chunk_id)
        await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True), limiter=self._limiter)

    async def exists(self, account_id: int, chunk_id: str) -> bool:
        path = self._path(account_id, chunk_id)
        return await trio.to_thread.run_sync(path.is_file, limiter=self._limiter)

    async def aclose(self) -> None:
        """Nothing to release: every file is closed after each call."""


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
