"""Garbage collection: chunks no node uses any more, expired sessions,
stale failed-login counts and old tombstones of the change feed.

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

__all__ = ["DEFAULT_CHANGE_RETENTION", "collect_garbage"]

log = logging.getLogger(__name__)

_BATCH = 1000

#: How long the change feed remembers a delete, in seconds: a client that
#: has not followed the feed for longer lists everything again.
DEFAULT_CHANGE_RETENTION = 30 * 24 * 3600


async def collect_garbage(
    meta: MetadataStore,
    chunks: ChunkStore,
    *,
    now: float,
    change_retention: int = DEFAULT_CHANGE_RETENTION,
) -> int:
    """One collection pass as of ``now`` (Unix seconds); returns the number
    of chunks deleted. Tombstones older than ``change_retention`` seconds
    are pruned.

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
    tombstones = await meta.prune_tombstones(before=int(now) - change_retention)
    # A count this old would start from zero at the next failure anyway.
    await meta.purge_throttle(before=int(now) - DEFAULT_LIMITS.forget_seconds)
    if removed or sessions or tombstones:
        log.info(
            "garbage collection: %d chunks, %d expired sessions and %d tombstones deleted",
            removed,
            sessions,
            tombstones,
        )
    return removed
