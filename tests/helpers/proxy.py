"""A man-in-the-middle for tests: a reverse HTTP proxy between a real megafs
client (``RemoteClient``, the CLI, a mount daemon) and a real megafs server.

The threat model (docs/security.md) says the server and
the network are the attacker: they may read everything, answer anything,
replay old answers, drop, reorder, and answer two devices differently. This
proxy lets a test *be* that attacker without touching megafs itself: the
client talks HTTP to the proxy exactly as to a server, and the test decides,
per request, what comes back. It runs in a daemon thread on 127.0.0.1 (an
ephemeral port) and speaks plain HTTP/1.1 with keep-alive on both sides.

Quick start::

    with running_proxy(server.url) as proxy:
        client = RemoteClient(proxy.url)           # talks to the proxy
        proxy.on(handler, method="GET", path=r"/v1/nodes/[0-9a-f]{32}/children")
        proxy.faults(drop=0.1, delay=(0, 0.5), reset=0.05, error5xx=0.1,
                     truncate=0.05, seed=7)        # flaky network (crash tests)
        ...
        proxy.clear()                              # hooks and faults off
        proxy.records                              # every exchange so far

Hooks
-----
``proxy.on(handler, *, method=None, path=None, client=None, times=None)``
installs a :data:`Handler` for requests that match (``path`` is a regular
expression matched in full against the path without the query string;
``client`` is a listener label, see below). It returns a :class:`Hook`
(``.calls``, ``.remove()``); ``times=n`` removes it after n uses.
``proxy.on(method=..., path=...)`` without a handler is a decorator. Hooks
stack: the newest matching hook is called first, and its ``forward`` goes
through the next older matching one before reaching the server, so two
tamperings of one listing compose. A handler is called in the proxy's
thread as ``handler(request, forward)`` and returns one of:

- ``None``: pass the request through unchanged;
- a :class:`ProxyResponse`: send it. ``forward()`` sends the request (or a
  changed one, ``forward(request.replace(body=...))``) to the real server
  and returns its answer, which the handler may change first:
  ``forward().with_json(lambda v: {**v, "version": 1})``,
  ``.replace(status=..., headers=..., body=...)``; or answer without the
  server at all: a replayed ``proxy.records[i].response``, or
  ``ProxyResponse.json_answer(...)``;
- a :class:`Fault`: break the transport instead (see below).

Faults
------
:class:`Drop` (close without answering), :class:`Reset` (TCP RST),
:class:`Truncate` (announce the whole body, send part of it, close),
:class:`Error` (a 5xx answer), :class:`Delay` (wait, then go on). ``Drop``,
``Reset`` and ``Error`` take ``after_server=True`` to forward first, so the
server acts on the request and only its answer is lost: the case where
idempotent retries matter. ``proxy.faults(...)`` draws faults at random for
every request (or those matching ``method``/``path``) not taken by a hook:
each request is delayed by ``uniform(*delay)`` seconds, then gets at most one
of drop, reset, error5xx, truncate with the given probabilities; a drop,
reset or 5xx happens after the server acted with probability
``after_server``. ``seed`` makes the draws reproducible (as far as thread
scheduling allows). ``proxy.clear()`` removes hooks and faults.

Clients
-------
Every request carries ``request.client``: the label of the listener it came
in on (``proxy.url`` is ``"default"``; ``proxy.url_for("laptop")`` opens
another listener labelled ``"laptop"``, so two devices pointed at two URLs
can be told apart whatever they send), overridden by an ``X-Proxy-Client``
request header; and ``request.token``, the bearer token, if any.

Records
-------
``proxy.records`` lists every exchange in arrival order: method, path (with
query), client, token, request headers and body, response status, headers
and body as sent to the client (None when a fault cut it), and the fault
(``None``, or its kind: ``"drop"``, ``"reset"``, ``"truncate"``,
``"error"``). ``proxy.find(method, path)`` filters them; ``proxy.forget()``
empties the list; ``proxy.statistics()`` counts requests and faults.

When the server cannot be reached the proxy answers 502, as a real reverse
proxy does, so a client sees the same thing as behind nginx. A request
whose body its client stopped sending (killed mid-upload) is not forwarded
at all, as no real proxy forwards an incomplete message; ``statistics()``
counts it as ``incomplete``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "Delay",
    "Drop",
    "Error",
    "Fault",
    "FaultPlan",
    "Forward",
    "Handler",
    "Hook",
    "Proxy",
    "ProxyRequest",
    "ProxyResponse",
    "Record",
    "Reset",
    "Truncate",
    "running_proxy",
]

#: Headers that describe one hop, not the message: never copied across.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
#: A request body larger than this is refused (the server's own limit is
#: lower); it keeps a runaway client from exhausting the test's memory.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
CLIENT_HEADER = "X-Proxy-Client"
DEFAULT_CLIENT = "default"


def _get_header(headers: list[tuple[str, str]], name: str) -> str | None:
    lowered = name.lower()
    return next((v for k, v in headers if k.lower() == lowered), None)


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the client sent it. ``path`` includes the query."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    client: str

    @property
    def route(self) -> str:
        """The path without the query string."""
        return self.path.split("?", 1)[0]

    @property
    def token(self) -> str | None:
        value = self.header("Authorization")
        if value is None or not value.startswith("Bearer "):
            return None
        return value[len("Bearer ") :]

    def header(self, name: str) -> str | None:
        return _get_header(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body)

    def replace(self, **changes: Any) -> ProxyRequest:
        return replace(self, **changes)

    def with_json(self, value: Any) -> ProxyRequest:
        return self.replace(body=json.dumps(value).encode())


@dataclass(frozen=True)
class ProxyResponse:
    """An answer; ``Content-Length`` is computed when it is sent."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return _get_header(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body)

    def replace(self, **changes: Any) -> ProxyResponse:
        return replace(self, **changes)

    def with_json(self, value: Any | Callable[[Any], Any]) -> ProxyResponse:
        """The same answer with a JSON body: ``value``, or ``value(old)``
        for a function (tamper with one field, re-encode)."""
        if callable(value):
            value = value(self.json())
        return self.replace(body=json.dumps(value).encode())

    def with_body(self, body: bytes) -> ProxyResponse:
        return self.replace(body=body)

    @classmethod
    def json_answer(cls, value: Any, status: int = 200) -> ProxyResponse:
        return cls(status, [("Content-Type", "application/json")], json.dumps(value).encode())


