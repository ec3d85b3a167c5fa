"""Node records: TLV round trips, binding to node and parent, tampering, and
strict decoding of authenticated-but-malformed plaintexts (rules 5, 7, 9),
for every kind including hard links (LINK names, the LINKS folder, NLINK)."""

from __future__ import annotations

import random
import struct

import pytest

from megafs.crypto import NO_PARENT, Kind, NodeRecord, open_record, seal, seal_record
from megafs.errors import IntegrityError
from tests.unit.crypto.util import (
    REQUIRED,
    TAGS,
    appended,
    every_bit,
    every_truncation,
    expect_integrity_error,
    make_record,
    record_ad,
    record_fields,
    tlv,
)

FOLDER_KEY = bytes(range(0, 64, 2))
OTHER_FOLDER_KEY = bytes(range(1, 65, 2))
NODE = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_NODE = bytes.fromhex("ffeeddccbbaa99887766554433221100")
PARENT = bytes.fromhex("0102030405060708090a0b0c0d0e0f10")
OTHER_PARENT = bytes.fromhex("1112131415161718191a1b1c1d1e1f20")
#: A hard-linked node, the account's LINKS folder (its parent) and its key.
LINKED = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
LINKS_ID = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf")
LINKS_KEY = bytes(range(100, 132))
LINK_ID = bytes.fromhex("d0d1d2d3d4d5d6d7d8d9dadbdcdddedf")
NAME_255 = bytes(range(128, 256)) + bytes(range(128, 255))  # not UTF-8
XATTRS = {
    b"user.empty": b"",
    b"user.binary": bytes(range(256)),
    b"security.selinux": b"system_u:object_r:user_home_t:s0\0",
    b"u" * 255: b"long name",
}

