"""The server process: clean shutdown, restart, crash, start-up errors, and
chunk garbage collection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from megafs.remote import RemoteClient
from megafs.server import LocalChunkStore, SQLiteMetadataStore, collect_garbage
from megafs.wire import API_PREFIX, CHUNK_GRACE_SECONDS
from tests.helpers.server import ServerProcess
from tests.integration.users import new_user, put_file


async def test_sigterm_stops_cleanly_and_data_persists(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url)
    node, chunk = os.urandom(16), os.urandom(32)
    async with user.client as client:
        await client.put_chunk(chunk, b"ciphertext")
        await put_file(client, user.root, chunk, node)
        url = own_server.url
        assert own_server.stop() == 0
        assert not (own_server.data_dir / "server.json").exists()
        assert "Traceback" not in own_server.log()

        own_server.start()
        assert own_server.url == url  # same port
        got = await client.get_node(node)  # the session survived too
        assert (got.meta, got.content, got.version) == (b"m", b"c", 1)
        assert await client.get_chunk(chunk) == b"ciphertext"


async def test_sigterm_lets_requests_in_flight_finish(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url)
    await user.client.aclose()
    terminated = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first half "
        await terminated.wait()
        await trio.sleep(0.3)
        yield b"second half"

    async with (
        httpx.AsyncClient(base_url=own_server.url + API_PREFIX) as http,
        trio.open_nursery() as nursery,
    ):

        async def upload() -> None:
            answer = await http.put(
                f"/chunks/{'ab' * 32}",
                content=slow_body(),
                headers={"Authorization": f"Bearer {user.session.token}"},
            )
            assert answer.status_code == 201, answer.text

        nursery.start_soon(upload)
        await trio.sleep(0.3)
        assert own_server.proc is not None
        own_server.proc.terminate()
        terminated.set()
    assert await trio.to_thread.run_sync(own_server.proc.wait, 30) == 0


async def test_crash_and_restart(own_server: ServerProcess) -> None:
    user = await new_user(own_server.url, retries=8)
    async with user.client as client:
        node = os.urandom(16)
        await client.put_node(
            node,
            parent=user.root,
            expect_version=0,
            meta=b"m",
            content=None,
            chunks=[],
            commit_id=os.urandom(16),
        )
        own_server.kill()
        assert (own_server.data_dir / "server.json").exists()  # stale, as after any crash
        own_server.start()
        assert (await client.get_node(node)).meta == b"m"


def _run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megafs.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_startup_errors_are_one_line(own_server: ServerProcess, tmp_path: Path) -> None:
    cases = [
        (
            ["--data", str(tmp_path / "other"), "--listen", f"127.0.0.1:{own_server.port}"],
            1,
            "cannot listen on",
        ),
        (
            ["--data", str(own_server.data_dir), "--listen", "127.0.0.1:0"],
            1,
            "another megafs server is using",
        ),
        (
            ["--data", str(tmp_path / "file" / "data"), "--listen", "127.0.0.1:0"],
            1,
            "cannot use the data directory",
        ),
        (["--data", str(tmp_path / "d"), "--listen", "8377"], 2, "HOST:PORT"),
    ]
    (tmp_path / "file").write_text("not a directory")
    for args, code, message in cases:
        proc = _run_server(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, proc.stderr
        assert len(lines) == 1 and message in lines[0], proc.stderr


async def test_garbage_collection_removes_only_old_unreferenced_chunks(
    own_server: ServerProcess,
) -> None:
    user = await new_user(own_server.url)
    async with user.client as client:
        kept, loose, replaced, deleted = (os.urandom(32) for _ in range(4))
        for chunk in (kept, loose, replaced, deleted):
            await client.put_chunk(chunk, chunk * 10)
        a, b = os.urandom(16), os.urandom(16)
        for node, chunk in ((a, kept), (b, replaced)):
            await put_file(client, user.root, chunk, node)
        await client.put_node(
            b,
            parent=user.root,
            expect_version=1,
            meta=b"m",
            content=b"c",
            chunks=[deleted],
            commit_id=os.urandom(16),
        )
        await client.delete_node(b, expect_version=2)
        used = (await client.account()).used

        assert own_server.stop() == 0
        assert await _collect(own_server.data_dir, time.time()) == 0  # all within grace
        assert await _collect(own_server.data_dir, time.time() + CHUNK_GRACE_SECONDS + 5) == 3
        own_server.start()

        assert await client.missing_chunks([kept, loose, replaced, deleted]) == {
            loose,
            replaced,
            deleted,
        }
        assert await client.get_chunk(kept) == kept * 10
        assert (await client.account()).used == used - 3 * 320
        files = {p.name for p in (own_server.data_dir / "chunks").rglob("*") if p.is_file()}
        assert files == {kept.hex()}


async def _collect(data_dir: Path, now: float) -> int:
    """One collection pass on a stopped server's data, as of ``now``."""
    meta = await trio.to_thread.run_sync(SQLiteMetadataStore, data_dir / "meta.sqlite3")
    try:
        return await collect_garbage(meta, LocalChunkStore(data_dir), now=now)
    finally:
        await meta.aclose()


async def test_server_json_names_the_running_server(own_server: ServerProcess) -> None:
    info = json.loads((own_server.data_dir / "server.json").read_text())
    assert own_server.proc is not None
    assert info == {"url": own_server.url, "pid": own_server.proc.pid}
    async with RemoteClient(info["url"]) as client:
        assert await client.health()
