"""Read-ahead on real mounts: a sequential reader gets the next chunks
fetched ahead of it, a random reader does not, and whatever a prefetch
meets (a server error, a corrupted chunk, a writer changing the file) no
read ever returns wrong bytes and the daemon keeps serving.

What the daemon fetched is seen from outside: every chunk it downloads
lands in its disk cache (``<cache>/chunks``) under the id the server
stores it by, so the tests count and name those files.
"""

from __future__ import annotations

import inspect
import mmap
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest

from megafs.cache.chunks import PLAINTEXT_BYTES
from megafs.crypto import CHUNK_SIZE
from megafs.remote import RemoteClient
from tests.helpers.drive import Drive
from tests.helpers.proxy import Error, running_proxy
from tests.helpers.server import ServerProcess
from tests.helpers.tools import wait_for

pytestmark = pytest.mark.mount

PIECE = 128 * 1024  # what the kernel asks for at a time


def _cached_ids(drive: Drive) -> set[str]:
    root = drive.cache / "chunks"
    return {p.name for p in root.rglob("*") if p.is_file() and p.suffix != ".tmp"}


def _put_cold(drive: Drive, name: str, data: bytes) -> Path:
    """Store ``data`` and remount on an empty cache: every read downloads."""
    drive.mount()
    (drive.mnt / name).write_bytes(data)
    drive.umount()
    drive.drop_cache()
    drive.mount()
    return drive.mnt / name


def _chunk_ids(drive: Drive, path: Path, count: int) -> list[str]:
    """The id of each chunk of ``path`` (on a cold cache): one page of each
    chunk is read, in an order where no read follows the one before, and
    each read must add exactly one chunk to the cache, so random readers
    get no read-ahead. (A download's cache file is written behind its read:
    it is waited for. A chunk fetched ahead would show as two files after
    one read, or as none after a later one.)"""
    ids = [""] * count
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead either
        before = _cached_ids(drive)
        for index in [*range(0, count, 2), *range(1, count, 2)]:
            os.pread(fd, 4096, index * CHUNK_SIZE)
            wait_for(f"chunk {index}'s cache file", lambda b=before: _cached_ids(drive) != b)
            after = _cached_ids(drive)
            assert len(after - before) == 1, f"chunk {index}: fetched {len(after - before)}"
            (ids[index],) = after - before
            before = after
    finally:
        os.close(fd)
    return ids


def _chunk_requests(server: ServerProcess, offset: int) -> tuple[int, int]:
    """How many ``GET /chunks/{id}`` and ``POST /chunks/fetch`` the server
    answered since its log was ``offset`` bytes long."""
    log = server.log_since(offset).decode()
    gets = re.findall(r"method=GET path=/v1/chunks/[0-9a-f]{64} status=200", log)
    fetches = re.findall(r"method=POST path=/v1/chunks/fetch status=200", log)
    return len(gets), len(fetches)


def _server_chunk(server: ServerProcess, chunk_id: str) -> Path:
    (path,) = (server.data_dir / "chunks").rglob(chunk_id)
    return path


def _read_in_pieces(fd: int, start: int, end: int, expected: bytes) -> None:
    for off in range(start, end, PIECE):
        got = os.pread(fd, PIECE, off)
        assert got == expected[off : off + PIECE], f"wrong bytes at {off}"


def test_cold_sequential_read_is_exact_and_fetches_ahead(drive: Drive) -> None:
    data = random.Random(1).randbytes(20 * CHUNK_SIZE + 12345)
    path = _put_cold(drive, "movie.bin", data)
    with open(path, "rb", buffering=0) as f:
        for k in range(3):
            assert f.read(PIECE) == data[k * PIECE : (k + 1) * PIECE]
        # The reader is still in chunk 0; read-ahead fetches what follows.
        wait_for("read-ahead", lambda: len(_cached_ids(drive)) >= 5)
        rest = b"".join(iter(lambda: f.read(PIECE), b""))
    assert data[3 * PIECE :] == rest
    wait_for("every chunk's cache file", lambda: len(_cached_ids(drive)) == 21)
    drive.umount()
    drive.drop_cache()
    drive.mount()
    assert (drive.mnt / "movie.bin").read_bytes() == data  # 1 MiB reads (cat, cp)
    drive.umount()


