"""Small files travel inline: their bytes ride in the sealed manifest, so
saving one costs no chunk upload and the server stores no chunk for it.
Files that grow past the threshold become chunked, and shrink back. Chunks
waiting for upload go several to a request: many small ones, or a few
full ones."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from megafs.cache.content import INLINE_THRESHOLD
from megafs.cache.uploader import CHUNK_WORKERS, LARGE_BATCH_ITEMS, SMALL_GATHER
from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive
from tests.helpers.proxy import Forward, ProxyRequest, ProxyResponse, running_proxy
from tests.helpers.server import ServerProcess

SIZES = [1, 100, INLINE_THRESHOLD - 1, INLINE_THRESHOLD, INLINE_THRESHOLD + 1, CHUNK_SIZE + 7]


def _stored_chunks(server: ServerProcess) -> int:
    return sum(1 for p in (server.data_dir / "chunks").rglob("*") if p.is_file())


def _reads_back_from_the_server(drive: Drive, files: dict[str, bytes]) -> None:
    """Mounted again with an empty cache, every file reads back exact."""
    drive.drop_cache()
    drive.mount()
    for name, data in files.items():
        assert (drive.mnt / name).read_bytes() == data, name


def _payload(size: int, seed: int) -> bytes:
    block = os.urandom(64) + bytes([seed])
    return (block * (size // len(block) + 1))[:size]


def test_small_files_are_inline_and_read_back_everywhere(
    drive: Drive, server: ServerProcess
) -> None:
    drive.mount()
    files = {f"f{size}": _payload(size, i) for i, size in enumerate(SIZES)}
    for name, data in files.items():
        (drive.mnt / name).write_bytes(data)
    drive.umount()
    # Only the two files above the threshold have chunks on the server.
    chunked = [s for s in SIZES if s > INLINE_THRESHOLD]
    assert _stored_chunks(server) == sum(-(-s // CHUNK_SIZE) for s in chunked)

    drive.mount()  # warm: the local cache
    for name, data in files.items():
        assert (drive.mnt / name).read_bytes() == data, name
        assert os.stat(drive.mnt / name).st_blocks > 0, "inline data is not a hole"
    drive.umount()
    drive.drop_cache()
    drive.mount()  # cold: what another device sees
    for name, data in files.items():
        assert (drive.mnt / name).read_bytes() == data, name


def test_a_file_crosses_the_threshold_both_ways(drive: Drive, tmp_path: Path) -> None:
    drive.mount()
    path = drive.mnt / "grows"
    expect = b"start\n"
    path.write_bytes(expect)
    # Appends one small write at a time, across the threshold.
    with open(path, "ab") as f:
        while len(expect) < 3 * INLINE_THRESHOLD:
            piece = _payload(997, len(expect) % 251)
            f.write(piece)
            f.flush()
            expect += piece
    assert path.read_bytes() == expect
    # Shrinks back below it, then grows with a hole.
    os.truncate(path, 10)
    expect = expect[:10]
    assert path.read_bytes() == expect
    with open(path, "r+b") as f:
        f.seek(INLINE_THRESHOLD // 2)
        f.write(b"tail")
    expect = expect + bytes(INLINE_THRESHOLD // 2 - 10) + b"tail"
    assert path.read_bytes() == expect
    # Rewrite in the middle of an inline file, then a metadata-only change.
    with open(path, "r+b") as f:
        f.seek(3)
        f.write(b"XYZ")
    expect = expect[:3] + b"XYZ" + expect[6:]
    os.chmod(path, 0o600)
    drive.umount()
    drive.drop_cache()
    drive.mount()
    assert path.read_bytes() == expect
    assert os.stat(path).st_mode & 0o777 == 0o600


def _saved_while_uploads_wait(
    tmp_path: Path, server: ServerProcess, files: dict[str, bytes]
) -> tuple[int, int]:
    """Save ``files`` while the server holds every chunk upload, then let
    it answer and unmount; returns how many single-chunk and batch
    uploads there were. What lands is exact, read back from an empty
    cache."""
    with running_proxy(server.url) as proxy:
        drive = Drive(tmp_path / "alice", proxy.url)
        drive.signup()
        try:
            drive.mount()
            release = threading.Event()

            def held(request: ProxyRequest, forward: Forward) -> ProxyResponse:
                release.wait(60)
                return forward()

            proxy.on(held, method="PUT", path=r"/v1/chunks/[0-9a-f]{64}")
            proxy.on(held, method="POST", path=r"/v1/chunks/batch")
            for name, data in files.items():
                (drive.mnt / name).parent.mkdir(exist_ok=True)
                (drive.mnt / name).write_bytes(data)
            release.set()
            drive.umount()  # returns once everything is on the server
            singles = proxy.find("PUT", r"/v1/chunks/[0-9a-f]{64}")
            batches = proxy.find("POST", r"/v1/chunks/batch")
            assert all(r.status == 201 for r in singles + batches)
            _reads_back_from_the_server(drive, files)
            return len(singles), len(batches)
        finally:
            drive.cleanup()


def test_small_chunks_waiting_to_upload_go_many_to_a_request(
    tmp_path: Path, server: ServerProcess
) -> None:
    """Files too large to travel inline but small (a source tree's) are
    uploaded many to a request when they wait: while the server holds the
    first uploads, 120 files are saved; then it answers, and the rest go
    in a few batches."""
    files = {f"src/f{i:03}.c": os.urandom(INLINE_THRESHOLD + 100 * i) for i in range(120)}
    singles, batches = _saved_while_uploads_wait(tmp_path, server, files)
    # The first upload was held, the rest waited.
    assert batches and singles + batches <= 10, (singles, batches)


def test_full_chunks_waiting_to_upload_go_a_few_to_a_request(
    tmp_path: Path, server: ServerProcess
) -> None:
    """A 12 MiB file written while the server holds the first uploads: the
    chunks that waited meanwhile go ``LARGE_BATCH_ITEMS`` to a request once
    it answers."""
    files = {"video.ts": os.urandom(12 * CHUNK_SIZE)}
    singles, batches = _saved_while_uploads_wait(tmp_path, server, files)
    # At most one request per upload task was held; the rest waited.
    assert singles + batches <= CHUNK_WORKERS + -(-12 // LARGE_BATCH_ITEMS), (singles, batches)


def test_small_files_saved_one_after_another_share_requests(
    tmp_path: Path, server: ServerProcess
) -> None:
    """Nothing holds the uploads here: files are saved one after another,
    10 ms apart (a tree extracted, where each file costs the extracting
    tool a dozen requests to the daemon). Their chunks still go many to a
    request, at most one per ``SMALL_GATHER`` of saving; sent as they came,
    every file made a request of its own."""
    files = {f"src/f{i:03}.c": os.urandom(INLINE_THRESHOLD + 100 * i) for i in range(40)}
    drive = Drive(tmp_path / "alice", server.url)
    drive.signup()
    try:
        drive.mount()
        (drive.mnt / "src").mkdir()
        offset = server.log_path.stat().st_size
        started = time.monotonic()
        for name, data in files.items():
            (drive.mnt / name).write_bytes(data)
            time.sleep(0.008)
        elapsed = time.monotonic() - started
        drive.umount()
        log = server.log_since(offset).decode()
        uploads = re.findall(r"method=(?:PUT path=/v1/chunks/\w+|POST path=/v1/chunks/batch) ", log)
        # One request per gathering, a last one at the unmount.
        assert len(uploads) <= elapsed / SMALL_GATHER + 2, (len(uploads), elapsed)
        _reads_back_from_the_server(drive, files)
    finally:
        drive.cleanup()
