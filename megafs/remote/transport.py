"""HTTP/1.1 to one server over trio, with h11 reading and writing the
message heads: the transport under :class:`~megafs.remote.http.RemoteClient`.

Why not httpx's own client and pool: the daemon's cold sequential read is
bound by its event-loop thread, and a 1 MiB chunk download cost that
thread 3.1-3.8 ms through httpx (request and URL objects, cookies, the
pool's locks, h11 copying the body three times) against 1.4-1.6 ms here
(eight in flight); a request with a tiny answer 1.2-1.9 ms against
0.6-0.7 ms (docs/performance.md, "The HTTP client"). A body announced by
Content-Length, as every answer of the megafs server is, is received
straight into one buffer of its size; anything else (chunked, or ended by
the connection's close, as a proxy might answer) goes through h11's
events.

A large answer the caller takes as raw bytes (a chunk, a fetch of a
few) is received into a buffer of :class:`ReceiveBuffers`, reused once
nothing views it any more.

Idle connections are kept for :data:`KEEPALIVE_SECONDS` (shorter than the
server keeps them, ``megafs.server.run.KEEP_ALIVE_SECONDS``, so the server
never closes one under a request) and are not reused once they turned
readable: the server closed them, or sent something unasked.
"""

from __future__ import annotations

import ssl
import sys
from dataclasses import dataclass

import h11
import trio

__all__ = [
    "BodyTooLarge",
    "ReceiveBuffers",
    "Response",
    "Timeouts",
    "Transport",
    "TransportError",
    "TransportTimeout",
]

#: Seconds an idle connection may be reused.
KEEPALIVE_SECONDS = 5.0
#: Idle connections kept at most; more are closed when they finish.
MAX_IDLE = 20
#: Bytes asked of the socket at once while reading a head or an h11 body.
#: Small, so that little of a large body passes through h11's buffer: the
#: rest goes straight into its own (1 MiB through h11: +1.5 ms of CPU).
_RECEIVE_BYTES = 64 * 1024
#: A response head larger than this is refused (h11 checks it).
_MAX_HEAD_BYTES = 64 * 1024
#: A pooled answer (``request(pooled=True)``) of fewer bytes gets a
#: buffer of its own: glibc serves such sizes from its heaps anyway.
_POOLED_MIN = 1024 * 1024
#: Pooled buffers are sized in steps of this many bytes, so that answers
#: of about the same size (four chunks and their framing) share them.
_POOLED_STEP = 64 * 1024


class TransportError(Exception):
    """The exchange failed below HTTP: the connection was refused, reset or
    closed early, TLS failed, or the server's bytes were not HTTP. The
    request may or may not have reached the server."""


class TransportTimeout(TransportError):
    """A connection, a send, a receive or a free connection slot took
    longer than its timeout."""


class BodyTooLarge(Exception):
    """The answer's body is (or is announced as) larger than the caller
    allows for its status; the connection is closed, nothing more is read."""

    def __init__(self, status: int, cap: int) -> None:
        super().__init__(f"a {status} answer larger than {cap} bytes")
        self.status = status


@dataclass(frozen=True)
class Timeouts:
    """Seconds for each step, as httpx counts them: ``read`` bounds each
    wait for bytes, not the whole answer."""

    connect: float
    read: float
    write: float
    pool: float


@dataclass(frozen=True)
class Response:
    """A whole answer. ``headers`` are lowercased names to values; a name
    sent twice keeps its last value."""

    status: int
    headers: dict[bytes, bytes]
    #: A body of announced length is the buffer it was received into (a
    #: 1 MiB chunk is not copied again): a view of a reused one for a
    #: large pooled answer, else a bytearray; others are bytes.
    body: bytes | bytearray | memoryview


