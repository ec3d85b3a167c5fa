"""Everything the server receives or stores is ciphertext and ids (threat
model rules 3 and 9, and the last adversarial case: "any request the client
sends contains no plaintext, no file or folder key, no password").

A user signs up, mounts and writes files with recognisable names, contents,
xattrs and symlink targets through a real mount, with the real CLI, all
through the recording proxy. Afterwards the test derives every key of the
account (password KEK, master key and its subkeys, every folder key and
content key, every chunk secret and chunk key, and the AES keys derived
from them) and looks for each secret in every recorded request and response
(headers and bodies, and every base64 or hex string inside JSON decoded),
in its raw form and hex and base64 encodings; then in every file of the
server's data directory (SQLite database, WAL, chunk files) and its log.
What is *meant* to be there is not searched for: the email (the account's
name on the server), the auth secret (sent to log in) and public values
(ids, commitments).

The account turns two-factor authentication on (``megafs 2fa enable``) and
every later login (the mounts) sends a code. The TOTP secret is meant to be
in exactly one place of the traffic: the server's answer to ``POST
/2fa/setup`` (the server checks the codes, so it must know it; the user
types it into an app). The client never sends it back, and it is nowhere
else in the traffic, the server's log or the local cache; the recovery
codes are in the answer to ``POST /2fa/enable`` only, never sent, never in
the server's files (it keeps hashes). The codes themselves are sent, as
they must be.

It also checks the local cache (rule: a stolen laptop with the daemon
stopped reveals nothing without the password).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from megafs.crypto import (
    CHUNK_SIZE,
    KdfParams,
    Kind,
    derive_password_keys,
    open_manifest,
    open_record,
)
from megafs.remote import RemoteClient
from megafs.wire import TOTP_STEP
from tests.helpers.drive import Drive
from tests.helpers.keyholder import KeyHolder
from tests.helpers.proxy import Record, running_proxy
from tests.helpers.server import ServerProcess
from tests.integration.users import totp_code

MARK = uuid.uuid4().hex[:12]
PASSWORD = f"pw-{MARK}-correct horse battery"
#: Plaintext the client handles; none of it may reach the server.
NAMES = {
    "folder": f"Taxes-{MARK}",
    "file": f"medical-report-{MARK}.txt",
    "big": f"holiday-video-{MARK}.bin",
    "link": f"shortcut-{MARK}",
    "target": f"../secret-target-{MARK}/plans.txt",
    "xattr_name": f"user.tag-{MARK}",
    "xattr_value": f"xattr-value-{MARK}",
}
CONTENT = f"diagnosis: top secret content {MARK}\n".encode() * 40
#: Larger than a chunk, so several chunks and a manifest of two entries.
BIG = b"".join(f"frame {i:08d} of {MARK}|".encode() for i in range(60_000))[: CHUNK_SIZE + 12345]


def _encodings(secret: bytes) -> Iterator[bytes]:
    """``secret`` and the ways it could travel: hex and base64 variants."""
    yield secret
    yield secret.hex().encode()
    yield secret.hex().upper().encode()
    for b64 in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        yield b64
        yield b64.rstrip(b"=")


def _decoded(value: Any) -> Iterator[bytes]:
    """Every string in a JSON value, and its base64 or hex decoding where
    it has one (so a secret inside a larger encoded blob is found too)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _decoded(k)
            yield from _decoded(v)
    elif isinstance(value, list):
        for v in value:
            yield from _decoded(v)
    elif isinstance(value, str):
        yield value.encode()
        for decode in (
            lambda t: base64.b64decode(t, validate=True),
            lambda t: base64.urlsafe_b64decode(t),
            bytes.fromhex,
        ):
            with contextlib.suppress(ValueError, binascii.Error):
                yield decode(value)


def _haystacks(records: Iterable[Record]) -> Iterator[tuple[str, bytes]]:
    for r in records:
        where = f"{r.method} {r.path}"
        yield where + " (request line)", r.path.encode()
        yield where + " (request headers)", repr(r.request_headers).encode()
        yield where + " (response headers)", repr(r.response_headers).encode()
        for part, body in (("request", r.request_body), ("response", r.response_body or b"")):
            yield f"{where} ({part} body)", body
            try:
                value = json.loads(body)
            except ValueError:
                continue
            for piece in _decoded(value):
                yield f"{where} ({part} JSON, decoded)", piece


