#!/usr/bin/env python3
"""Print megafs's known-answer vectors (format version 1) as JSON.

    .venv/bin/python tests/vectors/generate.py > tests/vectors/v1.json

DO NOT run this to make a failing test pass. ``v1.json`` is the fixed
reference for format version 1: tests/unit/crypto/test_vectors.py checks
the library against it byte for byte, so a change in any output means the
on-disk/on-server format changed and every existing account would become
unreadable. Run this script deliberately only when a *new* format version
is introduced (write ``v2.json`` next to ``v1.json``, keep ``v1.json`` and
its test while version 1 can still be read), and update docs/format.md in
the same change.

Version 1 was extended before its first release: hard links added
the node kinds LINK (8) and LINKS (9) and the record field NLINK (tag 15,
written only when a node has more than one name). No existing output
changed: the new vectors (the LINKS folder, a hard-linked file in it, its
manifest and two LINK names) were appended after the old ones with new,
distinct inputs, and the old records gained only the JSON key ``nlink``
(1), which their plaintexts do not encode. The regenerated file was checked
to differ from the previous one by additions only, and its new SHA-256
pinned in test_vectors.py. It was extended a second time, also before
release and by addition only: manifests with inline content (one vector,
"inline content", appended to the manifests with inputs of its own). Any
later change is a new format version.

All inputs are fixed below (keys, ids, nonces, plaintexts, and Argon2id at
the client minimum with a fixed salt); the outputs are computed with
megafs.crypto. Byte strings are lowercase hex; integers are exact JSON
integers (some exceed 2**53: read them with a big-integer-capable parser).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from megafs.crypto import (
    CHUNK_SIZE,
    NO_PARENT,
    AccountKeys,
    KdfParams,
    Kind,
    Manifest,
    NodeRecord,
    derive_password_keys,
    seal,
    seal_chunk,
    seal_manifest,
    seal_record,
    wrap_master_key,
)
from megafs.crypto.keys import hkdf


def h(data: bytes) -> str:
    return data.hex()


def seq(start: int, n: int, step: int = 1) -> bytes:
    return bytes((start + i * step) % 256 for i in range(n))


def record_json(r: NodeRecord) -> dict[str, Any]:
    return {
        "kind": int(r.kind),
        "name": h(r.name),
        "key": h(r.key),
        "mode": r.mode,
        "uid": r.uid,
        "gid": r.gid,
        "atime_ns": r.atime_ns,
        "mtime_ns": r.mtime_ns,
        "ctime_ns": r.ctime_ns,
        "size": r.size,
        "rev": r.rev,
        "target": h(r.target),
        "rdev": r.rdev,
        "xattrs": [[h(k), h(v)] for k, v in sorted(r.xattrs.items())],
        "nlink": r.nlink,
    }


def manifest_json(
    label: str, key: bytes, node_id: bytes, m: Manifest, nonce: bytes
) -> dict[str, Any]:
    return {
        "label": label,
        "content_key": h(key),
        "node_id": h(node_id),
        "nonce": h(nonce),
        "manifest": {
            "size": m.size,
            "chunk_size": m.chunk_size,
            "chunks": [None if c is None else h(c) for c in m.chunks],
            **({} if m.inline is None else {"inline": h(m.inline)}),
        },
        "plaintext": h(m.encode()),
        "blob": h(seal_manifest(key, node_id, m, nonce=nonce)),
    }


def aead_vectors() -> list[dict[str, Any]]:
    out = []
    for key, nonce, ad, plain in [
        (seq(0, 32), seq(0xA0, 12), b"megafs/test", b""),
        (seq(0x40, 32), seq(0xB0, 12), b"", b"megafs known-answer test: the quick brown fox"),
        (seq(0x80, 32, 3), seq(0xC0, 12, 5), b"megafs/v1/node" + seq(1, 32), seq(0, 100, 7)),
    ]:
        out.append(
            {
                "key": h(key),
                "nonce": h(nonce),
                "ad": h(ad),
                "plaintext": h(plain),
                "enc_key": h(hmac.new(key, b"megafs/v1/enc", hashlib.sha256).digest()),
                "commitment": h(hmac.new(key, b"megafs/v1/commit", hashlib.sha256).digest()),
                "blob": h(seal(key, plain, ad, nonce=nonce)),
            }
        )
    return out


def main() -> None:
    password = "correct horse battery staple \u00e9".encode()
    kdf = KdfParams(memory_kib=19456, iterations=2, lanes=1, salt=seq(0x10, 16))
    argon = Argon2id(
        salt=kdf.salt,
        length=32,
        iterations=kdf.iterations,
        lanes=kdf.lanes,
        memory_cost=kdf.memory_kib,
    ).derive(password)
    pw = derive_password_keys(password, kdf)
    assert pw.kek == hkdf(argon, b"megafs/v1/kek")

    master, root_id = seq(0x20, 32, 7), seq(0xE0, 16)
    keyblob_nonce = seq(0x33, 12)
    account = AccountKeys.from_master(master, root_id)

    chunks = []
    for plain, nonce in [(b"x", seq(0x01, 12)), (b"hello, megafs chunk\n" * 5, seq(0x02, 12))]:
        sealed = seal_chunk(account, plain, nonce=nonce)
        chunks.append(
            {
                "plaintext": h(plain),
                "nonce": h(nonce),
                "secret": h(sealed.secret),
                "chunk_key": h(
                    hmac.new(sealed.secret, b"megafs/v1/chunk-key", hashlib.sha256).digest()
                ),
                "chunk_id": h(sealed.chunk_id),
                "blob": h(sealed.blob),
            }
        )
    big_plain = bytes(i % 251 for i in range(CHUNK_SIZE))
    big_nonce = seq(0x03, 12)
    big = seal_chunk(account, big_plain, nonce=big_nonce)
    big_chunk = {
        "plaintext_rule": "byte i is i % 251",
        "length": CHUNK_SIZE,
        "nonce": h(big_nonce),
        "secret": h(big.secret),
        "chunk_id": h(big.chunk_id),
        "blob_length": len(big.blob),
        "blob_sha256": h(hashlib.sha256(big.blob).digest()),
    }

    # A small tree: the root (sealed under root_folder_key, parent NO_PARENT),
    # then one child of every kind sealed under the root record's key.
    root_key = seq(0x50, 32, 3)
    t = 1_700_000_000_000_000_000
    base = dict(
        key=b"",
        mode=0,
        uid=1000,
        gid=100,
        atime_ns=t,
        mtime_ns=t + 1,
        ctime_ns=t + 2,
        size=0,
        rev=1,
    )
    root = NodeRecord(kind=Kind.DIR, **{**base, "key": root_key, "mode": 0o755}, name=b"")
    children: list[tuple[str, bytes, NodeRecord]] = [
        (
            "dir",
            seq(0x01, 16),
            NodeRecord(
                kind=Kind.DIR, name=b"Documents", **{**base, "key": seq(0x60, 32), "mode": 0o750}
            ),
        ),
        (
            "file",
            seq(0x02, 16),
            NodeRecord(
                kind=Kind.FILE,
                name=b"r\xe9sum\xe9-latin1.txt",
                **{
                    **base,
                    "key": seq(0x70, 32),
                    "mode": 0o644,
                    "size": 2 * CHUNK_SIZE + 100,
                    "rev": 42,
                },
                xattrs={b"user.tag": b"blue", b"user.empty": b"", b"security.x": b"\0\1\2"},
            ),
        ),
        (
            "symlink",
            seq(0x03, 16),
            NodeRecord(
                kind=Kind.SYMLINK,
                name=b"link",
                target=b"../Documents/r\xe9sum\xe9",
                **{**base, "key": seq(0x80, 32), "mode": 0o777, "size": 17},
            ),
        ),
        (
            "fifo",
            seq(0x04, 16),
            NodeRecord(
                kind=Kind.FIFO, name=b"pipe", **{**base, "key": seq(0x90, 32), "mode": 0o600}
            ),
        ),
        (
            "socket",
            seq(0x05, 16),
            NodeRecord(
                kind=Kind.SOCKET, name=b"sock", **{**base, "key": seq(0xA0, 32), "mode": 0o755}
            ),
        ),
        (
            "chardev",
            seq(0x06, 16),
            NodeRecord(
                kind=Kind.CHARDEV,
                name=b"null",
                rdev=(1 << 8) | 3,
                **{**base, "key": seq(0xB0, 32), "mode": 0o666},
            ),
        ),
        (
            "blockdev",
            seq(0x07, 16),
            NodeRecord(
                kind=Kind.BLOCKDEV,
                name=b"sda1",
                rdev=(8 << 8) | 1,
                **{
                    **base,
                    "key": seq(0xC0, 32),
                    "mode": 0o660,
                    "uid": 0,
                    "gid": 6,
                    "atime_ns": -1,
                    "mtime_ns": -(1 << 63),
                    "ctime_ns": (1 << 63) - 1,
                    "rev": (1 << 64) - 1,
                },
            ),
        ),
    ]
    # Hard links (added to version 1 before release, after the vectors
    # above, which stay byte for byte as they were): the hidden LINKS folder
    # in the root, a file moved into it (named by its id in hex, with two
    # names), and its two names, LINK records in the root and in Documents.
    dir_id, dir_rec = children[0][1], children[0][2]
    links_id, links_key = seq(0x08, 16), seq(0xD0, 32)
    links = NodeRecord(
        kind=Kind.LINKS, name=b".megafs-links", **{**base, "key": links_key, "mode": 0o700}
    )
    linked_id = seq(0x09, 16)
    linked = NodeRecord(
        kind=Kind.FILE,
        name=linked_id.hex().encode(),
        nlink=2,
        **{**base, "key": seq(0xE0, 32), "mode": 0o640, "size": 1, "rev": 3},
    )
    link_fields = {
        **base,
        "mode": linked.mode,
        "uid": linked.uid,
        "gid": linked.gid,
        "atime_ns": linked.atime_ns,
        "mtime_ns": linked.mtime_ns,
        "ctime_ns": linked.ctime_ns,
        "size": linked.size,
    }
    link_in_root = NodeRecord(
        kind=Kind.LINK, name=b"notes.txt", target=linked_id, **{**link_fields, "key": seq(0xF0, 32)}
    )
    link_in_dir = NodeRecord(
        kind=Kind.LINK,
        name=b"notes (hard link).txt",
        target=linked_id,
        **{**link_fields, "key": seq(0x00, 32, 5)},
    )

    records = []
    entries = (
        [("root", root_id, NO_PARENT, account.root_folder_key, root)]
        + [(label, node_id, root_id, root_key, rec) for label, node_id, rec in children]
        + [
            ("links folder", links_id, root_id, root_key, links),
            ("hard-linked file", linked_id, links_id, links_key, linked),
            ("link in root", seq(0x0A, 16), root_id, root_key, link_in_root),
            ("link in Documents", seq(0x0B, 16), dir_id, dir_rec.key, link_in_dir),
        ]
    )
    for i, (label, node_id, parent_id, parent_key, rec) in enumerate(entries):
        nonce = seq(0x10 + i, 12, 11)
        records.append(
            {
                "label": label,
                "parent_key": h(parent_key),
                "node_id": h(node_id),
                "parent_id": h(parent_id),
                "nonce": h(nonce),
                "record": record_json(rec),
                "plaintext": h(rec.encode()),
                "blob": h(seal_record(parent_key, node_id, parent_id, rec, nonce=nonce)),
            }
        )

    file_id, file_rec = children[1][1], children[1][2]
    manifests = []
    # The file record's content: chunk 0 is the big chunk, chunk 1 a hole,
    # chunk 2 (100 bytes) the second small chunk above.
    tail_secret = bytes.fromhex(chunks[1]["secret"])
    for label, m, nonce in [
        (
            "hole in the middle",
            Manifest(
                size=file_rec.size, chunk_size=CHUNK_SIZE, chunks=(big.secret, None, tail_secret)
            ),
            seq(0x44, 12),
        ),
        ("empty file", Manifest(size=0, chunk_size=CHUNK_SIZE, chunks=()), seq(0x45, 12)),
    ]:
        manifests.append(manifest_json(label, file_rec.key, file_id, m, nonce))
    # The hard-linked file's content: the one-byte chunk. Bound to the node's
    # id only, so it did not change when the node moved into LINKS.
    manifests.append(
        manifest_json(
            "hard-linked file",
            linked.key,
            linked_id,
            Manifest(
                size=linked.size,
                chunk_size=CHUNK_SIZE,
                chunks=(bytes.fromhex(chunks[0]["secret"]),),
            ),
            seq(0x46, 12),
        )
    )
    # A small file whose manifest carries its bytes (inline content). Its
    # own key and node id: it belongs to no record above.
    inline = b"megafs inline content\n"
    manifests.append(
        manifest_json(
            "inline content",
            seq(0x50, 32),
            seq(0x70, 16),
            Manifest(size=len(inline), chunk_size=CHUNK_SIZE, chunks=(), inline=inline),
            seq(0x47, 12),
        )
    )

    vectors = {
        "format_version": 1,
        "note": "Fixed reference for megafs format version 1; see docs/format.md. "
        "Generated once by tests/vectors/generate.py; never regenerate to fix a test.",
        "aead": aead_vectors(),
        "password": {
            "password": h(password),
            "kdf": kdf.to_json(),
            "argon2id_output": h(argon),
            "kek": h(pw.kek),
            "auth_secret": h(pw.auth_secret),
        },
        "keyblob": {
            "kek": h(pw.kek),
            "master_key": h(master),
            "root_id": h(root_id),
            "nonce": h(keyblob_nonce),
            "blob": h(wrap_master_key(pw.kek, master, root_id, nonce=keyblob_nonce)),
        },
        "account": {
            "master_key": h(master),
            "root_id": h(root_id),
            "chunk_mac_key": h(account.chunk_mac_key),
            "chunk_id_key": h(account.chunk_id_key),
            "root_folder_key": h(account.root_folder_key),
        },
        "chunks": chunks,
        "big_chunk": big_chunk,
        "records": records,
        "manifests": manifests,
    }
    json.dump(vectors, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