class ReceiveBuffers:
    """Buffers for large answers, reused once no view of them is left.

    A cold read receives its chunks about 4 MiB per answer. Each in a new
    buffer, that is memory glibc maps afresh (or grows its heap into
    again), and zero-filling it faulted in every page: 99 % of the
    daemon's page faults during a cold read (docs/performance.md, §6).
    These buffers stay mapped instead. Each is handed out only as a
    memoryview, and the views of an answer travel on (a fetch's chunks go
    to their readers, to decryption in a worker thread, to the cache file
    written behind the reader); whoever holds one keeps the buffer from
    being reused, because every view holds a reference to it. So a buffer
    referenced by this pool alone is free. At most ``count`` are kept; when
    all of them are in use, an answer gets a buffer of its own, as before.
    Used from the event-loop thread only.
    """

    def __init__(self, count: int = 4) -> None:
        self._count = count
        self._buffers: list[bytearray] = []
        self._free_refs = _refs_held_by_list_alone()

    def take(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes (their content is whatever
        the buffer held before)."""
        smallest: bytearray | None = None
        for buffer in self._buffers:
            if sys.getrefcount(buffer) == self._free_refs:
                if len(buffer) >= size:
                    return memoryview(buffer)[:size]
                if smallest is None or len(buffer) < len(smallest):
                    smallest = buffer
        fresh = bytearray(-(-size // _POOLED_STEP) * _POOLED_STEP)
        if len(self._buffers) < self._count:
            self._buffers.append(fresh)
        elif smallest is not None:
            # Free but too small: a larger one takes its place.
            self._buffers[self._buffers.index(smallest)] = fresh
        return memoryview(fresh)[:size]


def _refs_held_by_list_alone() -> int:
    """The reference count ``ReceiveBuffers.take`` reads for a buffer only
    its list holds, read the same way (the list, the loop's variable and
    the call's argument on CPython 3.11; interpreters that skip counting
    some of them read less, for a free buffer and a viewed one alike)."""
    refs = 0
    for buffer in [bytearray(1)]:
        refs = sys.getrefcount(buffer)
    return refs


class _Connection:
    """One socket (perhaps under TLS) and when it last finished an exchange."""

    __slots__ = ("idle_since", "sock", "stream")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        if isinstance(stream, trio.SSLStream):
            self.sock = stream.transport_stream.socket
        else:
            self.sock = stream.socket
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        """Still open, not expired, and silent since its last answer."""
        return now - self.idle_since < KEEPALIVE_SECONDS and not self.sock.is_readable()

    async def receive_into(self, view: memoryview) -> int:
        if isinstance(self.stream, trio.SSLStream):
            data = await self.stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)
        return await self.sock.recv_into(view)


class Transport:
    """Kept-alive HTTP/1.1 connections to one origin, ``max_connections``
    of them in use at most. One instance is shared by all of a client's
    tasks; :meth:`aclose` closes the idle connections and refuses new
    requests."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        headers: list[tuple[bytes, bytes]],
        max_connections: int = 100,
    ) -> None:
        """``ssl_context`` is required for https and unused for http;
        ``headers`` go with every request (after Host)."""
        if scheme == "https" and ssl_context is None:
            raise ValueError("https needs an SSL context")
        self._host = host
        self._port = port
        self._ssl = ssl_context if scheme == "https" else None
        default_port = 443 if scheme == "https" else 80
        authority = host if ":" not in host else f"[{host}]"
        if port != default_port:
            authority = f"{authority}:{port}"
        self._headers = [(b"Host", authority.encode("ascii")), *headers]
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False
        self._buffers = ReceiveBuffers()

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        *,
        timeouts: Timeouts,
        body_cap: int,
        error_cap: int,
        pooled: bool = False,
    ) -> Response:
        """Send one request and read its whole answer. A 2xx body may have
        ``body_cap`` bytes, any other ``error_cap``; a larger one raises
        BodyTooLarge. Raises TransportError (TransportTimeout) when the
        exchange fails.

        ``pooled``: the caller takes a 2xx body as raw bytes, so a large
        one may be a view of a reused buffer (:class:`ReceiveBuffers`),
        valid for as long as the caller keeps it."""
        if self._closed:
            raise TransportError("the client is closed")
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        all_headers = [*self._headers, *headers]
        if body is not None:
            all_headers.append((b"Content-Length", str(len(body)).encode("ascii")))
        pieces = [h.send(h11.Request(method=method, target=target, headers=all_headers))]
        if body:
            pieces += h.send_with_data_passthrough(h11.Data(data=body))
        pieces.append(h.send(h11.EndOfMessage()))
        caps = (body_cap, error_cap)
        with trio.move_on_after(timeouts.pool) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise TransportTimeout("no connection to the server was free in time")
        try:
            conn = self._take_idle() or await self._connect(timeouts.connect)
            try:
                response, reusable = await self._exchange(
                    conn, h, pieces, method, timeouts, caps, pooled
                )
            except BaseException:
                await trio.aclose_forcefully(conn.stream)
                raise
            if reusable and not self._closed and len(self._idle) < MAX_IDLE:
                conn.idle_since = trio.current_time()
                self._idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)
            return response
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Close the idle connections; later requests fail."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection that is still usable;
        the unusable ones met on the way are closed."""
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.sock.close()
        return None

    async def _connect(self, timeout: float) -> _Connection:
        try:
            with trio.fail_after(timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                if self._ssl is None:
                    return _Connection(tcp)
                tls = trio.SSLStream(
                    tcp, self._ssl, server_hostname=self._host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
                return _Connection(tls)
        except trio.TooSlowError:
            raise TransportTimeout("connecting to the server took too long") from None
        except (OSError, trio.BrokenResourceError) as exc:
            # trio says "all attempts failed" and keeps why in a group.
            group = exc.__cause__
            if isinstance(group, BaseExceptionGroup) and group.exceptions:
                exc = group.exceptions[-1]
            raise TransportError(f"cannot connect to the server: {reason(exc)}") from exc

    async def _exchange(
        self,
        conn: _Connection,
        h: h11.Connection,
        pieces: list[bytes],
        method: bytes,
        timeouts: Timeouts,
        caps: tuple[int, int],
        pooled: bool,
    ) -> tuple[Response, bool]:
        """Send the request ``h`` serialized into ``pieces`` on ``conn``
        and read its answer (``caps``: the most bytes of a 2xx body, and
        of any other; ``pooled``: see :meth:`request`); also whether the
        connection may carry another."""
        try:
            try:
                await self._send(conn, pieces, timeouts.write)
            except (OSError, trio.BrokenResourceError) as exc:
                # A server may refuse a request before reading all of
                # it (too large, over quota) and close: its answer says
                # why better than the broken pipe does.
                event = await self._head_after_failed_send(conn, h, timeouts.read, exc)
                send_failed = True
            else:
                event = await self._next_head(conn, h, timeouts.read)
                send_failed = False
            status = event.status_code
            fields = {name: value for name, value in event.headers}
            cap = caps[0] if 200 <= status < 300 else caps[1]
            length = fields.get(b"content-length")
            if (
                length is not None
                and b"transfer-encoding" not in fields
                and method != b"HEAD"
                and status not in (204, 304)
            ):
                size = int(length)
                if size > cap:
                    raise BodyTooLarge(status, cap)
                data: bytes | bytearray | memoryview
                if pooled and 200 <= status < 300 and size >= _POOLED_MIN:
                    data = self._buffers.take(size)
                else:
                    data = bytearray(size)
                clean = await self._read_sized(conn, h, memoryview(data), timeouts.read)
                reusable = clean and _keep_alive(event)
            else:
                data = await self._read_events(conn, h, status, cap, timeouts.read)
                reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
            reusable = reusable and not send_failed
        except h11.ProtocolError as exc:
            raise TransportError(f"the server's answer is not valid HTTP: {exc}") from exc
        except trio.TooSlowError:
            raise TransportTimeout("the server did not answer in time") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError(f"the connection to the server failed: {reason(exc)}") from exc
        return Response(status, fields, data), reusable

    @staticmethod
    async def _send(conn: _Connection, pieces: list[bytes], timeout: float) -> None:
        # A small request goes out in one segment; a large body is not
        # copied just to be joined to its head.
        if sum(map(len, pieces)) <= 64 * 1024:
            pieces = [b"".join(pieces)]
        with trio.fail_after(timeout):
            for piece in pieces:
                if piece:
                    await conn.stream.send_all(piece)

    @staticmethod
    async def _receive(conn: _Connection, h: h11.Connection, timeout: float) -> None:
        with trio.fail_after(timeout):
            data = await conn.stream.receive_some(_RECEIVE_BYTES)
        h.receive_data(data)  # b"": the server closed its side

    async def _head_after_failed_send(
        self, conn: _Connection, h: h11.Connection, timeout: float, failure: BaseException
    ) -> h11.Response:
        """The answer the server sent before it stopped reading, if any;
        else the send's own failure."""
        try:
            return await self._next_head(conn, h, timeout)
        except (h11.ProtocolError, TransportError, OSError, trio.BrokenResourceError):
            raise failure from None

    async def _next_head(
        self, conn: _Connection, h: h11.Connection, timeout: float
    ) -> h11.Response:
        """The final response head (1xx heads are skipped)."""
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                await self._receive(conn, h, timeout)
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("the server closed the connection without an answer")

    @staticmethod
    async def _read_sized(
        conn: _Connection, h: h11.Connection, view: memoryview, timeout: float
    ) -> bool:
        """Receive a body of announced length into ``view``; returns
        whether nothing followed it (else the connection is not reused)."""
        length = len(view)
        early, closed = h.trailing_data
        got = min(len(early), length)
        view[:got] = memoryview(early)[:got]
        while got < length:
            with trio.fail_after(timeout):
                n = await conn.receive_into(view[got:])
            if not n:
                raise TransportError("the server closed the connection in the middle of an answer")
            got += n
        return len(early) <= length and not closed

    async def _read_events(
        self, conn: _Connection, h: h11.Connection, status: int, cap: int, timeout: float
    ) -> bytes:
        """A body framed some other way (chunked, or up to the close),
        through h11."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                await self._receive(conn, h, timeout)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > cap:
                    raise BodyTooLarge(status, cap)
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("the server closed the connection in the middle of an answer")


def _keep_alive(event: h11.Response) -> bool:
    """Whether the server keeps the connection open after this answer, by
    HTTP/1.1's rules (h11 decides the same way for the bodies it reads)."""
    if event.http_version < b"1.1":
        return False
    for name, value in event.headers:
        if name == b"connection" and b"close" in value.lower().replace(b" ", b"").split(b","):
            return False
    return True


def reason(exc: BaseException) -> str:
    """The first non-empty message down the exception's causes: trio often
    wraps the telling one (a refused certificate, a reset) in an exception
    without text."""
    cause: BaseException | None = exc
    while cause is not None:
        if str(cause):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__
