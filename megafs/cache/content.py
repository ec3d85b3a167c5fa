"""The content of one open file: its last sealed manifest plus dirty chunks.

Writes land in plaintext chunk buffers in memory; ``seal`` turns them into
sealed chunks in the chunk cache (ciphertext on disk) and a new chunk list.
A sequential writer's finished chunks are sealed behind it, in the mount's
:class:`Sealer` nursery, while it writes the next ones: the crypto and the
cache write run on the other core instead of stalling the writer, and the
uploader can send them before the file is closed. Memory stays bounded:
once a file has more than ``MAX_DIRTY_CHUNKS`` dirty buffers, the write
waits for the seals in flight and then seals all but the one being written
itself, so a recorder appending for hours holds a few MiB, not the file.

A file of at most ``INLINE_THRESHOLD`` bytes is not chunked: its manifest
carries the bytes (docs/format.md section 9), and its content stays in
memory as the buffer of its only chunk.

A chunk that is all zeros is stored as a hole: it costs no upload and no
storage, and reads as zeros. Every stored chunk holds exactly the bytes the
manifest geometry gives it (the chunk size, or what remains for the last
one): when a file grows past its old last chunk, that chunk becomes dirty
and is zero-padded when sealed, and a stored chunk of any other length is
refused as an integrity failure.

Writers, truncation and sealing hold the file's lock; readers do not need
it, because every state they can observe between two checkpoints is whole.
A seal in flight does not hold the lock either: it seals a copy of the
buffer, and its result replaces the buffer only if nothing wrote to or
truncated that chunk meanwhile; every other path that seals first waits
for the seals in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from megafs.cache.chunks import ChunkCache
from megafs.cache.service import Held, HeldNursery
from megafs.crypto import CHUNK_SIZE, MAX_INLINE, Manifest
from megafs.errors import FormatError, IntegrityError, MegafsError, TooLarge

__all__ = ["INLINE_THRESHOLD", "MAX_DIRTY_CHUNKS", "MAX_FILE_SIZE", "FileContent", "Sealer"]

log = logging.getLogger(__name__)

MAX_DIRTY_CHUNKS = 8
#: Chunks of one file sealed behind its writer at once: one in the crypto,
#: one being written to the cache, on two cores.
SEALS_IN_FLIGHT = 2
#: Files up to this size travel inline in their manifest: one request to
#: save, none to read after a listing (docs/performance.md has the measure).
INLINE_THRESHOLD = 4096
assert INLINE_THRESHOLD <= MAX_INLINE
#: A chunk of zeros: chunks equal to (a prefix of) it are holes.
_ZEROS = bytes(CHUNK_SIZE)
#: 256 GiB: the largest file whose manifest (8 MiB) and chunk list fit one
#: commit request (wire.MAX_JSON_BYTES). Larger sizes are EFBIG.
MAX_FILE_SIZE = 256 << 30


class Sealer(HeldNursery):
    """The mount's nursery for chunks sealed behind their writers.

    Owned by the daemon's nursery (:meth:`run`), which keeps it until every
    file was saved at unmount. Until it runs, and after, files seal in the
    writer's own request, as without it.
    """

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` in the nursery; False if it is not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True


class FileContent:
    def __init__(
        self,
        chunks: ChunkCache,
        manifest: Manifest,
        *,
        on_new_chunk: Callable[[bytes], None],
        sealer: Sealer | None = None,
    ) -> None:
        if manifest.chunk_size != CHUNK_SIZE:
            # The format allows other sizes; this client writes only 1 MiB.
            raise FormatError("file uses an unsupported chunk size")
        self._cache = chunks
        self._on_new_chunk = on_new_chunk
        self.size = manifest.size
        self._secrets: list[bytes | None] = list(manifest.chunks)
        self._dirty: dict[int, bytearray] = {}
        if manifest.inline is not None:
            # A small file's content came with its node: it stays in memory
            # as the only chunk's buffer and is never sealed as a chunk.
            self._secrets = [None]
            self._dirty[0] = bytearray(manifest.inline)
        self._lock = trio.Lock()
        self._sealer = sealer
        #: chunk index -> whether the seal in flight still holds its bytes
        #: (a write to the chunk or a truncation through it clears it).
        self._in_flight: dict[int, bool] = {}
        #: Set (and replaced) whenever a seal in flight ends.
        self._landed = trio.Event()
        #: Where the last write ended: a write that starts there is sequential.
        self._write_end = -1
        #: The chunk a sequential writer is in (full dirty chunks before it
        #: are sealed behind it); -1 after any other write.
        self._writing = -1
        #: True while the content differs from the last manifest handed out.
        self.changed = False
        #: Counts changes of the bytes (writes, truncations), so a reader can
        #: tell that what it prefetched may no longer be the file's.
        self.revision = 0

    @property
    def dirty_bytes(self) -> int:
        return sum(len(b) for b in self._dirty.values())

    def allocated_bytes(self) -> int:
        """Bytes that are not holes (for st_blocks)."""
        full = sum(1 for i, s in enumerate(self._secrets) if s is not None or i in self._dirty)
        return min(self.size, full * CHUNK_SIZE)

    # -- reading ----------------------------------------------------------------

    async def read(self, offset: int, length: int, *, whole: bool = True) -> bytes | memoryview:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file).

        A range within one stored chunk comes back as a view of the cached
        plaintext, without a copy (pyfuse3 replies from any buffer); a range
        across chunks is joined, and a dirty buffer is copied, since a writer
        may change it once this returns.

        ``whole=False`` is for random readers: a stored chunk not in memory
        is read in pieces (:meth:`ChunkCache.read_range`) rather than
        decrypted whole into the LRU, which a sequential reader would need
        next but a random one would not.
        """
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            index, within = divmod(pos, CHUNK_SIZE)
            n = min(CHUNK_SIZE - within, end - pos)
            secret = self.stored_secret(index)
            if whole or secret is None:
                parts.append(_piece(await self._chunk_plaintext(index), within, n))
            else:
                parts.append(
                    await self._cache.read_range(secret, within, n, self._chunk_length(index))
                )
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def chunk_count(self) -> int:
        return len(self._secrets)

    def stored_secret(self, index: int) -> bytes | None:
        """The secret of chunk ``index`` as stored, for read-ahead; None for a
        hole, a dirty buffer, or past the end."""
        if index >= len(self._secrets) or index in self._dirty:
            return None
        return self._secrets[index]

    def _chunk_length(self, index: int) -> int:
        return max(0, min(CHUNK_SIZE, self.size - index * CHUNK_SIZE))

    async def _chunk_plaintext(self, index: int) -> bytes | bytearray | memoryview:
        """A chunk's bytes: a dirty buffer (a bytearray, which a write may
        change), or a stored chunk (bytes or a read-only view); a dirty
        buffer or a hole may be shorter than the chunk (its tail reads as
        zeros)."""
        buf = self._dirty.get(index)
        if buf is not None:
            return buf
        secret = self._secrets[index] if index < len(self._secrets) else None
        if secret is None:
            return b""
        data = await self._cache.read(secret)
        if len(data) != self._chunk_length(index):
            raise IntegrityError()
        return data

    # -- writing ----------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        async with Held(self._lock):
            if len(self._dirty) > MAX_DIRTY_CHUNKS:
                # An earlier seal failed (ENOSPC): fail before buffering
                # more, so memory stays bounded while the cache is full.
                await self._seal_locked()
            await self._grow(offset + len(data))
            view = memoryview(data)
            pos = offset
            last = offset // CHUNK_SIZE
            while view:
                index, within = divmod(pos, CHUNK_SIZE)
                n = min(CHUNK_SIZE - within, len(view))
                buf = self._dirty.get(index)
                if buf is None:
                    buf = await self._load_for_write(index, within, n)
                    self._dirty[index] = buf
                if len(buf) < within:
                    buf.extend(bytes(within - len(buf)))
                buf[within : within + n] = view[:n]
                if index in self._in_flight:
                    self._in_flight[index] = False
                pos += n
                last = index
                view = view[n:]
            self.changed = True
            self.revision += 1
            self._writing = last if offset == self._write_end else -1
            self._write_end = pos
            self._seal_behind()
            while len(self._dirty) > MAX_DIRTY_CHUNKS and self._in_flight:
                await self._landed.wait()  # the writer is ahead of its seals
            if len(self._dirty) > MAX_DIRTY_CHUNKS:
                await self._seal_locked(keep=last)
        return len(data)

    async def _load_for_write(self, index: int, within: int, n: int) -> bytearray:
        start = index * CHUNK_SIZE
        existing = max(0, min(CHUNK_SIZE, self.size - start))
        if existing == 0 or (within == 0 and n >= existing):
            return bytearray()
        return bytearray((await self._chunk_plaintext(index))[:existing])

    async def _grow(self, size: int) -> None:
        """Extend the file to ``size`` (no-op if not larger). The old last
        chunk, if partial and stored, becomes dirty so it is sealed again at
        its new length."""
        if size <= self.size:
            return
        if size > MAX_FILE_SIZE:
            raise TooLarge(f"files are limited to {MAX_FILE_SIZE >> 30} GiB")
        index, within = divmod(self.size, CHUNK_SIZE)
        if within and index not in self._dirty:
            self._dirty[index] = bytearray(await self._chunk_plaintext(index))
        self.size = size
        count = -(-size // CHUNK_SIZE)
        self._secrets.extend([None] * (count - len(self._secrets)))

    async def truncate(self, size: int) -> None:
        async with Held(self._lock):
            if size < self.size:
                count = -(-size // CHUNK_SIZE)
                del self._secrets[count:]
                for index in [i for i in self._dirty if i >= count]:
                    del self._dirty[index]
                for index in self._in_flight:
                    if index >= size // CHUNK_SIZE:
                        self._in_flight[index] = False
                index, within = divmod(size, CHUNK_SIZE)
                if within:
                    buf = self._dirty.get(index)
                    if buf is None:
                        buf = bytearray((await self._chunk_plaintext(index))[:within])
                        self._dirty[index] = buf
                    del buf[within:]
                self.size = size
            else:
                await self._grow(size)
            self.changed = True
            self.revision += 1

    # -- sealing ----------------------------------------------------------------

    async def seal(self) -> Manifest:
        """Seal every dirty chunk and return the manifest of the content.

        Clears ``changed`` once sealed: the caller commits this manifest, and
        any write after it sets ``changed`` again. A seal that fails (the
        cache is full of changes waiting for upload: ENOSPC) leaves it set,
        so the content is sealed again on the next commit, not forgotten.
        """
        async with Held(self._lock):
            if 0 < self.size <= INLINE_THRESHOLD:
                data = bytes((await self._chunk_plaintext(0))[: self.size])
                data += bytes(self.size - len(data))
                self._secrets = [None]
                self._dirty = {0: bytearray(data)}
                self.changed = False
                return Manifest(size=self.size, chunk_size=CHUNK_SIZE, chunks=(), inline=data)
            await self._seal_locked()
            self.changed = False
            return Manifest(size=self.size, chunk_size=CHUNK_SIZE, chunks=tuple(self._secrets))

    async def _seal_locked(self, keep: int | None = None) -> None:
        while self._in_flight:
            await self._landed.wait()
        for index in sorted(self._dirty):
            if index == keep:
                continue
            buf = self._dirty[index]
            length = self._chunk_length(index)
            if len(buf) < length:
                buf.extend(bytes(length - len(buf)))
            self._secrets[index] = await self._store(bytes(buf))
            del self._dirty[index]

    async def _store(self, data: bytes) -> bytes | None:
        """The secret of ``data`` sealed into the chunk cache, queued for
        upload if new; None for zeros (a hole)."""
        if _ZEROS.startswith(data):  # a memcmp; count(0) is 10x slower
            return None
        secret, chunk_id, new = await self._cache.store(data)
        if new:
            self._on_new_chunk(chunk_id)
        return secret

    def _seal_behind(self) -> None:
        """Start sealing the full chunks a sequential writer left behind, up
        to ``SEALS_IN_FLIGHT`` at once (a random writer may come back to its
        chunks, and would make every seal a wasted upload)."""
        if self._sealer is None or self._writing <= 0:
            return  # no sealer, or no full chunk behind a sequential writer
        for index, buf in self._dirty.items():
            if len(self._in_flight) >= SEALS_IN_FLIGHT:
                return
            if index < self._writing and len(buf) == CHUNK_SIZE and index not in self._in_flight:
                if not self._sealer.start_soon(self._seal_one, index, bytes(buf)):
                    return
                self._in_flight[index] = True

    async def _seal_one(self, index: int, data: bytes) -> None:
        """Seal one chunk behind the writer. A failure leaves the chunk
        dirty: the next seal in a request does it again and reports."""
        sealed = False
        try:
            secret = await self._store(data)
            sealed = True
        except MegafsError as exc:
            log.debug("sealing a chunk behind its writer failed: %s", exc.detail)
        except Exception:
            log.exception("sealing a chunk behind its writer failed")
        finally:
            still_valid = self._in_flight.pop(index)
            self._landed.set()
            self._landed = trio.Event()
        if sealed:
            if still_valid:
                self._secrets[index] = secret
                del self._dirty[index]
            self._seal_behind()  # the next one the writer left, if any


def _piece(data: bytes | bytearray | memoryview, within: int, n: int) -> bytes | memoryview:
    """``n`` bytes of a chunk's plaintext from ``within``: a view of a stored
    chunk (immutable), a copy of a dirty buffer, zeros past a short buffer's
    end (a hole is an empty one)."""
    if not isinstance(data, bytearray) and within + n <= len(data):
        return memoryview(data)[within : within + n]
    piece = bytes(data[within : within + n])
    return piece + bytes(n - len(piece)) if len(piece) < n else piece
