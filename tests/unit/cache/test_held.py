"""``Held`` (megafs/cache/service.py): a free lock is taken without a turn
of the event loop; a held one is waited for, first come, first served."""

from __future__ import annotations

import trio
import trio.testing

from megafs.cache import Held


async def test_a_free_lock_is_taken_without_a_schedule_point() -> None:
    lock = trio.Lock()
    with trio.testing.assert_no_checkpoints():
        async with Held(lock):
            assert lock.locked()
    assert not lock.locked()


async def test_a_held_lock_is_waited_for_in_turn() -> None:
    lock = trio.Lock()
    order: list[int] = []
    inside = 0

    async def take(n: int) -> None:
        nonlocal inside
        async with Held(lock):
            inside += 1
            assert inside == 1
            order.append(n)
            await trio.sleep(0.01)
            inside -= 1

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        for n in range(4):
            nursery.start_soon(take, n)
            await trio.testing.wait_all_tasks_blocked()  # queued in this order
        lock.release()
    assert order == [0, 1, 2, 3]
    assert not lock.locked()


async def test_a_failure_inside_releases_the_lock() -> None:
    lock = trio.Lock()
    try:
        async with Held(lock):
            raise KeyError
    except KeyError:
        pass
    assert not lock.locked()
