"""Where a sealed chunk's cache file lives, and how it is written.

Shared by the chunk cache (cache/chunks.py), which writes the files of
large chunks and of downloads itself, and the local state (cache/state.py),
whose log carries small new chunks and whose fold writes their files.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["chunk_path", "write_chunk_file"]


def chunk_path(root: str, chunk_id: bytes) -> str:
    """``root/<id[0:2]>/<id>`` in hex (docs/format.md §14). A string, not a
    Path: a random read builds one for every piece, and pathlib takes 6 µs
    to join three parts."""
    name = chunk_id.hex()
    return f"{root}/{name[:2]}/{name}"


def write_chunk_file(path: str, blob: bytes) -> None:
    """Write ``blob`` as ``path`` whole or not at all (blocking): to a
    temporary name of its own, then renamed. Two writes of one chunk (a
    store and a download, say) carry different nonces and must not mix; a
    crash leaves only a ``.tmp`` file, removed at the next mount; a failed
    write leaves nothing."""
    with contextlib.suppress(FileExistsError):
        try:
            os.mkdir(os.path.dirname(path))
        except FileNotFoundError:  # no cache directory yet (a log replayed at start)
            os.makedirs(os.path.dirname(path))
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except OSError:
        # A full disk, say: what was written of it only takes the room
        # that the next write needs.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