RECORDS = {
    "dir": make_record(kind=Kind.DIR, name=b"Documents", mode=0o40755, size=0),
    "root": make_record(kind=Kind.DIR, name=b"", mode=0o40700, size=0, rev=0),
    "file": make_record(),
    "file-xattrs": make_record(xattrs=XATTRS),
    "file-name-255": make_record(name=NAME_255),
    "empty-file": make_record(size=0, rev=0),
    "symlink": make_record(
        kind=Kind.SYMLINK, name=b"link", mode=0o120777, target=b"../some/where \xff\xfe", size=17
    ),
    "fifo": make_record(kind=Kind.FIFO, name=b"pipe", mode=0o10600, size=0),
    "socket": make_record(kind=Kind.SOCKET, name=b"sock", mode=0o140755, size=0),
    "chardev": make_record(kind=Kind.CHARDEV, name=b"null", mode=0o20666, rdev=0x103),
    "blockdev": make_record(
        kind=Kind.BLOCKDEV, name=b"sda", mode=0o60660, rdev=(8 << 8) | 0, xattrs={b"user.x": b"1"}
    ),
    "blockdev-rdev0": make_record(kind=Kind.BLOCKDEV, name=b"b0", mode=0o60660),
    "extremes": make_record(
        mode=0xFFFFFFFF,
        uid=0xFFFFFFFF,
        gid=0,
        atime_ns=-(1 << 63),
        mtime_ns=(1 << 63) - 1,
        ctime_ns=-1,
        size=(1 << 64) - 1,
        rev=(1 << 64) - 1,
        rdev=(1 << 64) - 1,
    ),
    "all-optional": make_record(
        kind=Kind.SYMLINK, name=b"x", target=b"t", rdev=1, xattrs={b"a": b"b"}, nlink=3
    ),
    # Hard links: a further name (TARGET = the linked node's 16-byte id; its
    # KEY seals nothing), the hidden LINKS folder (KEY = its folder key), and
    # nodes living there, named by their id in hex, with their name count.
    "link": make_record(
        kind=Kind.LINK, name=b"second name.txt", target=LINKED, key=bytes(range(200, 232))
    ),
    "link-to-device": make_record(
        kind=Kind.LINK, name=b"null2", mode=0o666, size=0, target=LINKED, xattrs={b"user.k": b"v"}
    ),
    "links": make_record(
        kind=Kind.LINKS, name=b".megafs-links", mode=0o700, size=0, rev=1, key=LINKS_KEY
    ),
    "hard-linked": make_record(name=LINKED.hex().encode(), nlink=2),
    "hard-linked-xattrs": make_record(
        name=LINKED.hex().encode(), nlink=(1 << 32) - 1, xattrs=XATTRS
    ),
    "hard-linked-chardev": make_record(
        kind=Kind.CHARDEV, name=LINKED.hex().encode(), mode=0o666, size=0, rdev=0x103, nlink=65000
    ),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_round_trip(name: str) -> None:
    record = RECORDS[name]
    data = record.encode()
    assert NodeRecord.decode(data) == record
    parent = NO_PARENT if name == "root" else PARENT
    blob = seal_record(FOLDER_KEY, NODE, parent, record)
    opened = open_record(FOLDER_KEY, NODE, parent, blob)
    assert opened == record
    assert isinstance(opened.kind, Kind)
    if len(record.name) >= 8:  # shorter strings turn up in random bytes by chance
        assert record.name not in blob
    assert record.key not in blob


@pytest.mark.parametrize("name", list(RECORDS))
def test_encoding_matches_the_spec(name: str) -> None:
    """The library's bytes equal a TLV written from docs/format.md."""
    record = RECORDS[name]
    assert record.encode() == tlv(record_fields(record))


def test_every_kind_round_trips() -> None:
    assert {r.kind for r in RECORDS.values()} == set(Kind)
    assert [(k.name, int(k)) for k in Kind] == [
        ("DIR", 1),
        ("FILE", 2),
        ("SYMLINK", 3),
        ("FIFO", 4),
        ("SOCKET", 5),
        ("CHARDEV", 6),
        ("BLOCKDEV", 7),
        ("LINK", 8),
        ("LINKS", 9),
    ]


def test_nlink_is_written_last_and_only_when_not_one() -> None:
    nlink_field = bytes((T["NLINK"],)) + struct.pack(">I", 4) + struct.pack(">I", 2)
    hard = RECORDS["hard-linked"]
    assert hard.encode().endswith(nlink_field)
    assert hard.encode() == hard.evolve(nlink=1).encode() + nlink_field
    assert NodeRecord.decode(hard.evolve(nlink=1).encode()).nlink == 1
    assert RECORDS["file"].nlink == 1
    # After every XATTR field, with all other optional fields before them.
    data = RECORDS["hard-linked-xattrs"].encode()
    assert data.endswith(bytes((T["NLINK"],)) + struct.pack(">II", 4, (1 << 32) - 1))
    assert record_fields(RECORDS["hard-linked-xattrs"])[-2][0] == T["XATTR"]
    assert [t for t, _ in record_fields(RECORDS["all-optional"])][-4:] == [
        T["TARGET"],
        T["RDEV"],
        T["XATTR"],
        T["NLINK"],
    ]


def test_link_record_holds_the_linked_node_id() -> None:
    link = RECORDS["link"]
    data = link.encode()
    target_field = bytes((T["TARGET"],)) + struct.pack(">I", 16) + LINKED
    assert target_field in data
    decoded = NodeRecord.decode(data)
    assert decoded.kind == Kind.LINK and decoded.target == LINKED and decoded.nlink == 1
    assert len(decoded.key) == 32


def test_xattr_size_limit() -> None:
    # 64 KiB of names and values in total is the limit.
    at_limit = {b"user.a": b"v" * (65536 - 6)}
    assert NodeRecord.decode(make_record(xattrs=at_limit).encode()).xattrs == at_limit
    with pytest.raises(ValueError):
        make_record(xattrs={b"user.a": b"v" * (65536 - 5)}).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"name": b""},  # only a folder may have an empty name (the root)
        {"name": b"a/b"},
        {"name": b"/"},
        {"name": b"nul\0"},
        {"name": b"."},
        {"name": b".."},
        {"name": b"x" * 256},
        {"kind": Kind.DIR, "name": b"."},
        {"kind": Kind.DIR, "name": b"a/b"},
        {"key": b"k" * 31},
        {"key": b"k" * 33},
        {"kind": Kind.LINK, "name": b"", "target": LINKED},  # only a DIR: not a LINK
        {"kind": Kind.LINKS, "name": b""},  # nor the LINKS folder
        {"kind": Kind.LINKS, "name": b".."},
        {"kind": Kind.LINK, "name": b"a/b", "target": LINKED},
        {"xattrs": {b"": b"v"}},
        {"xattrs": {b"x" * 256: b"v"}},
    ],
    ids=repr,
)
def test_encode_refuses_invalid_records(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_record(**changes).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"uid": -1},
        {"mode": 1 << 32},
        {"size": -1},
        {"atime_ns": 1 << 63},
        {"rdev": 1 << 64},
        {"nlink": -1},
        {"nlink": 1 << 32},
    ],
    ids=repr,
)
def test_encode_refuses_out_of_range_integers(changes: dict[str, object]) -> None:
    with pytest.raises((ValueError, struct.error)):
        make_record(**changes).encode()