def test_a_whole_chunk_read_from_the_start_fetches_the_rest_ahead(drive: Drive) -> None:
    """cat and cp read in buffers of one chunk (st_blksize), and the kernel
    asks one chunk at a time: such a read at offset 0 starts read-ahead at
    once, so the other chunks of a photo of three are fetched while its
    first is read, not one round trip each. A read of a page there (a
    header, a file's magic) starts none."""
    data = random.Random(7).randbytes(3 * CHUNK_SIZE - 100)
    path = _put_cold(drive, "photo.jpg", data)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
        wait_for("chunk 0's cache file", lambda: len(_cached_ids(drive)) == 1)
    finally:
        os.close(fd)
    assert len(_cached_ids(drive)) == 1
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        # One request of exactly a chunk: a page-aligned buffer, as the
        # kernel's own requests are (an unaligned one spans a page more).
        with mmap.mmap(-1, CHUNK_SIZE) as buffer:
            assert os.preadv(fd, [buffer], 0) == CHUNK_SIZE
            assert buffer[:] == data[:CHUNK_SIZE]  # chunk 0, from memory
        wait_for("chunks 1 and 2, fetched ahead", lambda: len(_cached_ids(drive)) == 3)
        assert os.pread(fd, 2 * CHUNK_SIZE, CHUNK_SIZE) == data[CHUNK_SIZE:]
    finally:
        os.close(fd)
    drive.umount()


def test_a_cold_sequential_read_fetches_a_few_chunks_to_a_request(
    drive: Drive, server: ServerProcess
) -> None:
    """Read-ahead asks for four chunks at a time, and they travel in one
    ``POST /chunks/fetch``: 16 chunks read cold in at most half as many
    requests as chunks (one each before)."""
    data = random.Random(5).randbytes(16 * CHUNK_SIZE)
    path = _put_cold(drive, "stream.ts", data)
    offset = server.log_path.stat().st_size
    assert path.read_bytes() == data
    gets, fetches = _chunk_requests(server, offset)
    assert fetches and gets + fetches <= 8, (gets, fetches)
    drive.umount()


def test_jumping_reader_gets_right_bytes_and_random_reads_fetch_nothing_ahead(
    drive: Drive,
) -> None:
    rng = random.Random(2)
    count = 12
    data = rng.randbytes(count * CHUNK_SIZE - 777)
    path = _put_cold(drive, "db.bin", data)
    _chunk_ids(drive, path, count)  # asserts one fetch per random read
    drive.umount()
    drive.drop_cache()
    drive.mount()
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(60):
            start = rng.randrange(len(data) + CHUNK_SIZE)  # sometimes past the end
            if rng.random() < 0.3:
                # A sequential run: read-ahead starts, then the reader leaves.
                _read_in_pieces(fd, start, min(start + 3 * CHUNK_SIZE, len(data)), data)
            else:
                size = rng.choice([1, 4096, PIECE, CHUNK_SIZE, 3 * CHUNK_SIZE])
                assert os.pread(fd, size, start) == data[start : start + size], (start, size)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    drive.umount()


def test_prefetch_meeting_a_server_error_leaves_later_reads_intact(
    drive: Drive, server: ServerProcess
) -> None:
    """The server fails every request for chunk 5 while read-ahead fetches
    it, until the prefetch gives up; then the chunk is back. The reader,
    arriving there later, gets the right bytes."""
    count = 12
    data = random.Random(3).randbytes(count * CHUNK_SIZE)
    path = _put_cold(drive, "video.bin", data)
    victim = _chunk_ids(drive, path, count)[5]
    drive.umount()
    stored = _server_chunk(server, victim)
    aside = stored.with_name("aside")
    stored.rename(aside)
    stored.mkdir()  # reading it fails: HTTP 500, which the client retries
    drive.drop_cache()
    drive.mount()
    attempts = 1 + inspect.signature(RemoteClient).parameters["retries"].default
    fd = os.open(path, os.O_RDONLY)
    try:
        _read_in_pieces(fd, 0, 3 * CHUNK_SIZE, data)  # read-ahead reaches chunk 5
        wait_for(
            "the prefetch gave up",
            lambda: server.log().count(f"{victim} status=500") >= attempts,
        )
        stored.rmdir()
        aside.rename(stored)
        _read_in_pieces(fd, 3 * CHUNK_SIZE, len(data), data)
    finally:
        os.close(fd)
    drive.umount()