class Fault:
    """A transport failure instead of (or after) an answer."""

    kind = "fault"


@dataclass(frozen=True)
class Drop(Fault):
    """Close the connection without answering (FIN). ``after_server``: the
    request reaches the server first, only the answer is lost."""

    after_server: bool = False
    kind = "drop"


@dataclass(frozen=True)
class Reset(Fault):
    """Abort the connection with a TCP RST (SO_LINGER 0)."""

    after_server: bool = False
    kind = "reset"


@dataclass(frozen=True)
class Truncate(Fault):
    """Forward, then send the answer's headers (with its full length) and
    only ``keep`` of its body (a fraction if below 1, else bytes), and
    close."""

    keep: float = 0.5
    kind = "truncate"


@dataclass(frozen=True)
class Error(Fault):
    """Answer ``status`` (a server error) with a JSON error body."""

    status: int = 503
    after_server: bool = False
    kind = "error"


@dataclass(frozen=True)
class Delay(Fault):
    """Wait ``seconds``, then handle the request as if there were no hook."""

    seconds: float = 0.1
    kind = "delay"


class Forward(Protocol):
    """Sends a request (the original by default) to the server."""

    def __call__(self, request: ProxyRequest | None = None) -> ProxyResponse: ...


Handler = Callable[[ProxyRequest, Forward], "ProxyResponse | Fault | None"]


@dataclass
class Hook:
    """An installed handler; ``calls`` counts the requests it took."""

    handler: Handler
    method: str | None
    path: re.Pattern[str] | None
    client: str | None
    times: int | None
    calls: int = 0
    _owner: Proxy | None = None

    def matches(self, request: ProxyRequest) -> bool:
        return (
            (self.method is None or self.method == request.method)
            and (self.path is None or self.path.fullmatch(request.route) is not None)
            and (self.client is None or self.client == request.client)
        )

    def remove(self) -> None:
        if self._owner is not None:
            self._owner._remove_hook(self)