# -- tampering and binding --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["file-xattrs", "symlink", "root", "chardev", "link", "links", "hard-linked-xattrs"]
)
def test_every_bit_truncation_and_append_is_rejected(name: str) -> None:
    parent = NO_PARENT if name == "root" else PARENT
    blob = seal_record(FOLDER_KEY, NODE, parent, RECORDS[name])
    opener = lambda b: open_record(FOLDER_KEY, NODE, parent, b)  # noqa: E731
    expect_integrity_error(opener, every_bit(blob))
    expect_integrity_error(opener, every_truncation(blob))
    expect_integrity_error(opener, appended(blob))


def test_wrong_folder_key() -> None:
    blob = seal_record(FOLDER_KEY, NODE, PARENT, RECORDS["file"])
    with pytest.raises(IntegrityError):
        open_record(OTHER_FOLDER_KEY, NODE, PARENT, blob)


def test_swapped_records_of_two_nodes_are_detected() -> None:
    a = seal_record(FOLDER_KEY, NODE, PARENT, RECORDS["file"])
    b = seal_record(FOLDER_KEY, OTHER_NODE, PARENT, RECORDS["dir"])
    assert open_record(FOLDER_KEY, NODE, PARENT, a) == RECORDS["file"]
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, NODE, PARENT, b)
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, OTHER_NODE, PARENT, a)


def test_moved_node_is_detected() -> None:
    """The server rewrites the node's parent: same key (even a folder that
    happened to share the key), other parent id -> refused."""
    blob = seal_record(FOLDER_KEY, NODE, PARENT, RECORDS["file"])
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, NODE, OTHER_PARENT, blob)
    with pytest.raises(IntegrityError):
        open_record(OTHER_FOLDER_KEY, NODE, OTHER_PARENT, blob)
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, NODE, NO_PARENT, blob)


def test_node_and_parent_ids_are_not_interchangeable() -> None:
    blob = seal_record(FOLDER_KEY, NODE, PARENT, RECORDS["file"])
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, PARENT, NODE, blob)


def test_root_record_is_bound_to_no_parent() -> None:
    blob = seal_record(FOLDER_KEY, NODE, NO_PARENT, RECORDS["root"])
    assert open_record(FOLDER_KEY, NODE, NO_PARENT, blob).name == b""
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, NODE, PARENT, blob)


def test_hard_linked_node_is_bound_to_the_links_folder() -> None:
    """A hard-linked node is an ordinary child of the LINKS folder: sealed
    under that folder's key, bound to its own id and the folder's id."""
    record = RECORDS["hard-linked"]
    blob = seal_record(LINKS_KEY, LINKED, LINKS_ID, record)
    assert open_record(LINKS_KEY, LINKED, LINKS_ID, blob) == record
    for key, node, parent in [
        (FOLDER_KEY, LINKED, PARENT),  # presented back in a folder that names it
        (LINKS_KEY, LINKED, PARENT),  # the folder's key, another parent id
        (LINKS_KEY, LINK_ID, LINKS_ID),  # as the LINK record's node
        (LINKS_KEY, LINKS_ID, LINKED),  # ids swapped
        (LINKS_KEY, LINKED, NO_PARENT),
    ]:
        with pytest.raises(IntegrityError):
            open_record(key, node, parent, blob)


