"""A malicious server against a real mount (issue #7, threat model
"Adversarial cases"): what the daemon does when the server tampers with
folder listings, nodes, manifests and chunks.

One server, one account and one mount serve the whole module (a mount costs
seconds; each attack costs milliseconds). The mount talks to the server
through ``tests.helpers.proxy``, which plays the attacker; a second device
of the account, a :class:`~tests.helpers.keyholder.KeyHolder` connected to
the server directly, wrote one folder per test beforehand, so every test
has objects the daemon has never loaded and the test knows every id, key
and sealed byte of. Each test checks the three promises of rule 9:

- the tampered object fails: EIO for that file (or the entry is not shown,
  for a record that does not authenticate), never other bytes;
- the other file of its folder (``ok.txt``) still reads correctly;
- the daemon keeps running (checked after every test).

Threat-model case -> test (the account-level cases, rollback and two
devices are in tests/integration/test_malicious_server.py; rollback across
remounts also in tests/mount/test_rollback.py):

Case of the threat model (short)        -> test
--------------------------------------------------------------------------
bit flip in a record (name, attributes) -> test_record_bit_flip_hides_the_entry
old version byte, unknown algorithm id  -> test_record_bit_flip_hides_the_entry
bit flip in a chunk                     -> test_chunk_bit_flip_is_eio
swapped records of two nodes            -> test_swapped_records_are_not_shown
node moved by rewriting its parent      -> test_node_moved_to_another_folder_is_not_shown
chunks reordered or duplicated          -> test_reordered_or_duplicated_chunks_are_eio
chunk of another file of the account    -> test_chunk_of_another_file_is_eio
manifest spliced from another file      -> test_manifest_of_another_file_is_eio
manifest/chunk of an older revision     -> test_older_revision_manifest_or_chunk_is_eio
truncation/extension (manifest, chunk)  -> test_truncated_or_extended_manifest_or_chunk_is_eio
node (and chunk) injected by the server -> test_injected_node_is_never_shown
chunk withheld (what the server can do) -> test_withheld_chunk_is_eio
malformed answers, bad JSON             -> test_malformed_listing_is_eio_and_recoverable
oversized or truncated answers          -> test_oversized_or_truncated_chunk_is_eio
drop/reset/5xx/truncation at random     -> test_random_transport_faults_never_give_wrong_bytes
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from megafs.crypto import (
    CHUNK_SIZE,
    Kind,
    Manifest,
    NodeRecord,
    new_key,
    new_node_id,
    seal_chunk,
    seal_manifest,
    seal_record,
)
from megafs.remote import RemoteClient
from megafs.wire import b64d, b64e
from tests.helpers.drive import Drive
from tests.helpers.keyholder import FileNode, Folder, KeyHolder, flip_bit
from tests.helpers.proxy import (
    Handler,
    Hook,
    Proxy,
    ProxyResponse,
    Truncate,
    running_proxy,
)
from tests.helpers.server import ServerProcess, running_server
from tests.helpers.tools import daemon_pid

pytestmark = pytest.mark.mount

PASSWORD = "malicious server test password"
OK = b"the bystander: this file was not tampered with\n"


@dataclass
class Case:
    """The folder of one test and the files in it, by name."""

    folder: Folder
    name: str
    files: dict[str, FileNode] = field(default_factory=dict)


@dataclass
class World:
    drive: Drive
    proxy: Proxy
    server: ServerProcess
    pid: int
    cases: dict[str, Case]
    #: Objects the "server" made itself, under keys it chose.
    forged: dict[str, Any]

    def path(self, case: str, name: str = "") -> Path:
        return self.drive.mnt / self.cases[case].name / name


def _content(label: str, size: int = 3000) -> bytes:
    """Recognisable, incompressible-looking content unique to ``label``."""
    seed = f"[{label}]".encode()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += seed + counter.to_bytes(4, "big") + os.urandom(16)
        counter += 1
    return bytes(out[:size])


#: Test -> the files its folder holds (besides ok.txt), name -> size.
CASES: dict[str, dict[str, int]] = {
    "record": {"flipped.txt": 500, "version0.txt": 500, "alg2.txt": 500},
    "chunkflip": {"victim.bin": 100_000},
    "swap": {"a.txt": 700, "b.txt": 900},
    "movesrc": {"moved.txt": 400},
    "movedst": {},
    "order": {"two.bin": CHUNK_SIZE + 5000},
    "foreign": {"victim.bin": 4000, "other.bin": 5000},
    "manifest": {"victim.txt": 800, "donor.txt": 800},
    "revision": {"doc.txt": 1200, "doc2.txt": 1300},
    "length": {"cut.txt": 900, "grown.txt": 900, "cutchunk.bin": 20_000, "grownchunk.bin": 20_000},
    "inject": {},
    "withheld": {"gone.bin": 6000},
    "malformed": {},
    "transport": {"big.bin": 300_000, "small.txt": 100},
    "random": {"r1.bin": 150_000, "r2.bin": 40_000, "r3.txt": 600},
}


async def _build(url: str, email: str) -> tuple[dict[str, Case], dict[str, Any]]:
    async with RemoteClient(url) as remote:
        holder = await KeyHolder.login(remote, email, PASSWORD.encode())
        cases: dict[str, Case] = {}
        for index, (case_name, files) in enumerate(CASES.items()):
            folder_name = f"s{index:02d}-{case_name}"
            folder = await holder.mkdir(holder.root, folder_name.encode())
            case = cases[case_name] = Case(folder, folder_name)
            case.files["ok.txt"] = await holder.write(folder, b"ok.txt", OK)
            for name, size in files.items():
                data = _content(f"{case_name}/{name}", size)
                case.files[name] = await holder.write(folder, name.encode(), data)
        # A second revision of each file of "revision" (the first is kept).
        case = cases["revision"]
        for name in ("doc.txt", "doc2.txt"):
            case.files[name] = await holder.write(
                case.folder,
                name.encode(),
                _content(f"revision/{name} v2", 1200),
                node=case.files[name],
            )
        # What the server injects: a record and manifest under a key it chose.
        folder = cases["inject"].folder
        key, node_id = new_key(), new_node_id()
        chunk = seal_chunk(holder.keys, b"injected content " * 10)  # even a real chunk secret
        manifest = Manifest(size=170, chunk_size=CHUNK_SIZE, chunks=(chunk.secret,))
        record = NodeRecord(
            kind=Kind.FILE,
            name=b"injected.txt",
            key=key,
            mode=0o644,
            uid=os.getuid(),
            gid=os.getgid(),
            atime_ns=0,
            mtime_ns=0,
            ctime_ns=0,
            size=170,
            rev=1,
        )
        forged = {
            "inject": {
                "id": node_id.hex(),
                "parent": folder.id.hex(),
                "version": 1,
                "meta": b64e(seal_record(new_key(), node_id, folder.id, record)),
                "content": b64e(c := seal_manifest(key, node_id, manifest)),
                "content_size": len(c),
            }
        }
        return cases, forged


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing on this machine")
    root = tmp_path_factory.mktemp("malicious")
    with running_server(root / "server") as server, running_proxy(server.url) as proxy:
        drive = Drive(root / "alice", proxy.url, password=PASSWORD)
        try:
            drive.signup()
            cases, forged = trio.run(_build, server.url, drive.email)
            drive.mount()
            yield World(drive, proxy, server, daemon_pid(drive.config), cases, forged)
            drive.umount()
        finally:
            drive.cleanup()


@pytest.fixture(autouse=True)
def _daemon_survives(world: World) -> Iterator[None]:
    """After every attack: hooks off, and the same daemon still serves."""
    yield
    world.proxy.clear()
    os.kill(world.pid, 0)  # still running (ProcessLookupError otherwise)
    assert os.path.ismount(world.drive.mnt)
    assert (world.drive.mnt / world.cases["record"].name / "ok.txt").read_bytes() == OK


# -- attacks, as proxy hooks --------------------------------------------------------


def _nodes(world: World, folder: Folder, change: Callable[[list[dict[str, Any]]], Any]) -> Hook:
    """Rewrite the listing of ``folder``: ``change`` gets the node objects
    and returns the new list."""
    return world.proxy.on(
        lambda request, forward: forward().with_json(lambda v: {**v, "nodes": change(v["nodes"])}),
        method="GET",
        path=f"/v1/nodes/{folder.id.hex()}/children",
    )


def _node(world: World, node: FileNode, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite a node wherever the server sends it: in its folder's listing
    (small manifests travel inline) and as ``GET /nodes/{id}``."""
    nid = node.id.hex()
    _nodes(
        world, Folder(node.parent, b""), lambda ns: [change(n) if n["id"] == nid else n for n in ns]
    )
    world.proxy.on(
        lambda request, forward: forward().with_json(change),
        method="GET",
        path=f"/v1/nodes/{nid}",
    )


