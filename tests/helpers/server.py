"""A real megafs server for tests: ``python -m megafs.server`` as a child
process on 127.0.0.1, found through the ``server.json`` it writes.

The first start picks a free port; later starts reuse it, so clients keep
their URL across :meth:`ServerProcess.stop` / :meth:`ServerProcess.kill`
and :meth:`ServerProcess.start`. The server's output goes to ``log_path``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import httpx

__all__ = ["ServerProcess", "running_server"]

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """One server on one data directory.

    ``url`` and ``port`` are known after the first :meth:`start`; ``args``
    are further server options (TLS, login limits).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        quota: int | None = None,
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.quota = quota
        self.args = list(args)
        self.host = host
        self.log_path = log_path or data_dir.with_name(data_dir.name + ".log")
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            raise RuntimeError("the server is already running")
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)  # left behind by a killed server
        args = [
            sys.executable,
            "-m",
            "megafs.server",
            "--data",
            str(self.data_dir),
            "--listen",
            f"{self.host}:{self.port}",
        ]
        if self.quota is not None:
            args += ["--quota", str(self.quota)]
        args += self.args
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = json.loads(info.read_text())
                if data["pid"] == self.proc.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        self.url = data["url"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for the graceful exit; returns the exit code."""
        assert self.proc is not None, "never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        assert self.proc is not None, "never started"
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        """Stop gracefully and start again on the same directory and port."""
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since(self, offset: int, timeout: float = 10) -> bytes:
        """The log from byte ``offset`` on, holding the line of every
        request answered before this call.

        The server writes a request's line once its answer is sent, so a
        client can see an answer before its line. This asks one more
        request, a path no route has, and waits for its line: the tasks
        that answered earlier ones have written theirs by then. That line
        and what follows it are left out.
        """
        mark = f"/v1/log-mark-{uuid.uuid4().hex}".encode()
        httpx.get(self.url + mark.decode(), timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read()
            at = text.find(mark)
            if at >= 0:
                return text[: text.rfind(b"\n", 0, at) + 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not log {mark.decode()} in {timeout} s")
            time.sleep(0.02)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(timeout=15)
            self.kill()


@contextlib.contextmanager
def running_server(
    data_dir: Path, *, quota: int | None = None, args: Sequence[str] = ()
) -> Iterator[ServerProcess]:
    """A started server, stopped (or killed) at the end whatever happens:
    the body of a pytest fixture."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with ServerProcess(data_dir, quota=quota, args=args) as server:
        yield server
