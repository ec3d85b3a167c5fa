"""A nursery held open by one of the daemon's long-lived tasks, for work
that other parts start later (prefetches, seals behind a writer): the
task's owner is the daemon's nursery, so that work ends with the mount."""

from __future__ import annotations

import trio

__all__ = ["HeldNursery"]


class HeldNursery:
    """Base of the services that lend their nursery; ``_nursery`` is None
    until :meth:`run` starts and after it ends, and callers then do the
    work themselves or not at all."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
