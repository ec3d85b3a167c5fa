"""File content chunks (threat model rule 6).

A file is cut into chunks of ``CHUNK_SIZE`` bytes of plaintext (the last one
shorter). For each chunk the client computes its *secret*
``s = HMAC(chunk_mac_key, plaintext)``; from it come the chunk's own key
``HMAC(s, "megafs/v1/chunk-key")`` and its public name ``HMAC(chunk_id_key,
s)``. The manifest stores ``s``. Opening a chunk checks the AEAD and then
recomputes ``s`` from the plaintext, so a chunk is accepted only if it is
exactly the content the manifest names, even if the server claims a chunk
was deduplicated or sends another one.
"""

from __future__ import annotations

import hashlib
import hmac

from megafs.crypto.aead import seal, unseal
from megafs.crypto.keys import AccountKeys
from megafs.errors import IntegrityError

__all__ = ["CHUNK_SIZE", "SealedChunk", "open_chunk", "seal_chunk"]

#: 1 MiB: the kernel's largest FUSE write (256 pages), a manifest of 32 bytes
#: per MiB, seal+open measured as fast as 256 KiB and faster than 4 MiB
#: chunks, and a random 4 KiB write uploads 4x less than with 4 MiB chunks
#: (scripts/bench-chunk-size; numbers and reasoning in docs/format.md).
CHUNK_SIZE = 1 << 20
_CHUNK_AD = b"megafs/v1/chunk"


def _chunk_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"megafs/v1/chunk-key", hashlib.sha256).digest()


class SealedChunk:
    """The result of sealing one chunk: what the manifest keeps (``secret``)
    and what the server stores (``chunk_id`` -> ``blob``)."""

    __slots__ = ("blob", "chunk_id", "secret")

    def __init__(self, secret: bytes, chunk_id: bytes, blob: bytes) -> None:
        self.secret = secret
        self.chunk_id = chunk_id
        self.blob = blob


def seal_chunk(keys: AccountKeys, plaintext: bytes, *, nonce: bytes | None = None) -> SealedChunk:
    if not plaintext or len(plaintext) > CHUNK_SIZE:
        raise ValueError("a chunk holds 1 to CHUNK_SIZE bytes")
    secret = keys.chunk_secret(plaintext)
    blob = seal(_chunk_key(secret), plaintext, _CHUNK_AD, nonce=nonce)
    return SealedChunk(secret, keys.chunk_id(secret), blob)


def open_chunk(keys: AccountKeys, secret: bytes, blob: bytes) -> bytes:
    """Decrypt a chunk and check it is exactly the one ``secret`` names."""
    plaintext = unseal(_chunk_key(secret), blob, _CHUNK_AD)
    if not hmac.compare_digest(keys.chunk_secret(plaintext), secret):
        raise IntegrityError()
    return plaintext
