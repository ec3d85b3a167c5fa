"""POSIX behaviour beyond plain files, checked live and again after a
remount with an empty cache (so everything came back from the server)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from megafs.crypto import CHUNK_SIZE
from tests.helpers.drive import Drive
from tests.helpers.server import ServerProcess
from tests.helpers.tools import need, run
from tests.mount.test_crash import kill_daemon

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def renameat2(old: os.PathLike[str], new: os.PathLike[str], flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def remount_cold(drive: Drive) -> None:
    drive.umount()
    drive.drop_cache()
    drive.mount()


def test_hard_links(drive: Drive) -> None:
    drive.mount()
    m = drive.mnt
    (m / "a").write_bytes(b"shared data")
    (m / "dir").mkdir()
    os.link(m / "a", m / "b")
    os.link(m / "b", m / "dir" / "c")
    inos = {os.stat(m / n).st_ino for n in ("a", "b", "dir/c")}
    assert len(inos) == 1
    assert os.stat(m / "a").st_nlink == 3
    with open(m / "dir" / "c", "ab") as f:
        f.write(b" grows")
    assert (m / "a").read_bytes() == b"shared data grows"
    os.unlink(m / "a")
    assert os.stat(m / "b").st_nlink == 2
    os.rename(m / "dir" / "c", m / "moved")
    with pytest.raises(OSError) as err:
        os.link(m / "dir", m / "dirlink")
    assert err.value.errno == errno.EPERM
    remount_cold(drive)
    assert sorted(os.listdir(m)) == ["b", "dir", "moved"]
    assert (m / "moved").read_bytes() == b"shared data grows"
    assert os.stat(m / "b").st_ino == os.stat(m / "moved").st_ino
    assert os.stat(m / "b").st_nlink == 2
    os.unlink(m / "b")
    assert os.stat(m / "moved").st_nlink == 1
    assert (m / "moved").read_bytes() == b"shared data grows"
    remount_cold(drive)
    assert (m / "moved").read_bytes() == b"shared data grows"
    os.unlink(m / "moved")
    assert sorted(os.listdir(m)) == ["dir"]
    drive.umount()


def test_the_first_hard_link_after_a_remount(drive: Drive) -> None:
    """The links folder exists from an earlier mount but nothing has loaded
    it yet (no folder listed here holds a further name): a new link still
    works, as git's link-then-unlink of every object it writes needs."""
    drive.mount()
    m = drive.mnt
    (m / "docs").mkdir()
    (m / "docs" / "a").write_bytes(b"first")
    os.link(m / "docs" / "a", m / "docs" / "b")
    drive.umount()
    drive.mount()
    (m / "objects").mkdir()
    (m / "objects" / "tmp").write_bytes(b"object")
    os.link(m / "objects" / "tmp", m / "objects" / "final")
    os.unlink(m / "objects" / "tmp")
    assert (m / "objects" / "final").read_bytes() == b"object"
    assert os.stat(m / "objects" / "final").st_nlink == 1
    remount_cold(drive)
    assert os.listdir(m / "objects") == ["final"]
    assert (m / "objects" / "final").read_bytes() == b"object"
    assert os.stat(m / "docs" / "a").st_ino == os.stat(m / "docs" / "b").st_ino
    drive.umount()


def test_attributes_set_on_an_open_file_are_saved_with_it(drive: Drive) -> None:
    """tar's order: write, set the times and mode through the open file,
    close. The attributes are kept in memory until the close, which
    journals them with the content; an open file that was only chmod'ed is
    journaled at its close too. A crash right after the closes loses
    neither."""
    drive.mount()
    m = drive.mnt
    fd = os.open(m / "extracted", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"from the archive")
    os.utime(fd, ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    os.fchmod(fd, 0o640)
    os.close(fd)
    (m / "old").write_bytes(b"unchanged bytes")
    with open(m / "old", "rb") as f:
        os.chmod(m / "old", 0o604)
        assert f.read() == b"unchanged bytes"
    kill_daemon(drive)  # before the periodic flush or an unmount could save them
    drive.mount()
    remount_cold(drive)
    st = os.stat(m / "extracted")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_500_000_000_123_456_789)
    assert (m / "extracted").read_bytes() == b"from the archive"
    assert stat.S_IMODE(os.stat(m / "old").st_mode) == 0o604
    drive.umount()


