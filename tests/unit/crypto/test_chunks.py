"""Content chunks: keyed names, per-chunk keys, tampering, swapped and
"deduplicated" chunks (threat model rules 6 and 11)."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from megafs.crypto import CHUNK_SIZE, OVERHEAD, AccountKeys, open_chunk, seal, seal_chunk
from megafs.crypto.chunks import PIECE, PieceMarker
from megafs.errors import IntegrityError
from tests.unit.crypto.util import (
    HEADER,
    appended,
    every_bit,
    every_truncation,
    expect_integrity_error,
    flip,
)

CHUNK_AD = b"megafs/v1/chunk"


def _chunk_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"megafs/v1/chunk-key", hashlib.sha256).digest()


@pytest.fixture(scope="module")
def big() -> bytes:
    return random.Random(1).randbytes(CHUNK_SIZE)


def test_chunk_size_is_one_mib() -> None:
    assert CHUNK_SIZE == 1 << 20


@pytest.mark.parametrize("size", [1, 2, 4096, CHUNK_SIZE - 1, CHUNK_SIZE])
def test_round_trip(account: AccountKeys, size: int) -> None:
    plain = bytes((i * 7) % 256 for i in range(size)) if size < 5000 else b"\x5a" * size
    sealed = seal_chunk(account, plain)
    assert len(sealed.blob) == size + OVERHEAD
    assert len(sealed.secret) == 32 and len(sealed.chunk_id) == 32
    assert sealed.secret == account.chunk_secret(plain)
    assert sealed.chunk_id == account.chunk_id(sealed.secret)
    assert open_chunk(account, sealed.secret, sealed.blob) == plain


def test_secret_and_name_are_derived_as_specified(account: AccountKeys) -> None:
    plain = b"chunk plaintext"
    sealed = seal_chunk(account, plain)
    secret = hmac.new(account.chunk_mac_key, plain, hashlib.sha256).digest()
    assert sealed.secret == secret
    assert sealed.chunk_id == hmac.new(account.chunk_id_key, secret, hashlib.sha256).digest()
    # The blob is an ordinary envelope under the chunk key with the chunk AD.
    from megafs.crypto import unseal

    assert unseal(_chunk_key(secret), sealed.blob, CHUNK_AD) == plain


@pytest.mark.parametrize("size", [0, CHUNK_SIZE + 1])
def test_bad_chunk_sizes_are_refused(account: AccountKeys, size: int) -> None:
    with pytest.raises(ValueError):
        seal_chunk(account, bytes(size))


def test_dedup_names_within_one_account_only(
    account: AccountKeys, other_account: AccountKeys
) -> None:
    a1, a2 = seal_chunk(account, b"same"), seal_chunk(account, b"same")
    assert (a1.secret, a1.chunk_id) == (a2.secret, a2.chunk_id)
    assert a1.blob != a2.blob  # fresh nonce each time
    b = seal_chunk(other_account, b"same")
    assert b.chunk_id != a1.chunk_id and b.secret != a1.secret
    assert b.blob[14:46] != a1.blob[14:46]  # commitments differ across accounts too
    assert seal_chunk(account, b"samf").chunk_id != a1.chunk_id


def test_small_chunk_every_bit_truncation_and_append(account: AccountKeys) -> None:
    sealed = seal_chunk(account, b"a small chunk of a file" * 3)
    opener = lambda b: open_chunk(account, sealed.secret, b)  # noqa: E731
    expect_integrity_error(opener, every_bit(sealed.blob))
    expect_integrity_error(opener, every_truncation(sealed.blob))
    expect_integrity_error(opener, appended(sealed.blob))


def test_full_chunk_header_bits_and_sampled_body_bits(account: AccountKeys, big: bytes) -> None:
    sealed = seal_chunk(account, big)
    assert open_chunk(account, sealed.secret, sealed.blob) == big
    n_bits = len(sealed.blob) * 8
    rng = random.Random(2)
    body = rng.sample(range(HEADER * 8, n_bits - 128), 200)
    tag = list(range(n_bits - 128, n_bits, 7))
    positions = [*range(HEADER * 8), *body, *tag, HEADER * 8, n_bits - 1]

    # Header bits fail before any decryption, so they are cheap to check all.
    opener = lambda b: open_chunk(account, sealed.secret, b)  # noqa: E731
    expect_integrity_error(opener, ((i, flip(sealed.blob, i)) for i in positions))


def test_full_chunk_truncations(account: AccountKeys, big: bytes) -> None:
    sealed = seal_chunk(account, big)
    n = len(sealed.blob)
    lengths = [
        0,
        1,
        HEADER - 1,
        HEADER,
        HEADER + 1,
        OVERHEAD - 1,
        OVERHEAD,
        n // 2,
        n - 17,
        n - 16,
        n - 15,
        n - 1,
    ]
    opener = lambda b: open_chunk(account, sealed.secret, b)  # noqa: E731
    expect_integrity_error(opener, ((k, sealed.blob[:k]) for k in lengths))
    expect_integrity_error(opener, appended(sealed.blob))


def test_swapped_chunks_are_detected(account: AccountKeys) -> None:
    """The server answers chunk id A with chunk B's blob (or the manifest's
    secret for A is paired with B's blob)."""
    a = seal_chunk(account, b"chunk A" * 100)
    b = seal_chunk(account, b"chunk B" * 100)
    with pytest.raises(IntegrityError):
        open_chunk(account, a.secret, b.blob)
    with pytest.raises(IntegrityError):
        open_chunk(account, b.secret, a.blob)