def _chunk(world: World, chunk_id: bytes, answer: Callable[[ProxyResponse], Any]) -> Hook:
    return world.proxy.on(
        lambda request, forward: answer(forward()),
        method="GET",
        path=f"/v1/chunks/{chunk_id.hex()}",
    )


def _with_content(content: bytes) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda n: {**n, "content": b64e(content), "content_size": len(content)}


def _assert_eio(path: Path, *, offset: int = 0) -> None:
    """Reading fails with EIO and returns nothing at all."""
    with pytest.raises(OSError) as info, open(path, "rb") as f:
        got = os.pread(f.fileno(), 65536, offset)
        pytest.fail(f"{path.name}: read returned {len(got)} bytes instead of failing")
    assert info.value.errno == errno.EIO, f"{path.name}: {info.value!r}, expected EIO"


def _assert_bystander(world: World, case: str) -> None:
    assert world.path(case, "ok.txt").read_bytes() == OK


# -- node records -------------------------------------------------------------------


def test_record_bit_flip_hides_the_entry(world: World) -> None:
    """A flipped bit in a sealed record (name, attributes, the node's key),
    a version byte of 0 and an unknown algorithm id all fail authentication:
    the entry is not shown, the rest of the folder is."""
    files = world.cases["record"].files
    _node(world, files["flipped.txt"], lambda n: {**n, "meta": b64e(flip_bit(b64d(n["meta"]), 60))})
    _node(
        world, files["version0.txt"], lambda n: {**n, "meta": b64e(b"\x00" + b64d(n["meta"])[1:])}
    )
    _node(
        world, files["alg2.txt"], lambda n: {**n, "meta": b64e(b"\x01\x02" + b64d(n["meta"])[2:])}
    )
    assert sorted(os.listdir(world.path("record"))) == ["ok.txt"]
    for name in ("flipped.txt", "version0.txt", "alg2.txt"):
        assert not world.path("record", name).exists()
    _assert_bystander(world, "record")
    assert "fails authentication" in world.drive.daemon_log()


