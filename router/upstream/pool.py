"""Keep-alive connection pools per replica, and `post`: one request, re-sent once on a stale connection."""

from __future__ import annotations

import asyncio
import ssl

from gpufleet.router.upstream.connection import (
    Connection,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamResponse,
)

__all__ = ["UpstreamPool"]


class UpstreamPool:
    """Keep-alive connections to replicas, keyed by (host, port)."""

    def __init__(self, *, connect_timeout_s: float = 5.0, max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self._closed = False
        self._ssl: ssl.SSLContext | None = None

    def give_back(self, key: tuple[str, int, bool], conn: Connection) -> None:
        """Keep a finished, reusable connection idle for the next request to `key` (or close it)."""
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            conn.close()
        else:
            idle.append(conn)

    async def _connect(self, key: tuple[str, int, bool], deadline: float) -> Connection:
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
                    lambda: Connection(loop), host, port, ssl=ctx, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect timed out after {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(getattr(exc, "strerror", None) or type(exc).__name__) from None
        return conn

    def _take_idle(self, key: tuple[str, int, bool]) -> Connection | None:
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

    def forget(self, host: str, port: int, tls: bool = False) -> None:
        """Close the idle connections to one endpoint (a replica that left); busy ones close on release."""
        for conn in self._idle.pop((host, port, tls), ()):
            conn.close()

    async def close(self) -> None:
        """Close every idle connection; later releases close theirs."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