def test_link_record_is_bound_to_its_own_id_and_folder() -> None:
    """A LINK is sealed under its own folder's key with its own id: it
    cannot be passed off as the linked node's record, moved to another
    folder, or swapped with another name, even if two keys coincided."""
    link = RECORDS["link"]
    blob = seal_record(FOLDER_KEY, LINK_ID, PARENT, link)
    assert open_record(FOLDER_KEY, LINK_ID, PARENT, blob) == link
    for key, node, parent in [
        (FOLDER_KEY, LINKED, PARENT),  # as the node it names
        (FOLDER_KEY, LINKED, LINKS_ID),  # as that node, where it lives
        (FOLDER_KEY, LINK_ID, OTHER_PARENT),  # moved to another folder
        (FOLDER_KEY, LINK_ID, LINKS_ID),  # moved into the LINKS folder
        (LINKS_KEY, LINK_ID, PARENT),
        (FOLDER_KEY, OTHER_NODE, PARENT),  # swapped with another entry
    ]:
        with pytest.raises(IntegrityError):
            open_record(key, node, parent, blob)
    # And the linked node's record cannot stand in for the LINK.
    node_blob = seal_record(FOLDER_KEY, LINKED, LINKS_ID, RECORDS["hard-linked"])
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, LINK_ID, PARENT, node_blob)


def test_links_folder_record_is_bound_like_a_folder() -> None:
    blob = seal_record(FOLDER_KEY, LINKS_ID, PARENT, RECORDS["links"])
    assert open_record(FOLDER_KEY, LINKS_ID, PARENT, blob) == RECORDS["links"]
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, LINKS_ID, OTHER_PARENT, blob)
    with pytest.raises(IntegrityError):
        open_record(FOLDER_KEY, NODE, PARENT, blob)


def test_record_sealed_with_another_purpose_is_refused() -> None:
    data = RECORDS["file"].encode()
    for ad in (b"megafs/v1/manifest" + NODE, b"megafs/v1/node" + NODE, b""):
        with pytest.raises(IntegrityError):
            open_record(FOLDER_KEY, NODE, PARENT, seal(FOLDER_KEY, data, ad))
    assert (
        open_record(FOLDER_KEY, NODE, PARENT, seal(FOLDER_KEY, data, record_ad(NODE, PARENT)))
        == RECORDS["file"]
    )


def test_bad_id_lengths_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        seal_record(FOLDER_KEY, NODE[:15], PARENT, RECORDS["file"])
    with pytest.raises(ValueError):
        open_record(FOLDER_KEY, NODE, PARENT + b"\0", b"")


# -- strict decoding of authenticated plaintexts ----------------------------------


def _open_plain(plain: bytes) -> NodeRecord:
    """Seal a hand-made plaintext with the real key and AD, then open it:
    only the decoder stands between it and the caller."""
    return open_record(FOLDER_KEY, NODE, PARENT, seal(FOLDER_KEY, plain, record_ad(NODE, PARENT)))


BASE = make_record(xattrs={b"user.a": b"1", b"user.b": b"2"}, target=b"t", rdev=5)
F = record_fields(BASE)
T = TAGS


def _without(tag: str) -> list[tuple[int, bytes]]:
    return [f for f in F if f[0] != T[tag]]


def _replace(tag: str, value: bytes) -> list[tuple[int, bytes]]:
    return [(t, value if t == T[tag] else v) for t, v in F]


def _minimal(tag: str, value: bytes) -> list[tuple[int, bytes]]:
    """The required fields alone (KIND to REV), one of them replaced."""
    return [(t, value if t == T[tag] else v) for t, v in F[:11]]