def test_swapped_records_are_not_shown(world: World) -> None:
    """The server swaps the sealed records (key, name, attributes) of two
    files: each is bound to its node id, so neither opens."""
    case = world.cases["swap"]
    a, b = case.files["a.txt"].id.hex(), case.files["b.txt"].id.hex()

    def swap(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_id = {n["id"]: n for n in nodes}
        meta = {a: by_id[b]["meta"], b: by_id[a]["meta"]}
        return [{**n, "meta": meta.get(n["id"], n["meta"])} for n in nodes]

    _nodes(world, case.folder, swap)
    assert sorted(os.listdir(world.path("swap"))) == ["ok.txt"]
    _assert_bystander(world, "swap")


def test_node_moved_to_another_folder_is_not_shown(world: World) -> None:
    """The server lists a node of one folder in another (its parent field
    rewritten): its record is bound to its real parent, so it is not shown
    there."""
    moved = world.cases["movesrc"].files["moved.txt"]
    dst = world.cases["movedst"].folder
    source: list[dict[str, Any]] = []

    def steal(request: Any, forward: Any) -> ProxyResponse:
        answer = forward()
        source.extend(n for n in answer.json()["nodes"] if n["id"] == moved.id.hex())
        return answer.with_json(lambda v: {**v, "nodes": []})  # gone from its folder

    world.proxy.on(steal, method="GET", path=f"/v1/nodes/{moved.parent.hex()}/children")
    assert os.listdir(world.path("movesrc")) == []  # withheld: allowed, and visible as such
    assert source, "the real listing did not contain the node"
    _nodes(
        world,
        dst,
        lambda ns: sorted([*ns, {**source[0], "parent": dst.id.hex()}], key=lambda n: n["id"]),
    )
    assert sorted(os.listdir(world.path("movedst"))) == ["ok.txt"]
    assert not world.path("movedst", "moved.txt").exists()
    _assert_bystander(world, "movedst")


def test_injected_node_is_never_shown(world: World) -> None:
    """A node the server made itself, sealed under a key it chose (with a
    manifest naming a genuine chunk secret), is not shown, and the client
    never asks about it."""
    case = world.cases["inject"]
    injected = world.forged["inject"]
    _nodes(world, case.folder, lambda ns: sorted([*ns, injected], key=lambda n: n["id"]))
    world.proxy.forget()
    assert sorted(os.listdir(world.path("inject"))) == ["ok.txt"]
    assert not world.path("inject", "injected.txt").exists()
    _assert_bystander(world, "inject")
    assert [r.path for r in world.proxy.records if injected["id"] in r.path] == []


# -- manifests and chunks -----------------------------------------------------------


def test_chunk_bit_flip_is_eio(world: World) -> None:
    victim = world.cases["chunkflip"].files["victim.bin"]
    _chunk(world, victim.chunks[0][0], lambda r: r.with_body(flip_bit(r.body, 5000)))
    _assert_eio(world.path("chunkflip", "victim.bin"))
    _assert_bystander(world, "chunkflip")


def test_reordered_or_duplicated_chunks_are_eio(world: World) -> None:
    """The server answers each chunk of a two-chunk file with the other one
    (reordering), so chunk 0 is also chunk 1's duplicate: both reads fail."""
    two = world.cases["order"].files["two.bin"]
    (id0, blob0), (id1, blob1) = two.chunks
    _chunk(world, id0, lambda r: r.with_body(blob1))
    _chunk(world, id1, lambda r: r.with_body(blob0))
    _assert_eio(world.path("order", "two.bin"), offset=0)
    _assert_eio(world.path("order", "two.bin"), offset=CHUNK_SIZE)
    _assert_bystander(world, "order")


def test_chunk_of_another_file_is_eio(world: World) -> None:
    """A chunk replaced by another chunk of the same account (whose key the
    account holds): the manifest names the chunk's content, so it fails."""
    files = world.cases["foreign"].files
    other_blob = files["other.bin"].chunks[0][1]
    _chunk(world, files["victim.bin"].chunks[0][0], lambda r: r.with_body(other_blob))
    _assert_eio(world.path("foreign", "victim.bin"))
    assert world.path("foreign", "other.bin").read_bytes() == files["other.bin"].data
    _assert_bystander(world, "foreign")


def test_manifest_of_another_file_is_eio(world: World) -> None:
    files = world.cases["manifest"].files
    _node(world, files["victim.txt"], _with_content(files["donor.txt"].content))
    _assert_eio(world.path("manifest", "victim.txt"))
    assert world.path("manifest", "donor.txt").read_bytes() == files["donor.txt"].data
    _assert_bystander(world, "manifest")


def test_older_revision_manifest_or_chunk_is_eio(world: World) -> None:
    """The newest record with the previous revision's manifest (sealed
    under the previous content key) fails; so does the previous revision's
    chunk served under the new chunk's id."""
    files = world.cases["revision"].files
    doc, doc2 = files["doc.txt"], files["doc2.txt"]
    assert doc.previous is not None and doc2.previous is not None
    _node(world, doc, _with_content(doc.previous.content))
    _assert_eio(world.path("revision", "doc.txt"))
    # doc2's manifest is genuine; the chunk it names is the old revision's.
    old_blob = doc2.previous.chunks[0][1]
    _chunk(world, doc2.chunks[0][0], lambda r: r.with_body(old_blob))
    _assert_eio(world.path("revision", "doc2.txt"))
    world.proxy.clear()
    assert world.path("revision", "doc2.txt").read_bytes() == doc2.data
    _assert_bystander(world, "revision")


def test_truncated_or_extended_manifest_or_chunk_is_eio(world: World) -> None:
    """A manifest cut short by one entry or extended by one (the tag no
    longer matches), and a chunk cut short or extended, all fail."""
    files = world.cases["length"].files
    _node(world, files["cut.txt"], _with_content(files["cut.txt"].content[:-32]))
    _node(world, files["grown.txt"], _with_content(files["grown.txt"].content + bytes(32)))
    _chunk(world, files["cutchunk.bin"].chunks[0][0], lambda r: r.with_body(r.body[:-100]))
    _chunk(world, files["grownchunk.bin"].chunks[0][0], lambda r: r.with_body(r.body + b"\0" * 100))
    for name in ("cut.txt", "grown.txt", "cutchunk.bin", "grownchunk.bin"):
        _assert_eio(world.path("length", name))
    _assert_bystander(world, "length")


def test_withheld_chunk_is_eio(world: World) -> None:
    """The server may withhold data (docs/security.md): the file is an I/O
    error, not a missing file, and nothing else is affected."""
    gone = world.cases["withheld"].files["gone.bin"]
    _chunk(
        world,
        gone.chunks[0][0],
        lambda r: ProxyResponse.json_answer({"error": "not_found", "detail": "no such chunk"}, 404),
    )
    _assert_eio(world.path("withheld", "gone.bin"))
    _assert_bystander(world, "withheld")


# -- hostile answers and transport faults -------------------------------------------


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("not an object", lambda v: [v]),
    ("nodes not a list", lambda v: {**v, "nodes": {"a": 1}}),
    (
        "missing meta",
        lambda v: {**v, "nodes": [{k: x for k, x in n.items() if k != "meta"} for n in v["nodes"]]},
    ),
    ("version as text", lambda v: {**v, "nodes": [{**n, "version": "1"} for n in v["nodes"]]}),
    (
        "meta not base64",
        lambda v: {**v, "nodes": [{**n, "meta": "!!" + n["meta"]} for n in v["nodes"]]},
    ),
    (
        "huge content_size",
        lambda v: {
            **v,
            "nodes": [{**n, "content": None, "content_size": 2**70} for n in v["nodes"]],
        },
    ),
    ("id not hex", lambda v: {**v, "nodes": [{**n, "id": "z" * 32} for n in v["nodes"]]}),
    ("longer than a page", lambda v: {**v, "nodes": v["nodes"] * 1001}),
    ("wrong cursor", lambda v: {**v, "next": "0" * 32}),
]


