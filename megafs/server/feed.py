"""Long polls of the change feed: ``GET /changes?wait=S`` answers as soon as
the account changes.

A write through this server process wakes the account's waiting polls at
once (:meth:`ChangeWatch.changed`). A write through another process sharing
the store is noticed by polling it: every ``poll_seconds`` at most one
query, for every account that has a poll waiting, shared by all of them,
so a thousand idle mounts cost one query per interval, not a thousand.
Nothing here runs without a poll waiting: the poll is made by whichever
waiting request finds it due, not by a background task.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from megafs.server.metadata import MetadataStore

__all__ = ["ChangeWatch", "WatchedAccount"]


class WatchedAccount:
    """One account with polls waiting: ``generation`` goes up whenever this
    process changes the account."""

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.generation = 0
        self.waiters = 0
        self._event = trio.Event()

    def wake(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_woken(self, generation: int) -> None:
        """Return once ``generation`` has passed (at once if it has)."""
        while self.generation == generation:
            await self._event.wait()


class ChangeWatch:
    """Who waits for which account's changes, and the shared poll."""

    def __init__(
        self, meta: MetadataStore, *, stopping: trio.Event, poll_seconds: float = 0.2
    ) -> None:
        self._meta = meta
        #: Set when the server shuts down: polls answer at once (within a
        #: poll interval) instead of holding the graceful phase.
        self._stopping = stopping
        self._poll_seconds = poll_seconds
        self._accounts: dict[int, WatchedAccount] = {}
        self._poll_lock = trio.Lock()
        self._polled_at = -math.inf
        self._polled: dict[int, int] = {}

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def changed(self, account_id: int) -> None:
        """A change of the account committed in this process."""
        watched = self._accounts.get(account_id)
        if watched is not None:
            watched.wake()

    @asynccontextmanager
    async def watching(self, account_id: int) -> AsyncIterator[WatchedAccount]:
        """Register interest in an account for the duration of one poll.
        Take its ``generation`` before reading the store, and pass it to
        :meth:`wait_beyond`: a change committed between the read and the
        wait is then not missed."""
        watched = self._accounts.setdefault(account_id, WatchedAccount(account_id))
        watched.waiters += 1
        try:
            yield watched
        finally:
            watched.waiters -= 1
            if not watched.waiters:
                del self._accounts[account_id]

    async def wait_beyond(
        self, watched: WatchedAccount, generation: int, seq: int, *, deadline: float
    ) -> None:
        """Return once the account may have changes after ``seq``: this
        process changed it since ``generation``, or a poll of the store saw
        its sequence number pass ``seq``; or at ``deadline`` (trio time)."""
        while trio.current_time() < deadline and not self.stopping:
            with trio.move_on_at(min(deadline, trio.current_time() + self._poll_seconds)):
                await watched.wait_woken(generation)
                return
            if await self._polled_cursor(watched.account_id) > seq:
                return

    async def _polled_cursor(self, account_id: int) -> int:
        """The account's sequence number as of the latest shared poll, which
        is made now if it is due (0 until a poll has seen the account)."""
        async with self._poll_lock:
            if trio.current_time() - self._polled_at >= self._poll_seconds:
                self._polled = await self._meta.change_cursors(list(self._accounts))
                self._polled_at = trio.current_time()
        return self._polled.get(account_id, 0)
