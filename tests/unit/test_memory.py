"""The daemon gives memory it freed back to the system (megafs/fs/memory.py).

Resident sizes are read from /proc (VmRSS). Every other block stays allocated, so
what is freed lies between live blocks, where a heap cannot shrink from its
top; 48 MiB are freed, more than anything else in the test process moves.
"""

from __future__ import annotations

import os
import platform

import pytest

from megafs.fs.memory import return_free_memory
from tests.helpers.tools import vm_rss

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="trimming is glibc's")

MiB = 1 << 20


def _resident() -> int:
    rss = vm_rss(os.getpid())
    assert rss is not None
    return rss


def _fill(count: int, size: int) -> list[bytes]:
    # Multiplication writes every byte: the pages are resident.
    return [b"m" * size for _ in range(count)]


def test_freed_blocks_inside_a_heap_go_back_to_the_system() -> None:
    blocks = _fill(1536, 64 * 1024)  # 96 MiB of heap blocks, below glibc's mmap threshold
    kept = blocks[1::2]  # every other one stays: the heap cannot shrink from its top
    del blocks
    before = _resident()
    assert return_free_memory()
    assert before - _resident() > 32 * MiB
    del kept
