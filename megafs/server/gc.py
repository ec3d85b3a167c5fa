"""Garbage collection: chunks no node uses any more, expired sessions and
stale failed-login counts.

A chunk is uploaded before the node that uses it is committed, and a
replaced or deleted node may leave chunks behind. A chunk that no node
references is deleted once it has not been touched (uploaded, or confirmed
by ``POST /chunks/missing``) for ``CHUNK_GRACE_SECONDS``: that window lets a
client finish the commit it uploaded the chunk for.
"""

from __future__ import annotations

import logging

from megafs.server.auth import DEFAULT_LIMITS
from megafs.server.chunks import ChunkStore
from megafs.server.metadata import MetadataStore
from megafs.wire import CHUNK_GRACE_SECONDS

__all__ = ["collect_garbage"]

log = logging.getLogger(__name__)

_BATCH = 1000


async def collect_garbage(meta: MetadataStore, chunks: ChunkStore, *, now: float) -> int:
    """One collection pass as of ``now`` (Unix seconds); returns the number
    of chunks deleted.

    Each chunk is re-checked and forgotten under its lock, then its bytes
    deleted, so an upload or a commit racing the pass either keeps the chunk
    or finds it missing (and uploads it again), never a record without bytes.
    """
    cutoff = int(now) - CHUNK_GRACE_SECONDS
    removed = 0
    while True:
        candidates = await meta.garbage_chunks(cutoff=cutoff, limit=_BATCH)
        for account_id, chunk_id in candidates:
            async with chunks.locked(account_id, chunk_id):
                if await meta.forget_chunk(account_id, chunk_id, cutoff=cutoff):
                    await chunks.delete(account_id, chunk_id)
                    removed += 1
        if len(candidates) < _BATCH:
            break
    sessions = await meta.purge_sessions(now=int(now))
    # A count this old would start from zero at the next failure anyway.
    await meta.purge_throttle(before=int(now) - DEFAULT_LIMITS.forget_seconds)
    if removed or sessions:
        log.info("garbage collection: %d chunks and %d expired sessions deleted", removed, sessions)
    return removed
