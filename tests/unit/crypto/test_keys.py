"""Password keys, KDF parameter checking (downgrade refusal), the keyblob
and account subkeys (threat model rules 1-4)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from megafs.crypto import (
    DEFAULT_KDF,
    MIN_KDF,
    AccountKeys,
    KdfParams,
    derive_password_keys,
    new_kdf_params,
    new_key,
    new_node_id,
    unwrap_master_key,
    wrap_master_key,
)
from megafs.crypto.keys import hkdf
from megafs.errors import FormatError, IntegrityError
from tests.unit.crypto.util import (
    FAST_KDF,
    appended,
    every_bit,
    every_truncation,
    expect_integrity_error,
)

MASTER = bytes(range(32))
ROOT_ID = bytes(range(100, 116))
KEK = bytes(range(64, 96))


def _json(**changes: Any) -> dict[str, Any]:
    obj = FAST_KDF.to_json()
    obj.update(changes)
    return obj


# -- KdfParams ----------------------------------------------------------------


def test_kdf_json_round_trip() -> None:
    obj = FAST_KDF.to_json()
    assert obj == {
        "alg": "argon2id",
        "memory_kib": 19456,
        "iterations": 2,
        "lanes": 1,
        "salt": base64.b64encode(bytes(range(16))).decode(),
    }
    assert KdfParams.from_json(obj) == FAST_KDF
    assert KdfParams.from_json(DEFAULT_KDF.to_json()) == DEFAULT_KDF


def test_minimum_and_default_parameters() -> None:
    assert (MIN_KDF.memory_kib, MIN_KDF.iterations, MIN_KDF.lanes) == (19456, 2, 1)
    assert len(MIN_KDF.salt) == 16
    assert (DEFAULT_KDF.memory_kib, DEFAULT_KDF.iterations, DEFAULT_KDF.lanes) == (65536, 3, 4)
    MIN_KDF.check()
    DEFAULT_KDF.check()


def test_new_kdf_params_uses_defaults_and_a_random_salt() -> None:
    a, b = new_kdf_params(), new_kdf_params()
    assert (a.memory_kib, a.iterations, a.lanes) == (
        DEFAULT_KDF.memory_kib,
        DEFAULT_KDF.iterations,
        DEFAULT_KDF.lanes,
    )
    assert len(a.salt) == 16 and a.salt != b.salt
    a.check()


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_kib": 19455},
        {"memory_kib": 0},
        {"memory_kib": -1},
        {"iterations": 1},
        {"iterations": 0},
        {"lanes": 0},
        {"salt": base64.b64encode(b"x" * 15).decode()},
        {"salt": ""},
        {"memory_kib": 4 * 1024 * 1024 + 1},
        {"iterations": 65},
        {"lanes": 17},
    ],
    ids=repr,
)
def test_parameters_outside_the_bounds_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        KdfParams.from_json(_json(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"alg": "argon2i"},
        {"alg": "pbkdf2"},
        {"alg": "Argon2id"},
        {"alg": None},
        {"memory_kib": True},
        {"memory_kib": "65536"},
        {"memory_kib": 65536.0},
        {"memory_kib": None},
        {"iterations": True},
        {"iterations": "3"},
        {"iterations": 3.0},
        {"lanes": True},
        {"lanes": "1"},
        {"lanes": 1.5},
        {"salt": "not base64!"},
        {"salt": "AAAA="},
        {"salt": "AAECAwQFBgcICQoLDA0ODw"},  # missing padding
        {"salt": "AAECAwQFBgcICQoLDA0ODw==\n"},
        {"salt": "\u00e9" * 24},
        {"salt": 12345},
        {"salt": None},
        {"salt": ["AAECAwQFBgcICQoLDA0ODw=="]},
    ],
    ids=repr,
)
def test_malformed_parameters_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        KdfParams.from_json(_json(**changes))


@pytest.mark.parametrize("missing", ["alg", "memory_kib", "iterations", "lanes", "salt"])
def test_missing_parameter_is_refused(missing: str) -> None:
    obj = _json()
    del obj[missing]
    with pytest.raises(FormatError):
        KdfParams.from_json(obj)


@pytest.mark.parametrize("obj", [None, [], "argon2id", 3, [("alg", "argon2id")]], ids=repr)
def test_non_object_is_refused(obj: Any) -> None:
    with pytest.raises(FormatError):
        KdfParams.from_json(obj)


def test_accepts_stronger_parameters_without_modifying_the_input() -> None:
    salt = base64.b64encode(b"s" * 32).decode()
    strong = _json(memory_kib=262144, iterations=4, lanes=8, salt=salt)
    params = KdfParams.from_json(strong)
    assert (params.memory_kib, params.iterations, params.lanes, params.salt) == (
        262144,
        4,
        8,
        b"s" * 32,
    )
    original = copy.deepcopy(strong)
    KdfParams.from_json(strong)
    assert strong == original


def test_derive_refuses_weak_parameters_before_touching_the_password() -> None:
    weak = KdfParams(memory_kib=8, iterations=1, lanes=1, salt=b"s" * 16)
    with pytest.raises(FormatError):
        derive_password_keys(b"pw", weak)


# -- password keys --------------------------------------------------------------


def test_password_keys_are_deterministic_and_independent() -> None:
    a = derive_password_keys(b"correct horse", FAST_KDF)
    b = derive_password_keys(b"correct horse", FAST_KDF)
    assert a == b
    assert len(a.kek) == 32 and len(a.auth_secret) == 32
    assert a.kek != a.auth_secret

    other_salt = KdfParams(FAST_KDF.memory_kib, FAST_KDF.iterations, FAST_KDF.lanes, b"\xff" * 16)
    c = derive_password_keys(b"correct horse", other_salt)
    assert c.kek != a.kek and c.auth_secret != a.auth_secret

    d = derive_password_keys(b"correct horsf", FAST_KDF)
    assert d.kek != a.kek and d.auth_secret != a.auth_secret


def test_default_parameters_work() -> None:
    keys = derive_password_keys(b"pw", new_kdf_params())
    assert len(keys.kek) == 32 and keys.kek != keys.auth_secret


def test_auth_secret_does_not_open_the_keyblob() -> None:
    """The server holds (a hash of) the auth secret: it must not be the KEK."""
    pw = derive_password_keys(b"pw", FAST_KDF)
    blob = wrap_master_key(pw.kek, MASTER, ROOT_ID)
    assert unwrap_master_key(pw.kek, blob) == (MASTER, ROOT_ID)
    with pytest.raises(IntegrityError):
        unwrap_master_key(pw.auth_secret, blob)


def test_wrong_password_is_integrity_error() -> None:
    good = derive_password_keys(b"right", FAST_KDF)
    bad = derive_password_keys(b"wrong", FAST_KDF)
    blob = wrap_master_key(good.kek, MASTER, ROOT_ID)
    with pytest.raises(IntegrityError):
        unwrap_master_key(bad.kek, blob)


# -- keyblob --------------------------------------------------------------------


def test_keyblob_round_trip_and_size() -> None:
    blob = wrap_master_key(KEK, MASTER, ROOT_ID)
    assert len(blob) == 62 + 48
    assert MASTER not in blob and ROOT_ID not in blob
    assert unwrap_master_key(KEK, blob) == (MASTER, ROOT_ID)
    assert wrap_master_key(KEK, MASTER, ROOT_ID) != blob  # random nonce


def test_rewrap_with_a_new_password_keeps_the_master_key() -> None:
    blob = wrap_master_key(KEK, MASTER, ROOT_ID)
    master, root = unwrap_master_key(KEK, blob)
    new_kek = bytes(range(128, 160))
    rewrapped = wrap_master_key(new_kek, master, root)
    assert unwrap_master_key(new_kek, rewrapped) == (MASTER, ROOT_ID)
    with pytest.raises(IntegrityError):
        unwrap_master_key(KEK, rewrapped)


@pytest.mark.parametrize(
    ("master", "root"),
    [
        (MASTER[:31], ROOT_ID),
        (MASTER + b"\0", ROOT_ID),
        (MASTER, ROOT_ID[:15]),
        (MASTER, ROOT_ID + b"\0"),
    ],
)
def test_wrap_refuses_bad_lengths(master: bytes, root: bytes) -> None:
    with pytest.raises(ValueError):
        wrap_master_key(KEK, master, root)


def test_keyblob_tampering_is_detected() -> None:
    blob = wrap_master_key(KEK, MASTER, ROOT_ID)
    opener = lambda b: unwrap_master_key(KEK, b)  # noqa: E731
    expect_integrity_error(opener, every_bit(blob))
    expect_integrity_error(opener, every_truncation(blob))
    expect_integrity_error(opener, appended(blob))


def test_keyblob_is_bound_to_its_purpose() -> None:
    """An object sealed under the KEK with another AD, or with the right AD
    but a payload of the wrong length, is not a keyblob."""
    from megafs.crypto import seal

    with pytest.raises(IntegrityError):
        unwrap_master_key(KEK, seal(KEK, MASTER + ROOT_ID, b"megafs/v1/other"))
    for payload in (MASTER, MASTER + ROOT_ID + b"\0", b""):
        with pytest.raises(IntegrityError):
            unwrap_master_key(KEK, seal(KEK, payload, b"megafs/v1/keyblob"))
    assert unwrap_master_key(KEK, seal(KEK, MASTER + ROOT_ID, b"megafs/v1/keyblob")) == (
        MASTER,
        ROOT_ID,
    )


# -- account subkeys ------------------------------------------------------------


def test_account_subkeys_are_distinct_and_deterministic() -> None:
    a = AccountKeys.from_master(MASTER, ROOT_ID)
    assert a == AccountKeys.from_master(MASTER, ROOT_ID)
    subkeys = [a.master_key, a.chunk_mac_key, a.chunk_id_key, a.root_folder_key]
    assert len(set(subkeys)) == 4
    assert all(len(k) == 32 for k in subkeys)
    assert a.root_id == ROOT_ID
    b = AccountKeys.from_master(bytes(range(1, 33)), ROOT_ID)
    assert not {a.chunk_mac_key, a.chunk_id_key, a.root_folder_key} & {
        b.chunk_mac_key,
        b.chunk_id_key,
        b.root_folder_key,
    }


def test_subkeys_are_hkdf_expand_with_their_labels() -> None:
    a = AccountKeys.from_master(MASTER, ROOT_ID)
    assert a.chunk_mac_key == hkdf(MASTER, b"megafs/v1/chunk-mac")
    assert a.chunk_id_key == hkdf(MASTER, b"megafs/v1/chunk-id")
    assert a.root_folder_key == hkdf(MASTER, b"megafs/v1/root-folder")
    assert hkdf(MASTER, b"x", 64)[:32] == hkdf(MASTER, b"x")


def test_chunk_secret_and_id_are_keyed() -> None:
    a = AccountKeys.from_master(MASTER, ROOT_ID)
    b = AccountKeys.from_master(bytes(range(1, 33)), ROOT_ID)
    s = a.chunk_secret(b"data")
    assert s == a.chunk_secret(b"data") and len(s) == 32
    assert s != a.chunk_secret(b"datb")
    assert s != b.chunk_secret(b"data")  # no cross-account equality
    assert a.chunk_id(s) != b.chunk_id(s)
    assert a.chunk_id(s) != s and len(a.chunk_id(s)) == 32


def test_new_key_and_node_id() -> None:
    keys = {new_key() for _ in range(100)}
    ids = {new_node_id() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) == 32 for k in keys)
    assert len(ids) == 100 and all(len(i) == 16 for i in ids)
