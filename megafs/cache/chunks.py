"""The chunk cache: sealed chunks on local disk, a few decrypted ones in memory.

Chunks are immutable and named by their id (a keyed hash of their content),
so caching them needs no invalidation: a file changes by pointing its
manifest at other chunks. On disk the cache holds only what the server
holds, ciphertext; the plaintext LRU lives in memory only.

A chunk is *dirty* from the moment it is sealed until the server has it.
Dirty chunks are never evicted, which is what lets the journal promise that
a closed file survives a crash of the daemon. Clean chunks are evicted least
recently used first once the cache is over its size limit, and whenever
its disk runs short of room (``room_to_keep``), whatever filled it: the
cache gives its room back to the user's other programs, and to its own
new chunks. On a disk full all the same, a download is served from memory
without being cached.

Dirty chunks may fill the cache up to its limit and no further: a new one
then waits for uploads to make room, as long as they do (backpressure on a
writer faster than the network), and fails with QuotaExceeded (ENOSPC)
while the uploads are failing (the server is unreachable) or have made no
progress for ``ROOM_WAIT`` seconds. A writer gets an error it can act on,
never a hang, and no change waiting for upload is ever dropped.

A small read of a chunk that is not in memory (a random reader) does not
decrypt the whole chunk: once a chunk has been verified whole, the cache
keeps a MAC of each 16 KiB piece of its file in memory, and reads, checks
and decrypts only the pieces the read needs (docs/format.md §14).

Disk I/O and crypto run in worker threads; the event loop thread only does
bookkeeping, and seals a small chunk, whose file the local state's log
writes (``LocalState.add_chunk_file``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import NoReturn, TypeVar, cast

import cachetools
import trio

from megafs.cache.chunkfiles import chunk_path, write_chunk_file
from megafs.cache.downloads import Downloads
from megafs.cache.service import HeldNursery
from megafs.cache.state import LOGGED_CHUNK, LocalState, local_disk
from megafs.crypto import CHUNK_SIZE, OVERHEAD, AccountKeys, SealedChunk, open_chunk, seal_chunk
from megafs.crypto.chunks import PieceMarker, PieceMarks
from megafs.errors import (
    IntegrityError,
    LocalDiskFull,
    MegafsError,
    NotFound,
    QuotaExceeded,
    RemoteError,
)
from megafs.remote import RemoteClient

__all__ = ["ChunkCache"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Below this size, sealing or opening inline beats a hop to a worker thread.
_INLINE_CRYPTO = 64 * 1024
#: preadv flag: fail instead of waiting for the disk (0 where unknown,
#: which sends every piece read to a worker thread).
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: Memory for piece marks: 2.4 KiB per chunk (1 KiB of marks, 1.2 KiB for
#: the decryption context its first piece read makes), so 7 GiB of cached
#: chunks, more than the default cache holds.
_MARKS_BYTES = 16 << 20
#: Free space the cache's disk must have for new small chunks to travel in
#: the local state's log (``_disk_has_room``): well above what a fold writes
#: (at most 8 MiB of log, twice while one fold runs).
DISK_MARGIN = 64 << 20
#: Free space the cache keeps on its disk at most, by giving back clean
#: chunks (``room_to_keep``).
KEEP_FREE_MAX = 512 << 20
#: Plaintext of chunks kept in memory (least recently used out): what the
#: read-ahead of two sequential readers holds (12 chunks each; a chunk that
#: a third one's read-ahead pushes out is read back from the disk cache, not
#: downloaded again), and a hot file of this size read at random decrypts
#: each chunk once.
PLAINTEXT_BYTES = 32 << 20
#: Buffers of chunks that left the plaintext LRU kept to decrypt the next
#: ones into: as many as decryptions run at once on two cores, and a spare.
SPARE_PLAINTEXTS = 3
#: Sealed bytes of new chunks kept in memory from their file's write until
#: their upload, which then does not read the file back: a sequential
#: writer's next few chunks.
UNSENT_BYTES = 8 << 20
#: Downloaded chunks whose cache files are being written behind their
#: readers (each holds its sealed bytes until written).
KEEPING = 8
#: Seconds a new chunk waits for room in a cache full of chunks waiting for
#: upload while no upload finishes, before it fails with ENOSPC.
ROOM_WAIT = 30.0


def room_to_keep(disk_bytes: int) -> int:
    """The free space the cache keeps on a disk of ``disk_bytes`` by giving
    back clean chunks: 5 % of it, at least ``DISK_MARGIN`` (what new small
    chunks need to travel in the log) and at most ``KEEP_FREE_MAX``. A
    full disk is what users meet otherwise: saves that fail with ENOSPC
    while gigabytes of the cache could be fetched again."""
    return max(DISK_MARGIN, min(KEEP_FREE_MAX, disk_bytes // 20))


class _Load:
    """One chunk being loaded; ``error`` is its failure once ``done`` is set
    (None if it succeeded or was cancelled)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: MegafsError | None = None