def test_other_accounts_chunk_is_not_accepted(
    account: AccountKeys, other_account: AccountKeys
) -> None:
    mine = seal_chunk(account, b"content")
    theirs = seal_chunk(other_account, b"content")
    with pytest.raises(IntegrityError):
        open_chunk(account, mine.secret, theirs.blob)
    with pytest.raises(IntegrityError):
        open_chunk(other_account, mine.secret, mine.blob)


def test_a_blob_under_the_right_chunk_key_with_other_content_is_refused(
    account: AccountKeys,
) -> None:
    """The last line of defence for "the server says it was deduplicated":
    even a blob that authenticates under the chunk key of secret S (which
    only a key holder can make) is accepted only if its plaintext hashes
    back to S."""
    wanted = seal_chunk(account, b"the real content")
    forged = seal(_chunk_key(wanted.secret), b"other content", CHUNK_AD)
    with pytest.raises(IntegrityError):
        open_chunk(account, wanted.secret, forged)
    # Control: the same construction with the real content is accepted.
    genuine = seal(_chunk_key(wanted.secret), b"the real content", CHUNK_AD)
    assert open_chunk(account, wanted.secret, genuine) == b"the real content"


def test_chunk_sealed_with_another_ad_is_refused(account: AccountKeys) -> None:
    plain = b"content"
    secret = account.chunk_secret(plain)
    for ad in (b"", b"megafs/v1/chunk\0", b"megafs/v2/chunk", b"megafs/v1/manifest"):
        with pytest.raises(IntegrityError):
            open_chunk(account, secret, seal(_chunk_key(secret), plain, ad))


def test_injected_chunk_made_by_the_server_is_refused(account: AccountKeys) -> None:
    """Without the account keys the server can only guess: a blob built
    with a key it knows does not open for a secret from the manifest."""
    secret = account.chunk_secret(b"data")
    server_key = bytes(32)
    with pytest.raises(IntegrityError):
        open_chunk(account, secret, seal(server_key, b"data", CHUNK_AD))
    with pytest.raises(IntegrityError):
        open_chunk(account, secret, seal(_chunk_key(bytes(32)), b"data", CHUNK_AD))


# -- reading a verified chunk in pieces -------------------------------------------


MARKER = PieceMarker(bytes(range(32, 64)))


@pytest.mark.parametrize("size", [1, 17, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5, CHUNK_SIZE])
def test_every_range_of_a_marked_chunk_decrypts_as_the_whole(
    account: AccountKeys, size: int
) -> None:
    plain = random.Random(size).randbytes(size)
    sealed = seal_chunk(account, plain)
    marks = MARKER.mark(sealed.secret, sealed.blob)
    rng = random.Random(size + 1)
    ranges = [(0, size), (size - 1, 1), (0, 1)]
    ranges += [(s, rng.randint(1, size - s)) for s in (rng.randrange(size) for _ in range(40))]
    for start, n in ranges:
        offset, length = marks.span(start, n)
        data = sealed.blob[offset : offset + length]
        assert MARKER.open(marks, data, start, n) == plain[start : start + n]


def test_a_4k_read_touches_one_piece(account: AccountKeys, big: bytes) -> None:
    sealed = seal_chunk(account, big)
    marks = MARKER.mark(sealed.secret, sealed.blob)
    assert marks.span(5 * 4096, 4096) == (HEADER + PIECE, PIECE)
    assert len(marks.macs) == 16 * (CHUNK_SIZE // PIECE)


def test_a_changed_piece_is_refused(account: AccountKeys, big: bytes) -> None:
    """Any bit of the bytes read, or a piece from elsewhere in the chunk,
    is IntegrityError: the marks stand in for the tag the piece lacks."""
    sealed = seal_chunk(account, big)
    marks = MARKER.mark(sealed.secret, sealed.blob)
    start, n = 3 * PIECE + 100, 4096
    offset, length = marks.span(start, n)
    data = sealed.blob[offset : offset + length]
    for bit in range(0, 8 * length, 997):
        with pytest.raises(IntegrityError):
            MARKER.open(marks, flip(data, bit), start, n)
    other = sealed.blob[offset + PIECE : offset + PIECE + length]
    with pytest.raises(IntegrityError):
        MARKER.open(marks, other, start, n)
    with pytest.raises(IntegrityError):
        MARKER.open(marks, data[:-1], start, n)
    with pytest.raises(IntegrityError):  # marks under another process's key
        MARKER.open(PieceMarker(bytes(32)).mark(sealed.secret, sealed.blob), data, start, n)
    with pytest.raises(IntegrityError):  # past the chunk's end
        MARKER.open(marks, data, CHUNK_SIZE - 10, 11)
