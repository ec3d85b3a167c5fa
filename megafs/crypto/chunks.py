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
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.crypto.aead import HEADER, OVERHEAD, OpenedPieces, seal, unseal
from megafs.crypto.keys import AccountKeys
from megafs.errors import IntegrityError

__all__ = [
    "CHUNK_SIZE",
    "PIECE",
    "PieceMarker",
    "PieceMarks",
    "SealedChunk",
    "open_chunk",
    "seal_chunk",
]

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


def seal_chunk(
    keys: AccountKeys,
    plaintext: bytes,
    *,
    secret: bytes | None = None,
    nonce: bytes | None = None,
) -> SealedChunk:
    """``secret``: ``keys.chunk_secret(plaintext)``, for a caller that took
    it already (to look the chunk up before sealing it)."""
    if not plaintext or len(plaintext) > CHUNK_SIZE:
        raise ValueError("a chunk holds 1 to CHUNK_SIZE bytes")
    if secret is None:
        secret = keys.chunk_secret(plaintext)
    blob = seal(_chunk_key(secret), plaintext, _CHUNK_AD, nonce=nonce)
    return SealedChunk(secret, keys.chunk_id(secret), blob)


def open_chunk(
    keys: AccountKeys,
    secret: bytes,
    blob: bytes | bytearray | memoryview,
    *,
    into: bytearray | None = None,
) -> bytes | bytearray:
    """Decrypt a chunk and check it is exactly the one ``secret`` names.

    ``into``: decrypt into this buffer (see :func:`~megafs.crypto.aead.unseal`)."""
    plaintext = unseal(_chunk_key(secret), blob, _CHUNK_AD, into=into)
    if not hmac.compare_digest(keys.chunk_secret(plaintext), secret):
        raise IntegrityError()
    return plaintext


#: A verified chunk kept on local disk can be read back in pieces of this
#: many plaintext bytes (the last one shorter), each checked against a MAC
#: taken when the whole chunk was verified: a 4 KiB random read then reads
#: and decrypts 16 KiB instead of a whole chunk (docs/format.md §14).
PIECE = 16 * 1024
_MARK = 16


class PieceMarks:
    """What reading a verified chunk's blob in pieces needs: its decryption
    (key and nonce), its plaintext length, and a mark (MAC) of each piece's
    ciphertext, taken by one :class:`PieceMarker`. Memory only."""

    __slots__ = ("length", "macs", "pieces", "salt")

    def __init__(self, pieces: OpenedPieces, length: int, salt: bytes, macs: bytes) -> None:
        self.pieces = pieces
        self.length = length
        self.salt = salt
        self.macs = macs

    def span(self, start: int, n: int) -> tuple[int, int]:
        """The blob bytes (offset, length) holding plaintext [start, start+n):
        whole pieces, so each can be checked."""
        first = start // PIECE * PIECE
        end = min(-(-(start + n) // PIECE) * PIECE, self.length)
        return HEADER + first, end - first


class PieceMarker:
    """Marks the pieces of chunks it has seen verified whole, and opens them.

    The marks are GMAC tags (AES-GCM with an empty plaintext) under a key
    that lives and dies with this object, so nothing on disk can carry a
    valid one; each marking draws a random 8-byte salt, and piece ``i`` is
    tagged under the nonce ``salt || i`` (big-endian 32-bit), so a piece
    moved within its chunk fails its mark. GMAC is 4-5x cheaper than the
    HMAC-SHA-256 it replaces, on every random read and every first read of
    a chunk.
    """

    __slots__ = ("_gmac",)

    def __init__(self, key: bytes | None = None) -> None:
        """``key``: 32 bytes, for tests; by default drawn at random."""
        self._gmac = AESGCM(key if key is not None else os.urandom(32))

    def _tag(self, salt: bytes, index: int, piece: bytes | memoryview) -> bytes:
        return self._gmac.encrypt(salt + index.to_bytes(4, "big"), b"", piece)

    def mark(self, secret: bytes, blob: bytes | bytearray | memoryview) -> PieceMarks:
        """The marks of ``blob``, which :func:`open_chunk` has just accepted
        as the chunk ``secret`` names."""
        view = memoryview(blob)
        length = len(blob) - OVERHEAD
        salt = os.urandom(8)
        macs = b"".join(
            self._tag(salt, i, view[HEADER + at : HEADER + min(at + PIECE, length)])
            for i, at in enumerate(range(0, length, PIECE))
        )
        # The nonce is the envelope's (docs/format.md §3).
        pieces = OpenedPieces(_chunk_key(secret), bytes(blob[2:14]))
        return PieceMarks(pieces, length, salt, macs)

    def open(
        self, marks: PieceMarks, data: bytes | bytearray | memoryview, start: int, n: int
    ) -> bytes:
        """Plaintext [start, start+n) of a marked chunk from ``data``, the
        blob bytes :meth:`PieceMarks.span` names; IntegrityError if any piece
        differs from the one marked."""
        offset, length = marks.span(start, n)
        if len(data) != length or start + n > marks.length:
            raise IntegrityError()
        first = (offset - HEADER) // PIECE
        view = memoryview(data)
        for i, at in enumerate(range(0, length, PIECE), start=first):
            if not hmac.compare_digest(
                self._tag(marks.salt, i, view[at : at + PIECE]),
                marks.macs[i * _MARK : (i + 1) * _MARK],
            ):
                raise IntegrityError()
        plain = marks.pieces.decrypt(data, offset - HEADER)
        within = start - (offset - HEADER)
        return plain[within : within + n]
