"""End to end, as a user meets megafs: real server over HTTP, real FUSE
mounts driven through the ``megafs`` command line."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive

pytestmark = pytest.mark.mount

SIZES = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1]


def _write_tree(root: Path, rng: random.Random) -> dict[str, bytes]:
    """A nested tree of 200 small files; returns relative path -> content."""
    files: dict[str, bytes] = {}
    for i in range(200):
        rel = Path(f"folder-{i % 5}/subfolder-{i % 3}/{'deepfolder/' * (i % 2)}file-{i:03d}.txt")
        data = f"MEGAFS-SECRET-LINE {i:05d} ".encode() * rng.randint(1, 40)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[str(rel)] = data
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_files_survive_remount_restart_and_cold_cache(drive: Drive, server) -> None:
    rng = random.Random(1)
    drive.mount()
    expected: dict[str, bytes] = {}
    for size in SIZES:
        data = rng.randbytes(size)
        (drive.mnt / f"size-{size}").write_bytes(data)
        expected[f"size-{size}"] = data
    big = os.urandom(50 << 20)
    (drive.mnt / "big.bin").write_bytes(big)
    (drive.mnt / "tree").mkdir()
    tree = _write_tree(drive.mnt / "tree", rng)
    for rel, data in tree.items():
        expected[f"tree/{rel}"] = data
    # Read back through the live mount first.
    for name in ("size-1", f"size-{CHUNK_SIZE + 1}"):
        assert (drive.mnt / name).read_bytes() == expected[name]
    drive.umount()

    server.stop()
    server.start()
    drive.drop_cache()
    drive.mount()
    got = _read_tree(drive.mnt)
    assert hashlib.sha256(got.pop("big.bin")).digest() == hashlib.sha256(big).digest()
    assert got.keys() == expected.keys()
    for name, data in expected.items():
        assert got[name] == data, name
    drive.umount()


def test_server_stores_no_plaintext_and_no_names(drive: Drive, server) -> None:
    """Every 16-byte run of the text files and every name is searched for in
    the server's whole data dir (database and chunks). Random binary data is
    checked at sampled offsets (a full search would take minutes)."""
    drive.mount()
    rng = random.Random(2)
    (drive.mnt / "Secret Folder Name").mkdir()
    tree = _write_tree(drive.mnt / "Secret Folder Name", rng)
    binary = rng.randbytes(3 * CHUNK_SIZE + 77)
    (drive.mnt / "Secret Folder Name" / "binary-secret-file.dat").write_bytes(binary)
    drive.umount()

    blobs = [p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file()]
    needles: set[bytes] = set()
    for rel, data in tree.items():
        needles.update(part.encode() for part in Path(rel).parts)
        for i in range(len(data) - 15):
            needles.add(data[i : i + 16])
    needles |= {b"Secret Folder Name", b"binary-secret-file.dat"}
    for off in range(0, len(binary) - 16, 4099):
        needles.add(binary[off : off + 16])
    # Every name in the tree is 8 bytes or longer: shorter strings occur by
    # chance in hex ids and ciphertext. Text windows repeat heavily, so the
    # needle set stays small.
    assert min(len(n) for n in needles) >= 8
    assert len(needles) < 50_000
    for blob in blobs:
        for needle in needles:
            assert needle not in blob, f"plaintext {needle!r} found on the server"


def test_wrong_password_is_one_line_and_mounts_nothing(drive: Drive) -> None:
    drive.password_file.write_text("not the password\n")
    proc = drive.mount(check=False)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "password" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.ismount(drive.mnt)


def test_clear_errors_for_bad_mountpoints(drive: Drive, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = drive.cli(
        "mount", str(missing), "--password-file", str(drive.password_file), check=False
    )
    assert proc.returncode == 6 and "does not exist" in proc.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    proc = drive.cli("mount", str(full), "--password-file", str(drive.password_file), check=False)
    assert proc.returncode == 6 and "not empty" in proc.stderr
    drive.mount()
    proc = drive.mount(check=False)
    assert proc.returncode == 6 and "already mounted" in proc.stderr
    assert "Traceback" not in proc.stderr
    drive.umount()


def test_not_logged_in_and_unreachable_server(tmp_path: Path, server) -> None:
    lonely = Drive(tmp_path / "lonely", server.url)
    proc = lonely.cli("mount", str(lonely.mnt), check=False)
    assert proc.returncode == 5 and "not logged in" in proc.stderr
    nowhere = Drive(tmp_path / "nowhere", "http://127.0.0.1:9")
    proc = nowhere.cli(
        "login",
        nowhere.url,
        nowhere.email,
        "--password-file",
        str(nowhere.password_file),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_server_killed_during_copy(drive: Drive, server, tmp_path: Path) -> None:
    """A writer copies files in, fsyncing each; the server is killed with
    SIGKILL in the middle and restarted. Every file whose fsync succeeded
    must be intact after remount with an empty cache."""
    drive.mount("--fsync-timeout", "20")
    script = tmp_path / "writer.py"
    script.write_text(
        "import os, sys, hashlib\n"
        "root = sys.argv[1]\n"
        "for i in range(40):\n"
        "    data = hashlib.sha256(str(i).encode()).digest() * (60000 + i * 997)\n"
        "    path = os.path.join(root, f'copy-{i:02d}.bin')\n"
        "    try:\n"
        "        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "        os.write(fd, data)\n"
        "        os.fsync(fd)\n"
        "        os.close(fd)\n"
        "        print('ok', i, flush=True)\n"
        "    except OSError as e:\n"
        "        print('err', i, e.errno, flush=True)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, str(script), str(drive.mnt)], stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(writer.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while sum(1 for line in lines if line.startswith("ok")) < 5:
        assert time.monotonic() < deadline, "writer made no progress"
        time.sleep(0.05)
    assert writer.poll() is None, "the copy finished before the server was killed"
    server.kill()
    time.sleep(2)
    server.start()
    assert writer.wait(timeout=300) == 0
    reader.join(timeout=10)
    assert writer.stdout is not None
    writer.stdout.close()
    ok = [int(line.split()[1]) for line in lines if line.startswith("ok")]
    assert len(ok) >= 5
    drive.umount()
    drive.drop_cache()
    drive.mount()
    for i in ok:
        data = hashlib.sha256(str(i).encode()).digest() * (60000 + i * 997)
        assert (drive.mnt / f"copy-{i:02d}.bin").read_bytes() == data, i
    drive.umount()


def test_ordinary_operations(drive: Drive) -> None:
    drive.mount()
    m = drive.mnt
    (m / "a").mkdir()
    (m / "a" / "f").write_text("hello")
    os.rename(m / "a" / "f", m / "g")
    assert (m / "g").read_text() == "hello"
    assert not (m / "a" / "f").exists()
    (m / "h").write_text("other")
    os.rename(m / "h", m / "g")  # over an existing file
    assert (m / "g").read_text() == "other"
    os.chmod(m / "g", 0o600)
    with open(m / "g", "r+b") as f:
        f.truncate(2)
    with open(m / "g", "ab") as f:
        f.write(b"++")
    os.utime(m / "g", ns=(1_000_000_123, 2_000_000_456))
    with pytest.raises(OSError):
        os.rmdir(m)  # busy / not allowed on the root
    (m / "a" / "inner").mkdir()
    with pytest.raises(OSError):
        os.rmdir(m / "a")
    os.rmdir(m / "a" / "inner")
    os.rmdir(m / "a")
    st = os.statvfs(m)
    assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks
    drive.umount()
    drive.drop_cache()
    drive.mount()
    assert sorted(os.listdir(m)) == ["g"]
    st = os.stat(m / "g")
    assert (m / "g").read_bytes() == b"ot++"
    assert st.st_mode & 0o777 == 0o600
    assert st.st_mtime_ns == 2_000_000_456
    drive.umount()


def test_tampered_chunk_is_eio_for_that_file_only(drive: Drive, server) -> None:
    """The server flips one bit in a stored chunk: reading that file gives
    EIO (never wrong bytes), the log says why, and other files still work."""
    drive.mount()
    victim = os.urandom(CHUNK_SIZE + 5000)
    (drive.mnt / "victim.bin").write_bytes(victim)
    (drive.mnt / "fine.txt").write_text("still readable")
    drive.umount()
    chunk_files = sorted(p for p in (server.data_dir / "chunks").rglob("*") if p.is_file())
    big = [p for p in chunk_files if p.stat().st_size > 4096]
    assert len(big) == 2  # the victim's two chunks; fine.txt is a small one
    raw = bytearray(big[0].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    big[0].write_bytes(bytes(raw))
    drive.drop_cache()
    drive.mount()
    with pytest.raises(OSError) as err, open(drive.mnt / "victim.bin", "rb") as f:
        f.read()
    assert err.value.errno == 5  # EIO
    assert (drive.mnt / "fine.txt").read_text() == "still readable"
    assert "integrity" in drive.daemon_log()
    drive.umount()


def test_quickstart_as_a_new_user(tmp_path: Path) -> None:
    """The README's main job: quickstart sets up server, account and mount;
    running it again is harmless; umount stops the drive."""
    from tests.helpers.drive import megafs

    home = tmp_path / "home"
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "MEGAFS_CONFIG_DIR": "",
    }
    mnt = home / "Mega"
    server_pid = None
    try:
        first = megafs("quickstart", str(mnt), "--listen", "127.0.0.1:0", env=env)
        assert "started a megafs server" in first.stdout
        assert "created account" in first.stdout
        assert os.path.ismount(mnt)
        (mnt / "hello.txt").write_text("hi")
        again = megafs("quickstart", str(mnt), "--listen", "127.0.0.1:0", env=env)
        assert "already running" in again.stdout and "already mounted" in again.stdout
        server_pid = int(again.stdout.split("kill ")[1].split()[0])
        megafs("umount", str(mnt), env=env)
        assert not os.path.ismount(mnt)
        third = megafs("quickstart", str(mnt), "--listen", "127.0.0.1:0", env=env)
        assert "using account" in third.stdout
        assert (mnt / "hello.txt").read_text() == "hi"
        megafs("umount", str(mnt), env=env)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if server_pid is None:
            info = home / ".local/share/megafs/server/server.json"
            if info.exists():
                import json

                server_pid = json.loads(info.read_text())["pid"]
        if server_pid:
            os.kill(server_pid, 15)
