"""Read-ahead: the chunks after a sequential reader's position, in flight.

The kernel asks a FUSE filesystem for at most 128 KiB ahead of a reader
(design/fuse-notes.md), and a chunk that is not in memory costs a download,
a decryption and a cache write. Fetched one at a time, a cold sequential
read takes the sum of those latencies and leaves both cores mostly idle.
So each open handle gets a :class:`Reader` that watches its offsets; once
three reads in a row follow each other, the next ``window`` stored chunks are
fetched concurrently through :meth:`ChunkCache.read` (downloads in
parallel, decryption in worker threads), which verifies them, keeps their
plaintext in its bounded LRU and merges them with the reader's own fetch of
the same chunk. The window is topped up ``_STEP`` chunks at a time, asked
for at the same moment, so that they travel in one download request
(``cache/downloads.py``). A reader whose reads do not follow each other gets no
read-ahead, and when a sequential reader jumps, what was in flight for it is
cancelled.

Ownership (every task has an owner): :meth:`ReadAhead.run` holds the
mount's read-ahead nursery and is started by the daemon. A handle that
turns sequential starts its prefetches there through a
:class:`PrefetchGroup` of its own, which cancels them all at once; the
group is cancelled when the handle is released (:meth:`Reader.close`),
when the reader jumps, and when the file's content changes (its
``revision``, or another device's content replacing it).

Bounds: at most ``window`` chunks ahead per handle, and at most
``max_fetches`` prefetches running at once in the mount, each holding up to
a sealed chunk and its plaintext (2 MiB); the rest wait on a limiter holding
nothing. Prefetched plaintext lives only in the chunk cache's LRU.

Failures: a prefetch is a hint. Its error is logged at DEBUG and dropped,
and nothing reaches memory or disk that ``ChunkCache.read`` did not verify.
A read of that chunk afterwards fetches it as if there had been no
prefetch; a read that arrives while the prefetch's download is still
running shares its outcome, as two reads of one chunk always do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import trio

from megafs.cache.chunks import ChunkCache
from megafs.cache.content import FileContent
from megafs.cache.service import HeldNursery
from megafs.crypto import CHUNK_SIZE
from megafs.errors import MegafsError
from megafs.wire import MAX_FETCH_ITEMS

__all__ = ["PrefetchGroup", "ReadAhead", "Reader", "as_hint"]

log = logging.getLogger(__name__)

#: Chunks kept in flight ahead of one sequential reader.
WINDOW = 12
#: Chunks scheduled at once, so that they travel in one download request
#: (``cache/downloads.py``): the window is topped up in steps of this many.
_STEP = MAX_FETCH_ITEMS
#: Prefetches running at once in the mount (each up to 2 MiB in memory).
MAX_FETCHES = 12
#: How far from the end of the previous read the next one may start and still
#: follow it: twice the kernel's largest read-ahead request.
_NEAR = 256 * 1024
#: Reads in a row, each following the one before, that make a reader
#: sequential. Three: a random reader of a file of N MiB starts near the end
#: of its previous read with a chance of about 1/(2N), twice in a row only
#: with the square of that; a sequential reader's first three reads in
#: requests of 128 KiB all come from its first chunk, whose fetch they wait
#: for anyway (in requests of a chunk, see ``_WHOLE_FROM_START``).
_SEQUENTIAL = 3
#: A read this large from offset 0 makes a reader sequential at once. cat
#: and cp read in buffers of st_blksize (one chunk), and the kernel then
#: asks a chunk at a time (its first read-ahead window, mm/readahead.c, is
#: half a chunk or more once a read asks 256 KiB or more); three such reads
#: span three chunks, each fetched in turn before read-ahead begins, so a
#: file of two or three chunks (a photo) would be read one round trip at a
#: time. A reader of a header or a file's magic number asks a few pages,
#: for which the kernel asks 16 to 256 KiB.
_WHOLE_FROM_START = CHUNK_SIZE // 2


class ReadAhead(HeldNursery):
    """The mount's read-ahead: its nursery, its limit, and a :class:`Reader`
    per open handle.

    :meth:`run` holds the nursery every handle's prefetches run in; until it
    runs (and after it ends), readers read without read-ahead.
    """

    def __init__(
        self, chunks: ChunkCache, *, window: int = WINDOW, max_fetches: int = MAX_FETCHES
    ) -> None:
        super().__init__()
        self._chunks = chunks
        #: Chunks kept in flight ahead of one sequential reader.
        self.window = window
        self._fetches = trio.CapacityLimiter(max_fetches)

    def reader(
        self,
        on_start: Callable[[], None] | None = None,
        on_whole: Callable[[], None] | None = None,
    ) -> Reader:
        """The reading side of one new handle; ``on_start``, ``on_whole``:
        see :class:`Reader`."""
        return Reader(self, on_start, on_whole)

    def group(self) -> PrefetchGroup | None:
        """A new group for one owner's prefetches, in the mount's nursery;
        None when read-ahead is not running."""
        return None if self._nursery is None else PrefetchGroup(self._nursery)

    async def fetch(self, secret: bytes) -> None:
        """Bring one chunk into the cache's LRU, as a hint (:func:`as_hint`):
        one bad prefetch cannot stop the daemon."""
        async with self._fetches:
            with as_hint("a chunk"):
                await self._chunks.read(secret, ahead=True)


@contextlib.contextmanager
def as_hint(what: str) -> Iterator[None]:
    """Read-ahead work is a hint: its errors are dropped, never raised into
    the mount's nursery. A ``MegafsError`` is logged at DEBUG (the read that
    needs the data loads it again and reports); anything else is a bug,
    logged with its traceback."""
    try:
        yield
    except MegafsError as exc:
        log.debug("read-ahead of %s failed: %s", what, exc.detail)
    except Exception:
        log.exception("read-ahead of %s failed", what)


class PrefetchGroup:
    """Prefetch tasks with one owner (a handle, or a folder's stream of
    files), in the mount's read-ahead nursery: :meth:`cancel` ends them
    all, those not started yet included.

    Each task runs in a cancel scope of its own, made when it is started
    and kept by the group while it runs, so a group is made and used
    without an ``await``: an owner's reads never race each other to open
    one, and no task waits idle to hold one open.
    """

    __slots__ = ("_cancelled", "_nursery", "_scopes")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled = False

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` in the group; nothing once it is cancelled."""
        if self._cancelled:
            return
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self._nursery.start_soon(self._run, scope, fn, args)

    def cancel(self) -> None:
        self._cancelled = True
        for scope in self._scopes:
            scope.cancel()

    async def _run(
        self,
        scope: trio.CancelScope,
        fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
    ) -> None:
        try:
            with scope:
                await fn(*args)
        finally:
            self._scopes.discard(scope)