def _nlink(value: int) -> tuple[int, bytes]:
    return (T["NLINK"], struct.pack(">I", value))


def test_hand_made_plaintext_control_opens() -> None:
    assert _open_plain(tlv(F)) == BASE
    assert _open_plain(tlv(F)).nlink == 1
    assert _open_plain(tlv(_without("TARGET"))) == BASE.evolve(target=b"")
    assert _open_plain(tlv(_without("RDEV"))) == BASE.evolve(rdev=0)
    assert _open_plain(tlv(_without("XATTR"))) == BASE.evolve(xattrs={})
    assert _open_plain(tlv([*F, _nlink(2)])) == BASE.evolve(nlink=2)
    assert _open_plain(tlv([*_without("XATTR"), _nlink(7)])) == BASE.evolve(xattrs={}, nlink=7)
    assert _open_plain(tlv([*F, _nlink(0xFFFFFFFF)])).nlink == 0xFFFFFFFF
    assert _open_plain(tlv(_replace("KIND", bytes((Kind.LINKS,))))) == BASE.evolve(kind=Kind.LINKS)
    # A LINK names its node by a 16-byte id, nothing else.
    link = [
        (t, bytes((Kind.LINK,)) if t == T["KIND"] else bytes(range(16)) if t == T["TARGET"] else v)
        for t, v in F
    ]
    assert _open_plain(tlv(link)) == BASE.evolve(kind=Kind.LINK, target=bytes(range(16)))