def test_corrupted_chunk_is_eio_never_wrong_bytes(drive: Drive, server: ServerProcess) -> None:
    count = 10
    data = random.Random(4).randbytes(count * CHUNK_SIZE)
    path = _put_cold(drive, "photo.raw", data)
    (drive.mnt / "other.txt").write_text("still here")
    victim = _chunk_ids(drive, path, count)[4]
    drive.umount()
    stored = _server_chunk(server, victim)
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stored.write_bytes(bytes(raw))
    drive.drop_cache()
    drive.mount()
    fd = os.open(path, os.O_RDONLY)
    try:
        failed_at = None
        for off in range(0, len(data), PIECE):
            try:
                got = os.pread(fd, PIECE, off)
            except OSError as exc:
                assert exc.errno == 5  # EIO
                failed_at = off
                break
            assert got == data[off : off + PIECE], f"wrong bytes at {off}"
        assert failed_at is not None and failed_at // CHUNK_SIZE == 4
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, 4 * CHUNK_SIZE + 8192)  # again: still EIO
        assert err.value.errno == 5
        _read_in_pieces(fd, 5 * CHUNK_SIZE, len(data), data)
        _read_in_pieces(fd, 0, 4 * CHUNK_SIZE, data)
    finally:
        os.close(fd)
    assert (drive.mnt / "other.txt").read_text() == "still here"
    assert "integrity" in drive.daemon_log()
    drive.umount()