@dataclass
class FaultPlan:
    """Random faults, as ``Proxy.faults`` installs them."""

    drop: float = 0.0
    delay: tuple[float, float] = (0.0, 0.0)
    reset: float = 0.0
    error5xx: float = 0.0
    truncate: float = 0.0
    after_server: float = 0.5
    method: str | None = None
    path: re.Pattern[str] | None = None
    rng: random.Random = field(default_factory=random.Random)

    def draw(self, request: ProxyRequest) -> tuple[float, Fault | None]:
        """(delay in seconds, the fault or None) for one request."""
        if (self.method is not None and self.method != request.method) or (
            self.path is not None and self.path.fullmatch(request.route) is None
        ):
            return 0.0, None
        delay = self.rng.uniform(*self.delay) if self.delay[1] > 0 else 0.0
        roll = self.rng.random()
        late = self.rng.random() < self.after_server
        for probability, fault in (
            (self.drop, Drop(after_server=late)),
            (self.reset, Reset(after_server=late)),
            (self.error5xx, Error(self.rng.choice((500, 502, 503, 504)), after_server=late)),
            (self.truncate, Truncate(self.rng.uniform(0.0, 0.9))),
        ):
            if roll < probability:
                return delay, fault
            roll -= probability
        return delay, None


@dataclass(frozen=True)
class Record:
    """One exchange as the client saw it."""

    method: str
    path: str
    client: str
    token: str | None
    request_headers: list[tuple[str, str]]
    request_body: bytes
    status: int | None
    response_headers: list[tuple[str, str]]
    response_body: bytes | None
    fault: str | None

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def response(self) -> ProxyResponse:
        """The answer, to replay later (only for exchanges that had one)."""
        if self.status is None or self.response_body is None:
            raise ValueError("this exchange had no answer")
        return ProxyResponse(self.status, list(self.response_headers), self.response_body)

    def request_json(self) -> Any:
        return json.loads(self.request_body)

    def response_json(self) -> Any:
        return json.loads(self.response_body or b"")