def _malformed() -> dict[str, bytes]:
    cases: dict[str, bytes] = {
        "empty": b"",
        "version only": b"\x01",
        "version 0": tlv(F, version=0),
        "version 2": tlv(F, version=2),
        "swapped KEY and NAME": tlv([F[0], F[2], F[1], *F[3:]]),
        "MODE after UID": tlv([*F[:3], F[4], F[3], *F[5:]]),
        "TARGET after RDEV": tlv([*F[:11], F[12], F[11], *F[13:]]),
        "XATTR before RDEV": tlv([*F[:12], F[13], F[12], F[14]]),
        "duplicate KIND": tlv([F[0], *F]),
        "duplicate MODE": tlv([*F[:4], F[3], *F[4:]]),
        "duplicate TARGET": tlv([*F[:12], F[11], *F[12:]]),
        "duplicate xattr name": tlv([*F, F[-1]]),
        "xattrs not sorted": tlv([*F[:13], F[14], F[13]]),
        "empty xattr name": tlv([*F, (T["XATTR"], b"\x00value")]),
        "xattr name length past value": tlv([*F, (T["XATTR"], b"\x09user.z")]),
        "empty xattr field": tlv([*F, (T["XATTR"], b"")]),
        "empty TARGET field": tlv(_replace("TARGET", b"")),
        "zero RDEV field": tlv(_replace("RDEV", bytes(8))),
        "KIND 0": tlv(_replace("KIND", b"\x00")),
        "LINK without a 16-byte target": tlv(_replace("KIND", bytes((Kind.LINK,)))),
        "NLINK 0": tlv([*F, _nlink(0)]),
        "KIND 10": tlv(_replace("KIND", b"\x0a")),
        "KIND 255": tlv(_replace("KIND", b"\xff")),
        "KIND two bytes": tlv(_replace("KIND", b"\x02\x00")),
        "KIND empty": tlv(_replace("KIND", b"")),
        "KEY 31 bytes": tlv(_replace("KEY", bytes(31))),
        "KEY 33 bytes": tlv(_replace("KEY", bytes(33))),
        "MODE 8 bytes": tlv(_replace("MODE", bytes(8))),
        "UID 2 bytes": tlv(_replace("UID", bytes(2))),
        "MTIME 4 bytes": tlv(_replace("MTIME", bytes(4))),
        "SIZE 9 bytes": tlv(_replace("SIZE", bytes(9))),
        "REV 4 bytes": tlv(_replace("REV", bytes(4))),
        "RDEV 4 bytes": tlv(_replace("RDEV", bytes(4))),
        "name with slash": tlv(_replace("NAME", b"a/b")),
        "name with NUL": tlv(_replace("NAME", b"a\0b")),
        "name dot": tlv(_replace("NAME", b".")),
        "name dotdot": tlv(_replace("NAME", b"..")),
        "empty name on a file": tlv(_replace("NAME", b"")),
        "empty name on a LINK": tlv([(T["KIND"], b"\x08"), (T["NAME"], b""), *F[2:]]),
        "empty name on the LINKS folder": tlv([(T["KIND"], b"\x09"), (T["NAME"], b""), *F[2:]]),
        "name 256 bytes": tlv(_replace("NAME", b"n" * 256)),
        # The same rules on a record of the required fields alone, which
        # decode checks without encoding it again.
        **{
            f"{case}, minimal record": tlv(_minimal("NAME", name))
            for case, name in [
                ("name with slash", b"a/b"),
                ("name with NUL", b"a\0b"),
                ("name dot", b"."),
                ("name dotdot", b".."),
                ("empty name on a file", b""),
                ("name 256 bytes", b"n" * 256),
            ]
        },
        "LINK without a target, minimal record": tlv(
            [(T["KIND"], bytes((Kind.LINK,))), *_minimal("NAME", b"l")[1:]]
        ),
        "xattrs over 64 KiB": tlv([*F, (T["XATTR"], b"\x06user.z" + bytes(65536))]),
        "trailing tag byte": tlv(F) + bytes((T["XATTR"],)),
        "trailing partial length": tlv(F) + b"\x0e\x00\x00",
        "length past the end": tlv(F) + b"\x0e\xff\xff\xff\xff" + b"x" * 10,
        # NLINK: u32, only when not 1, after every other field.
        "NLINK 1 written": tlv([*F, _nlink(1)]),
        "NLINK 1 written, no xattrs": tlv([*_without("XATTR"), _nlink(1)]),
        "NLINK 1 written, minimal record": tlv([*F[:11], _nlink(1)]),
        "NLINK before the XATTRs": tlv([*F[:13], _nlink(2), *F[13:]]),
        "NLINK between XATTRs": tlv([*F[:14], _nlink(2), F[14]]),
        "XATTR after NLINK": tlv([*F, _nlink(2), (T["XATTR"], b"\x06user.c3")]),
        "NLINK before RDEV": tlv([*F[:12], _nlink(2), *F[12:]]),
        "NLINK first": tlv([_nlink(2), *F]),
        "duplicate NLINK": tlv([*F, _nlink(2), _nlink(2)]),
        "two NLINKs": tlv([*F, _nlink(2), _nlink(3)]),
        "NLINK empty": tlv([*F, (T["NLINK"], b"")]),
        "NLINK 1 byte": tlv([*F, (T["NLINK"], b"\x02")]),
        "NLINK 2 bytes": tlv([*F, (T["NLINK"], b"\x00\x02")]),
        "NLINK 3 bytes": tlv([*F, (T["NLINK"], b"\x00\x00\x02")]),
        "NLINK 5 bytes": tlv([*F, (T["NLINK"], b"\x00\x00\x00\x00\x02")]),
        "NLINK 8 bytes": tlv([*F, (T["NLINK"], struct.pack(">Q", 2))]),
        "NLINK length past the end": tlv(F) + b"\x0f\x00\x00\x00\x04\x00\x02",
        "NLINK tag alone at the end": tlv(F) + bytes((T["NLINK"],)),
    }
    for tag in (0, 16, 17, 127, 128, 255):
        cases[f"unknown tag {tag}"] = tlv([*F, (tag, b"")])
        cases[f"unknown tag {tag} first"] = tlv([(tag, b"x"), *F])
    for tag in REQUIRED:
        cases[f"missing {tag}"] = tlv(_without(tag))
    return cases


MALFORMED = _malformed()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_plaintext_is_integrity_error(case: str) -> None:
    with pytest.raises(IntegrityError):
        _open_plain(MALFORMED[case])
    with pytest.raises(IntegrityError):
        NodeRecord.decode(MALFORMED[case])