def _server_nodes(server: ServerProcess) -> int:
    with contextlib.closing(sqlite3.connect(server.data_dir / "meta.sqlite3")) as db:
        return db.execute("SELECT count(*) FROM nodes").fetchone()[0]


def test_a_name_linked_and_unlinked_before_upload_leaves_an_ordinary_file(
    drive: Drive, server: ServerProcess
) -> None:
    """git writes each object under a temporary name, links it to its final
    name and unlinks the temporary one. Neither name has reached the server
    when the second goes, so the node becomes an ordinary file again: one
    node on the server, not a hard-linked node and a LINK."""
    drive.mount()
    m = drive.mnt
    (m / "kept").write_bytes(b"a real hard link")
    os.link(m / "kept", m / "kept too")  # the links folder exists, with a node in it
    (m / "objects").mkdir()
    objects = {f"obj_{i}": os.urandom(100 * i + 1) for i in range(20)}
    for name, data in objects.items():
        tmp = m / "objects" / f"tmp_{name}"
        tmp.write_bytes(data)
        os.link(tmp, m / "objects" / name)
        os.unlink(tmp)
        assert os.stat(m / "objects" / name).st_nlink == 1
    os.rename(m / "objects" / "obj_0", m / "objects" / "renamed")
    objects["renamed"] = objects.pop("obj_0")
    drive.umount()
    # root, links folder, its node and the node's two LINKs, "objects", the objects
    assert _server_nodes(server) == 6 + len(objects)
    drive.drop_cache()
    drive.mount()
    assert sorted(os.listdir(m / "objects")) == sorted(objects)
    for name, data in objects.items():
        assert (m / "objects" / name).read_bytes() == data
        assert os.stat(m / "objects" / name).st_nlink == 1
    assert os.stat(m / "kept").st_ino == os.stat(m / "kept too").st_ino
    assert os.stat(m / "kept").st_nlink == 2
    drive.umount()


def test_symlinks_special_files_and_xattrs(drive: Drive) -> None:
    drive.mount()
    m = drive.mnt
    os.symlink("../some/where \xff".encode("utf-8", "surrogateescape"), m / "link")
    os.symlink("/absolute/target", m / "abs")
    os.mkfifo(m / "fifo", 0o640)
    os.mknod(m / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (m / "file").write_text("x")
    os.setxattr(m / "file", "user.colour", b"blue")
    os.setxattr(m / "file", "user.empty", b"")
    with pytest.raises(OSError) as err:
        os.getxattr(m / "file", "user.missing")
    assert err.value.errno == errno.ENODATA
    with pytest.raises(OSError) as err:
        os.setxattr(m / "file", "system.posix_acl_access", b"\x02\0\0\0")
    assert err.value.errno == errno.EOPNOTSUPP
    os.setxattr(m / "file", "user.gone", b"1")
    os.removexattr(m / "file", "user.gone")
    remount_cold(drive)
    assert os.readlink(m / "link") == "../some/where \xff".encode(
        "utf-8", "surrogateescape"
    ).decode("utf-8", "surrogateescape")
    assert os.readlink(m / "abs") == "/absolute/target"
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(m / "fifo").st_mode) == 0o640
    st = os.stat(m / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listxattr(m / "file")) == ["user.colour", "user.empty"]
    assert os.getxattr(m / "file", "user.colour") == b"blue"
    assert os.getxattr(m / "file", "user.empty") == b""
    drive.umount()


