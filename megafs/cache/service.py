"""Two trio helpers of the cache's services and the inode tree.

``HeldNursery``: a nursery held open by one of the daemon's long-lived
tasks, for work that other parts start later (prefetches, seals behind a
writer, cache files behind a reader): the task's owner is the daemon's
nursery, so that work ends with the mount. ``Held``: a lock taken without
a turn of the event loop when it is free."""

from __future__ import annotations

import trio

__all__ = ["Held", "HeldNursery"]


class HeldNursery:
    """Base of the services that lend their nursery; ``_nursery`` is None
    until :meth:`run` starts and after it ends, and callers then do the
    work themselves or not at all."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery until cancelled, doing :meth:`_meanwhile`; once
        cancelled, wait for the work in it (shielded work finishes)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._meanwhile()
        finally:
            self._nursery = None

    async def _meanwhile(self) -> None:
        """The holding task's own work while it holds the nursery: none,
        unless a service has some."""
        await trio.sleep_forever()


class Held:
    """``async with Held(lock)``: ``lock``, taken at once when it is free.

    ``async with lock`` is a schedule point even when nobody holds the
    lock: the task goes back to trio's run queue and the event loop turns
    once before it goes on. A small file's close takes two such locks and
    each of its writes one, so that is three turns of the daemon's busy
    loop per file created, for no one else's benefit. A lock that is held
    is waited for as ``async with lock`` would (first come, first served:
    trio hands a released lock to its first waiter, so a free lock has
    none).
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
