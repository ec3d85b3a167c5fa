"""Read-ahead across a folder's files, for a program going through them one
after another.

A folder of photos or songs is read file by file: ``cat *`` and ``cp *``,
a file manager copying it or making its thumbnails, ``cp -r`` and ``tar``
read each file whole; a file manager sniffing types, a photo or music
library reading tags, ``file *`` read the start of each. Each file's own
read-ahead (``cache/readahead.py``) keeps its later chunks in flight, but
a file of a few chunks ends before that pays off, and the next file's
first chunk is only asked for once the program opens it: each file then
costs a round trip to the server with both cores mostly idle. So once two
files of a folder have been begun (a handle's first read at offset 0) in
the folder's order, the files after them are fetched ahead: once files of
the stream are read whole, their first chunks up to one reader's window
(12 chunks), else the first chunk of each of the next 12 files, which is
all that reading a file's start needs (a chunk is verified whole before
any of its bytes is used). The window is topped up as further files are
begun, four chunks at a time so that they travel in one request.

The order is the one the program follows: name order (``ls``, a shell's
glob, a file manager, rsync) or the folder's own (``readdir``, which
``cp -r`` and ``tar`` follow). The second file must come after the first
within ``_SKIP`` entries of one of them, so a program that leaves out some
files (a thumbnailer skipping sidecar files) still counts as in order
(where it does in both, the order with fewer entries between them wins,
name order if as many). Once a stream runs, a file up to ``_SKIP`` before
the last one (read out of turn by one of several threads) neither
advances nor ends it; any other file starts the stream over from the
last file read, so one that guessed the wrong order of two goes on in
the right one at the next file.

Ownership: each followed folder is a stream holding a group in the
mount's read-ahead nursery (:meth:`ReadAhead.group`), with one task per
file read ahead: it loads the file's manifest (``Tree.stored_secrets``;
from memory, the local copy, or the server) and starts the fetches of
its first chunks in the same group. The group is cancelled when a file
begun in that folder does not follow the stream, or when the stream is
the oldest of more than ``_STREAMS``. Prefetches are hints, as a single file's are: a
failure is logged at DEBUG and the read that needs the chunk fetches it
itself; every chunk is verified by ``ChunkCache.read``, so what a stream
fetched can never be read as another file's bytes.

Bounds: at most ``window`` chunks and ``window`` files ahead per stream,
in folders of at most ``FOLLOWED_FOLDER`` entries; the fetches share the
mount's read-ahead limit. Telling whether two files follow each other
needs the folder's names in order: they are listed (and sorted, for name
order) when first needed and kept while the folder's names stay the same
(``Children.generation``), so a program going through a big folder's
files in no order pays for that once, not per file (sorting 65 536
names takes about 25 ms).
"""

from __future__ import annotations

import bisect
import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

from megafs.cache import ReadAhead
from megafs.cache.content import INLINE_THRESHOLD
from megafs.cache.readahead import WINDOW, PrefetchGroup, as_hint
from megafs.crypto import CHUNK_SIZE, Kind
from megafs.fs.tree import Children, Inode, Tree
from megafs.wire import MAX_FETCH_ITEMS

__all__ = ["FOLLOWED_FOLDER", "FolderAhead"]

#: Entries of the followed order a program may leave out between two files
#: it reads.
_SKIP = 8
#: Chunks scheduled at once, so that they travel in one download request.
_STEP = MAX_FETCH_ITEMS
#: Folders followed at once.
_STREAMS = 4
#: The largest folder followed: a camera's folder of a few thousand photos
#: is, and its names in order cost 8 bytes each.
FOLLOWED_FOLDER = 65536


@dataclass(eq=False)
class _Orders:
    """A folder's names in the two orders a stream may follow, as they were
    at one ``generation`` of its children."""

    children: Children
    generation: int
    #: As readdir lists them (the dictionary's order).
    listed: list[bytes]
    #: Sorted; only once a pair of files in name order asks for it.
    by_name: list[bytes] | None = None

    def current(self, children: Children) -> bool:
        return self.children is children and self.generation == children.generation

    def follows(self, first: bytes, second: bytes) -> tuple[list[bytes], int] | None:
        """The order in which ``second`` comes after ``first`` within
        ``_SKIP``, and the position of ``first`` in it, or None. Where it
        does in both, the one with fewer files between them (``cp -r``
        reads the listing's next file, which may be a few names on), and
        name order if as many."""
        found: list[tuple[list[bytes], int]] = []
        if first < second:
            if self.by_name is None:
                self.by_name = sorted(self.children)
            found.append((self.by_name, bisect.bisect_left(self.by_name, first)))
        with contextlib.suppress(ValueError):
            found.append((self.listed, self.listed.index(first)))
        best: tuple[list[bytes], int] | None = None
        gap = _SKIP + 1
        for order, at in found:
            here = _near(order, second, at) if at < len(order) and order[at] == first else None
            if here is not None and 0 < here - at < gap:
                best, gap = (order, at), here - at
        return best


