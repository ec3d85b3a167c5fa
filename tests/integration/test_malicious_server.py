"""A malicious server against the real client (issue #7): login, account
keys, rollback, two devices, deduplication and hostile answers.

The client is megafs's own code (``megafs.cli.account``, the CLI, and the
mount's ``Tree`` with its real chunk cache, local state and uploader, run in
this process without FUSE); the server is the real one; between them
``tests.helpers.proxy`` plays the attacker. What a real mount does with a
tampered listing, manifest or chunk (EIO for that file, the daemon keeps
serving) is in tests/mount/test_malicious_server.py.

Case of the threat model (short)            -> test
-----------------------------------------------------------------------------
weaker KDF parameters in /prelogin (rule 1) -> test_kdf_downgrade_in_prelogin_is_refused
weaker KDF parameters in /account           -> test_kdf_downgrade_in_account_is_refused
bit flip, old version, unknown algorithm id,
  truncation of the wrapped master key      -> test_tampered_keyblob_is_refused
another account's keyblob (wrapped key swap)-> test_tampered_keyblob_is_refused
another root folder than the keyblob pins   -> test_substituted_root_folder_is_refused
recovery wrap swapped (rule 4)              -> test_swapped_recovery_wrap_is_refused
older revision of a seen node (rule 8)      -> test_rollback_of_a_seen_node_is_refused
different answers to two devices            -> test_two_devices_given_different_answers
upload claimed deduplicated (rule 6)        -> test_claimed_deduplication_is_still_verified
malformed answers: wrong types, huge sizes,
  missing fields, wrong ids, header tricks  -> test_malformed_answers_are_format_errors
requests carry no secrets                   -> tests/integration/test_traffic.py

Not covered, because megafs does not implement it yet: share links and
user-to-user sharing (rule 10).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from megafs.cli.account import login
from megafs.cli.config import Paths
from megafs.cli.main import CliError, build_parser
from megafs.crypto import (
    MIN_KDF,
    NO_PARENT,
    AccountKeys,
    KdfParams,
    Kind,
    NodeRecord,
    derive_password_keys,
    new_key,
    new_node_id,
    open_record,
    seal_record,
    wrap_master_key,
)
from megafs.errors import AuthFailed, FormatError, IntegrityError, MegafsError
from megafs.fs.tree import Inode, Tree
from megafs.remote import RemoteClient
from megafs.wire import b64d, b64e
from tests.helpers.keyholder import FileNode, Folder, KeyHolder, flip_bit
from tests.helpers.parts import local_parts
from tests.helpers.proxy import Forward, Proxy, ProxyRequest, ProxyResponse
from tests.helpers.server import ServerProcess

PASSWORD = b"integration password for the malicious server"


@dataclass(frozen=True)
class Account:
    email: str
    keyblob: bytes
    root_id: bytes
    #: A long-lived session of the account, for tests that need no login.
    token: str


def _signup(url: str) -> Account:
    """Sign up as ``megafs signup`` does, but with the client's minimum
    Argon2id cost instead of the default: every login of these tests derives
    the password's keys, and the minimum is what a downgrade must not go
    below, so it is the right account to attack."""

    async def run() -> Account:
        email = f"victim-{uuid.uuid4().hex[:10]}@example.org"
        params = KdfParams(MIN_KDF.memory_kib, MIN_KDF.iterations, MIN_KDF.lanes, os.urandom(16))
        pw = await trio.to_thread.run_sync(derive_password_keys, PASSWORD, params)
        master_key, root_id = new_key(), new_node_id()
        keys = AccountKeys.from_master(master_key, root_id)
        now = time.time_ns()
        root = NodeRecord(
            kind=Kind.DIR,
            name=b"",
            key=new_key(),
            mode=0o755,
            uid=os.getuid(),
            gid=os.getgid(),
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            size=0,
            rev=1,
        )
        async with RemoteClient(url) as remote:
            session = await remote.signup(
                email,
                params.to_json(),
                pw.auth_secret,
                wrap_master_key(pw.kek, master_key, root_id),
                root_id,
                seal_record(keys.root_folder_key, root_id, NO_PARENT, root),
                "signup",
                long_lived=True,
            )
        return Account(email, session.account.keyblob, root_id, session.token)

    return trio.run(run)


def _cli(config: Path, *argv: str) -> tuple[int, str]:
    """``megafs --config-dir CONFIG ARGV...`` in this process (no interpreter
    start-up): its exit code and error line, as ``megafs.cli.main.main``
    would give them."""
    args = build_parser().parse_args(["--config-dir", str(config), *argv])
    try:
        return args.func(args, Paths(config)), ""
    except CliError as exc:
        return exc.code, str(exc)
    except MegafsError as exc:
        return (3 if isinstance(exc, AuthFailed) else 1), exc.detail


@pytest.fixture(scope="module")
def victim(server: ServerProcess) -> Account:
    """A real account (real Argon2id, keyblob and root record), made once."""
    return _signup(server.url)


@pytest.fixture(scope="module")
def other(server: ServerProcess) -> Account:
    """Another account of the same server, whose objects the server can
    hand to the victim."""
    return _signup(server.url)


def _answer(proxy: Proxy, method: str, path: str, change: Callable[[Any], Any]) -> None:
    """Tamper with the JSON answer to every matching request."""
    proxy.on(lambda request, forward: forward().with_json(change), method=method, path=path)


# -- key derivation and the keyblob ---------------------------------------------------

DOWNGRADES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("memory below the minimum", lambda k: {**k, "memory_kib": 19455}),
    ("one iteration", lambda k: {**k, "iterations": 1}),
    ("no lanes", lambda k: {**k, "lanes": 0}),
    ("15-byte salt", lambda k: {**k, "salt": b64e(bytes(15))}),
    ("argon2i", lambda k: {**k, "alg": "argon2i"}),
    ("pbkdf2", lambda k: {**k, "alg": "pbkdf2-sha256"}),
    ("memory as a float", lambda k: {**k, "memory_kib": 65536.0}),
    ("iterations as text", lambda k: {**k, "iterations": "3"}),
    ("iterations as a bool", lambda k: {**k, "iterations": True}),
    ("salt with a newline", lambda k: {**k, "salt": k["salt"][:8] + "\n" + k["salt"][8:]}),
    ("memory of 8 TiB", lambda k: {**k, "memory_kib": 1 << 33}),
    ("no salt", lambda k: {key: v for key, v in k.items() if key != "salt"}),
]


@pytest.mark.parametrize("change", [c for _, c in DOWNGRADES], ids=[i for i, _ in DOWNGRADES])
async def test_kdf_downgrade_in_prelogin_is_refused(
    proxy: Proxy, victim: Account, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Weaker (or absurd) Argon2id parameters are refused before the
    password is used: no login request is ever sent."""
    _answer(proxy, "POST", "/v1/prelogin", lambda v: {**v, "kdf": change(v["kdf"])})
    async with RemoteClient(proxy.url) as remote:
        with pytest.raises(FormatError):
            await login(remote, victim.email, PASSWORD, "device")
    assert proxy.find("POST", "/v1/prelogin")
    assert proxy.find("POST", "/v1/login") == []