def test_every_truncation_of_a_minimal_plaintext_is_refused() -> None:
    """A record with only the required fields loses REV (at least) to any
    truncation, so every shorter plaintext must be refused."""
    plain = make_record().encode()
    expect_integrity_error(NodeRecord.decode, every_truncation(plain))


@pytest.mark.parametrize(
    "record",
    [
        make_record(kind=Kind.SYMLINK, target=b"tgt", rdev=3, xattrs={b"a": b"b"}),
        make_record(kind=Kind.LINK, target=LINKED, rdev=3, xattrs={b"a": b"b"}, nlink=2),
        make_record(name=LINKED.hex().encode(), nlink=5),
    ],
    ids=["symlink", "link-nlink", "hard-linked"],
)
def test_every_bit_flip_in_the_plaintext_framing_is_refused(record: NodeRecord) -> None:
    """Flipping bits in version, tag or length bytes (not values) never
    yields a record: each such change breaks the framing."""
    plain = record.encode()
    framing: list[int] = [0]
    pos = 1
    while pos < len(plain):
        framing.extend(range(pos, pos + 5))
        (length,) = struct.unpack_from(">I", plain, pos + 1)
        pos += 5 + length
    positions = [(i, bit) for i in framing for bit in range(8)]
    cases = []
    for i, bit in positions:
        mutated = bytearray(plain)
        mutated[i] ^= 1 << bit
        cases.append(((i, bit), bytes(mutated)))
    expect_integrity_error(NodeRecord.decode, cases)


# -- property-style ---------------------------------------------------------------


_NAME_BYTES = bytes(b for b in range(256) if b not in (0, 0x2F))


def _random_record(rng: random.Random) -> NodeRecord:
    kind = rng.choice(list(Kind))
    name = bytes(rng.choice(_NAME_BYTES) for _ in range(rng.randint(1, 255)))
    if name in (b".", b".."):
        name = b"x"
    xattrs = {}
    for _ in range(rng.choice([0, 0, 1, 3, 8])):
        xattrs[rng.randbytes(rng.randint(1, 40))] = rng.randbytes(rng.randint(0, 300))
    return NodeRecord(
        kind=kind,
        name=name,
        key=rng.randbytes(32),
        mode=rng.getrandbits(32),
        uid=rng.getrandbits(32),
        gid=rng.getrandbits(32),
        atime_ns=rng.getrandbits(64) - (1 << 63),
        mtime_ns=rng.getrandbits(64) - (1 << 63),
        ctime_ns=rng.getrandbits(64) - (1 << 63),
        size=rng.getrandbits(64),
        rev=rng.getrandbits(rng.choice([1, 8, 64])),
        target=(
            rng.randbytes(16)
            if kind == Kind.LINK
            else rng.randbytes(rng.randint(0, 100))
            if rng.random() < 0.4
            else b""
        ),
        rdev=rng.getrandbits(64) if rng.random() < 0.3 else 0,
        xattrs=xattrs,
        nlink=rng.choice([1, 1, 1, 2, 3, rng.getrandbits(32)]),
    )


def test_random_records_round_trip_and_resist_tampering() -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        record = _random_record(rng)
        node, parent, key = rng.randbytes(16), rng.randbytes(16), rng.randbytes(32)
        blob = seal_record(key, node, parent, record)
        assert open_record(key, node, parent, blob) == record
        assert record.encode() == tlv(record_fields(record))
        bit = rng.randrange(len(blob) * 8)
        mutated = bytearray(blob)
        mutated[bit // 8] ^= 0x80 >> (bit % 8)
        cut = rng.randrange(len(blob))
        other = rng.randbytes(16)
        expect_integrity_error(
            lambda b, node=node, parent=parent, key=key: open_record(key, node, parent, b),
            [("flip", bytes(mutated)), ("cut", blob[:cut])],
        )
        with pytest.raises(IntegrityError):
            open_record(key, other, parent, blob)
        with pytest.raises(IntegrityError):
            open_record(key, node, other, blob)