def _files(*roots: Path) -> Iterator[tuple[str, bytes]]:
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                yield str(path), path.read_bytes()


def _leaks(haystacks: Iterable[tuple[str, bytes]], secrets: dict[str, bytes]) -> list[str]:
    needles = [(name, enc) for name, secret in secrets.items() for enc in _encodings(secret)]
    return [f"{name} in {where}" for where, hay in haystacks for name, enc in needles if enc in hay]


class _Authenticator:
    """An authenticator app: each code is for a time step newer than the
    last one used (the server refuses a step twice) and within the server's
    skew of one step either side. The earliest step the server takes comes
    first, so that a few logins in a row need not wait for the clock."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.last_step = -1

    def code(self) -> str:
        now = time.time()
        current = int(now // TOTP_STEP)
        # The step before still counts for a while (15 s is plenty for the
        # CLI to start and send it, even on a loaded machine).
        earliest = current - 1 if now % TOTP_STEP < TOTP_STEP - 15 else current
        step = max(earliest, self.last_step + 1)
        while step > time.time() // TOTP_STEP + 1:  # all used up ahead: wait
            time.sleep(1)
        self.last_step = step
        return totp_code(self.secret, step * TOTP_STEP)


def _sub(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


async def _key_material(url: str, email: str, code: str) -> dict[str, bytes]:
    """Every secret of the account, found the way a device finds them:
    from the password (and a two-factor ``code``) down through every folder
    and manifest."""
    async with RemoteClient(url) as remote:
        holder = await KeyHolder.login(remote, email, PASSWORD.encode(), code=code)
        account = await remote.account()
        keys = holder.keys
        pw = derive_password_keys(PASSWORD.encode(), KdfParams.from_json(account.kdf))
        secrets = {
            "KEK": pw.kek,
            "master key": keys.master_key,
            "chunk MAC key": keys.chunk_mac_key,
            "chunk id key": keys.chunk_id_key,
            "root folder key": keys.root_folder_key,
            "root folder's own key": holder.root.key,
        }
        folders = [(holder.root.id, holder.root.key)]
        while folders:
            folder_id, folder_key = folders.pop()
            for node in await remote.list_children(folder_id):
                record = open_record(folder_key, node.id, folder_id, node.meta)
                label = f"key of {record.name!r}"
                secrets[label] = record.key
                if record.kind in (Kind.DIR, Kind.LINKS):
                    folders.append((node.id, record.key))
                if record.kind == Kind.FILE:
                    content = (await remote.get_node(node.id)).content
                    assert content is not None
                    manifest = open_manifest(record.key, node.id, content)
                    for i, secret in enumerate(manifest.chunks):
                        if secret is not None:
                            secrets[f"chunk secret {i} of {record.name!r}"] = secret
                            chunk_key = _sub(secret, b"megafs/v1/chunk-key")
                            secrets[f"chunk key {i} of {record.name!r}"] = chunk_key
                            secrets[f"chunk AES key {i} of {record.name!r}"] = _sub(
                                chunk_key, b"megafs/v1/enc"
                            )
        for name, key in list(secrets.items()):
            if "key" in name and "chunk" not in name:
                secrets[f"AES key of the {name}"] = _sub(key, b"megafs/v1/enc")
        return secrets


@pytest.mark.mount
def test_no_plaintext_or_key_reaches_the_server(own_server: ServerProcess, tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing on this machine")
    with running_proxy(own_server.url) as proxy:
        drive = Drive(tmp_path / "alice", proxy.url, password=PASSWORD)
        try:
            drive.signup()
            shown = drive.cli("2fa", "enable", "--password-file", str(drive.password_file))
            found = re.search(r"enter the key ([A-Z2-7]+)", shown.stdout)
            assert found, shown.stdout
            app = _Authenticator(found.group(1))
            enabled = drive.cli(
                "2fa", "enable", "--code", app.code(), "--password-file", str(drive.password_file)
            )
            recovery_codes = re.findall(r"^  (\S+)$", enabled.stdout, re.MULTILINE)
            assert len(recovery_codes) == 10, enabled.stdout
            drive.mount("--totp-code", app.code())
            folder = drive.mnt / NAMES["folder"]
            folder.mkdir()
            (folder / NAMES["file"]).write_bytes(CONTENT)
            (folder / NAMES["big"]).write_bytes(BIG)
            os.symlink(NAMES["target"], folder / NAMES["link"])
            os.setxattr(folder / NAMES["file"], NAMES["xattr_name"], NAMES["xattr_value"].encode())
            drive.umount()  # every change is on the server; logs out
            drive.mount("--totp-code", app.code())  # and read back through the proxy
            assert (folder / NAMES["file"]).read_bytes() == CONTENT
            assert (folder / NAMES["big"]).read_bytes() == BIG
            assert os.readlink(folder / NAMES["link"]) == NAMES["target"]
            drive.umount()
        finally:
            drive.cleanup()
        records = proxy.records

    assert {
        ("POST", "/v1/signup"),
        ("POST", "/v1/login"),
        ("PUT", "/v1/chunks/"),
        ("POST", "/v1/2fa/setup"),
        ("POST", "/v1/2fa/enable"),
        ("POST", "/v1/logout"),
    } <= {
        (r.method, r.route[:11] if r.route.startswith("/v1/chunks/") else r.route) for r in records
    }
    # Logins with the password alone (the 2FA commands; each mount's first
    # try), and with a code (the mounts, once the server asks for one).
    codes_sent = [r.request_json().get("code") for r in records if r.route == "/v1/login"]
    assert len([c for c in codes_sent if c]) >= 2 and None in codes_sent, codes_sent
    secrets: dict[str, bytes] = {"password": PASSWORD.encode()}
    secrets |= {f"plaintext {k}": v.encode() for k, v in NAMES.items()}
    secrets |= {"file content": CONTENT[:64], "big file content": BIG[1000:1064]}
    secrets |= trio.run(_key_material, own_server.url, drive.email, app.code())
    assert len(secrets) > 20

    leaks = _leaks(_haystacks(records), secrets)
    assert leaks == [], "secrets in the traffic:\n" + "\n".join(leaks[:20])
    stored = _files(own_server.data_dir, own_server.log_path)
    leaks = _leaks(stored, secrets)
    assert leaks == [], "secrets on the server's disk:\n" + "\n".join(leaks[:20])
    # A lost laptop: the daemon is stopped, the cache stays.
    leaks = _leaks(_files(drive.cache), secrets)
    assert leaks == [], "secrets in the local cache:\n" + "\n".join(leaks[:20])

    # Two-factor secrets: where they must be, and nowhere else.
    totp = {"TOTP secret": app.secret.encode()}
    totp["TOTP key"] = base64.b32decode(app.secret + "=" * (-len(app.secret) % 8))
    recovery = {f"recovery code {i}": c.encode() for i, c in enumerate(recovery_codes)}
    (setup,) = [r for r in records if r.route == "/v1/2fa/setup"]
    (enable,) = [r for r in records if r.route == "/v1/2fa/enable"]
    assert app.secret.encode() in (setup.response_body or b"")
    assert all(c in (enable.response_body or b"") for c in recovery.values())
    shown = {(setup.method, setup.path), (enable.method, enable.path)}
    elsewhere = [
        (where, hay)
        for where, hay in _haystacks(records)
        if not ("response" in where and tuple(where.split(" ", 2)[:2]) in shown)
    ]
    leaks = _leaks(elsewhere, totp | recovery)
    assert leaks == [], "2FA secrets sent or answered again:\n" + "\n".join(leaks[:20])
    # The server keeps the TOTP secret (it checks the codes) but only hashes
    # of the recovery codes; neither is in its log.
    leaks = _leaks(_files(own_server.data_dir), recovery)
    leaks += _leaks(_files(own_server.log_path, drive.cache, drive.config), totp | recovery)
    assert leaks == [], "2FA secrets on disk:\n" + "\n".join(leaks[:20])
