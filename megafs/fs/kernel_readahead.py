"""The kernel's read-ahead for the mount: one chunk per request.

The kernel reads a FUSE file ahead of a sequential reader by its
backing device's ``read_ahead_kb``, 128 KiB unless told otherwise, so a
cold ``dd bs=1M`` reaches the daemon as eight 128 KiB requests per chunk,
each a round trip through pyfuse3 and the event loop. The largest request
the kernel sends is 1 MiB (256 pages), one chunk: with the read-ahead at
that size a sequential reader costs one request per chunk. Cold reads of a
256 MiB file, alternating mounts, three each: 207 to 214 MiB/s at 128 KiB,
242 to 250 at 1 MiB, with 13 % less daemon CPU (docs/performance.md).

Only the read-ahead changes: a random reader's request is its own size
either way, and megafs's own read-ahead (``cache/readahead.py``) decides
what is fetched from the server.

The setting is a file in sysfs, writable by root only, and takes effect
after the kernel's ``FUSE_INIT`` (which lowers it to what the daemon
answered then), so it is set once the mount answers. A daemon of an
ordinary user cannot set it and keeps the kernel's default; root can also
set it by hand (docs/performance.md, "Kernel caching").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from megafs.crypto import CHUNK_SIZE

__all__ = ["READ_AHEAD_KIB", "widen_read_ahead"]

log = logging.getLogger(__name__)

#: One chunk, the largest read the kernel sends to a FUSE filesystem.
READ_AHEAD_KIB = CHUNK_SIZE // 1024

#: Where the kernel keeps each backing device's settings, by ``major:minor``.
BDI_ROOT = Path("/sys/class/bdi")


def _widen(mountpoint: Path, kib: int) -> bool:
    setting = BDI_ROOT
    try:
        dev = os.stat(mountpoint).st_dev  # waits for FUSE_INIT, as every request does
        setting = BDI_ROOT / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb"
        if int(setting.read_text()) >= kib:
            return True
        setting.write_text(f"{kib}\n")
    except OSError as exc:
        log.info("kernel read-ahead left at its default (%s: %s)", setting, exc.strerror)
        return False
    log.debug("kernel read-ahead set to %d KiB (%s)", kib, setting)
    return True


async def widen_read_ahead(mountpoint: Path, kib: int = READ_AHEAD_KIB) -> bool:
    """Raise the mount's kernel read-ahead to ``kib`` KiB if permitted.

    Call once the mount is being served (the stat it makes waits for the
    kernel's first request to be answered). True if the read-ahead is now
    at least ``kib``."""
    return await trio.to_thread.run_sync(_widen, mountpoint, kib)
