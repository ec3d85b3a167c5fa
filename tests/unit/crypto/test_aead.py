"""The sealed envelope: round trips, tampering, wrong key/AD, version and
algorithm refusal, and key commitment (threat model rules 1, 6 and 9)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import megafs.crypto.aead as aead
from megafs.crypto import OVERHEAD, seal, unseal
from megafs.errors import IntegrityError
from tests.unit.crypto.util import (
    HEADER,
    appended,
    every_bit,
    every_truncation,
    expect_integrity_error,
    flip,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
AD = b"megafs/test/ad"
NONCE = bytes(range(200, 212))


def _commit(key: bytes) -> bytes:
    return hmac.new(key, b"megafs/v1/commit", hashlib.sha256).digest()


def _enc(key: bytes) -> bytes:
    return hmac.new(key, b"megafs/v1/enc", hashlib.sha256).digest()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65536])
def test_round_trip(size: int) -> None:
    plain = bytes(i % 251 for i in range(size))
    blob = seal(KEY, plain, AD)
    assert len(blob) == size + OVERHEAD
    assert unseal(KEY, blob, AD) == plain
    if size >= 15:
        assert plain not in blob


def test_layout_matches_the_spec() -> None:
    blob = seal(KEY, b"hello", AD, nonce=NONCE)
    assert OVERHEAD == 2 + 12 + 32 + 16
    assert blob[0] == 1 and blob[1] == 1
    assert blob[2:14] == NONCE
    assert blob[14:46] == _commit(KEY)
    # The GCM part is AES-256-GCM under the derived enc key, with the whole
    # header followed by the caller's AD as associated data.
    assert AESGCM(_enc(KEY)).decrypt(NONCE, blob[46:], blob[:46] + AD) == b"hello"


def test_random_nonces_differ_and_fixed_nonce_is_deterministic() -> None:
    blobs = {seal(KEY, b"same", AD) for _ in range(50)}
    assert len(blobs) == 50
    assert len({blob[2:14] for blob in blobs}) == 50
    assert seal(KEY, b"same", AD, nonce=NONCE) == seal(KEY, b"same", AD, nonce=NONCE)


def test_bad_key_or_nonce_length_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        seal(KEY[:31], b"x", AD)
    with pytest.raises(ValueError):
        seal(KEY + b"\0", b"x", AD)
    with pytest.raises(ValueError):
        seal(KEY, b"x", AD, nonce=NONCE[:11])


def test_wrong_key_and_wrong_ad() -> None:
    blob = seal(KEY, b"secret", AD)
    with pytest.raises(IntegrityError):
        unseal(OTHER, blob, AD)
    for ad in (b"", AD + b"\0", AD[:-1], b"megafs/test/ae"):
        with pytest.raises(IntegrityError):
            unseal(KEY, blob, ad)


@pytest.mark.parametrize("size", [0, 1, 40])
def test_every_bit_flip_is_rejected(size: int) -> None:
    blob = seal(KEY, bytes(size), AD)
    expect_integrity_error(lambda b: unseal(KEY, b, AD), every_bit(blob))


@pytest.mark.parametrize("size", [0, 1, 40])
def test_decrypting_into_a_buffer_checks_what_unseal_checks(size: int) -> None:
    plain = bytes(i % 251 for i in range(size))
    blob = seal(KEY, plain, AD)
    into = bytearray(b"\xff" * size)  # a reused buffer holds older bytes
    assert unseal(KEY, blob, AD, into=into) is into
    assert into == plain
    expect_integrity_error(lambda b: unseal(KEY, b, AD, into=bytearray(size)), every_bit(blob))
    with pytest.raises(IntegrityError):
        unseal(OTHER, blob, AD, into=bytearray(size))
    with pytest.raises(ValueError):
        unseal(KEY, blob, AD, into=bytearray(size + 1))


def test_every_truncation_and_appended_bytes_are_rejected() -> None:
    blob = seal(KEY, b"some plaintext", AD)
    expect_integrity_error(lambda b: unseal(KEY, b, AD), every_truncation(blob))
    expect_integrity_error(lambda b: unseal(KEY, b, AD), appended(blob))


def _with_valid_tag(version: int, alg: int, plain: bytes = b"payload") -> bytes:
    """A blob whose GCM tag is valid for a header carrying ``version`` and
    ``alg``: only the explicit version/alg check can refuse it."""
    header = bytes((version, alg)) + NONCE + _commit(KEY)
    return header + AESGCM(_enc(KEY)).encrypt(NONCE, plain, header + AD)


def test_control_blob_built_by_hand_opens() -> None:
    assert unseal(KEY, _with_valid_tag(1, 1), AD) == b"payload"


@pytest.mark.parametrize("version", [v for v in range(256) if v != 1])
def test_unknown_version_is_refused_even_with_a_valid_tag(version: int) -> None:
    with pytest.raises(IntegrityError):
        unseal(KEY, _with_valid_tag(version, 1), AD)


@pytest.mark.parametrize("alg", [a for a in range(256) if a != 1])
def test_unknown_algorithm_is_refused_even_with_a_valid_tag(alg: int) -> None:
    with pytest.raises(IntegrityError):
        unseal(KEY, _with_valid_tag(1, alg), AD)


def test_errors_are_uniform() -> None:
    """Every failure is the same class with the same message: no oracle."""
    blob = seal(KEY, b"x" * 20, AD)
    bad = [
        b"",
        blob[:10],
        bytes((2,)) + blob[1:],
        blob[:1] + bytes((9,)) + blob[2:],
        flip(blob, 14 * 8),  # commitment
        flip(blob, 3 * 8),  # nonce
        flip(blob, len(blob) * 8 - 1),  # tag
    ]
    messages = set()
    for b in bad:
        with pytest.raises(IntegrityError) as info:
            unseal(KEY, b, AD)
        assert type(info.value) is IntegrityError
        messages.add(str(info.value))
    with pytest.raises(IntegrityError) as info:
        unseal(OTHER, blob, AD)
    messages.add(str(info.value))
    assert messages == {"integrity check failed"}


# -- key commitment -------------------------------------------------------------


class _SpyAESGCM:
    decrypts = 0

    def __init__(self, key: bytes) -> None:
        self._inner = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        return self._inner.encrypt(nonce, data, ad)

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        type(self).decrypts += 1
        return self._inner.decrypt(nonce, data, ad)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_SpyAESGCM]]:
    aead._subkeys.cache_clear()
    monkeypatch.setattr(aead, "AESGCM", _SpyAESGCM)
    _SpyAESGCM.decrypts = 0
    yield _SpyAESGCM
    aead._subkeys.cache_clear()


def test_commitment_is_checked_before_any_decryption(spy: type[_SpyAESGCM]) -> None:
    blob = seal(KEY, b"sealed under A", AD)
    assert unseal(KEY, blob, AD) == b"sealed under A"
    assert spy.decrypts == 1  # the spy sees real decryptions

    # Opened with key B: B's commitment is not in the header -> refused
    # without decrypting.
    with pytest.raises(IntegrityError):
        unseal(OTHER, blob, AD)
    assert spy.decrypts == 1

    # Header commitment swapped for B's: opening with A now fails at the
    # commitment check (no decryption) ...
    swapped = blob[:14] + _commit(OTHER) + blob[HEADER:]
    with pytest.raises(IntegrityError):
        unseal(KEY, swapped, AD)
    assert spy.decrypts == 1
    # ... and opening with B passes the commitment but fails the tag.
    with pytest.raises(IntegrityError):
        unseal(OTHER, swapped, AD)
    assert spy.decrypts == 2


# GF(2^128) arithmetic in GCM's bit order, to build a ciphertext that plain
# AES-GCM accepts under two different keys ("invisible salamanders").
_R = 0xE1 << 120
_ONE = 1 << 127


def _gf_mul(x: int, y: int) -> int:
    z = 0
    for i in range(127, -1, -1):
        if (y >> i) & 1:
            z ^= x
        x = (x >> 1) ^ _R if x & 1 else x >> 1
    return z


def _gf_inv(x: int) -> int:
    result, base, e = _ONE, x, (1 << 128) - 2
    while e:
        if e & 1:
            result = _gf_mul(result, base)
        base = _gf_mul(base, base)
        e >>= 1
    return result


def _aes_block(key: bytes, block: bytes) -> int:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return int.from_bytes(enc.update(block) + enc.finalize(), "big")


def _ghash(h: int, ad: bytes, ct: bytes) -> int:
    def blocks(data: bytes) -> list[bytes]:
        padded = data + bytes(-len(data) % 16)
        return [padded[i : i + 16] for i in range(0, len(padded), 16)]

    lengths = (len(ad) * 8).to_bytes(8, "big") + (len(ct) * 8).to_bytes(8, "big")
    y = 0
    for b in [*blocks(ad), *blocks(ct), lengths]:
        y = _gf_mul(y ^ int.from_bytes(b, "big"), h)
    return y


def test_gf_arithmetic_is_sound() -> None:
    a = int.from_bytes(hashlib.sha256(b"a").digest()[:16], "big")
    assert _gf_mul(a, _ONE) == a
    assert _gf_mul(a, _gf_inv(a)) == _ONE
    # Our GHASH reproduces a real GCM tag.
    tag = AESGCM(KEY).encrypt(NONCE, b"x" * 40, b"ad")[-16:]
    h, ej0 = _aes_block(KEY, bytes(16)), _aes_block(KEY, NONCE + b"\0\0\0\1")
    ct = AESGCM(KEY).encrypt(NONCE, b"x" * 40, b"ad")[:-16]
    assert (_ghash(h, b"ad", ct) ^ ej0).to_bytes(16, "big") == tag


def test_a_ciphertext_valid_under_two_keys_opens_under_one_only() -> None:
    """Build a blob whose AES-GCM part authenticates under the enc keys of
    both A and B (possible because GCM is not key-committing). Raw GCM
    accepts it under both; megafs opens it under A only, because the
    header commits to A."""
    header = bytes((1, 1)) + NONCE + _commit(KEY)
    full_ad = header + AD
    e1, e2 = _enc(KEY), _enc(OTHER)
    h1, h2 = _aes_block(e1, bytes(16)), _aes_block(e2, bytes(16))
    j1, j2 = (_aes_block(e, NONCE + b"\0\0\0\1") for e in (e1, e2))
    free = b"chosen by the attacker!!"[:16]
    # The last ciphertext block x is multiplied by H^2 in GHASH (only the
    # length block follows it); solve tag_A(x) == tag_B(x) for x.
    g1, g2 = _ghash(h1, full_ad, free + bytes(16)), _ghash(h2, full_ad, free + bytes(16))
    h1sq, h2sq = _gf_mul(h1, h1), _gf_mul(h2, h2)
    x = _gf_mul(g1 ^ g2 ^ j1 ^ j2, _gf_inv(h1sq ^ h2sq))
    ct = free + x.to_bytes(16, "big")
    tag = _ghash(h1, full_ad, ct) ^ j1
    assert tag == _ghash(h2, full_ad, ct) ^ j2
    body = ct + tag.to_bytes(16, "big")

    plain_a = AESGCM(e1).decrypt(NONCE, body, full_ad)
    plain_b = AESGCM(e2).decrypt(NONCE, body, full_ad)
    assert plain_a != plain_b  # raw GCM: one ciphertext, two plaintexts

    blob = header + body
    assert unseal(KEY, blob, AD) == plain_a
    with pytest.raises(IntegrityError):
        unseal(OTHER, blob, AD)
    # Swapping in B's commitment does not help: the header is in the AD.
    with pytest.raises(IntegrityError):
        unseal(OTHER, header[:14] + _commit(OTHER) + body, AD)
