"""Large answers land in reused buffers, never in one something still views
(megafs/remote/transport.py, ``ReceiveBuffers``). Buffers are told apart by
``id``: a reference to one would keep it in use."""

from __future__ import annotations

from megafs.remote.transport import ReceiveBuffers

MiB = 1 << 20


def test_a_buffer_is_reused_once_no_view_of_it_is_left() -> None:
    buffers = ReceiveBuffers(count=2)
    first = buffers.take(4 * MiB)
    first[:5] = b"first"
    owner = id(first.obj)
    piece = first[1 * MiB : 2 * MiB]  # a chunk's view, passed on
    del first
    second = buffers.take(4 * MiB)
    assert id(second.obj) != owner  # the piece still views the first
    del piece, second
    third = buffers.take(3 * MiB)
    assert id(third.obj) == owner
    assert len(third) == 3 * MiB
    assert third[:5] == b"first"  # not cleared: the answer overwrites it


def test_when_every_buffer_is_in_use_an_answer_gets_its_own() -> None:
    buffers = ReceiveBuffers(count=2)
    held = [buffers.take(2 * MiB), buffers.take(2 * MiB)]
    pooled = {id(view.obj) for view in held}
    extra = buffers.take(2 * MiB)
    assert id(extra.obj) not in pooled
    del extra, held
    # The pool kept its two, not the extra one.
    again = [buffers.take(2 * MiB), buffers.take(2 * MiB)]
    assert {id(view.obj) for view in again} == pooled


def test_a_free_buffer_too_small_gives_way_to_a_larger_one() -> None:
    buffers = ReceiveBuffers(count=1)
    small = buffers.take(1 * MiB)
    small_owner = id(small.obj)
    del small
    large = buffers.take(4 * MiB)
    large_owner = id(large.obj)
    assert large_owner != small_owner
    del large
    assert id(buffers.take(4 * MiB).obj) == large_owner
