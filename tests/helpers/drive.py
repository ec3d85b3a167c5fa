"""A megafs user in tests: config dir, cache dir, account and mountpoint,
driven through the real ``megafs`` command line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Drive", "megafs"]

REPO = Path(__file__).resolve().parents[2]


def megafs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the megafs CLI as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "megafs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"megafs {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Drive:
    """One device of one account."""

    def __init__(
        self,
        root: Path,
        url: str,
        email: str = "alice@example.org",
        password: str = "correct horse battery staple",
    ) -> None:
        self.root = root
        self.url = url
        self.email = email
        self.config = root / "config"
        self.cache = root / "cache"
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.password_file = root / "password"
        self.password_file.write_text(password + "\n")

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return megafs("--config-dir", str(self.config), *args, check=check, timeout=timeout)

    def signup(self) -> None:
        self.cli("signup", self.url, self.email, "--password-file", str(self.password_file))

    def login(self) -> None:
        self.cli("login", self.url, self.email, "--password-file", str(self.password_file))

    def mount(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = self.cli(
            "mount",
            str(self.mnt),
            "--password-file",
            str(self.password_file),
            "--cache-dir",
            str(self.cache),
            *extra,
            check=check,
        )
        if check:
            assert os.path.ismount(self.mnt)
        return proc

    def umount(self, *extra: str, timeout: float = 180) -> None:
        self.cli("umount", str(self.mnt), *extra, timeout=timeout)
        assert not os.path.ismount(self.mnt)

    def drop_cache(self) -> None:
        """Forget the local cache, as on a new machine."""
        subprocess.run(["rm", "-rf", str(self.cache)], check=True)

    def daemon_log(self) -> str:
        try:
            return (self.cache / "daemon.log").read_text()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Teardown: never leave a mount behind, whatever the test did."""
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        deadline = time.monotonic() + 10
        while os.path.ismount(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid_dir = self.config / "mounts"
        if pid_dir.is_dir():
            import json

            for f in pid_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    os.kill(int(json.loads(f.read_text())["pid"]), 9)
