"""Following the account's change feed, so a mount sees other devices' work.

One task (``ChangeFollower.run``, owned by the daemon's nursery) long-polls
the server's feed (``GET /changes``), brings each changed node up to date in
the tree, then tells the kernel to forget what it cached about it. The
kernel is told from this task, through a worker thread, never from a FUSE
handler: an invalidation can block until the kernel finishes a request on
the same folder, which would deadlock a handler (docs/architecture.md).

Each page of the feed is applied to the local copy of the server's
listings first (cache/state.py), which keeps the feed's position across
runs: a new mount catches up from there and then lists every folder that
copy holds as current without asking the server.

Our own commits come back through the feed too; the tree skips them (their
version is one it already knows). If the server has pruned the feed past our
cursor, no kept listing is trusted and every loaded folder is listed again.
"""

from __future__ import annotations

import errno
import logging
import random

import pyfuse3
import trio

from megafs.cache import LocalState
from megafs.errors import CursorExpired, MegafsError, RemoteError
from megafs.fs.tree import Forget, Tree
from megafs.remote import RemoteClient
from megafs.wire import CHANGES_PAGE_MAX, CHANGES_WAIT_MAX

__all__ = ["ChangeFollower"]

log = logging.getLogger(__name__)

#: Seconds the server may hold one long poll open.
POLL_WAIT = float(CHANGES_WAIT_MAX)
_BACKOFF_MAX = 30.0
#: How often changes put off behind our own pending ones are looked at.
DEFERRED_INTERVAL = 0.5
#: Seconds between the starts of two polls that return changes. While this
#: mount writes, its own commits wake every poll; waiting a little lets the
#: next poll bring a burst of them in one request instead of one each.
POLL_GAP = 0.5


class ChangeFollower:
    def __init__(self, remote: RemoteClient, tree: Tree, state: LocalState) -> None:
        self._remote = remote
        self._tree = tree
        self._state = state
        self._cursor: int | None = None

    async def catch_up(self) -> None:
        """Bring the local copy of the server's listings up to the feed,
        from where the last run left it; called before the tree loads, so
        nothing that happens after loading is missed. Once caught up, the
        tree lists folders that copy holds as current without the server."""
        self._cursor = self._state.cursor
        while not self._tree.caught_up:
            try:
                await self._step(wait=0)
            except CursorExpired:
                self._cursor = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll)
            nursery.start_soon(self._tell_kernel)
            nursery.start_soon(self._deferred)
            task_status.started()

    async def _poll(self) -> None:
        failures = 0
        while True:
            asked = trio.current_time()
            try:
                came = await self._step(wait=POLL_WAIT if self._tree.caught_up else 0)
            except CursorExpired:
                log.warning("the change feed moved past this mount; listing folders again")
                self._cursor = None
                continue
            except MegafsError as exc:
                failures += 1
                delay = min(_BACKOFF_MAX, 0.5 * 2 ** min(failures, 6)) * (0.5 + random.random())
                log.debug("change feed: %s; again in %.1f s", exc.detail, delay)
                await trio.sleep(delay)
                continue
            failures = 0
            if came is None:
                await trio.sleep(1 + random.random())
            elif came and self._tree.caught_up:
                await trio.sleep_until(asked + POLL_GAP)

    async def _step(self, *, wait: float) -> int | None:
        """Ask for one page of the feed and apply it: to the local copy of
        listings first (so a folder loaded from it meanwhile misses nothing
        the tree is told after), then to the tree. Returns how many changes
        came, or None if one could not be applied (asked for again later)."""
        if self._cursor is None:
            # No position to follow from: trust no kept listing, and list
            # the loaded folders again; the cursor counts once they are.
            start = await self._remote.change_cursor()
            await self._state.reset_cursor(start)
            await self._tree.reload_folders()
            self._cursor = start
        changes, cursor = await self._remote.changes(self._cursor, wait=wait)
        await self._state.apply_changes(changes, cursor)
        for change in changes:
            try:
                await self._tree.apply_remote(change)
            except RemoteError as exc:
                # Not applied: ask for it again (from here) after a pause,
                # rather than step over it.
                log.info("change of node %s: %s; retrying", change.id.hex(), exc.detail)
                return None
            except MegafsError as exc:
                log.error("change of node %s: %s", change.id.hex(), exc.detail)
            self._cursor = change.seq
        self._cursor = cursor
        if len(changes) < CHANGES_PAGE_MAX:
            self._tree.caught_up = True
        return len(changes)

    async def _deferred(self) -> None:
        """Changes put off while a change of ours to the node was pending."""
        while True:
            await trio.sleep(DEFERRED_INTERVAL)
            await self._tree.apply_deferred()

    async def _tell_kernel(self) -> None:
        async for item in self._tree.forgotten:
            await trio.to_thread.run_sync(_invalidate, item)


def _invalidate(item: Forget) -> None:
    try:
        if item.name is None:
            pyfuse3.invalidate_inode(item.ino, attr_only=item.attr_only)
        else:
            pyfuse3.invalidate_entry(item.ino, item.name)
    except OSError as exc:
        # ENOENT: the kernel holds nothing of it, which is just as good.
        if exc.errno != errno.ENOENT:
            log.warning("could not invalidate inode %d: %s", item.ino, exc)
