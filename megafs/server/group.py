"""Group commit: concurrent requests share one expensive durable step.

Making a write durable costs one fsync (or a few) whatever its size, and
the server's writes are small: a node record, a chunk of a small file. So
writes that arrive together are made durable together. :class:`GroupCommit`
collects jobs from concurrent tasks; whoever finds no group in progress (or,
with ``parallel``, fewer than that many) runs every job waiting, in order,
in one worker thread call, then hands each its outcome. Jobs that arrive
meanwhile wait for that call and form the next group, so under load groups
grow by themselves, and a lone job runs at once: no timer, no batching
delay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import trio

__all__ = ["GroupCommit"]

J = TypeVar("J")
R = TypeVar("R")


class _Waiter(Generic[J, R]):
    __slots__ = ("job", "outcome", "settled", "taken")

    def __init__(self, job: J) -> None:
        self.job = job
        self.taken = False  # a group has it
        self.settled = trio.Event()  # that group is over: ``outcome`` is the job's
        self.outcome: R | Exception = RuntimeError("the group stopped before this job ran")


class GroupCommit(Generic[J, R]):
    """Run jobs in groups of at most ``max_group`` through
    ``run_group(jobs) -> outcomes`` (one per job, in order), which is called
    in a worker thread, up to ``parallel`` groups at a time (1: groups run
    one after the other, in order, as one database connection needs). The
    bound keeps one group (one transaction, holding the database's write
    lock) short.

    ``run_group`` must apply the jobs in the order given, make them durable
    before it returns, and report a job's failure as that job's outcome
    (an exception it returns rather than raises); an exception it raises
    fails every job of the group. Jobs are submitted with :meth:`run`.
    """

    def __init__(
        self,
        run_group: Callable[[list[J]], Sequence[R | Exception]],
        *,
        max_group: int = 64,
        parallel: int = 1,
    ) -> None:
        self._run_group = run_group
        self._max_group = max_group
        self._waiting: list[_Waiter[J, R]] = []
        # Fair: the tasks waiting for it get it in the order they came.
        self._slots = trio.CapacityLimiter(parallel)

    async def run(self, job: J) -> R:
        """Run ``job`` in the next group and return its result (or raise
        its exception) once its group is durable.

        Cancellation: a job still waiting for a group is withdrawn and never
        runs; once its group runs, the group is not interrupted (the job
        takes effect even if its caller was cancelled, as any write whose
        answer is lost).
        """
        waiter: _Waiter[J, R] = _Waiter(job)
        self._waiting.append(waiter)
        try:
            async with self._slots:
                if not waiter.taken:  # no group took it while we waited: run one now
                    # (It is among the first max_group, as those before it
                    # were given a slot first; the max() only makes sure.)
                    end = max(self._max_group, self._waiting.index(waiter) + 1)
                    await self._run(self._waiting[:end])
        finally:
            if not waiter.taken:
                self._waiting.remove(waiter)
        await waiter.settled.wait()  # (at once, unless another group took it and still runs)
        if isinstance(waiter.outcome, Exception):
            raise waiter.outcome
        return waiter.outcome

    async def _run(self, group: list[_Waiter[J, R]]) -> None:
        del self._waiting[: len(group)]
        for waiter in group:
            waiter.taken = True
        try:
            await trio.to_thread.run_sync(self._run_in_thread, group)
        finally:
            for waiter in group:
                waiter.settled.set()

    def _run_in_thread(self, group: list[_Waiter[J, R]]) -> None:
        try:
            outcomes = self._run_group([w.job for w in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(group)} jobs")
        except Exception as exc:
            outcomes = [exc] * len(group)
        for waiter, outcome in zip(group, outcomes, strict=True):
            waiter.outcome = outcome