def test_kdf_downgrade_in_account_is_refused(proxy: Proxy, victim: Account, tmp_path: Path) -> None:
    """``megafs passwd`` derives the current password's keys with the
    parameters ``/account`` names: weaker ones there are refused too, and the
    password change is never sent."""
    password = tmp_path / "password"
    password.write_text(PASSWORD.decode() + "\n")
    new_password = tmp_path / "new-password"
    new_password.write_text("a brand new password\n")
    config = tmp_path / "config"
    assert _cli(config, "login", proxy.url, victim.email, "--password-file", str(password)) == (
        0,
        "",
    )
    _answer(proxy, "GET", "/v1/account", lambda v: {**v, "kdf": {**v["kdf"], "iterations": 1}})
    code, error = _cli(
        config,
        "passwd",
        "--password-file",
        str(password),
        "--new-password-file",
        str(new_password),
    )
    assert code == 1
    assert "below the minimum" in error
    assert proxy.find("GET", "/v1/account")
    assert proxy.find("POST", "/v1/password") == []


KEYBLOBS: list[tuple[str, Callable[[bytes, Account], bytes]]] = [
    ("bit flip in the tag", lambda b, o: flip_bit(b)),
    ("bit flip in the ciphertext", lambda b, o: flip_bit(b, 50)),
    ("bit flip in the commitment", lambda b, o: flip_bit(b, 20)),
    ("version 0", lambda b, o: b"\x00" + b[1:]),
    ("version 2", lambda b, o: b"\x02" + b[1:]),
    ("unknown algorithm id", lambda b, o: b[:1] + b"\x02" + b[2:]),
    ("truncated", lambda b, o: b[:-1]),
    ("extended", lambda b, o: b + b"\x00"),
    ("empty", lambda b, o: b""),
    ("another account's keyblob", lambda b, o: o.keyblob),
]