class Reader:
    """One handle's reads of one file, with read-ahead once they are
    sequential.

    ``on_start`` is called if the handle's first read starts at offset 0,
    before it waits. ``on_whole`` is called once, before the read that
    shows the file is being read whole: reads that follow each other from
    offset 0 on, one of which reaches the end of the file or has read-ahead
    scheduled through its last chunk. The mount reads ahead across a
    folder's files with them (``fs/folder_ahead.py``).
    """

    def __init__(
        self,
        pool: ReadAhead,
        on_start: Callable[[], None] | None = None,
        on_whole: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_start = on_start
        self._on_whole = on_whole
        #: The content (and its revision) the scheduled prefetches came from.
        self._content: FileContent | None = None
        self._revision = 0
        #: Where the previous read ended (a first read at 0 follows it).
        self._end = 0
        #: Reads in a row that began near where the one before ended.
        self._streak = 0
        #: Where the first of those reads began.
        self._run_start = 0
        #: The highest chunk index handed to the current group.
        self._scheduled = -1
        self._group: PrefetchGroup | None = None
        self._closed = False

    async def read(self, content: FileContent, offset: int, length: int) -> bytes | memoryview:
        """``content.read``, after starting the read-ahead it calls for.

        ``content`` is the file's as of this read: another device's change
        may replace it while the handle is open. The prefetches start before
        this read waits for its own chunk, so they overlap with it.
        """
        self._follow(content, offset, length)
        if self._on_start is not None:
            on_start, self._on_start = self._on_start, None
            if offset == 0:
                on_start()
        if self._on_whole is not None and self._reads_whole(content):
            on_whole, self._on_whole = self._on_whole, None
            on_whole()
        return await content.read(offset, length, whole=self._streak >= _SEQUENTIAL)

    def close(self) -> None:
        """Cancel what is in flight for this handle (on release)."""
        self._closed = True
        self._stop()

    def _follow(self, content: FileContent, offset: int, length: int) -> None:
        if content is not self._content or content.revision != self._revision:
            # New content, or its bytes changed: what was scheduled may be
            # stale.
            self._content = content
            self._revision = content.revision
            self._stop()
        # The kernel's own read-ahead may deliver requests a little out of
        # order, so a read starting a little before or after still follows.
        if abs(offset - self._end) <= _NEAR:
            if self._streak == 0:
                self._run_start = offset  # (the first read: where it starts)
            self._streak += 1
        else:
            self._streak = 1
            self._run_start = offset
            self._stop()
        if offset == 0 and length >= _WHOLE_FROM_START:
            self._streak = max(self._streak, _SEQUENTIAL)
        self._end = offset + length
        if self._streak < _SEQUENTIAL:
            return
        last = (offset + max(length, 1) - 1) // CHUNK_SIZE
        start = max(self._scheduled, last) + 1
        stop = min(last + self._pool.window, content.chunk_count - 1)
        if start > stop or (stop - start + 1 < _STEP and stop < content.chunk_count - 1):
            return
        self._scheduled = stop
        if self._group is None and not self._closed:
            self._group = self._pool.group()
        if self._group is None:
            return
        for index in range(start, stop + 1):
            secret = content.stored_secret(index)
            if secret is not None:
                self._group.start_soon(self._pool.fetch, secret)

    def _reads_whole(self, content: FileContent) -> bool:
        if self._run_start != 0:
            return False
        if self._end >= content.size:
            return True
        return self._streak >= _SEQUENTIAL and self._scheduled >= content.chunk_count - 1

    def _stop(self) -> None:
        if self._group is not None:
            self._group.cancel()
            self._group = None
        self._scheduled = -1
