"""One keep-alive HTTP/1.1 connection to a replica, its response parser, and the response object.

Why a protocol and not streams: `asyncio.Protocol` gets the bytes without a reader task or an
extra await per chunk, and the parser runs once per `data_received`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from gpufleet.router.upstream.pool import UpstreamPool

__all__ = [
    "Connection",
    "UpstreamClientError",
    "UpstreamConnectError",
    "UpstreamDisconnected",
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


class Connection(asyncio.Protocol):
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
        # create_connection always hands a stream (read/write) transport to a Protocol
        self.transport = cast(asyncio.Transport, transport)

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
        """Whether any byte of the current response arrived (a stale connection sends none)."""
        return self._got_bytes

    def _timed_out(self) -> None:
        self._timer = None
        err = TimeoutError()
        if self._head is not None and not self._head.done():
            self._head.set_exception(err)
        else:
            self._fail(err)
        self.close()

    def set_deadline(self, deadline: float) -> None:
        """Re-arm the request's deadline (the first byte came: the rest gets the request timeout)."""
        self.cancel_timer()
        if not self.closed:
            self._timer = self.loop.call_at(deadline, self._timed_out)

    def cancel_timer(self) -> None:
        """Disarm the request's deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Drop the connection now."""
        self.cancel_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing -------------------------------------------------------------------------
    def _parse(self) -> None:
        head = self._head
        if head is not None and not head.done():
            if not self._parse_head(head):
                return
        if self._mode in ("length", "chunked", "close") and self._buf:
            self._parse_body()

    def _parse_head(self, waiter: asyncio.Future[None]) -> bool:
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
            waiter.set_result(None)
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
        """The next piece of body data; b"" at its end; raises the connection's error."""
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

    def __init__(self, conn: Connection, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
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

    def set_deadline(self, deadline: float) -> None:
        """Move the request's deadline (loop time) for the rest of the answer."""
        self._conn.set_deadline(deadline)

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        return await self._conn.readany()

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
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
            self._pool.give_back(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection now (the replica sees the client go away)."""
        if self._done:
            return
        self._done = True
        self._conn.close()