class _FaultRaised(Exception):
    """A hook chose a fault; it travels out through the earlier hooks."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.kind)
        self.fault = fault


class _Aborted(Exception):
    """The exchange ended in a fault; the connection is gone."""


class Proxy:
    """The proxy; see the module docstring. Use as a context manager (or
    :func:`running_proxy`), or call :meth:`start` and :meth:`stop`."""

    def __init__(self, upstream: str, *, timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the proxy forwards to plain http:// servers, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.timeout = timeout
        self._lock = threading.Lock()
        self._hooks: list[Hook] = []
        self._plan: FaultPlan | None = None
        self._records: list[Record] = []
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._stats: dict[str, int] = {"requests": 0}

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The address of the default listener (``request.client ==
        "default"``)."""
        return self.url_for(DEFAULT_CLIENT)

    def url_for(self, client: str) -> str:
        """The address of the listener labelled ``client``, opened on first
        use: requests arriving there carry ``request.client == client``."""
        with self._lock:
            server = self._servers.get(client)
        if server is None:
            server = self._listen(client)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def start(self) -> Proxy:
        self.url_for(DEFAULT_CLIENT)
        return self

    def stop(self) -> None:
        """Close the listeners and every open connection."""
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
            sockets = list(self._sockets)
        for server in servers:
            server.shutdown()
            server.server_close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, client: str) -> ThreadingHTTPServer:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy
            label = client

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits for one poll
            name=f"proxy-{client}",
            daemon=True,
        )
        with self._lock:
            if client in self._servers:  # another thread was first
                server.server_close()
                return self._servers[client]
            self._servers[client] = server
            self._threads.append(thread)
        thread.start()
        return server

    # -- hooks and faults ------------------------------------------------------------

    def on(
        self,
        handler: Handler | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        client: str | None = None,
        times: int | None = None,
    ) -> Any:
        """Install ``handler`` for matching requests and return its
        :class:`Hook`; without ``handler``, a decorator that does so."""

        def install(fn: Handler) -> Hook:
            hook = Hook(
                fn,
                method.upper() if method else None,
                re.compile(path) if path is not None else None,
                client,
                times,
                _owner=self,
            )
            with self._lock:
                self._hooks.append(hook)
            return hook

        return install(handler) if handler is not None else install

    def faults(
        self,
        *,
        drop: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        reset: float = 0.0,
        error5xx: float = 0.0,
        truncate: float = 0.0,
        after_server: float = 0.5,
        seed: int | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> FaultPlan:
        """Random transport faults from now on (replacing earlier ones)."""
        if drop + reset + error5xx + truncate > 1:
            raise ValueError("fault probabilities add up to more than 1")
        plan = FaultPlan(
            drop=drop,
            delay=delay,
            reset=reset,
            error5xx=error5xx,
            truncate=truncate,
            after_server=after_server,
            method=method.upper() if method else None,
            path=re.compile(path) if path is not None else None,
            rng=random.Random(seed),
        )
        with self._lock:
            self._plan = plan
        return plan

    def clear(self) -> None:
        """Remove every hook and the random faults: a plain proxy again."""
        with self._lock:
            self._hooks.clear()
            self._plan = None

    def _remove_hook(self, hook: Hook) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._hooks.remove(hook)

    # -- records ---------------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """A copy of every exchange so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def find(self, method: str | None = None, path: str | None = None) -> list[Record]:
        """The records whose method is ``method`` and whose path without the
        query fully matches the regular expression ``path``."""
        pattern = re.compile(path) if path is not None else None
        return [
            r
            for r in self.records
            if (method is None or r.method == method.upper())
            and (pattern is None or pattern.fullmatch(r.route))
        ]

    def forget(self) -> None:
        with self._lock:
            self._records.clear()

    def statistics(self) -> dict[str, int]:
        """Requests seen and faults injected, by kind."""
        with self._lock:
            return dict(self._stats)

    # -- the exchange (called from handler threads) ------------------------------------

    def _choose(self, request: ProxyRequest) -> tuple[list[Hook], float, Fault | None]:
        """The hooks that match, newest first; when none does, the random
        delay and fault drawn for the request (under the lock, so a seeded
        plan draws in request order)."""
        with self._lock:
            self._stats["requests"] += 1
            hooks = [hook for hook in reversed(self._hooks) if hook.matches(request)]
            if hooks or self._plan is None:
                return hooks, 0.0, None
            delay, fault = self._plan.draw(request)
            return hooks, delay, fault

    def _called(self, hook: Hook) -> None:
        with self._lock:
            hook.calls += 1
            if hook.times is not None and hook.calls >= hook.times:
                with contextlib.suppress(ValueError):
                    self._hooks.remove(hook)

    def _count(self, kind: str) -> None:
        with self._lock:
            self._stats[kind] = self._stats.get(kind, 0) + 1

    def _record(
        self,
        request: ProxyRequest,
        answer: ProxyResponse | None,
        fault: str | None,
        sent_body: bytes | None = None,
    ) -> None:
        record = Record(
            method=request.method,
            path=request.path,
            client=request.client,
            token=request.token,
            request_headers=list(request.headers),
            request_body=request.body,
            status=answer.status if answer is not None else None,
            response_headers=list(answer.headers) if answer is not None else [],
            response_body=(
                sent_body if sent_body is not None else answer.body if answer is not None else None
            ),
            fault=fault,
        )
        with self._lock:
            self._records.append(record)


class _Upstream:
    """One keep-alive connection to the server, per client connection."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._conn: http.client.HTTPConnection | None = None

    def send(self, request: ProxyRequest) -> ProxyResponse:
        headers = {
            k: v
            for k, v in request.headers
            if k.lower() not in _HOP_BY_HOP and k.lower() not in ("host", CLIENT_HEADER.lower())
        }
        for attempt in range(2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self._proxy.upstream_host,
                    self._proxy.upstream_port,
                    timeout=self._proxy.timeout,
                )
            try:
                self._conn.request(
                    request.method, request.path, body=request.body or None, headers=headers
                )
                answer = self._conn.getresponse()
                body = answer.read()
                out = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
                if answer.will_close:
                    self.close()
                return ProxyResponse(answer.status, out, body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt:  # a kept-alive connection the server closed
                    return _bad_gateway()
            except OSError:
                self.close()
                return _bad_gateway()
        return _bad_gateway()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _bad_gateway() -> ProxyResponse:
    return ProxyResponse.json_answer(
        {"error": "remote", "detail": "the proxy could not reach the server"}, 502
    )


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: reads requests, asks the proxy what to do."""

    owner: Proxy
    label: str
    protocol_version = "HTTP/1.1"
    #: An idle client connection is closed after this long.
    timeout = 120

    def setup(self) -> None:
        super().setup()
        self._upstream = _Upstream(self.owner)
        with self.owner._lock:
            self.owner._sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self._upstream.close()
        with self.owner._lock:
            self.owner._sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the records say it all

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Aborted:
            self.close_connection = True
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def _dispatch(self) -> None:
        body = self._read_body()
        headers = list(self.headers.items())
        request = ProxyRequest(
            method=self.command,
            path=self.path,
            headers=headers,
            body=body,
            client=_get_header(headers, CLIENT_HEADER) or self.label,
        )
        hooks, delay, fault = self.owner._choose(request)
        action: ProxyResponse | Fault
        if hooks:
            try:
                action = self._through(hooks, request)
            except _FaultRaised as raised:
                action = raised.fault
        else:
            if delay:
                time.sleep(delay)
            action = fault if fault is not None else self._upstream.send(request)
        if isinstance(action, ProxyResponse):
            self._send(request, action)
        else:
            self._fault(request, action)

    def _through(self, hooks: list[Hook], request: ProxyRequest) -> ProxyResponse:
        """Hand ``request`` to the first hook; its ``forward`` goes to the
        next one, and the last one's to the server. A fault a later hook
        returns ends the exchange (``_FaultRaised``)."""
        if not hooks:
            return self._upstream.send(request)
        hook, rest = hooks[0], hooks[1:]
        self.owner._called(hook)
        action = hook.handler(request, lambda r=None: self._through(rest, r or request))
        if isinstance(action, Delay):
            self.owner._count("delay")
            time.sleep(action.seconds)
            action = None
        if action is None:
            return self._through(rest, request)
        if isinstance(action, Fault):
            raise _FaultRaised(action)
        return action

    # Every method goes through the same path.
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        """The whole request body. One the client stopped sending (it was
        killed, say) is incomplete, and an incomplete message is never
        forwarded (RFC 9112, section 8): the exchange ends here, as it does
        at any real proxy, instead of reaching the server as a whole,
        shorter request."""
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            parts: list[bytes] = []
            total = 0
            while True:
                try:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                except ValueError:
                    raise _Aborted() from None
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += size
                if total > _MAX_REQUEST_BYTES:
                    raise _Aborted()
                parts.append(self._read_exactly(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_REQUEST_BYTES:
            raise _Aborted()
        return self._read_exactly(length)

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size) if size else b""
        if len(data) < size:
            self.owner._count("incomplete")
            raise _Aborted()
        return data

    def _send(
        self,
        request: ProxyRequest,
        answer: ProxyResponse,
        *,
        cut: int | None = None,
        fault: str | None = None,
    ) -> None:
        body = answer.body
        no_body = request.method == "HEAD" or answer.status in (204, 304) or answer.status < 200
        sent = body if cut is None else body[:cut]
        # Recorded before the client can see the answer, so a test that got
        # its answer always finds the exchange in the records.
        self.owner._record(
            request, answer, "truncate" if cut is not None else fault, sent_body=sent
        )
        self.send_response_only(answer.status)
        for name, value in answer.headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() not in ("date", "server"):
                self.send_header(name, value)
        if not no_body:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not no_body:
            self.wfile.write(sent)
        self.wfile.flush()
        if cut is not None:
            self.owner._count("truncate")
            self._close_now()
            raise _Aborted()

    def _fault(self, request: ProxyRequest, fault: Fault) -> None:
        if isinstance(fault, Truncate):
            answer = self._upstream.send(request)
            keep = int(fault.keep * len(answer.body)) if fault.keep < 1 else int(fault.keep)
            self._send(request, answer, cut=min(keep, max(len(answer.body) - 1, 0)))
            return
        if isinstance(fault, Drop | Reset | Error) and fault.after_server:
            self._upstream.send(request)
        self.owner._count(fault.kind)
        if isinstance(fault, Error):
            answer = ProxyResponse.json_answer(
                {"error": "remote", "detail": "injected server error"}, fault.status
            )
            self._send(request, answer, fault="error")
            return
        self.owner._record(request, None, fault.kind)
        if isinstance(fault, Reset):
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        self._close_now()
        raise _Aborted()

    def _close_now(self) -> None:
        """Close for real: the buffered reader holds a reference to the
        socket, which would otherwise keep it open."""
        self.close_connection = True
        for stream in (self.wfile, self.rfile):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):
            self.connection.close()


@contextlib.contextmanager
def running_proxy(upstream: str) -> Iterator[Proxy]:
    """A started proxy in front of ``upstream``, stopped at the end."""
    proxy = Proxy(upstream)
    with proxy:
        yield proxy
