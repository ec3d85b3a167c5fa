"""The uploader: moves dirty chunks and journaled node changes to the server.

One owner (``run``) starts, in its own nursery, ``CHUNK_WORKERS`` chunk
uploaders fed by a channel and one committer. The committer takes the
journal's pending entries and commits them in an order the server accepts:

- puts first, parents before children (ordered by depth along the chain of
  pending parents), so a new folder exists before anything is put in it and
  a moved folder never makes a cycle on the server;
- deletes last, children before parents, so a folder is empty on the server
  when it is deleted (its children may have moved out by a put).

Entries at the same depth commit concurrently. A node is committed only
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

import trio

from megafs.cache.chunks import ChunkCache
from megafs.cache.state import JournalEntry, LocalState
from megafs.errors import (
    AuthFailed,
    MegafsError,
    NotFound,
    RemoteError,
)
from megafs.remote import RemoteClient

__all__ = ["Uploader", "UploaderStats"]

log = logging.getLogger(__name__)

CHUNK_WORKERS = 4
COMMIT_CONCURRENCY = 8
_BACKOFF_MAX = 15.0


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
        #: Server version of every node this mount knows; 0 = not on server.
        self._versions: dict[bytes, int] = {}
        self._inflight: set[bytes] = set()
        self._seq = 0
        self._chunk_send, self._chunk_recv = trio.open_memory_channel[bytes](math.inf)
        self._queued_chunks: set[bytes] = set()
        self._work = trio.Event()
        self._progress = trio.Event()
        self._stats = UploaderStats()
        self._failing_since: float | None = None
        #: Nodes whose creation was sent but not confirmed: they may exist.
        self._maybe_created: set[bytes] = set()
        #: Highest journal seq of each node that is on the server (or moot).
        self._done_seq: dict[bytes, int] = {}

    # -- set-up ---------------------------------------------------------------

    async def load(self) -> list[JournalEntry]:
        """Take over the journal an earlier run left; returns its entries so
        the tree can show them before they reach the server."""
        entries = await self._state.load_journal()
        for entry in entries:
            self._entries[entry.node_id] = entry
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

    def pending_children(self, folder_id: bytes) -> list[JournalEntry]:
        """Journaled puts that place a node in ``folder_id``."""
        return [e for e in self._entries.values() if e.op == "put" and e.parent == folder_id]

    # -- producing work -------------------------------------------------------

    def chunk_added(self, chunk_id: bytes) -> None:
        """A freshly sealed chunk needs uploading."""
        self._queue_chunk(chunk_id)

    def _queue_chunk(self, chunk_id: bytes) -> None:
        if chunk_id not in self._queued_chunks:
            self._queued_chunks.add(chunk_id)
            self._chunk_send.send_nowait(chunk_id)

    async def put(
        self,
        node_id: bytes,
        *,
        parent: bytes,
        meta: bytes,
        content: bytes | None,
        chunks: tuple[bytes, ...],
        durable: bool = False,
    ) -> int:
        """Journal the new state of a node; returns its sequence number."""
        return await self._journal(node_id, "put", parent, meta, content, chunks, durable)

    async def delete(self, node_id: bytes, *, durable: bool = False) -> int:
        old = self._entries.get(node_id)
        base = old.base_version if old else self._versions.get(node_id, 0)
        if base == 0 and node_id not in self._inflight and node_id not in self._maybe_created:
            # Never reached the server: forget it instead of deleting.
            if old is not None:
                del self._entries[node_id]
                await self._state.entry_committed(node_id, old.seq, 0)
            self._versions.pop(node_id, None)
            self._done_seq[node_id] = self._seq
            self._notify()
            return 0
        return await self._journal(node_id, "delete", None, None, None, (), durable)

    async def _journal(
        self,
        node_id: bytes,
        op: str,
        parent: bytes | None,
        meta: bytes | None,
        content: bytes | None,
        chunks: tuple[bytes, ...],
        durable: bool,
    ) -> int:
        old = self._entries.get(node_id)
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
        )
        self._entries[node_id] = entry
        if durable:
            await self._chunks.sync_files([c for c in chunks if self._chunks.is_dirty(c)])
        await self._state.put_entry(entry, durable=durable)
        self._work.set()
        return entry.seq

    # -- waiting ----------------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_committed(self, node_id: bytes, seq: int) -> None:
        """Until the server has the node's state ``seq`` or a later one."""
        while self._done_seq.get(node_id, 0) < seq:
            await self._progress.wait()

    async def wait_idle(self) -> None:
        """Until nothing is left to upload."""
        while self._entries or self._chunks.dirty_ids:
            await self._progress.wait()

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
            nursery.start_soon(self._committer)
            task_status.started()

    async def _chunk_worker(self, recv: trio.MemoryReceiveChannel[bytes]) -> None:
        async with recv:
            async for chunk_id in recv:
                await self._with_retry(self._upload_chunk, chunk_id)
                self._queued_chunks.discard(chunk_id)
                self._notify()

    async def _upload_chunk(self, chunk_id: bytes) -> None:
        if not self._chunks.is_dirty(chunk_id):
            return
        blob = await self._chunks.sealed_blob(chunk_id)
        await self._remote.put_chunk(chunk_id, blob)
        await self._chunks.mark_uploaded([chunk_id])
        self._stats.uploaded_chunks += 1

    async def _committer(self) -> None:
        failures = 0
        while True:
            if not self._entries:
                await self._work.wait()
            self._work = trio.Event()
            results: list[bool] = []
            for level in self._plan():
                limit = trio.CapacityLimiter(COMMIT_CONCURRENCY)
                async with trio.open_nursery() as nursery:
                    for entry in level:
                        nursery.start_soon(self._commit_one, entry, limit, results)
            if all(results):
                failures = 0
            else:
                failures += 1
                await self._sleep_backoff(failures)

    def _plan(self) -> list[list[JournalEntry]]:
        """Pending entries grouped into levels that may commit concurrently."""
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

        levels: dict[int, list[JournalEntry]] = {}
        for node_id, entry in puts.items():
            levels.setdefault(depth_of(node_id), []).append(entry)
        deletes = [e for e in self._entries.values() if e.op == "delete"]
        out = [levels[d] for d in sorted(levels)]
        # Children of deleted folders are deleted first: the later a delete
        # was journaled, the more likely it is the parent (rmdir after
        # unlink), and the server refuses a non-empty folder, after which
        # the next round retries.
        out.extend([e] for e in sorted(deletes, key=lambda e: e.seq))
        return out

    async def _commit_one(
        self, entry: JournalEntry, limit: trio.CapacityLimiter, results: list[bool]
    ) -> None:
        async with limit:
            for chunk_id in entry.chunks:
                while self._chunks.is_dirty(chunk_id):
                    self._queue_chunk(chunk_id)
                    await self._progress.wait()
            current = self._entries.get(entry.node_id)
            if current is None or current.seq != entry.seq:
                return  # superseded while waiting; the next round takes it
            self._inflight.add(entry.node_id)
            if entry.op == "put" and entry.base_version == 0:
                self._maybe_created.add(entry.node_id)
            try:
                version = await self._with_retry(self._commit, current, attempts=1)
                results.append(version is not None)
                if version is None:
                    return
                # Update memory before the next checkpoint, while the node
                # still counts as in flight: a delete arriving meanwhile must
                # see that the node now exists on the server.
                self._maybe_created.discard(entry.node_id)
                self._done_seq[entry.node_id] = entry.seq
                latest = self._entries.get(entry.node_id)
                if latest is not None and latest.seq == entry.seq:
                    del self._entries[entry.node_id]
                elif latest is not None:
                    latest.base_version = version
                    self._work.set()
                if version:
                    self._versions[entry.node_id] = version
                else:
                    self._versions.pop(entry.node_id, None)
            finally:
                self._inflight.discard(entry.node_id)
            await self._state.entry_committed(entry.node_id, entry.seq, version)
            self._stats.committed += 1
            self._notify()

    async def _commit(self, entry: JournalEntry) -> int:
        if entry.op == "delete":
            # NotFound: already gone, a retry of a delete that landed.
            with contextlib.suppress(NotFound):
                version = entry.base_version
                if version == 0:
                    # Its creation may or may not have landed; the id is ours
                    # alone, so whatever the server holds under it is ours.
                    version = (await self._remote.get_node(entry.node_id)).version
                await self._remote.delete_node(entry.node_id, expect_version=version)
            return 0
        assert entry.parent is not None and entry.meta is not None
        try:
            return await self._remote.put_node(
                entry.node_id,
                parent=entry.parent,
                expect_version=entry.base_version,
                meta=entry.meta,
                content=entry.content,
                chunks=entry.chunks,
                commit_id=entry.commit_id,
            )
        except NotFound:
            # A chunk the server should have is gone (collected, or lost):
            # upload every chunk we still hold, then let the next round retry.
            missing = await self._remote.missing_chunks(list(entry.chunks))
            for chunk_id in missing:
                blob = await self._chunks.sealed_blob(chunk_id)
                await self._remote.put_chunk(chunk_id, blob)
            raise

    async def _with_retry(self, fn, *args, attempts: int = 0):  # type: ignore[no-untyped-def]
        """Run ``fn``; on a failure the server may recover from, back off and
        retry (forever unless ``attempts``). Returns None when given up."""
        tries = 0
        while True:
            tries += 1
            try:
                result = await fn(*args)
            except AuthFailed as exc:
                self._record_failure(exc)
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
                return result
            if attempts and tries >= attempts:
                return None
            await self._sleep_backoff(tries)

    def _record_failure(self, exc: MegafsError, *, online: bool = False) -> None:
        self._stats.last_error = f"{type(exc).__name__}: {exc.detail}"
        if not online and self._failing_since is None:
            self._failing_since = trio.current_time()
            log.warning("server unavailable (%s); changes wait in the journal", exc.detail)
        elif online:
            log.error("server refused a change: %s", exc.detail)

    async def _sleep_backoff(self, tries: int = 1) -> None:
        delay = min(_BACKOFF_MAX, 0.2 * 2 ** min(tries, 8)) * (0.5 + random.random() / 2)
        with trio.move_on_after(delay):
            await self._work.wait()