@pytest.mark.parametrize("change", [c for _, c in KEYBLOBS], ids=[i for i, _ in KEYBLOBS])
async def test_tampered_keyblob_is_refused(
    proxy: Proxy, victim: Account, other: Account, change: Callable[[bytes, Account], bytes]
) -> None:
    """The wrapped master key is authenticated under the password's KEK:
    any change (or another account's genuine keyblob) is the one uniform
    login failure, and no key comes out of it."""

    def tamper(session: dict[str, Any]) -> dict[str, Any]:
        keyblob = change(b64d(session["account"]["keyblob"]), other)
        return {**session, "account": {**session["account"], "keyblob": b64e(keyblob)}}

    _answer(proxy, "POST", "/v1/login", tamper)
    async with RemoteClient(proxy.url) as remote:
        with pytest.raises(AuthFailed) as info:
            await login(remote, victim.email, PASSWORD, "device")
    assert "does not open" in info.value.detail


def _with_root(root: bytes, session: dict[str, Any]) -> dict[str, Any]:
    return {**session, "account": {**session["account"], "root_id": root.hex()}}


async def test_substituted_root_folder_is_refused(
    proxy: Proxy, victim: Account, other: Account
) -> None:
    """The keyblob pins the root folder's id: the server cannot name
    another root (its own, or another account's)."""
    for root in (other.root_id, os.urandom(16)):
        proxy.clear()
        _answer(proxy, "POST", "/v1/login", partial(_with_root, root))
        async with RemoteClient(proxy.url) as remote:
            with pytest.raises(IntegrityError):
                await login(remote, victim.email, PASSWORD, "device")


def _with_keyblob(wrap: Callable[[bytes], bytes], answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "keyblob": b64e(wrap(b64d(answer["keyblob"])))}


def test_swapped_recovery_wrap_is_refused(
    proxy: Proxy,
    other: Account,
    server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``/recovery/start`` answers with a wrap that is not the recovery
    key's (the password keyblob of the same master key, another account's,
    a tampered one): the client refuses it and never sends
    ``/recovery/finish``, so the server learns no new password proof."""
    account = _signup(server.url)  # its own: a recovery key changes the account
    password = tmp_path / "password"
    password.write_text(PASSWORD.decode() + "\n")
    config = tmp_path / "config"
    assert _cli(config, "login", proxy.url, account.email, "--password-file", str(password))[0] == 0
    assert _cli(config, "recovery-key", "--password-file", str(password))[0] == 0
    printed = capsys.readouterr().out
    recovery_key = next(line.strip() for line in printed.splitlines() if line.count("-") == 12)
    key_file = tmp_path / "recovery-key"
    key_file.write_text(recovery_key + "\n")
    recover = (
        "login",
        proxy.url,
        account.email,
        "--recovery-key-file",
        str(key_file),
        "--password-file",
        str(password),
    )
    for name, wrap in [
        ("the password keyblob", lambda b: account.keyblob),
        ("another account's keyblob", lambda b: other.keyblob),
        ("a bit flip", flip_bit),
    ]:
        proxy.clear()
        _answer(proxy, "POST", "/v1/recovery/start", partial(_with_keyblob, wrap))
        code, error = _cli(config, *recover)
        assert code == 3, (name, error)
        assert "does not open with this recovery key" in error, name
        assert proxy.find("POST", "/v1/recovery/finish") == [], name
    proxy.clear()  # and the genuine wrap still works
    assert _cli(config, *recover) == (0, "")


# -- a device's tree: rollback, forks, deduplication -----------------------------------


@asynccontextmanager
async def device(url: str, keys: AccountKeys, state_dir: Path, token: str) -> AsyncIterator[Tree]:
    """One run of a device's client (the mount's tree, chunk cache, local
    state and uploader) without FUSE, remembering what it saw in
    ``state_dir`` across runs."""
    async with (
        RemoteClient(url, token) as remote,
        local_parts(remote, keys, state_dir) as (state, chunks, uploader),
    ):
        tree = Tree(remote, uploader, chunks, keys, state)
        await tree.load_root()
        yield tree


async def _lookup(tree: Tree, *path: bytes) -> Inode | None:
    inode: Inode | None = tree.inodes[1]
    for name in path:
        assert inode is not None
        inode = (await tree.children(inode)).get(name)
    return inode


async def _read(tree: Tree, *path: bytes) -> bytes | None:
    """The file's content, or None if it is not shown."""
    inode = await _lookup(tree, *path)
    if inode is None:
        return None
    content = await tree.content(inode)
    return await content.read(0, content.size)