def test_reader_alongside_a_writer_sees_only_written_bytes(drive: Drive) -> None:
    """One handle rewrites whole chunks while another reads the file over
    and over with O_DIRECT (every read reaches the daemon, read-ahead
    included): each page read is a page some version of its chunk had, and
    the end state is exact, also after a cold remount."""
    count = 8
    rng = random.Random(5)
    schedule = [(rng.randrange(count), v) for v in range(1, 25)]
    versions: dict[tuple[int, int], bytes] = {
        (i, 0): random.Random(f"{i}/0").randbytes(CHUNK_SIZE) for i in range(count)
    }
    for i, v in schedule:
        versions[i, v] = random.Random(f"{i}/{v}").randbytes(CHUNK_SIZE)
    pages: list[list[set[bytes]]] = [
        [set() for _ in range(CHUNK_SIZE // 4096)] for _ in range(count)
    ]
    for (i, _), chunk in versions.items():
        for p in range(CHUNK_SIZE // 4096):
            pages[i][p].add(chunk[p * 4096 : (p + 1) * 4096])
    initial = b"".join(versions[i, 0] for i in range(count))
    path = _put_cold(drive, "shared.bin", initial)

    done = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while not done.is_set():
                for off in range(0, count * CHUNK_SIZE, PIECE):
                    got = os.pread(fd, PIECE, off)
                    for k in range(0, len(got), 4096):
                        index, within = divmod(off + k, CHUNK_SIZE)
                        if got[k : k + 4096] not in pages[index][within // 4096]:
                            problems.append(f"page at {off + k} was never written")
                            return
        except OSError as exc:
            problems.append(f"read failed: {exc}")
        finally:
            os.close(fd)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with open(path, "r+b", buffering=0) as f:
            for i, v in schedule:
                os.pwrite(f.fileno(), versions[i, v], i * CHUNK_SIZE)
                time.sleep(0.02)  # let the reader in between writes
    finally:
        done.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert not problems, problems
    final = {i: 0 for i in range(count)}
    for i, v in schedule:
        final[i] = v
    expected = b"".join(versions[i, final[i]] for i in range(count))
    assert path.read_bytes() == expected
    drive.umount()
    drive.drop_cache()
    drive.mount()
    assert path.read_bytes() == expected
    drive.umount()


def test_random_reads_of_verified_chunks_check_each_piece_on_disk(drive: Drive) -> None:
    """A random reader of chunks no longer in memory gets them from the disk
    cache a piece (16 KiB) at a time, each checked against what the chunk
    held when it was verified whole: a flipped byte in another piece of the
    file goes unread, a flipped byte in the piece read is caught and the
    chunk fetched again; never a wrong byte."""
    count = 80
    assert count // 2 * CHUNK_SIZE > PLAINTEXT_BYTES  # more than the daemon keeps in memory
    data = random.Random(5).randbytes(count * CHUNK_SIZE - 999)
    path = _put_cold(drive, "vm.img", data)
    # Chunks are loaded even first, then odd: the even ones below 32 have
    # left memory by the end, and stay verified (and marked) on disk.
    ids = _chunk_ids(drive, path, count)
    files = {i: drive.cache / "chunks" / ids[i][:2] / ids[i] for i in (0, 2, 4)}
    sealed = {i: files[i].read_bytes() for i in files}
    header, piece = 46, 16 * 1024

    def flip(index: int, at: int) -> None:
        raw = bytearray(sealed[index])
        raw[header + at] ^= 0x40
        files[index].write_bytes(bytes(raw))

    flip(0, 9 * piece + 100)  # in a piece nobody reads
    flip(2, 5 * piece + 7)  # in the piece about to be read
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for index, at in [(0, 5 * piece + 4096), (2, 5 * piece), (4, 63 * piece + 8192)]:
            start = index * CHUNK_SIZE + at
            assert os.pread(fd, 4096, start) == data[start : start + 4096], (index, at)
        # Across the end of a chunk, and the short last chunk's last bytes.
        for start in [5 * CHUNK_SIZE - 2048, len(data) - 100]:
            assert os.pread(fd, 4096, start) == data[start : start + 4096], start
    finally:
        os.close(fd)
    # Chunk 0 was read in pieces: its other piece was never looked at. Chunk
    # 2's damaged piece failed its check, the whole file then failed the
    # chunk's tag, and the chunk was fetched again (its file is written
    # behind the read).
    assert files[0].read_bytes() != sealed[0]
    wait_for("chunk 2's cache file, downloaded again", files[2].exists)
    assert files[2].read_bytes() == sealed[2]
    assert files[4].read_bytes() == sealed[4]
    assert path.read_bytes() == data
    drive.umount()


def test_the_kernel_reads_ahead_a_chunk_per_request(drive: Drive) -> None:
    """The daemon (as root, which CI is) widens the mount's kernel
    read-ahead from 128 KiB to one chunk, the largest request the kernel
    sends: a sequential reader then costs one request per chunk, not eight."""
    drive.mount()
    dev = os.stat(drive.mnt).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    wait_for(
        "the wider read-ahead",
        lambda: int(setting.read_text()) == CHUNK_SIZE // 1024,
        timeout=10,
    )


def test_many_readers_of_more_than_memory_holds_get_exact_bytes(drive: Drive) -> None:
    """Eight threads read six files that together hold three times what the
    plaintext LRU keeps, with O_DIRECT (every read reaches the daemon): runs
    of chunk-sized reads that each straddle two chunks (read-ahead, many
    downloads and decryptions at once, chunks leaving memory) mixed with
    reads of a few pages anywhere (pieces). Every byte must be the file's,
    first from the server and then again from the disk cache after a
    remount. (The next test makes one such overlap happen on purpose.)"""
    files, count, threads = 6, 16, 8
    assert files * count * CHUNK_SIZE >= 3 * PLAINTEXT_BYTES
    data = [random.Random(f"f{k}").randbytes(count * CHUNK_SIZE - 4096 * k) for k in range(files)]
    drive.mount()
    for k in range(files):
        (drive.mnt / f"f{k}.bin").write_bytes(data[k])
    drive.umount()
    drive.drop_cache()

    def reader(rng: random.Random, problems: list[str]) -> None:
        fds = [os.open(drive.mnt / f"f{k}.bin", os.O_RDONLY | os.O_DIRECT) for k in range(files)]
        try:
            for _ in range(30):
                k = rng.randrange(files)
                if rng.random() < 0.5:
                    start = rng.randrange(1, CHUNK_SIZE // 4096) * 4096
                    spans = [(start + i * CHUNK_SIZE, CHUNK_SIZE) for i in range(4)]
                else:
                    spans = [
                        (rng.randrange(len(data[k]) // 4096) * 4096, 4096 * rng.randrange(1, 80))
                    ]
                for off, size in spans:
                    if os.pread(fds[k], size, off) != data[k][off : off + size]:
                        problems.append(f"f{k}.bin: wrong bytes in {size} at {off}")
                        return
        except OSError as exc:
            problems.append(f"read failed: {exc}")
        finally:
            for fd in fds:
                os.close(fd)

    for seed, source in [(1, "the server"), (2, "the disk cache")]:
        drive.mount()
        problems: list[str] = []
        running = [
            threading.Thread(target=reader, args=(random.Random(seed * 100 + t), problems))
            for t in range(threads)
        ]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in running)
        assert problems == [], f"reading from {source}: {problems}"
        drive.umount()
    drive.mount()
    for k in range(files):
        assert (drive.mnt / f"f{k}.bin").read_bytes() == data[k]
    drive.umount()


def test_a_read_across_two_chunks_keeps_the_first_while_the_second_downloads(
    tmp_path: Path, server: ServerProcess
) -> None:
    """A read across a chunk boundary holds a view of the first chunk's
    plaintext while it waits for the second. Meanwhile 45 other chunks pass
    through the plaintext LRU, so the first leaves it, and each new chunk is
    decrypted into a buffer an evicted one left behind: never the one the
    waiting read still views."""
    with running_proxy(server.url) as proxy:
        drive = Drive(tmp_path / "alice", proxy.url)
        drive.signup()
        try:
            hot = [random.Random(f"hot{k}").randbytes(16 * CHUNK_SIZE) for k in range(3)]
            assert 45 * CHUNK_SIZE > PLAINTEXT_BYTES
            slow = random.Random("slow").randbytes(2 * CHUNK_SIZE)
            drive.mount()
            for k, data in enumerate(hot):
                (drive.mnt / f"hot{k}.bin").write_bytes(data)
            # In a folder of its own: reading the hot files whole, in
            # order, fetches the first chunks of their folder's next files.
            (drive.mnt / "later").mkdir()
            (drive.mnt / "later" / "slow.bin").write_bytes(slow)
            drive.umount()
            drive.drop_cache()
            drive.mount()
            for k, data in enumerate(hot):  # into the disk cache
                assert (drive.mnt / f"hot{k}.bin").read_bytes() == data
            wait_for("the hot chunks' cache files", lambda: len(_cached_ids(drive)) == 48)
            fd = os.open(drive.mnt / "later" / "slow.bin", os.O_RDONLY | os.O_DIRECT)
            try:
                # Chunk 0 into memory; a page, so that no read-ahead
                # fetches chunk 1 too.
                assert os.pread(fd, 4096, 0) == slow[:4096]
                release = threading.Event()
                held = proxy.on(
                    lambda request, forward: None if release.wait(60) else Error(503),
                    path=r"/v1/chunks/.*",
                )
                got: list[bytes] = []
                across = threading.Thread(
                    target=lambda: got.append(os.pread(fd, 8192, CHUNK_SIZE - 4096))
                )
                across.start()
                wait_for("chunk 1's download", lambda: held.calls > 0)
                # 45 chunks from the disk cache, one at a time: last first,
                # so that no read-ahead runs, and each new chunk is
                # decrypted into the buffer of one just evicted.
                for k, data in enumerate(hot):
                    hot_fd = os.open(drive.mnt / f"hot{k}.bin", os.O_RDONLY | os.O_DIRECT)
                    try:
                        for off in range(len(data) - CHUNK_SIZE, 0, -CHUNK_SIZE):
                            got_hot = os.pread(hot_fd, CHUNK_SIZE, off)
                            assert got_hot == data[off : off + CHUNK_SIZE], (k, off)
                    finally:
                        os.close(hot_fd)
                assert across.is_alive()  # still waiting for chunk 1
                release.set()
                across.join(timeout=60)
                expected = slow[CHUNK_SIZE - 4096 : CHUNK_SIZE + 4096]
                assert got == [expected], "wrong bytes across the chunk boundary"
            finally:
                os.close(fd)
            drive.umount()
        finally:
            drive.cleanup()
