"""Chunk downloads: a few to a request when they have to wait.

The server's cost is mostly per request: about 1.4 ms of CPU for a request
and 0.5 ms more for a MiB of chunk (docs/performance.md). So at most
``SLOTS`` downloads run at once, and a chunk that finds them all busy waits
for the next free one together with the chunks of its kind that queue
behind it; the slot then takes them all, up to ``MAX_FETCH_ITEMS``, in one
``POST /chunks/fetch``. So do the chunks read-ahead asks for at the same
moment (a request's worth at once).

A reader's chunk with a slot free goes at once, as ``GET /chunks/{id}``:
it waits for no company, and never shares a request with read-ahead's
chunks, since taken along it would arrive only with theirs (an answer of
2-4 MiB instead of 1) and be decrypted after all of them. The kernel asks
for the first two chunks of a file read whole at nearly the same moment,
and a reader's first read starts read-ahead just before it asks for its
own chunk: otherwise the first chunk of every small file would wait for
the rest of it.

There is no task of its own: whoever asks for a chunk and gets a slot
makes the request, for itself and for the chunks it takes along, and hands
each its bytes (or NotFound). If that caller is cancelled, the chunks it
took along whose callers still wait are queued again; if the request
fails, each asks again in a request of its own, so that a chunk the server
cannot read fails no other.
"""

from __future__ import annotations

import contextlib
from collections import deque

import trio

from megafs.errors import MegafsError, NotFound
from megafs.remote import RemoteClient
from megafs.wire import MAX_FETCH_ITEMS

__all__ = ["SLOTS", "Downloads"]

#: Download requests in flight at once. Each carries up to four chunks, so
#: read-ahead (up to twelve chunks per reader) fills all three, keeps the
#: network and both cores busy, and what waits goes in fewer requests.
SLOTS = 3


class _Wanted:
    """One caller's chunk: ``done`` is set when the caller may go on, as the
    one to make a request (``lead``), with its bytes, with an error, or with
    none of these (the request that took it along was cancelled, or failed:
    ask again)."""

    __slots__ = (
        "abandoned",
        "ahead",
        "alone",
        "along",
        "blob",
        "chunk_id",
        "done",
        "error",
        "lead",
    )

    def __init__(self, chunk_id: bytes, *, alone: bool, ahead: bool) -> None:
        self.chunk_id = chunk_id
        #: Goes in a request of its own: its last one with others failed.
        self.alone = alone
        #: Read-ahead asks for it, not a reader.
        self.ahead = ahead
        self.done = trio.Event()
        self.lead = False
        #: Its caller was cancelled.
        self.abandoned = False
        #: The chunks a lead takes along in its request.
        self.along: list[_Wanted] = []
        self.blob: bytes | bytearray | memoryview | None = None
        self.error: MegafsError | None = None


class Downloads:
    """The chunk downloads of one mount (see the module's docstring)."""

    def __init__(self, remote: RemoteClient, *, slots: int = SLOTS) -> None:
        self._remote = remote
        self._slots = slots
        self._running = 0
        self._queue: deque[_Wanted] = deque()

    async def get(self, chunk_id: bytes, *, ahead: bool = False) -> bytes | bytearray | memoryview:
        """A chunk's sealed bytes (NotFound if the server does not have it).
        Callers ask for distinct chunks: the chunk cache merges the reads of
        one chunk into one load. ``ahead``: for read-ahead, whose chunks go
        in requests apart from readers' (see the module's docstring)."""
        alone = False
        while True:
            wanted = _Wanted(chunk_id, alone=alone, ahead=ahead)
            if not ahead and self._running < self._slots:
                # A reader's chunk with a slot free goes at once, before
                # read-ahead's chunks that are still gathering.
                self._start(wanted)
            else:
                self._queue.append(wanted)
            try:
                if ahead:
                    # The chunks read-ahead asks for at this same moment
                    # queue first, and go with this one.
                    await trio.lowlevel.checkpoint()
                    self._grant()
                await wanted.done.wait()
            except BaseException:
                # No one waits for it any more: it must not get back into
                # the queue, where it could be handed a slot no one would
                # use or give back.
                wanted.abandoned = True
                if wanted.lead:
                    # Granted meanwhile: what it took along goes back to the
                    # front (what still has a caller: the only way back into
                    # the queue for a chunk cancelled while taken along),
                    # and the slot to the next.
                    self._queue.extendleft(w for w in reversed(wanted.along) if not w.abandoned)
                    self._release()
                else:
                    # Still queued (else a request took it along: its
                    # answer then goes unread).
                    with contextlib.suppress(ValueError):
                        self._queue.remove(wanted)
                raise
            if wanted.lead:
                return await self._fetch(wanted)
            if wanted.error is not None:
                raise type(wanted.error)(wanted.error.detail) from wanted.error
            if wanted.blob is not None:
                return wanted.blob
            alone = wanted.alone

    def _grant(self) -> None:
        """Hand free slots to the chunks that waited longest, each with the
        chunks of its kind (a reader's, or read-ahead's) queued right behind
        it, up to a request's worth."""
        while self._queue and self._running < self._slots:
            lead = self._queue.popleft()
            while (
                not lead.alone
                and self._queue
                and not self._queue[0].alone
                and self._queue[0].ahead == lead.ahead
                and len(lead.along) + 1 < MAX_FETCH_ITEMS
            ):
                lead.along.append(self._queue.popleft())
            self._start(lead)

    def _start(self, lead: _Wanted) -> None:
        """``lead`` takes a slot: its caller makes the request."""
        lead.lead = True
        self._running += 1
        lead.done.set()

    def _release(self) -> None:
        self._running -= 1
        self._grant()

    async def _fetch(self, lead: _Wanted) -> bytes | bytearray | memoryview:
        """One request, for ``lead`` and the chunks it took along."""
        along = lead.along
        try:
            if along:
                try:
                    blobs = await self._remote.get_chunks(
                        [lead.chunk_id, *(wanted.chunk_id for wanted in along)]
                    )
                except MegafsError:
                    # One chunk the server cannot read must not fail the
                    # others: each asks again alone, for an answer of its own.
                    for wanted in along:
                        wanted.alone = True
                        wanted.done.set()
                else:
                    for wanted in along:
                        wanted.blob = blobs.get(wanted.chunk_id)
                        if wanted.blob is None:
                            wanted.error = NotFound("no such chunk")
                    if lead.chunk_id not in blobs:
                        raise NotFound("no such chunk")
                    return blobs[lead.chunk_id]
            return await self._remote.get_chunk(lead.chunk_id)
        finally:
            for wanted in along:
                wanted.done.set()
            self._release()
