"""Where a sealed chunk's cache file lives, and how it is written.

Shared by the chunk cache (cache/chunks.py), which writes the files of
large chunks and of downloads itself, and the local state (cache/state.py),
whose log carries small new chunks and whose fold writes their files.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["chunk_path", "write_chunk_file"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def chunk_path(root: str, chunk_id: bytes) -> str:
    """``root/<id[0:2]>/<id>`` in hex (docs/format.md §14). A string, not a
    Path: a random read builds one for every piece, and pathlib takes 6 µs
    to join three parts."""
    name = chunk_id.hex()
    return f"{root}/{name[:2]}/{name}"


def write_chunk_file(path: str, blob: bytes | bytearray | memoryview) -> None:
    """Write ``blob`` as ``path`` whole or not at all (blocking): to a
    temporary name of its own, then renamed. Two writes of one chunk (a
    store and a download, say) carry different nonces and must not mix; a
    crash leaves only a ``.tmp`` file, removed at the next mount; a failed
    write leaves nothing."""
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    try:
        try:
            fd = os.open(tmp, _CREATE, 0o600)
        except FileNotFoundError:
            # The first file of its folder (or no cache directory yet: a log
            # replayed at start). Made only then: a mkdir before every write
            # is one more system call in a worker thread, and after each the
            # thread waits for the event loop to give back the GIL.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, _CREATE, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # A full disk, say: what was written of it only takes the room
        # that the next write needs.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