@asynccontextmanager
async def holder_of(server: ServerProcess, account: Account) -> AsyncIterator[KeyHolder]:
    """A key holder writing straight to the server (no proxy)."""
    async with RemoteClient(server.url) as remote:
        yield await KeyHolder.login(remote, account.email, PASSWORD)


async def _two_revisions(holder: KeyHolder, proxy: Proxy) -> tuple[Folder, FileNode, Any]:
    """A folder with report.txt written twice; returns the folder, the file
    (revision 2) and the folder's listing as the server gave it while
    revision 1 was current, recorded through the proxy."""
    folder = await holder.mkdir(holder.root, f"dir-{uuid.uuid4().hex[:8]}".encode())
    v1 = await holder.write(folder, b"report.txt", b"[revision one of the report]")
    async with RemoteClient(proxy.url, holder.remote.token) as remote:
        await remote.list_children(folder.id)
    (old_listing,) = proxy.find("GET", f"/v1/nodes/{folder.id.hex()}/children")
    v2 = await holder.write(folder, b"report.txt", b"[revision two, the newest]", node=v1)
    return folder, v2, old_listing.response


def _replay(proxy: Proxy, folder: Folder, answer: ProxyResponse, client: str | None = None) -> None:
    proxy.on(
        lambda request, forward: answer,
        method="GET",
        path=f"/v1/nodes/{folder.id.hex()}/children",
        client=client,
    )


