"""A lean HTTP/1.1 client for the proxy's one job: POST a JSON body to a replica, relay the answer.

Why not a general client: measured against an instant replica, aiohttp's client costs about
80 µs of CPU per request and a raw keep-alive connection about 25 µs (httpx about 700 µs;
`bench/router_overhead.py` prints the comparison). The router's request path is nothing but
that call, so the general machinery (cookies, redirects, proxies, compression, multipart,
tracing, URL parsing) is paid for on every request for nothing. This module does only what the
proxy needs, and does it completely:

- keep-alive connection pools per replica (LIFO, bounded idle count), stale idle connections
  detected and dropped; a request that fails on a *reused* connection before any response byte
  is re-sent once on a fresh connection (the server had closed the idle connection);
- one `write` per request (head and body together), `TCP_NODELAY` as asyncio sets it;
- response framing by `Content-Length`, `Transfer-Encoding: chunked` (trailers skipped) or
  connection close; no body for 1xx/204/304; interim 1xx responses skipped;
- streaming: `readany()` returns body data as it arrives (chunk framing removed), with
  back-pressure (reading pauses while more than 1 MiB waits for the consumer);
- one deadline per request (`timeout_s`) covering connect, head and body, armed with a single
  timer; `ConnectTimeout`/`ReadTimeout` when it fires;
- `close()` drops the connection at once, so a cancelled client cancels the replica's work.

Errors: `UpstreamConnectError` (could not connect), `UpstreamDisconnected` (connection lost
before the response head, or mid-body), `UpstreamProtocolError` (not HTTP/1.x), all subclasses
of `UpstreamClientError`; timeouts raise `asyncio.TimeoutError`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

__all__ = [
    "UpstreamClientError",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
]

_MAX_HEAD = 64 * 1024
_HIGH_WATER = 1 << 20
_LOW_WATER = 256 * 1024


class UpstreamClientError(Exception):
    """Base of the upstream client's errors (timeouts are `asyncio.TimeoutError`)."""


class UpstreamConnectError(UpstreamClientError):
    """The replica could not be connected to."""


class UpstreamDisconnected(UpstreamClientError):
    """The connection was lost before the answer was complete."""


