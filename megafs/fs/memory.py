"""Giving memory the daemon has freed back to the system.

The daemon allocates and frees megabytes a second: 1 MiB chunk buffers,
sealed blobs, plaintexts entering and leaving the LRU, on the event-loop
thread and on the worker threads that encrypt and touch the disk. glibc's
allocator keeps what is freed inside its heaps (one per thread that
allocated, up to eight per core) and gives a heap's memory back only from
its top, so the resident size grows with every burst and stays there.
After extracting a 20 000-file tree and `git add` of it, the daemon was
resident at 331 MiB, of which one ``malloc_trim`` returned 73 MiB in 4 ms.

Every ``TRIM_INTERVAL`` seconds the daemon calls glibc's ``malloc_trim(0)``
in a worker thread, which returns the free pages inside every heap, not
only at the top (elsewhere than glibc nothing is done). Peak resident size
of the daemon over that untar and ``git add`` (a fresh server and account
each run): 348 MiB without, 292 trimming every 5 s, 285 every 2 s;
sequential writes and reads ran as fast as without (docs/performance.md,
"Memory").

Tried and not kept: fixing glibc's mmap threshold at 128 KiB, so that
every chunk-sized buffer gets a mapping of its own, returned whole when
freed (by default glibc raises the threshold each time such a buffer is
freed, after which they come from the heaps). Peak 285 MiB alone, 278 with
the trims, but the daemon then faults in every 1 MiB buffer afresh:
sequential writes 20 % and cold reads 18 % slower. Nor the other way:
fixing it at 8 MiB and the heap-top trim threshold at 128 MiB (fewer
buffers faulted in anew) made cold reads of 512 MiB about 10 % faster but
sequential writes about 5 % slower, in four alternating runs each.
"""

from __future__ import annotations

import ctypes
import logging

import trio

__all__ = ["TRIM_INTERVAL", "return_free_memory", "trim_periodically"]

log = logging.getLogger(__name__)

#: Seconds between two trims: a trim costs a few milliseconds of a worker
#: thread, and memory freed by a burst is back with the system this soon.
TRIM_INTERVAL = 2.0


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the symbols already loaded, the C library's among them
    if not hasattr(libc, "malloc_trim"):
        return None  # not glibc
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


_LIBC = _glibc()


def return_free_memory() -> bool:
    """Give the free pages of every heap back to the system (blocking:
    it holds each heap's lock while it walks it). True if any were."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


async def trim_periodically(interval: float = TRIM_INTERVAL) -> None:
    """Run ``return_free_memory`` every ``interval`` seconds until
    cancelled, off the event loop."""
    if _LIBC is None:
        log.debug("not glibc: freed memory is left to the C library")
        return
    while True:
        await trio.sleep(interval)
        await trio.to_thread.run_sync(return_free_memory)
