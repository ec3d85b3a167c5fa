"""The uploader: moves dirty chunks and journaled node changes to the server.

One owner (``run``) starts, in its own nursery, ``CHUNK_WORKERS`` chunk
uploaders fed by a channel and one committer. The committer takes the
journal's pending entries and commits them in an order the server accepts:

- puts first, parents before children (ordered by depth along the chain of
  pending parents), so a new folder exists before anything is put in it and
  a moved folder never makes a cycle on the server;
- deletes last, children before parents, so a folder is empty on the server
  when it is deleted (its children may have moved out by a put).

Changes gather for ``COMMIT_DELAY`` (unless someone waits) and go in
batches, many nodes per request (``POST /nodes/batch``), so a tree of small
files costs a few requests, not one per file. A node is committed only
after every chunk it references is on the server. Connection errors and 5xx
retry with backoff, forever: data waits in the journal, never dropped.

Waiters (fsync, unmount) use ``wait_committed`` and ``wait_idle``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import trio

from megafs.cache.chunks import ChunkCache
from megafs.cache.state import JournalEntry, LocalState
from megafs.errors import (
    AlreadyExists,
    AuthFailed,
    LocalDiskFull,
    MegafsError,
    NotEmpty,
    NotFound,
    QuotaExceeded,
    RemoteError,
    VersionConflict,
)
from megafs.remote import DeleteNode, PutNode, RemoteClient
from megafs.wire import (
    CHUNK_BATCH_HEADER,
    MAX_CHUNK_BATCH_BYTES,
    MAX_CHUNK_BATCH_ITEMS,
    MAX_CHUNK_BYTES,
)

__all__ = ["Uploader", "UploaderStats"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

CHUNK_WORKERS = 4
#: Sealed chunks of at most this many bytes (a source tree's files are
#: mostly a few KiB) are sent many to a request (``POST /chunks/batch``) by
#: ``SMALL_CHUNK_WORKERS`` tasks, one at a time taking what waits and what
#: comes within ``SMALL_GATHER``, up to ``SMALL_BATCH_BYTES``, unless someone
#: waits for an upload (fsync, unmount); their uploads overlap. Sent as soon
#: as they came, a tree extracted made a request per file; with two tasks a
#: backlog drains two requests at a time. Larger ones go in parallel, each
#: worker taking with its next chunk those already waiting, up to
#: ``LARGE_BATCH_ITEMS`` to a request: the server's cost per request is
#: about that of storing a MiB, so a writer's backlog of full chunks costs
#: it a fifth less CPU per MiB in threes than one by one.
SMALL_CHUNK_MAX = 256 * 1024
SMALL_BATCH_BYTES = 1 << 20
SMALL_CHUNK_WORKERS = 2
SMALL_GATHER = 0.02
#: As many of the largest chunks as fit in one batch.
LARGE_BATCH_ITEMS = MAX_CHUNK_BATCH_BYTES // (CHUNK_BATCH_HEADER + MAX_CHUNK_BYTES)
#: How long the committer lets changes gather before sending a batch
#: (unless someone waits: fsync, unmount).
COMMIT_DELAY = 0.05
#: Entries per round; the client splits a round into requests of at most
#: ``wire.MAX_BATCH_OPS``.
MAX_BATCH = 2000
_BACKOFF_MAX = 15.0
#: Retries of a write to a full local disk back off no further than this
#: (1.6 s at most): room made is used soon.
_DISK_FULL_TRIES = 3
#: ``last_error`` once the server refuses the mount's session: what happened
#: and what the user can do, since nothing in the daemon can open a new one.
SESSION_ENDED = (
    "this mount's session has ended (revoked from another device, expired, or the "
    "password was changed): changes wait in the journal; unmount, log in again "
    "(`megafs login URL EMAIL --remember`, or mount with the password) and mount "
    "again to upload them"
)


@dataclass
class UploaderStats:
    pending_nodes: int = 0
    pending_chunks: int = 0
    pending_bytes: int = 0
    online: bool = True
    last_error: str = ""
    committed: int = 0
    uploaded_chunks: int = 0
    failed_nodes: list[str] = field(default_factory=list)
    #: Conflicts the user should look at (shown by ``megafs status``).
    conflicts: list[str] = field(default_factory=list)


class Uploader:
    def __init__(
        self,
        remote: RemoteClient,
        state: LocalState,
        chunks: ChunkCache,
        *,
        relogin: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._remote = remote
        self._state = state
        self._chunks = chunks
        self._relogin = relogin
        self._entries: dict[bytes, JournalEntry] = {}
        #: The journal's puts by the folder they place their node in (for
        #: listings: a scan of a big journal per folder listed would cost
        #: seconds at a mount that lists thousands of folders).
        self._puts_in: dict[bytes | None, dict[bytes, JournalEntry]] = {}
        #: Puts that landed, whose node the local copy of the server's nodes
        #: does not hold until ``LocalState.entries_committed`` returns: a
        #: listing from that copy made meanwhile misses them, and the
        #: journal no longer has them (``pending_children``).
        self._landing: dict[bytes, JournalEntry] = {}
        #: Server version of every node this mount knows; 0 = not on server.
        self._versions: dict[bytes, int] = {}
        self._inflight: set[bytes] = set()
        self._seq = 0
        self._chunk_send, self._chunk_recv = trio.open_memory_channel[bytes](math.inf)
        self._small_send, self._small_recv = trio.open_memory_channel[bytes](math.inf)
        self._queued_chunks: set[bytes] = set()
        #: Set and replaced whenever work arrives. A task takes the current
        #: one before it looks for work (the committer) or makes a try that
        #: may fail (a retry loop), and waits on that: what arrived since
        #: wakes it, and nothing older can make a wait return at once.
        self._work = trio.Event()
        self._progress = trio.Event()
        self._stats = UploaderStats()
        self._failing_since: float | None = None
        #: The server refused the session (AuthFailed) since the last success.
        self._session_ended = False
        #: Nodes whose creation was sent but not confirmed: they may exist.
        self._maybe_created: set[bytes] = set()
        #: Nodes whose current entry was sent without an answer yet (it may
        #: have landed): a change superseding it remembers its commit id.
        self._unconfirmed: set[bytes] = set()
        #: Highest journal seq of each busy node that is on the server (or
        #: moot). A node that is not busy has all of its seqs done, and no
        #: entry here: a mount that wrote a big tree keeps none for it.
        self._done_seq: dict[bytes, int] = {}
        #: Keeps a change the server refused for a version conflict (set by
        #: the tree, which knows names and keys): see ``_settle``.
        self.on_conflict: Callable[[JournalEntry], Awaitable[None]] | None = None
        self._quota_full = False
        #: Someone waits for the journal to drain (fsync, unmount): commit
        #: without gathering first.
        self._urgent = False
        self._urgent_event = trio.Event()
        #: The wait for more small chunks, while one task gathers (one at a
        #: time: ``_gather_lock``).
        self._gathering: trio.CancelScope | None = None
        self._gather_lock = trio.Lock()

    # -- set-up ---------------------------------------------------------------

    async def load(self) -> list[JournalEntry]:
        """Take over the journal an earlier run left; returns its entries so
        the tree can show them before they reach the server."""
        entries = await self._state.load_journal()
        for entry in entries:
            self._set_entry(entry)
            self._seq = max(self._seq, entry.seq)
        for chunk_id in self._chunks.dirty_ids:
            self._queue_chunk(chunk_id)
        return entries

    def note_version(self, node_id: bytes, version: int) -> None:
        """Record the server version a node was loaded at."""
        if node_id not in self._entries:
            self._versions[node_id] = version

    def pending(self, node_id: bytes) -> JournalEntry | None:
        return self._entries.get(node_id)

    def busy(self, node_id: bytes) -> bool:
        """A change of the node is journaled or on its way to the server."""
        return node_id in self._entries or node_id in self._inflight

    def known_version(self, node_id: bytes) -> int:
        """The node's server version as this mount last loaded or made it."""
        return self._versions.get(node_id, 0)

    def pending_children(self, folder_id: bytes) -> list[JournalEntry]:
        """Puts that place a node in ``folder_id`` and that a listing of it
        may not show: the journal's, and those landed but not yet in the
        local copy of the server's nodes."""
        found = list(self._puts_in.get(folder_id, {}).values())
        found += [
            e
            for e in self._landing.values()
            if e.parent == folder_id and e.node_id not in self._entries
        ]
        return found

    def _set_entry(self, entry: JournalEntry) -> None:
        self._drop_entry(entry.node_id)
        self._entries[entry.node_id] = entry
        if entry.op == "put":
            self._puts_in.setdefault(entry.parent, {})[entry.node_id] = entry

    def _drop_entry(self, node_id: bytes) -> None:
        old = self._entries.pop(node_id, None)
        if old is not None and old.op == "put":
            siblings = self._puts_in[old.parent]
            del siblings[node_id]
            if not siblings:
                del self._puts_in[old.parent]

    # -- producing work -------------------------------------------------------

    def chunk_added(self, chunk_id: bytes) -> None:
        """A freshly sealed chunk needs uploading."""
        self._queue_chunk(chunk_id)

    def _queue_chunk(self, chunk_id: bytes) -> None:
        if chunk_id not in self._queued_chunks:
            self._queued_chunks.add(chunk_id)
            size = self._chunks.sealed_size(chunk_id)
            small = size is not None and size <= SMALL_CHUNK_MAX
            (self._small_send if small else self._chunk_send).send_nowait(chunk_id)

    async def put(
        self,
        node_id: bytes,
        *,
        parent: bytes,
        meta: bytes,
        content: bytes | None,
        chunks: tuple[bytes, ...],
        rev: int,
        durable: bool = False,
    ) -> int:
        """Journal the new state of a node; returns its sequence number.
        ``rev`` is the record revision ``meta`` seals: it is remembered as
        seen (rollback detection) in the same local transaction."""
        return await self._journal(node_id, "put", parent, meta, content, chunks, durable, rev)

    def unsent(self, node_id: bytes) -> bool:
        """The node has never reached the server (nor may have: no request
        with it is on its way or unanswered), so removing it sends nothing."""
        old = self._entries.get(node_id)
        base = old.base_version if old else self._versions.get(node_id, 0)
        return base == 0 and node_id not in self._inflight and node_id not in self._maybe_created

    async def delete(self, node_id: bytes, *, durable: bool = False) -> int:
        old = self._entries.get(node_id)
        if self.unsent(node_id):
            # Never reached the server: forget it instead of deleting.
            if old is not None:
                self._drop_entry(node_id)
                await self._state.forget_entry(node_id, old.seq)
            self._versions.pop(node_id, None)
            self._mark_done(node_id, self._seq)
            self._notify()
            return 0
        return await self._journal(node_id, "delete", None, None, None, (), durable, None)

    async def _journal(
        self,
        node_id: bytes,
        op: str,
        parent: bytes | None,
        meta: bytes | None,
        content: bytes | None,
        chunks: tuple[bytes, ...],
        durable: bool,
        rev: int | None,
    ) -> int:
        old = self._entries.get(node_id)
        sent = old.sent_commit_id if old is not None else None
        if old is not None and node_id in self._unconfirmed:
            sent = old.commit_id  # it may land (or have landed) unconfirmed
            self._unconfirmed.discard(node_id)
        self._seq += 1
        entry = JournalEntry(
            node_id=node_id,
            seq=self._seq,
            op=op,
            parent=parent,
            base_version=old.base_version if old else self._versions.get(node_id, 0),
            meta=meta,
            content=content,
            chunks=chunks,
            commit_id=os.urandom(16),
            sent_commit_id=sent,
        )
        self._set_entry(entry)
        if durable:
            # fsync waits for the upload next: its chunks go now, while the
            # local copy is made durable, not after.
            self._hurry()
            await self._chunks.sync_files([c for c in chunks if self._chunks.is_dirty(c)])
        await self._state.put_entry(entry, durable=durable, rev=rev)
        self._new_work()
        return entry.seq

    # -- waiting ----------------------------------------------------------------

    def _new_work(self) -> None:
        """Something to send: wakes the committer, and the tasks backing off
        after a failure, which try again now."""
        self._work.set()
        self._work = trio.Event()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _hurry(self) -> None:
        """Someone waits: the committer sends what it has without gathering."""
        self._urgent = True
        self._urgent_event.set()
        if self._gathering is not None:
            self._gathering.cancel()

    def _mark_done(self, node_id: bytes, seq: int) -> None:
        """The node's state ``seq`` is on the server (or moot). Remembered
        only while the node is busy: once it is not, every state is."""
        if self.busy(node_id):
            self._done_seq[node_id] = max(seq, self._done_seq.get(node_id, 0))
        else:
            self._done_seq.pop(node_id, None)

    async def wait_committed(self, node_id: bytes, seq: int) -> None:
        """Until the server has the node's state ``seq`` or a later one."""
        while self.busy(node_id) and self._done_seq.get(node_id, 0) < seq:
            self._hurry()
            await self._progress.wait()

    async def wait_idle(self, *, unless_session_ended: bool = False) -> None:
        """Until nothing is left to upload (or, with ``unless_session_ended``,
        until the server refuses the session: an unmount then stops
        waiting for what cannot upload, keeping it in the journal)."""
        while self._entries or self._chunks.dirty_ids:
            if unless_session_ended and self._session_ended:
                return
            self._hurry()
            await self._progress.wait()

    @property
    def session_ended(self) -> bool:
        """The server refused the session since the last success."""
        return self._session_ended

    @property
    def quota_full(self) -> bool:
        """The server refused the last upload or commit for the quota."""
        return self._quota_full

    @property
    def pending_bytes(self) -> int:
        """Sealed bytes waiting to upload."""
        return int(self._chunks.statistics()["dirty_bytes"])

    @property
    def failing_for(self) -> float:
        """Seconds the server has been failing without a success (0 if fine)."""
        if self._failing_since is None:
            return 0.0
        return trio.current_time() - self._failing_since

    def statistics(self) -> UploaderStats:
        stats = replace(self._stats)
        stats.pending_nodes = len(self._entries)
        chunk_stats = self._chunks.statistics()
        stats.pending_chunks = chunk_stats["dirty_chunks"]
        stats.pending_bytes = chunk_stats["dirty_bytes"]
        stats.online = self._failing_since is None
        return stats

    # -- the tasks ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(CHUNK_WORKERS):
                nursery.start_soon(self._chunk_worker, self._chunk_recv.clone())
            for _ in range(SMALL_CHUNK_WORKERS):
                nursery.start_soon(self._small_chunk_worker, self._small_recv.clone())
            nursery.start_soon(self._committer)
            task_status.started()

    async def _chunk_worker(self, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        async with recv:
            async for chunk_id in recv:
                batch = [chunk_id]
                while len(batch) < LARGE_BATCH_ITEMS:
                    try:
                        batch.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._upload(batch)

    async def _small_chunk_worker(self, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        async with recv:
            while True:
                # One task gathers at a time (else each would catch every
                # other chunk of a stream, and batches halve); the others'
                # uploads overlap it.
                async with self._gather_lock:
                    try:
                        first = await recv.receive()
                    except trio.EndOfChannel:
                        return
                    batch = await self._gather(recv, first)
                await self._upload(batch)

    async def _gather(self, recv: trio.MemoryReceiveChannel[bytes], first: bytes) -> list[bytes]:
        """``first`` and the small chunks queued after it, one request's
        worth: those waiting, then those that come within ``SMALL_GATHER``
        unless someone waits for uploads (``_hurry`` ends the wait)."""
        batch = [first]
        size = self._chunks.sealed_size(first) or 0
        with trio.move_on_after(SMALL_GATHER) as self._gathering:
            try:
                while len(batch) < MAX_CHUNK_BATCH_ITEMS and size < SMALL_BATCH_BYTES:
                    try:
                        chunk_id = recv.receive_nowait()
                    except trio.WouldBlock:
                        if self._urgent:
                            break
                        chunk_id = await recv.receive()
                    batch.append(chunk_id)
                    size += self._chunks.sealed_size(chunk_id) or 0
            except trio.EndOfChannel:
                pass
            finally:
                self._gathering = None
        return batch

    async def _upload(self, chunk_ids: list[bytes]) -> None:
        await self._with_retry(self._upload_chunks, chunk_ids)
        self._queued_chunks.difference_update(chunk_ids)
        self._notify()

    async def _upload_chunks(self, chunk_ids: list[bytes]) -> None:
        dirty = [i for i in chunk_ids if self._chunks.is_dirty(i)]
        if not dirty:
            return
        blobs = await self._chunks.sealed_blobs(dirty)
        if len(dirty) == 1:
            await self._remote.put_chunk(dirty[0], blobs[0])
        else:
            await self._remote.put_chunks(list(zip(dirty, blobs, strict=True)))
        await self._chunks.mark_uploaded(dirty)
        self._stats.uploaded_chunks += len(dirty)

    async def _committer(self) -> None:
        failures = 0
        work = self._work
        while True:
            if not self._entries:
                await work.wait()
            if not self._urgent:
                # Let a burst of changes (a tree of small files being
                # written) gather into one batch; fsync does not wait.
                with trio.move_on_after(COMMIT_DELAY):
                    await self._urgent_event.wait()
            work = self._work  # what arrives from here on is the next round's
            batch = self._next_batch()
            if not batch:
                # Everything pending waits for its chunks (or nothing is).
                with trio.move_on_after(1):
                    await self._progress.wait()
                continue
            if await self._commit_batch(batch):
                failures = 0
            else:
                failures += 1
                await self._sleep_backoff(failures, work)

    def _next_batch(self) -> list[JournalEntry]:
        """Pending entries the server can take now, in an order it accepts:
        puts parents first, then deletes children first. A put waits while
        one of its chunks is not uploaded yet, and so do puts below it."""
        self._urgent = False
        self._urgent_event = trio.Event()
        puts = {k: e for k, e in self._entries.items() if e.op == "put"}
        depth: dict[bytes, int] = {}

        def depth_of(node_id: bytes, seen: frozenset[bytes] = frozenset()) -> int:
            if node_id in depth:
                return depth[node_id]
            entry = puts.get(node_id)
            if entry is None or entry.parent is None or node_id in seen:
                return 0
            d = depth_of(entry.parent, seen | {node_id}) + 1
            depth[node_id] = d
            return d

        batch: list[JournalEntry] = []
        waiting: set[bytes] = set()
        for entry in sorted(puts.values(), key=lambda e: depth_of(e.node_id)):
            dirty = [c for c in entry.chunks if self._chunks.is_dirty(c)]
            for chunk_id in dirty:
                self._queue_chunk(chunk_id)
            if dirty or entry.parent in waiting:
                waiting.add(entry.node_id)
            else:
                batch.append(entry)
        # Children of deleted folders are deleted first: the later a delete
        # was journaled, the more likely it is the parent (rmdir after
        # unlink). The server refuses a non-empty folder; the next round
        # retries it.
        deletes = [e for e in self._entries.values() if e.op == "delete"]
        batch += sorted(deletes, key=lambda e: e.seq)
        return batch[:MAX_BATCH]

    async def _commit_batch(self, batch: list[JournalEntry]) -> bool:
        """Send one batch; returns True if every entry landed."""
        for entry in batch:
            self._inflight.add(entry.node_id)
            if entry.op == "put":
                self._unconfirmed.add(entry.node_id)
                if entry.base_version == 0:
                    self._maybe_created.add(entry.node_id)
        try:
            results = await self._with_retry(self._send, batch, attempts=1)
            if results is None:
                return False
            done: list[tuple[bytes, int, int]] = []
            refused: list[tuple[JournalEntry, MegafsError]] = []
            for entry, result in zip(batch, results, strict=True):
                if isinstance(result, NotFound) and entry.op == "delete":
                    result = 0  # already gone: a retry of a delete that landed
                if self._entries.get(entry.node_id) is entry:
                    self._unconfirmed.discard(entry.node_id)  # an answer came
                if isinstance(result, MegafsError):
                    refused.append((entry, result))
                    continue
                self._landed(entry, result)
                done.append((entry.node_id, entry.seq, result))
        finally:
            for entry in batch:
                self._inflight.discard(entry.node_id)
        if done:
            try:
                await self.until_saved(lambda: self._state.entries_committed(done))
            finally:
                for entry in batch:
                    if self._landing.get(entry.node_id) is entry:
                        del self._landing[entry.node_id]
            self._stats.committed += len(done)
            for node_id, seq, _ in done:
                self._mark_done(node_id, seq)  # (no longer in flight)
            self._notify()
        if refused:
            await self._refused(refused)
        return not refused

    async def _send(self, batch: list[JournalEntry]) -> list[int | MegafsError]:
        """Commit ``batch``; one result per entry, in order."""
        ops: dict[int, PutNode | DeleteNode] = {}
        for i, entry in enumerate(batch):
            if entry.op == "put":
                ops[i] = _put_op(entry, entry.commit_id)
                continue
            version = entry.base_version
            if version == 0:
                # Its creation may or may not have landed; the id is ours
                # alone, so whatever the server holds under it is ours.
                with contextlib.suppress(NotFound):
                    version = (await self._remote.get_node(entry.node_id)).version
            if version:
                ops[i] = DeleteNode(entry.node_id, version)
        results: list[int | MegafsError] = [0] * len(batch)  # deletes of nothing
        answers = await self._remote.commit_batch(list(ops.values()))
        for i, answer in zip(ops, answers, strict=True):
            results[i] = answer
        return results

    def _landed(self, entry: JournalEntry, version: int) -> None:
        """The server has ``entry``: update memory before the next
        checkpoint, while the node still counts as in flight (a delete
        arriving meanwhile must see that the node now exists)."""
        self._maybe_created.discard(entry.node_id)
        self._mark_done(entry.node_id, entry.seq)
        latest = self._entries.get(entry.node_id)
        if latest is not None and latest.seq == entry.seq:
            self._drop_entry(entry.node_id)
            if entry.op == "put":
                self._landing[entry.node_id] = entry
        elif latest is not None:
            latest.base_version = version
            latest.sent_commit_id = None
            self._new_work()
        if version:
            self._versions[entry.node_id] = version
        else:
            self._versions.pop(entry.node_id, None)

    async def _refused(self, refused: list[tuple[JournalEntry, MegafsError]]) -> None:
        """Entries the server would not take stay in the journal and are
        retried. A put refused for a missing chunk (collected, or lost) gets
        every chunk we still hold uploaded again first."""
        missing_for = [e for e, exc in refused if isinstance(exc, NotFound) and e.chunks]
        if missing_for:
            wanted = list(dict.fromkeys(c for e in missing_for for c in e.chunks))
            try:
                for chunk_id in await self._remote.missing_chunks(wanted):
                    (blob,) = await self._chunks.sealed_blobs([chunk_id])
                    await self._remote.put_chunk(chunk_id, blob)
            except MegafsError as exc:
                self._record_failure(exc)
        for entry, exc in refused:
            if await self._settle(entry, exc):
                continue
            if isinstance(exc, NotEmpty | NotFound):
                # Ordering within one round (a folder emptied, or a parent
                # created, by an op that is still waiting): the next round.
                log.debug("node %s: %s; retrying", entry.node_id.hex(), exc.detail)
                self._stats.last_error = f"{type(exc).__name__}: {exc.detail}"
            else:
                self._record_failure(exc, online=True)

    async def _settle(self, entry: JournalEntry, exc: MegafsError) -> bool:
        """A change the server refused because the node is not where this
        mount left it. Returns True when handled here (settled, or a failure
        to settle it recorded; the next round sends what is left), False to
        retry as it is.

        - Created, but the answer was lost and a newer change took the
          creation's place: the node is ours (ids are random), so the newer
          change goes on top of what landed.
        - Deleted by another device while changed here: the change wins and
          creates the node again.
        - Changed by another device (version conflict, the other device
          committed first): ``on_conflict`` (the tree) keeps this change as
          a conflicted copy, or for a delete keeps theirs, and then drops
          this entry through ``drop``.
        """
        current = self._entries.get(entry.node_id)
        if current is not entry:
            return True  # superseded meanwhile; the next round decides
        sent = entry.op == "put" and entry.sent_commit_id is not None
        if sent and isinstance(exc, VersionConflict | AlreadyExists):
            return await self._ask_about_sent(entry)
        if isinstance(exc, VersionConflict) and self.on_conflict is not None:
            await self._resolve(entry)
            return True
        if entry.op != "put" or not isinstance(exc, AlreadyExists | NotFound):
            return False
        try:
            version = (await self._remote.get_node(entry.node_id)).version
        except NotFound:
            version = 0
        except MegafsError:
            return False
        if isinstance(exc, AlreadyExists) and entry.base_version == 0 and version:
            if version == 1:
                entry.base_version = version
                return True
            if self.on_conflict is not None:  # and changed elsewhere since
                await self._resolve(entry)
                return True
        if isinstance(exc, NotFound) and entry.base_version and not version:
            log.warning("node %s was deleted elsewhere; saving it again", entry.node_id.hex())
            entry.base_version = 0
            return True
        return False

    async def _resolve(self, entry: JournalEntry) -> None:
        """``on_conflict(entry)``. If it could not finish (the server
        unreachable while asked which version won), the failure is recorded
        here, and the entry, still in the journal, meets the conflict again
        in the next round."""
        assert self.on_conflict is not None
        try:
            await self.on_conflict(entry)
        except AuthFailed as exc:
            self._session_lost(exc)
        except MegafsError as exc:
            self._record_failure(exc, online=not isinstance(exc, RemoteError))

    async def _ask_about_sent(self, entry: JournalEntry) -> bool:
        """Did the earlier commit ``entry`` superseded land? Send this state
        under that commit's id: the server answers the version that commit
        made if it did (this state is then sent again on top of it), or
        applies this state (sending it again on top is harmless), or refuses
        it as a conflict, a real one then (settled in the next round)."""
        assert entry.sent_commit_id is not None
        try:
            (version,) = await self._remote.commit_batch([_put_op(entry, entry.sent_commit_id)])
        except MegafsError:
            return False
        if isinstance(version, VersionConflict | AlreadyExists):
            entry.sent_commit_id = None
            return True
        if isinstance(version, MegafsError):
            return False
        entry.base_version = version
        entry.sent_commit_id = None
        self._versions[entry.node_id] = version
        return True

    async def drop(self, entry: JournalEntry, server_version: int) -> None:
        """Forget a change the tree has saved otherwise (a conflicted copy);
        the node is at ``server_version`` on the server."""
        if self._entries.get(entry.node_id) is entry:
            self._drop_entry(entry.node_id)
        self._versions[entry.node_id] = server_version
        self._mark_done(entry.node_id, entry.seq)
        dropped = [(entry.node_id, entry.seq, server_version)]
        await self.until_saved(lambda: self._state.entries_dropped(dropped))
        self._notify()

    def note_conflict(self, description: str) -> None:
        """A conflicted copy was made; ``megafs status`` lists it."""
        self._stats.conflicts.append(description)

    async def until_saved(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """``fn()``, which records in the local state what the server now
        has (or how a conflict was settled), tried again while the cache's
        disk is full: it must be neither forgotten nor a reason to stop the
        daemon. The committer waits meanwhile, as every upload would."""
        tries = 0
        while True:
            work = self._work
            try:
                return await fn()
            except LocalDiskFull as exc:
                tries += 1
                self._record_failure(exc)
                await self._sleep_backoff(min(tries, _DISK_FULL_TRIES), work)

    async def _with_retry(self, fn, *args, attempts: int = 0):  # type: ignore[no-untyped-def]
        """Run ``fn``; on a failure the server may recover from, back off and
        retry (forever unless ``attempts``). Returns None when given up."""
        tries = 0
        while True:
            tries += 1
            work = self._work
            try:
                result = await fn(*args)
            except AuthFailed as exc:
                self._session_lost(exc)
                if self._relogin is not None:
                    try:
                        await self._relogin()
                    except MegafsError as exc2:
                        self._record_failure(exc2)
            except RemoteError as exc:
                self._record_failure(exc)
            except MegafsError as exc:
                # The server refused this change (conflict, quota, invalid):
                # keep it in the journal, say so, and try again later.
                self._record_failure(exc, online=True)
            else:
                if self._failing_since is not None:
                    log.info("server reachable again")
                self._failing_since = None
                self._session_ended = False
                self._quota_full = False
                return result
            if attempts and tries >= attempts:
                return None
            if self._session_ended and self._relogin is None:
                # New changes cannot make a refused session work: no
                # request per write, only a slow check.
                await trio.sleep(_BACKOFF_MAX)
            else:
                await self._sleep_backoff(tries, work)

    def _session_lost(self, exc: AuthFailed) -> None:
        """The server refused the session: one clear log line (not one per
        retry) and a ``last_error`` that says what to do. Waiters that give
        up on a dead session (unmount) are woken."""
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        self._stats.last_error = f"AuthFailed: {SESSION_ENDED} (server: {exc.detail})"
        if not self._session_ended:
            self._session_ended = True
            log.error("the server refused the session (%s): %s", exc.detail, SESSION_ENDED)
            self._notify()

    def _record_failure(self, exc: MegafsError, *, online: bool = False) -> None:
        self._stats.last_error = f"{type(exc).__name__}: {exc.detail}"
        if isinstance(exc, QuotaExceeded):
            self._quota_full = True
        if isinstance(exc, LocalDiskFull):
            log.error("%s: uploads resume once there is room", exc.detail)
        elif not online and self._failing_since is None:
            self._failing_since = trio.current_time()
            log.warning("server unavailable (%s); changes wait in the journal", exc.detail)
        elif online:
            log.error("server refused a change: %s", exc.detail)

    async def _sleep_backoff(self, tries: int, work: trio.Event) -> None:
        """Wait before try ``tries + 1``, or until new work: ``work`` is
        ``_work`` as it was when the failed try began, so work that came
        during it counts, and a failure that made none waits its delay."""
        delay = min(_BACKOFF_MAX, 0.2 * 2 ** min(tries, 8)) * (0.5 + random.random() / 2)
        with trio.move_on_after(delay):
            await work.wait()


def _put_op(entry: JournalEntry, commit_id: bytes) -> PutNode:
    """The batch op that commits a journaled put under ``commit_id``."""
    assert entry.parent is not None and entry.meta is not None
    return PutNode(
        entry.node_id,
        entry.parent,
        entry.base_version,
        entry.meta,
        entry.content,
        entry.chunks,
        commit_id,
    )
