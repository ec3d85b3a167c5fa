"""The FUSE filesystem: request handlers, the inode tree and the daemon."""

from megafs.fs.daemon import MountError, run_mount
from megafs.fs.status import canonical_mountpoint, status_dir, status_socket_path

__all__ = ["MountError", "canonical_mountpoint", "run_mount", "status_dir", "status_socket_path"]
