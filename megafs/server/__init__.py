"""The megafs storage server: an untrusted store of ciphertext.

It keeps, per account, opaque node records and chunk blobs and enforces
only what a server can: who may log in, which account may read what, and
quotas. It never imports ``crypto``.

Layers: ``app`` (HTTP, validation) -> ``auth`` (credentials, sessions) and
``feed`` (long polls of the change feed) -> ``metadata`` and ``chunks`` (the
two storage interfaces and their local implementations, which make writes
durable by group commit, ``group``); ``gc`` collects unused chunks and old
tombstones; ``run`` wires them to Hypercorn, signals and the collector.
"""

from megafs.server.app import create_app
from megafs.server.chunks import ChunkStore, LocalChunkStore
from megafs.server.gc import collect_garbage
from megafs.server.metadata import (
    AccountRow,
    ChangeRow,
    MetadataStore,
    MissingReference,
    NodeDelete,
    NodeOp,
    NodeRow,
    NodeWrite,
    SQLiteMetadataStore,
)
from megafs.server.openapi import openapi_document
from megafs.server.run import DEFAULT_QUOTA, ServerStartError, parse_listen, run_server, serve

__all__ = [
    "DEFAULT_QUOTA",
    "AccountRow",
    "ChangeRow",
    "ChunkStore",
    "LocalChunkStore",
    "MetadataStore",
    "MissingReference",
    "NodeDelete",
    "NodeOp",
    "NodeRow",
    "NodeWrite",
    "SQLiteMetadataStore",
    "ServerStartError",
    "collect_garbage",
    "create_app",
    "openapi_document",
    "parse_listen",
    "run_server",
    "serve",
]
