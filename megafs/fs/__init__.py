"""The FUSE filesystem: request handlers, the inode tree and the daemon."""

from megafs.fs.daemon import MountError, run_mount

__all__ = ["MountError", "run_mount"]
