"""Seal and open one object: the envelope every megafs ciphertext uses.

A sealed object is::

    version (1) | alg (1) | nonce (12) | commitment (32) | AES-256-GCM ciphertext+tag

The object key ``K`` is never used directly. ``enc = HMAC-SHA256(K,
"megafs/v1/enc")`` encrypts and ``commitment = HMAC-SHA256(K,
"megafs/v1/commit")`` is stored in the header and checked before
decrypting, which makes the construction key-committing: one ciphertext
cannot open under two keys (AES-GCM alone does not guarantee that). The
whole header is part of the GCM associated data, followed by the caller's
``ad``, which names what the object is and where it belongs.

Every failure (unknown version or algorithm, short input, wrong commitment,
bad tag) raises the same :class:`~megafs.errors.IntegrityError`: callers
and logs cannot tell which check failed, so nothing becomes an oracle.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import IntegrityError

__all__ = [
    "ALG_AES256GCM_HMAC_COMMIT",
    "FORMAT_VERSION",
    "HEADER",
    "OVERHEAD",
    "OpenedPieces",
    "seal",
    "unseal",
]

FORMAT_VERSION = 1
ALG_AES256GCM_HMAC_COMMIT = 1
_NONCE = 12
_COMMIT = 32
_TAG = 16
_HEADER = 2 + _NONCE + _COMMIT
#: Bytes a sealed object adds to its plaintext.
OVERHEAD = _HEADER + _TAG
#: Where the ciphertext starts: plaintext byte i is sealed at ``HEADER + i``.
HEADER = _HEADER


@functools.lru_cache(maxsize=1024)
def _subkeys(key: bytes) -> tuple[AESGCM, bytes, bytes]:
    """The encryption cipher, the commitment and the encryption key for an
    object key.

    Cached because folder and file keys seal many objects in a row; the
    cache holds keys only in this process's memory. 1024 keys (about 2 MiB:
    an AESGCM object holds 1.7 KiB of OpenSSL state) cover the folders being
    written to; most other keys seal or open one object (a file revision's
    manifest, a chunk) and would only crowd a larger cache.
    """
    if len(key) != 32:
        raise ValueError("object keys are 32 bytes")
    enc = hmac.new(key, b"megafs/v1/enc", hashlib.sha256).digest()
    commit = hmac.new(key, b"megafs/v1/commit", hashlib.sha256).digest()
    return AESGCM(enc), commit, enc


def seal(key: bytes, plaintext: bytes, ad: bytes, *, nonce: bytes | None = None) -> bytes:
    """Encrypt and authenticate ``plaintext`` under ``key``, bound to ``ad``.

    ``nonce`` is for known-answer tests only; by default it is 12 random
    bytes, which is safe because every megafs key seals far fewer than 2**32
    objects (keys are per file revision, per folder, or per chunk).
    """
    cipher, commit, _ = _subkeys(key)
    if nonce is None:
        nonce = os.urandom(_NONCE)
    elif len(nonce) != _NONCE:
        raise ValueError("nonce must be 12 bytes")
    header = bytes((FORMAT_VERSION, ALG_AES256GCM_HMAC_COMMIT)) + nonce + commit
    return header + cipher.encrypt(nonce, plaintext, header + ad)


def unseal(
    key: bytes,
    blob: bytes | bytearray | memoryview,
    ad: bytes,
    *,
    into: bytearray | None = None,
) -> bytes | bytearray:
    """Check and decrypt a sealed object; any failure is IntegrityError.

    ``into``: a buffer of exactly the plaintext's size to decrypt into,
    returned instead of new bytes (a reused buffer is not faulted in and
    zero-filled again). After a failure it holds bytes that were never
    authenticated: the caller must drop it.
    """
    if len(blob) < OVERHEAD or blob[0] != FORMAT_VERSION or blob[1] != ALG_AES256GCM_HMAC_COMMIT:
        raise IntegrityError()
    if into is not None and len(into) != len(blob) - OVERHEAD:
        raise ValueError("the buffer must be exactly as long as the plaintext")
    cipher, commit, _ = _subkeys(key)
    header = bytes(blob[:_HEADER])
    if not hmac.compare_digest(header[2 + _NONCE :], commit):
        raise IntegrityError()
    nonce, sealed = header[2 : 2 + _NONCE], memoryview(blob)[_HEADER:]
    try:
        if into is None:
            return cipher.decrypt(nonce, sealed, header + ad)
        cipher.decrypt_into(nonce, sealed, header + ad, into)
    except InvalidTag:
        raise IntegrityError() from None
    return into


class OpenedPieces:
    """Decrypts pieces of one sealed object, each from a 16-byte-aligned
    plaintext offset, WITHOUT checking the object's tag.

    GCM encrypts with a counter-mode keystream, so any 16-byte-aligned piece
    decrypts on its own, but only the whole object is authenticated. This is
    for bytes the caller has already seen :func:`unseal` accept as part of
    the whole object and has kept authenticated since, with a MAC of its own
    (the chunk cache's pieces, docs/format.md §14); never for bytes that came
    from anywhere else.

    A decryption context is kept for the next piece (a new one costs 8 µs,
    twice the decryption of 16 KiB). Callers in several threads at once
    each take their own: ``list.pop`` and ``append`` are atomic.
    """

    __slots__ = ("_enc", "_nonce", "_spare")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        """``key`` and ``nonce``: the object's key and its envelope's nonce."""
        if len(nonce) != _NONCE:
            raise ValueError("nonce must be 12 bytes")
        self._enc = _subkeys(key)[2]
        self._nonce = nonce
        self._spare: list[CipherContext] = []

    def decrypt(self, piece: bytes | bytearray | memoryview, offset: int) -> bytes:
        """``piece``: the object's ciphertext from plaintext byte ``offset``
        (a multiple of 16) on."""
        if offset % 16:
            raise ValueError("a piece starts on a 16-byte block")
        # GCM's first keystream block is nonce || 2 (nonce || 1 masks the tag).
        counter = self._nonce + (2 + offset // 16).to_bytes(4, "big")
        try:
            context = self._spare.pop()
        except IndexError:
            context = Cipher(algorithms.AES(self._enc), modes.CTR(counter)).decryptor()
        else:
            context.reset_nonce(counter)
        plain = context.update(piece)  # CTR: all of it, finalize() adds nothing
        self._spare.append(context)
        return plain