class _Plaintexts(cachetools.LRUCache[bytes, bytes | bytearray]):
    """The plaintext LRU, which also recycles the buffers of chunks it
    decrypted.

    A cold read decrypts one new 1 MiB chunk after another while the
    oldest leave the LRU. Each in fresh memory, glibc maps or grows its
    heaps anew and the kernel faults in and zeroes every page: three
    quarters of the daemon's page faults during a cold read after the
    receive buffers (docs/performance.md, §6). Instead a full chunk is
    decrypted into a bytearray (:meth:`buffer`), and one that leaves the
    LRU while nothing else references it is kept (at most
    ``SPARE_PLAINTEXTS``) for the next. Readers see such a chunk only
    through views (:func:`_readonly`), and every view holds a reference to
    its buffer until the last one is gone, so a buffer a reader, a FUSE
    reply or a worker thread still uses is never reused: it is left to
    the allocator instead. Used from the event-loop thread only.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize, getsizeof=len)
        self._spares: list[bytearray] = []
        self._free_refs = _refs_of_popped_alone()

    def popitem(self) -> tuple[bytes, bytes | bytearray]:
        """Evict the least recently used chunk (cachetools calls this, and
        drops what it returns)."""
        key, value = super().popitem()
        if (
            type(value) is bytearray
            and len(value) == CHUNK_SIZE
            and len(self._spares) < SPARE_PLAINTEXTS
            and sys.getrefcount(value) == self._free_refs
        ):
            self._spares.append(value)
        return key, value

    def buffer(self) -> bytearray:
        """A buffer to decrypt a full chunk into (its content is whatever
        it held before)."""
        return self._spares.pop() if self._spares else bytearray(CHUNK_SIZE)


def _pop_pair() -> tuple[bytes, bytearray]:
    return b"", bytearray(1)


def _refs_of_popped_alone() -> int:
    """The reference count :meth:`_Plaintexts.popitem` reads for a value
    nothing else holds, read the same way (its variable and the call's
    argument on CPython 3.11; an interpreter that skips counting some
    references reads less for a free buffer and a viewed one alike)."""
    _, value = _pop_pair()
    return sys.getrefcount(value)


def _readonly(plain: bytes | bytearray) -> bytes | memoryview:
    """A chunk's plaintext as readers may hold it: a buffer the LRU may
    recycle only as a read-only view, which keeps it from being reused
    while it lives."""
    return plain if isinstance(plain, bytes) else memoryview(plain).toreadonly()


class ChunkCache(HeldNursery):
    """Shared by every open file of one mount. :meth:`run` (started by the
    daemon) keeps room on the cache's disk and holds the nursery where
    downloads are written to the cache behind their readers."""

    def __init__(
        self,
        state: LocalState,
        remote: RemoteClient,
        keys: AccountKeys,
        *,
        limit_bytes: int,
        memory_bytes: int = PLAINTEXT_BYTES,
        uploads_failing: Callable[[], bool] | None = None,
    ) -> None:
        """``uploads_failing``: whether uploads fail now (the server is
        unreachable), so a cache full of dirty chunks fails new ones at once
        instead of waiting for room."""
        super().__init__()
        self._dir = state.chunk_dir
        self._root = str(state.chunk_dir)
        self._uploads_failing = uploads_failing or (lambda: False)
        self._state = state
        self._downloads = Downloads(remote)
        self._keys = keys
        self._limit = limit_bytes
        self._plain = _Plaintexts(memory_bytes)
        #: chunk id -> sealed size, least recently used first.
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._dirty: set[bytes] = set()
        #: Sealed bytes of the dirty chunks, and of those being written.
        self._dirty_bytes = 0
        self._reserved = 0
        #: Set (and replaced) whenever dirty chunks become clean.
        self._room = trio.Event()
        #: chunk id -> sealed bytes of a new chunk's file not yet uploaded
        #: (at most ``UNSENT_BYTES`` in all).
        self._unsent: dict[bytes, bytes] = {}
        self._unsent_bytes = 0
        #: chunk id -> set once the write of its cache file (by a store, or
        #: behind a download's reader) is done: one writer per chunk at a
        #: time, and whoever else wants the file waits for it.
        self._writing: dict[bytes, trio.Event] = {}
        self._disk_bytes = 0
        #: chunk id -> the load in progress (disk or server), shared by every reader.
        self._loads: dict[bytes, _Load] = {}
        #: chunk id -> marks of its cache file's pieces; a key that lives
        #: and dies with this process, so no file can carry a valid mark.
        self._marks: cachetools.LRUCache[bytes, PieceMarks] = cachetools.LRUCache(
            maxsize=_MARKS_BYTES, getsizeof=lambda m: len(m.macs) + 1400
        )
        self._marker = PieceMarker()
        self._crypto = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self._disk = trio.CapacityLimiter(4)
        self._disk_checked = -math.inf
        self._disk_roomy = False
        #: Set (and replaced) when a cache file could not be written for room.
        self._disk_short = trio.Event()
        #: Whether a download went uncached for room, since one was cached.
        self._uncached = False
        self._keep_slots = trio.Semaphore(KEEPING)

    async def load(self) -> None:
        """Read the chunk index left by an earlier run, and remove the
        temporary files of writes it did not finish."""

        def prepare() -> None:
            self._dir.mkdir(parents=True, exist_ok=True)
            for tmp in self._dir.glob("*/*.tmp"):
                tmp.unlink(missing_ok=True)

        await trio.to_thread.run_sync(prepare)
        for chunk_id, size, dirty in await self._state.load_chunks():
            self._index[chunk_id] = size
            self._disk_bytes += size
            if dirty:
                self._dirty.add(chunk_id)
                self._dirty_bytes += size

    async def _meanwhile(self) -> NoReturn:
        """Keep room on the cache's disk while the mount lasts (:meth:`run`
        holds the nursery in which downloads are written to the cache behind
        their readers, :meth:`_keep_behind`): once a second, and at once when
        a cache file found the disk full, give back clean chunks if the disk
        has less than ``room_to_keep`` free. A save that failed with ENOSPC
        then succeeds when tried again."""
        failure = ""
        while True:
            short = self._disk_short
            with trio.move_on_after(1.0):
                await short.wait()
            if short.is_set():
                self._disk_short = trio.Event()
            try:
                await self._give_back_room()
            except (MegafsError, OSError) as exc:
                # A full disk that the index's write still met, or a cache
                # directory gone bad: tried again in a second, said once.
                if str(exc) != failure:
                    log.warning("could not give back the cache's room: %s", exc)
                failure = str(exc)
            else:
                failure = ""

    # -- facts -------------------------------------------------------------

    @property
    def dirty_ids(self) -> frozenset[bytes]:
        return frozenset(self._dirty)

    def is_dirty(self, chunk_id: bytes) -> bool:
        return chunk_id in self._dirty

    def statistics(self) -> dict[str, int]:
        return {
            "disk_bytes": self._disk_bytes,
            "disk_chunks": len(self._index),
            "dirty_chunks": len(self._dirty),
            "dirty_bytes": self._dirty_bytes,
            "memory_bytes": int(self._plain.currsize),
        }

    # -- reading ------------------------------------------------------------

    async def read(
        self, secret: bytes, *, mark: bool = False, ahead: bool = False
    ) -> bytes | memoryview:
        """The plaintext of the chunk ``secret`` names, verified (a read-only
        view of a buffer the LRU recycles once no view of it is left).

        From the plaintext LRU if there (no copy, no second check: it was
        verified on its way in), else from the disk cache, else from the
        server. Concurrent reads of one chunk share one load and its outcome,
        so a chunk is read and decrypted once, whoever asked first (a reader
        or read-ahead).

        Raises IntegrityError if what the disk or the server holds is not
        exactly that chunk (a corrupt cache file is dropped and fetched anew).

        Cancellation: a load cancelled before its data arrived caches nothing
        and leaves the chunk to whoever asks next (its waiters load it
        themselves); once a download has arrived and been verified, its cache
        file is written, shielded, behind the reader (:meth:`_keep_behind`),
        so the disk cache and its index never disagree.

        ``mark``: also take the piece marks of the chunk's cache file, so
        later small reads can use :meth:`read_range` without a whole chunk.
        ``ahead``: read-ahead asks, not a reader (see ``Downloads.get``).
        """
        plain = self._plain.get(secret)
        if plain is not None:
            return _readonly(plain)
        chunk_id = self._keys.chunk_id(secret)
        while (pending := self._loads.get(chunk_id)) is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise type(pending.error)(pending.error.detail) from pending.error
            plain = self._plain.get(secret)
            if plain is not None:
                return _readonly(plain)
        load = self._loads[chunk_id] = _Load()
        try:
            plain = await self._load(secret, chunk_id, mark, ahead)
        except MegafsError as exc:
            load.error = exc
            raise
        finally:
            del self._loads[chunk_id]
            load.done.set()
        return _readonly(plain)

    async def read_range(
        self, secret: bytes, start: int, n: int, length: int
    ) -> bytes | memoryview:
        """``n`` bytes from ``start`` of the chunk ``secret`` names, which
        holds ``length`` bytes (IntegrityError otherwise).

        For small reads of chunks not in memory: from the cache file, only
        the pieces the range touches, each checked against the marks taken
        when the whole chunk was last verified. Without marks (the first
        such read of a chunk since the mount) the chunk is read whole and
        marked. A piece that no longer matches (the file changed on disk) is
        not an answer: the whole chunk is then read and verified again.
        """
        plain = self._plain.get(secret)
        if plain is None:
            chunk_id = self._keys.chunk_id(secret)
            marks = self._marks.get(chunk_id)
            if marks is not None and chunk_id not in self._loads:
                if marks.length != length:
                    raise IntegrityError()
                piece = await self._read_piece(chunk_id, marks, start, n)
                if piece is not None:
                    self._index.move_to_end(chunk_id)
                    return piece
                self._marks.pop(chunk_id, None)
            plain = await self.read(secret, mark=True)
        if len(plain) != length:
            raise IntegrityError()
        return memoryview(plain)[start : start + n].toreadonly()

    async def _read_piece(
        self, chunk_id: bytes, marks: PieceMarks, start: int, n: int
    ) -> bytes | None:
        """The range from the chunk's cache file, or None if the file is gone
        or does not match its marks. A small range is usually in the page
        cache (the chunk's whole read brought its file in), and is then read
        and decrypted on the event loop (``_read_small``)."""
        offset, size = marks.span(start, n)
        path = self._path(chunk_id)

        def read(flags: int) -> bytes | None:
            sealed = _pread(path, offset, size, flags)
            if sealed is None:
                return None
            try:
                return self._marker.open(marks, sealed, start, n)
            except IntegrityError:
                return None

        if chunk_id not in self._index:
            return None
        return await self._read_small(size, read)

    async def _read_small(self, size: int, read: Callable[[int], _T]) -> _T:
        """``read(RWF_NOWAIT)`` on the event loop if it reads at most
        ``_INLINE_CRYPTO`` bytes, all of them in the page cache (the flag
        makes it fail rather than wait for the disk; reading and decrypting
        such a range costs less than the hop to a worker thread); else
        ``read(0)`` in a worker thread."""
        if _NOWAIT and size <= _INLINE_CRYPTO:
            try:
                return read(_NOWAIT)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                    raise
        return await trio.to_thread.run_sync(read, 0, limiter=self._disk)

    async def _load(
        self, secret: bytes, chunk_id: bytes, mark: bool, ahead: bool
    ) -> bytes | bytearray:
        """Disk cache, else server; verified, and kept in the LRU (and
        marked, if ``mark``)."""
        while (writing := self._writing.get(chunk_id)) is not None:
            await writing.wait()
        if (size := self._index.get(chunk_id)) is not None:
            blob = await self._read_file(chunk_id, size)
            if blob is None:
                if chunk_id in self._dirty:
                    raise IntegrityError("a chunk waiting for upload is missing from the cache")
                await self._drop(chunk_id)
            else:
                try:
                    plain = await self._open(secret, blob, chunk_id if mark else None)
                except IntegrityError:
                    if chunk_id in self._dirty:
                        raise
                    log.warning("chunk %s: cache file corrupt, fetching again", _short(chunk_id))
                    await self._drop(chunk_id)
                else:
                    self._index.move_to_end(chunk_id)
                    self._plain[secret] = plain
                    return plain
        try:
            blob = await self._downloads.get(chunk_id, ahead=ahead)
        except NotFound:
            # A manifest names it, so the server must have it: withheld or
            # lost, it is an I/O error of this file, not "no such file".
            raise RemoteError(f"the server does not have chunk {chunk_id.hex()[:16]}") from None
        plain = await self._open(secret, blob, chunk_id if mark else None)
        self._plain[secret] = plain
        with trio.CancelScope(shield=True):
            await self._keep_behind(chunk_id, blob)
        return plain

    async def _keep_behind(self, chunk_id: bytes, blob: bytes | bytearray | memoryview) -> None:
        """Cache a verified download on disk, in the cache's nursery: the
        reader has its plaintext and need not wait for the file (about a
        third of a cold read's time per chunk). At most ``KEEPING`` such
        writes at once; the next download waits for one to end. Without the
        nursery (the cache not running), written here. A store of the same
        content that got there first has written the file already."""
        await self._keep_slots.acquire()
        while (other := self._writing.get(chunk_id)) is not None:
            await other.wait()
        if chunk_id in self._index:
            self._keep_slots.release()
            return
        done = self._writing[chunk_id] = trio.Event()
        if self._nursery is None:
            await self._keep(chunk_id, blob, done)
        else:
            self._nursery.start_soon(self._keep, chunk_id, blob, done)

    async def _keep(
        self, chunk_id: bytes, blob: bytes | bytearray | memoryview, done: trio.Event
    ) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self._keep_download(chunk_id, blob)
        except (MegafsError, OSError) as exc:
            # The read has its plaintext; the chunk is fetched again if asked.
            log.warning("chunk %s: downloaded, not cached: %s", _short(chunk_id), exc)
        except Exception:
            # A bug: said with its traceback, and kept from the cache's
            # nursery, which would stop the mount (a FUSE request's own
            # failure is EIO for that request alone).
            log.exception("chunk %s: downloaded, not cached", _short(chunk_id))
        finally:
            del self._writing[chunk_id]
            done.set()
            self._keep_slots.release()

    async def _keep_download(self, chunk_id: bytes, blob: bytes | bytearray | memoryview) -> None:
        """Cache a verified download on disk, or on a full disk keep it in
        memory only: a read must not fail for want of a copy it does not
        need. The cache then makes room for the next one."""
        try:
            await self._write_file(chunk_id, blob, dirty=False)
        except LocalDiskFull as exc:
            self._marks.pop(chunk_id, None)  # they would describe no file
            self._disk_short.set()
            if chunk_id not in self._index:
                # Written, then not indexed for room: no row would name it
                # (and no other write of it runs: ``_writing``).
                await trio.to_thread.run_sync(_unlink, self._path(chunk_id), limiter=self._disk)
            if not self._uncached:
                self._uncached = True
                log.warning("%s: downloaded chunks are not cached meanwhile", exc.detail)
        else:
            self._uncached = False

    async def _open(
        self, secret: bytes, blob: bytes | bytearray | memoryview, mark: bytes | None = None
    ) -> bytes | bytearray:
        """Open a chunk; with ``mark`` (its id), also mark the pieces of
        ``blob``, which is then its cache file's content. A full chunk is
        decrypted into a buffer from the LRU (:class:`_Plaintexts`), which
        is dropped if the chunk fails its checks."""
        into = self._plain.buffer() if len(blob) == CHUNK_SIZE + OVERHEAD else None

        def run() -> tuple[bytes | bytearray, PieceMarks | None]:
            plain = open_chunk(self._keys, secret, blob, into=into)
            return plain, None if mark is None else self._marker.mark(secret, blob)

        plain, marks = await self._in_crypto(len(blob), run)
        if mark is not None and marks is not None:
            self._marks[mark] = marks
        return plain

    # -- writing ------------------------------------------------------------

    async def store(self, plaintext: bytes) -> tuple[bytes, bytes, bool]:
        """Seal a chunk and keep it on disk until uploaded.

        Returns (secret, chunk id, needs upload). A chunk the cache already
        holds is not written twice: that is deduplication within the account.
        Nor is one that another store is writing (equal chunks of a file
        sealed at once): this one waits for it and shares its file.
        """
        size = len(plaintext)

        def secret_and_seal() -> tuple[bytes, bytes, SealedChunk | None]:
            # One hop for both: the seal is skipped for a chunk the cache
            # holds or is storing (a copy's chunks are not encrypted at all).
            # Seen from a worker thread these can be stale; the checks
            # below are the ones that count.
            secret = self._keys.chunk_secret(plaintext)
            chunk_id = self._keys.chunk_id(secret)
            if chunk_id in self._index or chunk_id in self._writing:
                return secret, chunk_id, None
            return secret, chunk_id, seal_chunk(self._keys, plaintext, secret=secret)

        secret, chunk_id, sealed = await self._in_crypto(size, secret_and_seal)
        self._plain[secret] = bytes(plaintext)
        while (other := self._writing.get(chunk_id)) is not None:
            await other.wait()  # the same content, sealed by another writer or downloaded
        if chunk_id in self._index:
            # Held already (a copy, a file saved again unchanged): not even
            # encrypted again.
            self._index.move_to_end(chunk_id)
            return secret, chunk_id, chunk_id in self._dirty
        done = self._writing[chunk_id] = trio.Event()
        try:
            if sealed is None:
                sealed = await self._in_crypto(
                    size, lambda: seal_chunk(self._keys, plaintext, secret=secret)
                )
            sealed_size = len(sealed.blob)
            await self._wait_for_room(sealed_size)
            self._reserved += sealed_size
            try:
                if sealed_size <= LOGGED_CHUNK and self._disk_has_room():
                    await self._log_new(chunk_id, sealed.blob)
                else:
                    await self._write_new_file(chunk_id, sealed.blob)
                    self._keep_unsent(chunk_id, sealed.blob)
            finally:
                self._reserved -= sealed_size
        finally:
            del self._writing[chunk_id]
            done.set()
        return secret, chunk_id, True

    async def _in_crypto(self, size: int, fn: Callable[[], _T]) -> _T:
        """``fn()`` on a crypto worker thread (hashlib and AES-GCM release
        the GIL, so both cores work), or inline if it handles only ``size``
        bytes, when the hop would cost more than it saves."""
        if size <= _INLINE_CRYPTO:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._crypto)

    async def _wait_for_room(self, size: int) -> None:
        """Until ``size`` more dirty bytes fit under the limit (an empty
        cache takes any one chunk, whatever the limit). QuotaExceeded while
        uploads fail, or after ``ROOM_WAIT`` seconds without one finishing.

        Cancellation: a plain wait; nothing is reserved until it returns.
        """
        last_progress = trio.current_time()
        while self._dirty_bytes + self._reserved and (
            self._dirty_bytes + self._reserved + size > self._limit
        ):
            if self._uploads_failing() or trio.current_time() - last_progress > ROOM_WAIT:
                raise QuotaExceeded(
                    "the local cache is full of changes waiting for upload (--cache-size)"
                )
            room = self._room
            with trio.move_on_after(1):  # and look at the uploads again
                await room.wait()
            if room.is_set():
                last_progress = trio.current_time()

    def _keep_unsent(self, chunk_id: bytes, blob: bytes) -> None:
        if chunk_id in self._dirty and self._unsent_bytes + len(blob) <= UNSENT_BYTES:
            self._unsent[chunk_id] = blob
            self._unsent_bytes += len(blob)

    def _sent(self, chunk_id: bytes) -> None:
        blob = self._unsent.pop(chunk_id, None)
        if blob is not None:
            self._unsent_bytes -= len(blob)

    async def sealed_blobs(self, chunk_ids: list[bytes]) -> list[bytes]:
        """The sealed bytes of chunks on disk, for upload: from memory if
        they were sealed moments ago, else one worker-thread call for all
        of them (a batch of small files' chunks)."""

        blobs = [
            self._unsent.get(chunk_id) or self._state.unfolded_chunk(chunk_id)
            for chunk_id in chunk_ids
        ]
        on_disk = [i for i, blob in enumerate(blobs) if blob is None]

        def read() -> None:
            for i in on_disk:
                blobs[i] = _read_or_none(self._path(chunk_ids[i]))

        if on_disk:
            await trio.to_thread.run_sync(read, limiter=self._disk)
        for chunk_id, blob in zip(chunk_ids, blobs, strict=True):
            if blob is None:
                raise NotFound(f"chunk {_short(chunk_id)} is not in the local cache")
        return cast(list[bytes], blobs)

    def sealed_size(self, chunk_id: bytes) -> int | None:
        """The size of the chunk's sealed bytes, if it is in the cache."""
        return self._index.get(chunk_id)

    async def mark_uploaded(self, chunk_ids: list[bytes]) -> None:
        ids = [i for i in chunk_ids if i in self._dirty]
        if not ids:
            return
        await self._state.mark_clean(ids)
        for chunk_id in ids:
            self._sent(chunk_id)
            if chunk_id in self._dirty:
                self._dirty.discard(chunk_id)
                self._dirty_bytes -= self._index.get(chunk_id, 0)
        self._room.set()
        self._room = trio.Event()
        await self._evict()

    async def sync_files(self, chunk_ids: list[bytes]) -> None:
        """fsync the given chunk files (before an fsync'd journal entry
        names them), writing first those still in the log."""
        await self._state.write_chunk_files(chunk_ids)

        def sync() -> None:
            for chunk_id in chunk_ids:
                try:
                    fd = os.open(self._path(chunk_id), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        with local_disk(self._dir):
            await trio.to_thread.run_sync(sync, limiter=self._disk)

    # -- files --------------------------------------------------------------

    def _path(self, chunk_id: bytes) -> str:
        return chunk_path(self._root, chunk_id)

    async def _read_file(self, chunk_id: bytes, size: int) -> bytes | bytearray | None:
        """A cache file's sealed bytes (``size`` as indexed; None if it is
        missing). A small one in the page cache is read on the event loop
        (``_read_small``): opening a tree of small files (``git add``, a file
        manager's thumbnails) then costs no thread hop per file, which waits
        for a core and for the GIL."""
        blob = self._state.unfolded_chunk(chunk_id)
        if blob is not None:
            return blob
        path = self._path(chunk_id)

        def read(flags: int) -> bytes | bytearray | None:
            if not flags:
                return _read_or_none(path)  # whole, whatever its index row says
            return _pread(path, 0, size, flags)

        return await self._read_small(size, read)

    async def _write_file(
        self, chunk_id: bytes, blob: bytes | bytearray | memoryview, *, dirty: bool
    ) -> None:
        path = self._path(chunk_id)
        with local_disk(self._dir):
            await trio.to_thread.run_sync(write_chunk_file, path, blob, limiter=self._disk)
        await self._state.add_chunk(chunk_id, len(blob), dirty=dirty)
        await self._indexed(chunk_id, len(blob), dirty=dirty)

    async def _write_new_file(self, chunk_id: bytes, blob: bytes) -> None:
        """A new chunk's file; on a full disk, tried once more after giving
        back clean chunks, so that a cache full of what the server already
        has does not fail the save."""
        try:
            await self._write_file(chunk_id, blob, dirty=True)
        except LocalDiskFull:
            if not await self._give_back_room():
                raise
            await self._write_file(chunk_id, blob, dirty=True)

    async def _log_new(self, chunk_id: bytes, blob: bytes) -> None:
        """A small new chunk: its sealed bytes go into the local state's
        log, one ``write(2)`` on the event loop, and the log's next fold
        writes its file. A close thus waits for no worker thread and no
        file creation (0.2-1 ms on some disks), and the chunk survives a
        crash of the daemon all the same."""
        await self._state.add_chunk_file(chunk_id, blob)
        await self._indexed(chunk_id, len(blob), dirty=True)

    def _disk_has_room(self) -> bool:
        """Whether the cache's disk has ``DISK_MARGIN`` free (asked at most
        once a second). A logged chunk's file is written by a later fold,
        while the log still holds its bytes: on a nearly full disk that
        write could fail after its ``close`` succeeded, so chunks are then
        written before ``close`` returns, which reports a full disk."""
        now = trio.current_time()
        if now - self._disk_checked >= 1.0:
            self._disk_checked = now
            space = self._disk_space()
            self._disk_roomy = space is not None and space[0] >= DISK_MARGIN
        return self._disk_roomy

    def _disk_space(self) -> tuple[int, int] | None:
        """(free bytes, size) of the cache's disk, or None if it cannot say."""
        try:
            st = os.statvfs(self._root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    async def _indexed(self, chunk_id: bytes, size: int, *, dirty: bool) -> None:
        """Count a chunk the cache now holds (and evict if over the limit)."""
        if chunk_id not in self._index:
            self._disk_bytes += size
        if dirty and chunk_id not in self._dirty:
            self._dirty.add(chunk_id)
            self._dirty_bytes += size
        elif chunk_id in self._dirty:
            self._dirty_bytes += size - self._index[chunk_id]
        self._index[chunk_id] = size
        await self._evict()

    async def _drop(self, chunk_id: bytes) -> None:
        self._marks.pop(chunk_id, None)
        self._sent(chunk_id)
        size = self._index.pop(chunk_id, None)
        if size is None:
            return
        self._disk_bytes -= size
        if chunk_id in self._dirty:
            self._dirty.discard(chunk_id)
            self._dirty_bytes -= size
        # Else a fold could write it after the unlink.
        await self._state.write_chunk_files([chunk_id])
        path = self._path(chunk_id)
        await trio.to_thread.run_sync(_unlink, path, limiter=self._disk)
        await self._state.forget_chunks([chunk_id])

    async def _evict(self) -> None:
        """Drop clean chunks, least recently used first, until under the limit."""
        if self._disk_bytes > self._limit:
            await self._evict_clean(self._disk_bytes - self._limit)

    async def _give_back_room(self) -> bool:
        """If the cache's disk has less than ``room_to_keep`` free, drop
        clean chunks, least recently used first, to make up the difference
        (as far as they can). Returns whether any were dropped."""
        space = self._disk_space()
        if space is None:
            return False
        free, size = space
        short = room_to_keep(size) - free
        if short <= 0:
            return False
        freed = await self._evict_clean(short)
        if freed:
            log.info(
                "the cache's disk has %d MiB free: gave back %d MiB of cached chunks",
                free >> 20,
                freed >> 20,
            )
        return freed > 0

    async def _evict_clean(self, excess: int) -> int:
        """Drop clean chunks, least recently used first, until ``excess``
        bytes are dropped or none is left; returns the bytes dropped."""
        victims: list[bytes] = []
        freed = 0
        for chunk_id, size in self._index.items():
            if freed >= excess:
                break
            if chunk_id in self._dirty or chunk_id in self._loads:
                continue
            victims.append(chunk_id)
            freed += size
        if not victims:
            return 0
        for chunk_id in victims:
            self._disk_bytes -= self._index.pop(chunk_id)
            self._marks.pop(chunk_id, None)
        paths = [self._path(i) for i in victims]
        await trio.to_thread.run_sync(lambda: [_unlink(p) for p in paths], limiter=self._disk)
        await self._state.forget_chunks(victims)
        return freed


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _short(chunk_id: bytes) -> str:
    return chunk_id.hex()[:12]


def _pread(path: str, offset: int, size: int, flags: int) -> bytearray | None:
    """Up to ``size`` bytes of a cache file from ``offset``, in the buffer
    they were read into; None if the file is missing. With ``RWF_NOWAIT``
    in ``flags``: EAGAIN unless the page cache holds all ``size`` of them
    (a file shorter than that is then read by the caller without the
    flag)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        buf = bytearray(size)
        got = os.preadv(fd, [buf], offset, flags)
    finally:
        os.close(fd)
    if got < size:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "partly on disk")
        del buf[got:]
    return buf


def _read_or_none(path: str) -> bytes | None:
    """A cache file's bytes, or None if it is not there (blocking)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