class UpstreamProtocolError(UpstreamClientError):
    """The replica did not answer in HTTP/1.x."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0  # requests sent on this connection
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._got_bytes = False
        self._head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = True
        self._mode = ""  # "length" | "chunked" | "close" | "none"
        self._remaining = 0
        self._chunk_state = "size"
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self.eof = False
        self.exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._buf += data
        try:
            self._parse()
        except UpstreamProtocolError as exc:
            if self._head is not None and not self._head.done():
                self._head.set_exception(exc)
            else:
                self._fail(exc)
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is not None and not self._head.done():
            self._head.set_exception(UpstreamDisconnected("connection closed before the response head"))
            return
        if self._mode == "close" and exc is None:
            self.eof = True
            self._wake()
        elif not self.eof:
            self._fail(UpstreamDisconnected("connection closed mid-answer"))

    def pause_writing(self) -> None:  # a request body is written in one go; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- request side --------------------------------------------------------------------
    def send(self, data: bytes, deadline: float) -> asyncio.Future[None]:
        """Write a request; returns a future resolved when the response head has arrived."""
        self._reset()
        self.used += 1
        self._head = self.loop.create_future()
        self._timer = self.loop.call_at(deadline, self._timed_out)
        assert self.transport is not None
        self.transport.write(data)
        return self._head

    @property
    def got_response_bytes(self) -> bool:
        return self._got_bytes

    def _timed_out(self) -> None:
        self._timer = None
        err = TimeoutError()
        if self._head is not None and not self._head.done():
            self._head.set_exception(err)
        else:
            self._fail(err)
        self.close()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.cancel_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing -------------------------------------------------------------------------
    def _parse(self) -> None:
        if self._head is not None and not self._head.done():
            if not self._parse_head():
                return
        if self._mode in ("length", "chunked", "close") and self._buf:
            self._parse_body()

    def _parse_head(self) -> bool:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise UpstreamProtocolError("response head over 64 KiB")
                return False
            head = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[: end + 4]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise UpstreamProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # interim response (100 Continue, 103 Early Hints): the real one follows
            headers = []
            length = None
            chunked = False
            keep_alive = parts[0] != "HTTP/1.0"
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise UpstreamProtocolError("malformed response header line")
                value = value.strip()
                low = name.lower()
                if low == "content-length":
                    if not value.isdigit():
                        raise UpstreamProtocolError("bad Content-Length")
                    length = int(value)
                elif low == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                elif low == "connection":
                    v = value.lower()
                    if "close" in v:
                        keep_alive = False
                    elif "keep-alive" in v:
                        keep_alive = True
                headers.append((name, value))
            self.status = status
            self.headers = headers
            if status in (204, 304):
                self._mode, self.eof = "none", True
            elif chunked:
                self._mode, self._chunk_state = "chunked", "size"
            elif length is not None:
                self._mode, self._remaining = "length", length
                if length == 0:
                    self.eof = True
            else:
                self._mode, keep_alive = "close", False
            self.keep_alive = keep_alive
            self._head.set_result(None)  # type: ignore[union-attr]
            return True

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _parse_body(self) -> None:
        buf = self._buf
        if self._mode == "length":
            take = min(self._remaining, len(buf))
            if take:
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
            if self._remaining == 0:
                self.eof = True
                self._wake()
            return
        if self._mode == "close":
            self._push(bytes(buf))
            buf.clear()
            return
        while buf:  # chunked
            st = self._chunk_state
            if st == "size":
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > 1024:
                        raise UpstreamProtocolError("chunk size line too long")
                    return
                size_text = bytes(buf[:nl]).split(b";", 1)[0].strip()
                del buf[: nl + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise UpstreamProtocolError("bad chunk size") from None
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._remaining, self._chunk_state = size, "data"
            elif st == "data":
                take = min(self._remaining, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = "crlf"
            elif st == "crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("chunk not followed by CRLF")
                del buf[:2]
                self._chunk_state = "size"
            else:  # trailer lines until an empty one
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                line_empty = nl == 0
                del buf[: nl + 2]
                if line_empty:
                    self.eof = True
                    self._wake()
                    return

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumer side ---------------------------------------------------------------------
    async def readany(self) -> bytes:
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self.exc is not None:
                raise self.exc
            if self.eof:
                return b""
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class UpstreamResponse:
    """A response being received. Read it with `read()` or `readany()`; then `release()` or `close()`."""

    __slots__ = ("_conn", "_pool", "_key", "status", "headers", "_done")

    def __init__(self, conn: _Conn, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self._conn = conn
        self._pool = pool
        self._key = key
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    def header(self, name: str, default: str = "") -> str:
        """First value of a header (case-insensitive)."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        return await self._conn.readany()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while True:
            data = await self._conn.readany()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def release(self) -> None:
        """Done with a fully read answer: the connection goes back to the pool if reusable."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.cancel_timer()
        if conn.eof and conn.exc is None and conn.keep_alive and not conn.closed and not conn._buf:
            self._pool._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection now (the replica sees the client go away)."""
        if self._done:
            return
        self._done = True
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections to replicas, keyed by (host, port)."""

    def __init__(self, *, connect_timeout_s: float = 5.0, max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._closed = False
        self._ssl: ssl.SSLContext | None = None

    def _put(self, key: tuple[str, int, bool], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            conn.close()
        else:
            idle.append(conn)

    async def _connect(self, key: tuple[str, int, bool], deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        timeout = min(self.connect_timeout_s, max(0.0, deadline - loop.time()))
        host, port, tls = key
        ctx = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()  # verifies certificates and host names
            ctx = self._ssl
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop), host, port, ssl=ctx, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect timed out after {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(getattr(exc, "strerror", None) or type(exc).__name__) from None
        return conn  # type: ignore[return-value]

    def _take_idle(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def post(
        self, host: str, port: int, head: bytes, body: bytes, *, timeout_s: float, tls: bool = False
    ) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in CRLF CRLF) and `body`; wait for the response head.

        `tls` connects with TLS (certificates and host names verified).

        Raises UpstreamConnectError, UpstreamDisconnected, UpstreamProtocolError or
        asyncio.TimeoutError. Cancelling the caller closes the connection.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        key = (host, port, tls)
        data = head + body
        conn = self._take_idle(key)
        for attempt in (0, 1):
            if conn is None:
                conn = await self._connect(key, deadline)
            reused = conn.used > 0
            fut = conn.send(data, deadline)
            try:
                await fut
            except UpstreamDisconnected:
                conn.close()
                if reused and attempt == 0 and not conn.got_response_bytes:
                    conn = None  # the server had closed this idle connection: once more, fresh
                    continue
                raise
            except BaseException:
                conn.close()  # timeouts, protocol errors, cancellation: never reuse
                raise
            return UpstreamResponse(conn, self, key)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every idle connection; later releases close theirs."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
