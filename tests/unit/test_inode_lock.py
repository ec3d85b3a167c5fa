"""An inode's lock (megafs/fs/tree.py, ``Inode.locked``) serialises its
holders and exists only while held or awaited."""

from __future__ import annotations

import trio
import trio.testing

from megafs.fs.tree import Inode
from tests.unit.crypto.util import make_record


def _inode() -> Inode:
    return Inode(ino=2, id=bytes(16), parent=None, record=make_record())


async def test_holders_take_turns_and_the_lock_is_gone_after() -> None:
    inode = _inode()
    inside: list[int] = []
    overlaps = 0

    async def hold(n: int) -> None:
        nonlocal overlaps
        async with inode.locked():
            overlaps += bool(inside)
            inside.append(n)
            await trio.sleep(0.01)
            inside.remove(n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(hold, n)
        await trio.testing.wait_all_tasks_blocked()
        assert inode._lock is not None  # held, with two waiting
    assert overlaps == 0
    assert inode._lock is None


async def test_a_failing_holder_leaves_no_lock_behind() -> None:
    inode = _inode()
    try:
        async with inode.locked():
            raise KeyError
    except KeyError:
        pass
    assert inode._lock is None
    async with inode.locked():  # and the next holder gets one
        assert inode._lock is not None
