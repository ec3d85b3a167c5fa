"""File manifests: holes, binding to node and revision, and the size/count
rule that makes truncation, extension, reordering, duplication and splicing
detectable (threat model rule 6)."""

from __future__ import annotations

import random
import struct

import pytest

from megafs.crypto import (
    CHUNK_SIZE,
    MAX_INLINE,
    AccountKeys,
    Manifest,
    open_chunk,
    open_manifest,
    seal,
    seal_chunk,
    seal_manifest,
)
from megafs.errors import IntegrityError
from tests.unit.crypto.util import (
    HEADER,
    appended,
    every_bit,
    every_truncation,
    expect_integrity_error,
    manifest_ad,
    manifest_plain,
)

CONTENT_KEY = bytes(range(10, 42))
OLD_CONTENT_KEY = bytes(range(50, 82))
NODE = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_NODE = bytes.fromhex("ffeeddccbbaa99887766554433221100")
S = [bytes([i + 1]) * 32 for i in range(8)]  # stand-in chunk secrets


def _m(size: int, chunks: list[bytes | None], chunk_size: int = CHUNK_SIZE) -> Manifest:
    return Manifest(size=size, chunk_size=chunk_size, chunks=tuple(chunks))


MANIFESTS = {
    "empty": _m(0, []),
    "one byte": _m(1, [S[0]]),
    "exactly one chunk": _m(CHUNK_SIZE, [S[0]]),
    "one chunk and a byte": _m(CHUNK_SIZE + 1, [S[0], S[1]]),
    "hole in the middle": _m(2 * CHUNK_SIZE + 5, [S[0], None, S[2]]),
    "leading and trailing holes": _m(4 * CHUNK_SIZE, [None, S[1], S[1], None]),
    "only holes": _m(3 * CHUNK_SIZE - 1, [None, None, None]),
    "4 KiB chunks": _m(3 * 4096 + 1, [S[0], S[1], None, S[3]], chunk_size=4096),
    "16 MiB chunks": _m(16 << 20, [S[0]], chunk_size=16 << 20),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_round_trip(name: str) -> None:
    manifest = MANIFESTS[name]
    assert Manifest.decode(manifest.encode()) == manifest
    blob = seal_manifest(CONTENT_KEY, NODE, manifest)
    assert open_manifest(CONTENT_KEY, NODE, blob) == manifest


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_encoding_matches_the_spec(name: str) -> None:
    m = MANIFESTS[name]
    assert m.encode() == manifest_plain(m.chunk_size, m.size, list(m.chunks))
    assert len(m.encode()) == 17 + 32 * len(m.chunks)


def test_empty_file_manifest_layout() -> None:
    assert MANIFESTS["empty"].encode() == bytes.fromhex("0100100000000000000000000000000000")


@pytest.mark.parametrize(
    ("size", "count", "chunk_size"),
    [
        (0, 1, CHUNK_SIZE),
        (1, 0, CHUNK_SIZE),
        (CHUNK_SIZE, 2, CHUNK_SIZE),
        (CHUNK_SIZE + 1, 1, CHUNK_SIZE),
        (-1, 0, CHUNK_SIZE),
        (10, 1, 0),
        (10, 1, 4095),
        (10, 1, 3 * 4096),
        (10, 1, 32 << 20),
        (10, 1, -4096),
    ],
)
def test_inconsistent_geometry_cannot_be_built(size: int, count: int, chunk_size: int) -> None:
    with pytest.raises(ValueError):
        Manifest(size=size, chunk_size=chunk_size, chunks=(S[0],) * count)


def test_chunk_secret_of_wrong_length_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        _m(10, [b"short"]).encode()


# -- tampering and binding --------------------------------------------------------


def test_every_bit_truncation_and_append_is_rejected() -> None:
    blob = seal_manifest(CONTENT_KEY, NODE, MANIFESTS["hole in the middle"])
    opener = lambda b: open_manifest(CONTENT_KEY, NODE, b)  # noqa: E731
    expect_integrity_error(opener, every_bit(blob))
    expect_integrity_error(opener, every_truncation(blob))
    expect_integrity_error(opener, appended(blob))


def test_manifest_of_another_node_is_refused() -> None:
    """Splicing: the server serves file X's manifest for file Y. Even if both
    used the same content key (they never do), the node id in the AD differs."""
    blob = seal_manifest(CONTENT_KEY, OTHER_NODE, MANIFESTS["one byte"])
    with pytest.raises(IntegrityError):
        open_manifest(CONTENT_KEY, NODE, blob)


def test_manifest_of_an_older_revision_is_refused() -> None:
    """Every content revision gets a fresh content key (carried in the node
    record), so an older revision's manifest does not open under the key of
    the record the client holds."""
    old = seal_manifest(OLD_CONTENT_KEY, NODE, MANIFESTS["hole in the middle"])
    new = seal_manifest(CONTENT_KEY, NODE, MANIFESTS["one byte"])
    assert open_manifest(CONTENT_KEY, NODE, new) == MANIFESTS["one byte"]
    with pytest.raises(IntegrityError):
        open_manifest(CONTENT_KEY, NODE, old)


def test_manifest_with_another_ad_is_refused() -> None:
    plain = MANIFESTS["one byte"].encode()
    for ad in (b"megafs/v1/node" + NODE + NODE, b"megafs/v1/manifest", b""):
        with pytest.raises(IntegrityError):
            open_manifest(CONTENT_KEY, NODE, seal(CONTENT_KEY, plain, ad))
    assert (
        open_manifest(CONTENT_KEY, NODE, seal(CONTENT_KEY, plain, manifest_ad(NODE)))
        == (MANIFESTS["one byte"])
    )


def test_chunk_level_edits_of_the_ciphertext_are_refused() -> None:
    """Reorder, duplicate, drop or add 32-byte secrets directly in the sealed
    blob (CTR keeps block positions, so these are the server's natural
    moves): every one is refused."""
    m = _m(4 * CHUNK_SIZE, [S[0], S[1], S[2], S[3]])
    blob = seal_manifest(CONTENT_KEY, NODE, m)
    body, tag = blob[HEADER:-16], blob[-16:]
    head, secrets = body[:17], [body[17 + 32 * i : 17 + 32 * (i + 1)] for i in range(4)]

    def rebuild(order: list[bytes]) -> bytes:
        return blob[:HEADER] + head + b"".join(order) + tag

    assert rebuild(secrets) == blob
    cases = {
        "swap": rebuild([secrets[1], secrets[0], *secrets[2:]]),
        "duplicate": rebuild([secrets[0], secrets[0], *secrets[2:]]),
        "drop": rebuild(secrets[:3]),
        "append": rebuild([*secrets, secrets[3]]),
        "drop last, keep tag position": rebuild(secrets[:3]) + bytes(32),
    }
    expect_integrity_error(lambda b: open_manifest(CONTENT_KEY, NODE, b), cases.items())


def _open_plain(plain: bytes, key: bytes = CONTENT_KEY) -> Manifest:
    return open_manifest(CONTENT_KEY, NODE, seal(key, plain, manifest_ad(NODE)))


def test_edited_chunk_lists_only_open_when_resealed_by_a_key_holder() -> None:
    """Reordered, duplicated, dropped or extra secrets (with a matching
    size) are well-formed manifests: they open only if sealed with the
    revision's content key, which only key holders have."""
    edits = {
        "reordered": (4 * CHUNK_SIZE, [S[1], S[0], S[2], S[3]]),
        "duplicated": (4 * CHUNK_SIZE, [S[0], S[0], S[2], S[3]]),
        "dropped (truncated)": (3 * CHUNK_SIZE, [S[0], S[1], S[2]]),
        "extra (extended)": (5 * CHUNK_SIZE, [*S[:4], S[7]]),
        "spliced from another file": (4 * CHUNK_SIZE, [S[0], S[6], S[2], S[3]]),
    }
    for size, chunks in edits.values():
        plain = manifest_plain(CHUNK_SIZE, size, chunks)
        assert _open_plain(plain).chunks == tuple(chunks)  # control: the key holder can
    attacker_key = bytes(32)
    expect_integrity_error(
        lambda plain: _open_plain(plain, key=attacker_key),
        ((k, manifest_plain(CHUNK_SIZE, size, c)) for k, (size, c) in edits.items()),
    )


def _malformed() -> dict[str, bytes]:
    c = CHUNK_SIZE
    return {
        "empty": b"",
        "short header": manifest_plain(c, 1, [S[0]])[:16],
        "version 0": manifest_plain(c, 1, [S[0]], version=0),
        "version 2": manifest_plain(c, 1, [S[0]], version=2),
        "count below size": manifest_plain(c, 2 * c, [S[0]]),
        "count above size": manifest_plain(c, c, [S[0], S[1]]),
        "size 0 with a chunk": manifest_plain(c, 0, [S[0]]),
        "count field says 3, 2 secrets": manifest_plain(c, 3 * c, [S[0], S[1]], count=3),
        "count field says 1, 2 secrets": manifest_plain(c, c, [S[0], S[1]], count=1),
        "count field says 2, 1 secret": manifest_plain(c, 2 * c, [S[0]], count=2),
        "trailing byte": manifest_plain(c, 1, [S[0]]) + b"\0",
        "secret cut short": manifest_plain(c, 1, [S[0]])[:-1],
        "chunk size 0": manifest_plain(0, 0, []),
        "chunk size 4095": manifest_plain(4095, 1, [S[0]]),
        "chunk size not a power of two": manifest_plain(3 << 12, 1, [S[0]]),
        "chunk size 32 MiB": manifest_plain(32 << 20, 1, [S[0]]),
        "count 2**32-1, no body": manifest_plain(c, 1, [], count=0xFFFFFFFF),
        "huge size": manifest_plain(c, (1 << 64) - 1, [S[0]]),
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_plaintext_is_integrity_error(case: str) -> None:
    with pytest.raises(IntegrityError):
        _open_plain(MALFORMED[case])
    with pytest.raises(IntegrityError):
        Manifest.decode(MALFORMED[case])


def test_every_truncation_of_a_plaintext_is_refused() -> None:
    plain = MANIFESTS["hole in the middle"].encode()
    expect_integrity_error(Manifest.decode, every_truncation(plain))


# -- manifests and chunks together -------------------------------------------------


def test_file_round_trip_with_a_hole(account: AccountKeys) -> None:
    """A whole small file: chunks sealed, manifest sealed, everything read
    back through the manifest and checked."""
    cs = 4096
    data = b"A" * cs + bytes(cs) + b"C" * 100
    pieces = [data[i : i + cs] for i in range(0, len(data), cs)]
    store: dict[bytes, bytes] = {}
    secrets: list[bytes | None] = []
    for piece in pieces:
        if piece.count(0) == len(piece):
            secrets.append(None)
            continue
        sealed = seal_chunk(account, piece)
        store[sealed.chunk_id] = sealed.blob
        secrets.append(sealed.secret)
    blob = seal_manifest(CONTENT_KEY, NODE, _m(len(data), secrets, chunk_size=cs))
    manifest = open_manifest(CONTENT_KEY, NODE, blob)
    out = b""
    for i, secret in enumerate(manifest.chunks):
        want = min(cs, manifest.size - i * cs)
        if secret is None:
            out += bytes(want)
        else:
            out += open_chunk(account, secret, store[account.chunk_id(secret)])
    assert out == data
    # The server swaps the two stored chunks: both reads fail.
    a, c = (account.chunk_id(s) for s in secrets if s)
    store[a], store[c] = store[c], store[a]
    for secret in (s for s in manifest.chunks if s):
        with pytest.raises(IntegrityError):
            open_chunk(account, secret, store[account.chunk_id(secret)])


def test_random_manifests_round_trip_and_resist_tampering() -> None:
    rng = random.Random(7)
    for _ in range(300):
        cs = 1 << rng.randint(12, 24)
        count = rng.choice([0, 1, 2, 5, 40])
        size = 0 if count == 0 else (count - 1) * cs + rng.randint(1, cs)
        chunks = [None if rng.random() < 0.2 else rng.randbytes(32) for _ in range(count)]
        m = _m(size, chunks, chunk_size=cs)
        key, node = rng.randbytes(32), rng.randbytes(16)
        blob = seal_manifest(key, node, m)
        assert open_manifest(key, node, blob) == m
        assert m.encode() == manifest_plain(cs, size, chunks)
        bit = rng.randrange(len(blob) * 8)
        mutated = bytearray(blob)
        mutated[bit // 8] ^= 0x80 >> (bit % 8)
        expect_integrity_error(
            lambda b, key=key, node=node: open_manifest(key, node, b),
            [("flip", bytes(mutated)), ("cut", blob[: rng.randrange(len(blob))])],
        )
        with pytest.raises(IntegrityError):
            open_manifest(key, rng.randbytes(16), blob)
        with pytest.raises(IntegrityError):
            open_manifest(rng.randbytes(32), node, blob)


# -- inline content ----------------------------------------------------------------

INLINE = {
    "one byte": b"x",
    "a text file": b"hello, world\n" * 100,
    "the most inline": bytes(range(256)) * (MAX_INLINE // 256),
}


@pytest.mark.parametrize("name", list(INLINE))
def test_inline_content_round_trips_and_matches_the_spec(name: str) -> None:
    data = INLINE[name]
    m = Manifest(size=len(data), chunk_size=CHUNK_SIZE, chunks=(), inline=data)
    assert m.encode() == struct.pack(">BIQI", 1, CHUNK_SIZE, len(data), 0) + data
    blob = seal_manifest(CONTENT_KEY, NODE, m)
    assert len(blob) == 79 + len(data)
    assert open_manifest(CONTENT_KEY, NODE, blob) == m
    assert open_manifest(CONTENT_KEY, NODE, blob).inline == data


@pytest.mark.parametrize(
    ("size", "inline", "chunks"),
    [
        (0, b"", ()),
        (2, b"x", ()),
        (1, b"xy", ()),
        (1, b"x", (S[0],)),
        (MAX_INLINE + 1, bytes(MAX_INLINE + 1), ()),
    ],
)
def test_inconsistent_inline_content_cannot_be_built(
    size: int, inline: bytes, chunks: tuple[bytes, ...]
) -> None:
    with pytest.raises(ValueError):
        Manifest(size=size, chunk_size=CHUNK_SIZE, chunks=chunks, inline=inline)


@pytest.mark.parametrize(
    "plain",
    [
        struct.pack(">BIQI", 1, CHUNK_SIZE, 5, 0) + b"abcd",  # short
        struct.pack(">BIQI", 1, CHUNK_SIZE, 5, 0) + b"abcdef",  # long
        struct.pack(">BIQI", 1, CHUNK_SIZE, 0, 0) + b"a",  # empty file with a body
        struct.pack(">BIQI", 1, CHUNK_SIZE, MAX_INLINE + 1, 0) + bytes(MAX_INLINE + 1),
        struct.pack(">BIQI", 1, 1000, 5, 0) + b"abcde",  # bad geometry
        struct.pack(">BIQI", 2, CHUNK_SIZE, 5, 0) + b"abcde",  # unknown version
    ],
)
def test_malformed_inline_content_is_refused(plain: bytes) -> None:
    with pytest.raises(IntegrityError):
        open_manifest(CONTENT_KEY, NODE, seal(CONTENT_KEY, plain, manifest_ad(NODE)))


def test_every_bit_truncation_and_append_of_inline_content_is_rejected() -> None:
    m = Manifest(size=13, chunk_size=CHUNK_SIZE, chunks=(), inline=b"hello, world\n")
    blob = seal_manifest(CONTENT_KEY, NODE, m)
    opener = lambda b: open_manifest(CONTENT_KEY, NODE, b)  # noqa: E731
    expect_integrity_error(opener, every_bit(blob))
    expect_integrity_error(opener, every_truncation(blob))
    expect_integrity_error(opener, appended(blob))