def _rewrite(change: Callable[[Any], Any]) -> Handler:
    return lambda request, forward: forward().with_json(change)


def test_malformed_listing_is_eio_and_recoverable(world: World) -> None:
    """Malformed listings (wrong types, missing fields, huge sizes, bad
    base64, bad JSON) are EIO for that folder; once the server answers
    properly again, the folder lists and reads correctly."""
    case = world.cases["malformed"]
    route = f"/v1/nodes/{case.folder.id.hex()}/children"
    for what, change in MALFORMED:
        hook = world.proxy.on(_rewrite(change), method="GET", path=route)
        with pytest.raises(OSError) as info:
            os.listdir(world.path("malformed"))
        assert info.value.errno == errno.EIO, what
        hook.remove()
    hook = world.proxy.on(
        lambda request, forward: forward().with_body(b'{"nodes": [tru'), method="GET", path=route
    )
    with pytest.raises(OSError) as info:
        os.listdir(world.path("malformed"))
    assert info.value.errno == errno.EIO
    hook.remove()
    assert os.listdir(world.path("malformed")) == ["ok.txt"]
    _assert_bystander(world, "malformed")


def test_oversized_or_truncated_chunk_is_eio(world: World) -> None:
    """A chunk answer larger than any chunk, or cut off by the connection
    closing, is EIO after the client's retries; when the server behaves
    again, the same file reads correctly."""
    files = world.cases["transport"].files
    big, small = files["big.bin"], files["small.txt"]
    _chunk(world, big.chunks[0][0], lambda r: r.with_body(r.body + bytes(2 << 20)))
    _assert_eio(world.path("transport", "big.bin"))
    world.proxy.clear()
    world.proxy.on(
        lambda request, forward: Truncate(0.5),
        method="GET",
        path=f"/v1/chunks/{small.chunks[0][0].hex()}",
    )
    _assert_eio(world.path("transport", "small.txt"))
    world.proxy.clear()
    assert world.path("transport", "big.bin").read_bytes() == big.data
    assert world.path("transport", "small.txt").read_bytes() == small.data
    _assert_bystander(world, "transport")


def test_random_transport_faults_never_give_wrong_bytes(world: World) -> None:
    """Under dropped, reset, 5xx and truncated answers at random, every read
    either fails or returns exactly the file's content."""
    case = world.cases["random"]
    world.proxy.faults(
        drop=0.15, reset=0.15, error5xx=0.15, truncate=0.15, delay=(0, 0.02), seed=7, method="GET"
    )
    outcomes: list[tuple[str, object]] = []
    for name in ("r1.bin", "r2.bin", "r3.txt", "ok.txt"):
        try:
            got = world.path("random", name).read_bytes()
        except OSError as exc:
            outcomes.append((name, exc.errno))
            continue
        assert got == case.files[name].data, f"{name}: wrong bytes under transport faults"
        outcomes.append((name, "ok"))
    assert world.proxy.statistics().keys() & {"drop", "reset", "error", "truncate"}, outcomes
    world.proxy.clear()
    for name in ("r1.bin", "r2.bin", "r3.txt"):
        assert world.path("random", name).read_bytes() == case.files[name].data