@dataclass(eq=False)
class _Stream:
    """One folder's files being begun in turn: the last one begun, and once a
    second one followed it, the order they follow."""

    last: Inode
    #: The names of the folder in the followed order (empty until
    #: established), and the position of ``last`` in it.
    order: list[bytes] = field(default_factory=list)
    at: int = -1
    #: The position of the last file read ahead.
    through: int = -1
    group: PrefetchGroup | None = None
    #: What the folder's orders were last worked out to be.
    orders: _Orders | None = None
    #: Whether files of the stream are read whole: then the files ahead
    #: get their first chunks fetched (up to the window), else only their
    #: first chunk each.
    whole: bool = False

    def step(self, inode: Inode) -> int | None:
        """How far ``inode`` is from the last file begun in the stream's
        order: positive if it follows it, zero or negative (within
        ``_SKIP``) if it was read a little out of turn (the files of a
        folder copied or thumbnailed by several threads at once), None if it
        is out of the order or there is none yet."""
        if inode is self.last:
            return 0
        here = _near(self.order, inode.record.name, self.at)
        return None if here is None else here - self.at

    def cancel(self) -> None:
        if self.group is not None:
            self.group.cancel()
            self.group = None


class FolderAhead:
    """The mount's read-ahead across files: one stream per folder being read
    file by file."""

    def __init__(self, tree: Tree, read_ahead: ReadAhead, *, window: int = WINDOW) -> None:
        self._tree = tree
        self._read_ahead = read_ahead
        #: Chunks (and files) read ahead of the file being read.
        self.window = window
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def read_start(self, inode: Inode) -> None:
        """A handle's first read of ``inode`` starts at offset 0: follow its
        folder's stream, or start one."""
        folder = inode.parent
        children = None if folder is None else folder.children
        if folder is None or children is None or len(children) > FOLLOWED_FOLDER:
            return
        stream = self._streams.pop(folder.ino, None)
        step = None if stream is None else stream.step(inode)
        if stream is not None and step is None:
            # Out of the stream's order, or there is none yet: the last file
            # and this one may follow each other in one (again), so a stream
            # that guessed the wrong order goes on in the right one.
            stream.cancel()
            stream = _Stream(last=stream.last, orders=stream.orders, whole=stream.whole)
            self._establish(stream, children, inode)
            step = stream.step(inode)
        if stream is None or step is None:
            stream = _Stream(last=inode, orders=None if stream is None else stream.orders)
        self._streams[folder.ino] = stream
        while len(self._streams) > _STREAMS:
            self._streams.popitem(last=False)[1].cancel()
        if step is not None and step > 0:
            stream.last = inode
            stream.at += step
            self._schedule(stream, folder, children)

    def read_whole(self, inode: Inode) -> None:
        """``inode``, begun by one handle, is being read whole: from now on
        the files ahead of its stream get as many chunks as the window
        holds, not only their first."""
        folder = inode.parent
        stream = None if folder is None else self._streams.get(folder.ino)
        if stream is not None and stream.step(inode) is not None:
            stream.whole = True

    @staticmethod
    def _establish(stream: _Stream, children: Children, second: Inode) -> None:
        """Set the stream's order if ``second`` follows its last file in one."""
        if stream.orders is None or not stream.orders.current(children):
            stream.orders = _Orders(children, children.generation, list(children))
        found = stream.orders.follows(stream.last.record.name, second.record.name)
        if found is not None:
            stream.order, stream.at = found

    def _schedule(self, stream: _Stream, folder: Inode, children: Children) -> None:
        """Read ahead the files after the last one read that are not read
        ahead yet, up to ``window`` chunks and entries; only once that is
        ``_STEP`` chunks or the rest of the folder, so that their fetches
        travel a few to a request (a file of one chunk read ahead alone
        would cost a request of its own)."""
        ahead = 0
        new: list[tuple[Inode, int]] = []
        start = stream.at + 1
        end = min(len(stream.order), start + self.window)
        index = start
        while index < end and ahead < self.window:
            inode = children.get(stream.order[index])
            take = 0
            if inode is not None and inode.kind == Kind.FILE:
                size = inode.record.size
                chunks = 0 if size <= INLINE_THRESHOLD else -(-size // CHUNK_SIZE)
                take = min(chunks if stream.whole else min(chunks, 1), self.window - ahead)
            ahead += take
            if index > stream.through and take and inode.parent is folder and not inode.unlinked:
                new.append((inode, take))
            index += 1
        if sum(take for _, take in new) < _STEP and index < len(stream.order):
            return
        stream.through = max(stream.through, index - 1)
        if new and stream.group is None:
            stream.group = self._read_ahead.group()
        if stream.group is not None:
            for inode, take in new:
                stream.group.start_soon(self._fetch_start, stream.group, inode, take)

    async def _fetch_start(self, group: PrefetchGroup, inode: Inode, count: int) -> None:
        """Fetch the first ``count`` stored chunks of ``inode``, as a hint."""
        secrets: list[bytes | None] = []
        with as_hint(inode.id.hex()):
            secrets = await self._tree.stored_secrets(inode, count)
        for secret in secrets:
            if secret is not None:
                group.start_soon(self._read_ahead.fetch, secret)


def _near(order: list[bytes], name: bytes, at: int) -> int | None:
    """The position of ``name`` in ``order`` within ``_SKIP`` of ``at``."""
    try:
        return order.index(name, max(0, at - _SKIP), at + _SKIP + 1)
    except ValueError:
        return None
