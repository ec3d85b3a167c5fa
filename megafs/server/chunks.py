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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from megafs.server.group import GroupCommit

__all__ = ["ChunkStore", "LocalChunkStore"]

#: Chunks from this size on are written in groups of their own.
_LARGE_CHUNK = 256 * 1024


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
    async def get_many(self, account_id: int, chunk_ids: Sequence[str]) -> list[bytes | None]:
        """Each chunk's bytes, in order; None for one that is absent."""

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
    place, then its directory is fsynced, so a chunk is either absent or
    complete, even after a power cut. Uploads that arrive together share that
    work by group commit (``group``; small chunks one group at a time, large
    ones up to four): one worker thread call writes all of a group, then
    fsyncs each file, renames them, and fsyncs each directory once; every
    put returns when its group is durable. Other file I/O runs in worker
    threads, at most ``max_threads`` at once.
    """

    def __init__(self, root: Path, *, max_threads: int = 8) -> None:
        super().__init__()
        self._root = root / "chunks"
        self._root.mkdir(parents=True, exist_ok=True)
        self._limiter = trio.CapacityLimiter(max_threads)
        # A small chunk costs the fixed price of its syncs: the fewer, larger
        # groups the better. A large one costs the time to write it out: a
        # few groups at once keep the disk busy.
        self._small_writes = GroupCommit(_write_group)
        self._large_writes = GroupCommit(_write_group, parallel=4)

    def _path(self, account_id: int, chunk_id: str) -> Path:
        return self._root / str(account_id) / chunk_id[:2] / chunk_id

    async def put(self, account_id: int, chunk_id: str, data: bytes) -> None:
        writes = self._small_writes if len(data) < _LARGE_CHUNK else self._large_writes
        await writes.run((self._path(account_id, chunk_id), data))

    async def get_many(self, account_id: int, chunk_ids: Sequence[str]) -> list[bytes | None]:
        paths = [self._path(account_id, chunk_id) for chunk_id in chunk_ids]
        # One worker-thread call for all: the hop, not the read, is most of
        # the cost of a chunk the page cache holds.
        return await trio.to_thread.run_sync(
            lambda: [_read_or_none(path) for path in paths], limiter=self._limiter
        )

    async def delete(self, account_id: int, chunk_id: str) -> None:
        path = self._path(account_id, chunk_id)
        await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True), limiter=self._limiter)

    async def exists(self, account_id: int, chunk_id: str) -> bool:
        path = self._path(account_id, chunk_id)
        return await trio.to_thread.run_sync(path.is_file, limiter=self._limiter)

    async def aclose(self) -> None:
        """Nothing to release: every file is closed after each call."""


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_group(jobs: list[tuple[Path, bytes]]) -> list[Exception | None]:
    """Store each (path, bytes) durably, in as few syncs as the group
    allows; returns None per stored file, or the OSError that stopped it.

    In steps, so that every fsync of the group follows every write: write
    each file under a temporary name (creating missing directories), fsync
    each, rename each into place, fsync each directory that gained an entry
    once. A file is never visible under its name before its bytes are
    durable.
    """
    outcomes: list[Exception | None] = [None] * len(jobs)
    tmps: dict[int, Path] = {}
    dirs: dict[Path, list[int]] = {}  # directories to sync, and whose files need them

    def attempt(i: int, step: Callable[[], object]) -> None:
        if outcomes[i] is None:
            try:
                step()
            except OSError as exc:
                outcomes[i] = exc

    for i, (path, data) in enumerate(jobs):
        tmps[i] = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        attempt(i, partial(_write_file, tmps[i], data, dirs, i))
    for i in tmps:
        attempt(i, partial(_fsync, tmps[i]))
    for i, (path, _) in enumerate(jobs):
        attempt(i, partial(os.replace, tmps[i], path))
        if outcomes[i] is None:
            dirs.setdefault(path.parent, []).append(i)
    for directory, users in dirs.items():
        try:
            _fsync(directory, os.O_DIRECTORY)
        except OSError as exc:
            for i in users:
                outcomes[i] = outcomes[i] or exc
    for i, tmp in tmps.items():
        if outcomes[i] is not None:
            tmp.unlink(missing_ok=True)
    return outcomes


def _write_file(path: Path, data: bytes, dirs: dict[Path, list[int]], user: int) -> None:
    """Write ``path`` (not yet durable), creating its missing directories;
    the parent of each new one must be synced for ``user`` (in ``dirs``)."""
    missing = []
    directory = path.parent
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        dirs.setdefault(directory.parent, []).append(user)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        # Start writing it out now: the disk then allocates every file of
        # the group before the first fsync, whose journal commit covers
        # them all (the later fsyncs find little left to do).
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _fsync(path: Path, flags: int = 0) -> None:
    """fsync a file, or with ``os.O_DIRECTORY`` a directory (where the
    filesystem can: some cannot fsync a directory, and say EINVAL)."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