def test_a_missing_selinux_label_is_unsupported_so_ls_asks_once(
    drive: Drive, tmp_path: Path
) -> None:
    """``ls -l`` asks every entry for its SELinux label. A file without one
    answers EOPNOTSUPP, which GNU ls remembers for the rest of the listing;
    ENODATA made it send a request per entry. A label given to a file is still kept
    (megafs/fs/operations.py)."""
    drive.mount()
    d = drive.mnt / "d"
    d.mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"x")
    with pytest.raises(OSError) as err:
        os.getxattr(d / "f1", "security.selinux")
    assert err.value.errno == errno.EOPNOTSUPP
    label = b"system_u:object_r:user_home_t:s0\0"
    os.setxattr(d / "f0", "security.selinux", label)
    trace = tmp_path / "ls.trace"
    out = run([need("strace"), "-o", trace, "-e", "trace=getxattr,lgetxattr", "ls", "-l", d])
    assert len(out.stdout.splitlines()) == 41  # "total" and the 40 files
    asked = [line for line in trace.read_text().splitlines() if "security.selinux" in line]
    assert len(asked) == 1, asked
    remount_cold(drive)
    assert os.listxattr(d / "f0") == ["security.selinux"]
    assert os.getxattr(d / "f0", "security.selinux") == label
    os.removexattr(d / "f0", "security.selinux")
    with pytest.raises(OSError) as err:
        os.getxattr(d / "f0", "security.selinux")
    assert err.value.errno == errno.EOPNOTSUPP
    drive.umount()


def test_rename_flags_and_odd_names(drive: Drive) -> None:
    drive.mount()
    m = drive.mnt
    odd = [b"x" * 255, b"\xff\xfe not utf-8", b"-leading dash", b"new\nline", b" spaced "]
    for name in odd:
        with open(os.path.join(os.fsencode(m), name), "wb") as f:
            f.write(name)
    (m / "one").write_text("1")
    (m / "two").write_text("2")
    with pytest.raises(OSError) as err:
        renameat2(m / "one", m / "two", RENAME_NOREPLACE)
    assert err.value.errno == errno.EEXIST
    renameat2(m / "one", m / "two", RENAME_EXCHANGE)
    assert (m / "one").read_text() == "2" and (m / "two").read_text() == "1"
    (m / "d1").mkdir()
    (m / "d1" / "sub").mkdir()
    with pytest.raises(OSError) as err:
        os.rename(m / "d1", m / "d1" / "sub" / "inside")
    assert err.value.errno == errno.EINVAL
    (m / "d2").mkdir()
    os.rename(m / "d2", m / "d1" / "sub")  # over an empty directory
    with pytest.raises(OSError) as err:
        os.mkdir(m / ("y" * 256))
    assert err.value.errno == errno.ENAMETOOLONG
    remount_cold(drive)
    names = set(os.listdir(os.fsencode(m)))
    for name in odd:
        assert name in names
        with open(os.path.join(os.fsencode(m), name), "rb") as f:
            assert f.read() == name
    assert (m / "one").read_text() == "2" and (m / "two").read_text() == "1"
    assert os.listdir(m / "d1") == ["sub"] and os.listdir(m / "d1" / "sub") == []
    drive.umount()


def test_shared_writable_mmap_reaches_the_server(drive: Drive) -> None:
    import mmap

    drive.mount()
    path = drive.mnt / "mapped.bin"
    path.write_bytes(bytes(3 << 20))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[10:20] = b"0123456789"
        mm[(2 << 20) + 5 : (2 << 20) + 10] = b"HELLO"
        mm.flush()  # msync
    fd = os.open(path, os.O_RDWR)
    with mmap.mmap(fd, 0) as mm:  # a map closed without msync
        mm[-3:] = b"end"
    os.close(fd)
    remount_cold(drive)
    data = path.read_bytes()
    assert data[10:20] == b"0123456789"
    assert data[(2 << 20) + 5 : (2 << 20) + 10] == b"HELLO"
    assert data[-3:] == b"end"
    assert len(data) == 3 << 20
    drive.umount()


def test_block_size_is_one_chunk(drive: Drive) -> None:
    """cp and Python size their buffers by st_blksize: one chunk per write."""
    drive.mount()
    (drive.mnt / "f").write_bytes(b"x" * 10)
    assert os.stat(drive.mnt / "f").st_blksize == CHUNK_SIZE
    remount_cold(drive)
    assert os.stat(drive.mnt / "f").st_blksize == CHUNK_SIZE
    drive.umount()