async def test_rollback_of_a_seen_node_is_refused(
    proxy: Proxy,
    server: ServerProcess,
    victim: Account,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A device that has seen revision 2 of a file refuses the revision 1
    the server replays later (the node is not shown, and it is logged). A
    device that never saw revision 2 cannot tell (docs/security.md): it is
    shown revision 1, which the key holder really wrote, never anything
    else."""
    async with holder_of(server, victim) as holder:
        folder, v2, old_listing = await _two_revisions(holder, proxy)
        keys, name = holder.keys, folder_name(holder, folder)
    async with device(proxy.url, keys, tmp_path / "laptop", victim.token) as tree:
        assert await _read(tree, name, b"report.txt") == v2.data
    _replay(proxy, folder, old_listing)
    with caplog.at_level(logging.ERROR, logger="megafs.fs.tree"):
        async with device(proxy.url, keys, tmp_path / "laptop", victim.token) as tree:
            assert await _lookup(tree, name, b"report.txt") is None
    assert any("rollback" in r.getMessage() for r in caplog.records)
    async with device(proxy.url, keys, tmp_path / "new-machine", victim.token) as tree:
        assert await _read(tree, name, b"report.txt") == b"[revision one of the report]"


def folder_name(holder: KeyHolder, folder: Folder) -> bytes:
    return open_record(holder.root.key, folder.id, holder.root.id, folder.meta).name


async def test_two_devices_given_different_answers(
    proxy: Proxy, server: ServerProcess, victim: Account, tmp_path: Path
) -> None:
    """The server answers the laptop and the desktop differently: the
    desktop, which had seen revision 2, gets revision 1 and refuses it; the
    laptop still gets and reads revision 2. A lie to one device does not
    reach the other."""
    async with holder_of(server, victim) as holder:
        folder, v2, old_listing = await _two_revisions(holder, proxy)
        keys, name = holder.keys, folder_name(holder, folder)
    laptop, desktop = proxy.url_for("laptop"), proxy.url_for("desktop")
    for url, where in ((laptop, "laptop"), (desktop, "desktop")):
        async with device(url, keys, tmp_path / where, victim.token) as tree:
            assert await _read(tree, name, b"report.txt") == v2.data
    _replay(proxy, folder, old_listing, client="desktop")
    async with device(desktop, keys, tmp_path / "desktop", victim.token) as tree:
        assert await _lookup(tree, name, b"report.txt") is None
    async with device(laptop, keys, tmp_path / "laptop", victim.token) as tree:
        assert await _read(tree, name, b"report.txt") == v2.data
    served = {r.client for r in proxy.find("GET", f"/v1/nodes/{folder.id.hex()}/children")}
    assert served == {"default", "laptop", "desktop"}


async def test_claimed_deduplication_is_still_verified(
    proxy: Proxy, server: ServerProcess, victim: Account, tmp_path: Path
) -> None:
    """The server answers an upload as if it already held the chunk, and
    keeps another chunk of the account under its id: a device reading the
    file checks the content against the manifest and refuses it."""
    async with holder_of(server, victim) as direct:
        folder = await direct.mkdir(direct.root, b"dedup")
        decoy = await direct.write(folder, b"decoy.txt", b"[the decoy the server keeps]")
        keys = direct.keys
        name = folder_name(direct, folder)
    decoy_blob = decoy.chunks[0][1]

    def keep_decoy(request: Any, forward: Any) -> ProxyResponse:
        forward(request.replace(body=decoy_blob))  # what the server really stores
        return ProxyResponse.json_answer({"size": len(request.body)}, 201)

    proxy.on(keep_decoy, method="PUT", path=r"/v1/chunks/[0-9a-f]{64}")
    async with RemoteClient(proxy.url, victim.token) as remote:
        real = await KeyHolder(remote, keys, direct.root).write(
            folder, b"real.txt", b"[the real content]"
        )
    proxy.clear()
    async with device(proxy.url, keys, tmp_path / "reader", victim.token) as tree:
        with pytest.raises(IntegrityError):
            await _read(tree, name, b"real.txt")
        assert await _read(tree, name, b"decoy.txt") == decoy.data
    assert real.chunks and real.chunks[0][1] != decoy_blob


# -- hostile answers --------------------------------------------------------------------

Call = Callable[[RemoteClient, Account], Awaitable[Any]]


async def _get_root(remote: RemoteClient, account: Account) -> Any:
    return await remote.get_node(account.root_id)


async def _list_root(remote: RemoteClient, account: Account) -> Any:
    return await remote.list_children(account.root_id)


async def _account(remote: RemoteClient, account: Account) -> Any:
    return await remote.account()


async def _missing(remote: RemoteClient, account: Account) -> Any:
    return await remote.missing_chunks([os.urandom(32)])


async def _prelogin(remote: RemoteClient, account: Account) -> Any:
    return await remote.prelogin("someone@example.org")


async def _sessions(remote: RemoteClient, account: Account) -> Any:
    return await remote.sessions()


ROOT = r"/v1/nodes/[0-9a-f]{32}"
MALFORMED: list[tuple[str, str, str, Call, Callable[[Any], Any]]] = [
    ("node version as text", "GET", ROOT, _get_root, lambda v: {**v, "version": "1"}),
    ("node version negative", "GET", ROOT, _get_root, lambda v: {**v, "version": -1}),
    ("node version 2**64", "GET", ROOT, _get_root, lambda v: {**v, "version": 2**64}),
    ("meta as a number", "GET", ROOT, _get_root, lambda v: {**v, "meta": 12}),
    ("meta oversized", "GET", ROOT, _get_root, lambda v: {**v, "meta": b64e(bytes(262145))}),
    ("missing id", "GET", ROOT, _get_root, lambda v: {k: x for k, x in v.items() if k != "id"}),
    ("another node's id", "GET", ROOT, _get_root, lambda v: {**v, "id": "ab" * 16}),
    ("parent not an id", "GET", ROOT, _get_root, lambda v: {**v, "parent": 7}),
    ("content_size huge", "GET", ROOT, _get_root, lambda v: {**v, "content_size": 2**62}),
    ("answer is a list", "GET", ROOT, _get_root, lambda v: [v]),
    ("answer is null", "GET", ROOT, _get_root, lambda v: None),
    ("listing not a list", "GET", ROOT + "/children", _list_root, lambda v: {"nodes": "x"}),
    (
        "listing of another folder",
        "GET",
        ROOT + "/children",
        _list_root,
        lambda v: {
            "nodes": [
                {
                    "id": "cd" * 16,
                    "parent": "ef" * 16,
                    "version": 1,
                    "meta": "",
                    "content": None,
                    "content_size": 0,
                }
            ]
        },
    ),
    ("quota as text", "GET", "/v1/account", _account, lambda v: {**v, "quota": "lots"}),
    ("keyblob not base64", "GET", "/v1/account", _account, lambda v: {**v, "keyblob": "%%"}),
    (
        "kdf missing",
        "GET",
        "/v1/account",
        _account,
        lambda v: {k: x for k, x in v.items() if k != "kdf"},
    ),
    ("root id too short", "GET", "/v1/account", _account, lambda v: {**v, "root_id": "ab"}),
    (
        "unasked missing id",
        "POST",
        "/v1/chunks/missing",
        _missing,
        lambda v: {"missing": ["00" * 32]},
    ),
    ("prelogin kdf a list", "POST", "/v1/prelogin", _prelogin, lambda v: {"kdf": []}),
    (
        "salt not base64",
        "POST",
        "/v1/prelogin",
        _prelogin,
        lambda v: {"kdf": {**v["kdf"], "salt": "***"}},
    ),
    (
        "two current sessions",
        "GET",
        "/v1/sessions",
        _sessions,
        lambda v: {"sessions": [{**s, "current": True} for s in v["sessions"] * 2]},
    ),
    (
        "device with escape codes",
        "GET",
        "/v1/sessions",
        _sessions,
        lambda v: {"sessions": [{**s, "device": "\x1b]0;pwned\x07"} for s in v["sessions"]]},
    ),
]


@pytest.mark.parametrize(
    "method, path, call, change",
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
async def test_malformed_answers_are_format_errors(
    proxy: Proxy,
    victim: Account,
    method: str,
    path: str,
    call: Call,
    change: Callable[[Any], Any],
) -> None:
    """Real answers bent into wrong types, sizes, ids and shapes are a
    FormatError (a clean error, nothing else escapes), and the same client
    works again once the answers are right."""
    async with RemoteClient(proxy.url, victim.token, retries=0) as remote:
        _answer(proxy, method, path, change)
        with pytest.raises(MegafsError) as info:
            await call(remote, victim)
        assert type(info.value) is FormatError
        proxy.clear()
        await call(remote, victim)


def _frames(body: bytes) -> list[bytes]:
    """A chunk fetch's answer cut into its frames (id, size, bytes)."""
    frames = []
    while body:
        end = 36 + int.from_bytes(body[32:36], "big")
        frames.append(body[:end])
        body = body[end:]
    return frames


FETCH_TAMPERING: list[tuple[str, Callable[[list[bytes]], bytes]]] = [
    ("out of order", lambda f: f[1] + f[0]),
    ("one not asked for", lambda f: f[0] + os.urandom(32) + (1).to_bytes(4, "big") + b"x"),
    ("one twice", lambda f: f[0] + f[0] + f[1]),
    ("cut short in a header", lambda f: f[0] + f[1][:20]),
    ("cut short in its bytes", lambda f: f[0] + f[1][:-1]),
    ("an empty one", lambda f: f[0] + f[1][:32] + bytes(4)),
]


@pytest.mark.parametrize(
    "change", [c for _, c in FETCH_TAMPERING], ids=[i for i, _ in FETCH_TAMPERING]
)
async def test_a_malformed_chunk_fetch_is_a_format_error(
    proxy: Proxy, victim: Account, change: Callable[[list[bytes]], bytes]
) -> None:
    """A fetch's answer must hold chunks that were asked for, each once, in
    order, framed whole: anything else is a FormatError, never bytes handed
    to the wrong chunk."""
    a, b = os.urandom(32), os.urandom(32)
    async with RemoteClient(proxy.url, victim.token, retries=0) as remote:
        await remote.put_chunks([(a, b"alpha"), (b, b"bravo")])

        @proxy.on(method="POST", path="/v1/chunks/fetch")
        def tamper(request: ProxyRequest, forward: Forward) -> ProxyResponse:
            answer = forward()
            return answer.with_body(change(_frames(answer.body)))

        with pytest.raises(MegafsError) as info:
            await remote.get_chunks([a, b])
        assert type(info.value) is FormatError
        proxy.clear()
        assert await remote.get_chunks([a, b]) == {a: b"alpha", b: b"bravo"}
