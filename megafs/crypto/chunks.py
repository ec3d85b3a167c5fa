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

from megafs.crypto.aead import HEADER, OVERHEAD, decrypt_opened_piece, seal, unseal
from megafs.crypto.keys import AccountKeys
from megafs.errors import IntegrityError

__all__ = [
    "CHUNK_SIZE",
    "PIECE",
    "PieceMarks",
    "SealedChunk",
    "mark_pieces",
    "open_chunk",
    "open_piece",
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


#: A verified chunk kept on local disk can be read back in pieces of this
#: many plaintext bytes (the last one shorter), each checked against a MAC
#: taken when the whole chunk was verified: a 4 KiB random read then reads
#: and decrypts 16 KiB instead of a whole chunk (docs/format.md §14).
PIECE = 16 * 1024
_MARK = 16


class PieceMarks:
    """What reading a verified chunk's blob in pieces needs: its nonce, its
    plaintext length, and a MAC of each piece's ciphertext under a key that
    never leaves the process (so nothing on disk can forge one)."""

    __slots__ = ("length", "macs", "nonce")

    def __init__(self, nonce: bytes, length: int, macs: bytes) -> None:
        self.nonce = nonce
        self.length = length
        self.macs = macs

    def span(self, start: int, n: int) -> tuple[int, int]:
        """The blob bytes (offset, length) holding plaintext [start, start+n):
        whole pieces, so each can be checked."""
        first = start // PIECE * PIECE
        end = min(-(-(start + n) // PIECE) * PIECE, self.length)
        return HEADER + first, end - first


def _mac(mac_key: bytes, piece: bytes | memoryview) -> bytes:
    return hmac.digest(mac_key, piece, "sha256")[:_MARK]


def mark_pieces(blob: bytes, mac_key: bytes) -> PieceMarks:
    """The marks of a blob :func:`open_chunk` has just accepted."""
    view = memoryview(blob)
    length = len(blob) - OVERHEAD
    macs = b"".join(
        _mac(mac_key, view[HEADER + at : HEADER + min(at + PIECE, length)])
        for at in range(0, length, PIECE)
    )
    return PieceMarks(bytes(blob[2:14]), length, macs)  # the nonce (§3)


def open_piece(
    secret: bytes, marks: PieceMarks, mac_key: bytes, data: bytes, start: int, n: int
) -> bytes:
    """Plaintext [start, start+n) of a marked chunk from ``data``, the blob
    bytes :meth:`PieceMarks.span` names; IntegrityError if any piece differs
    from the one marked."""
    offset, length = marks.span(start, n)
    if len(data) != length or start + n > marks.length:
        raise IntegrityError()
    first = (offset - HEADER) // PIECE
    view = memoryview(data)
    for i, at in enumerate(range(0, length, PIECE), start=first):
        if not hmac.compare_digest(
            _mac(mac_key, view[at : at + PIECE]), marks.macs[i * _MARK : (i + 1) * _MARK]
        ):
            raise IntegrityError()
    plain = decrypt_opened_piece(_chunk_key(secret), marks.nonce, data, offset - HEADER)
    within = start - (offset - HEADER)
    return plain[within : within + n]
