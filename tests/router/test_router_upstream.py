"""The lean upstream HTTP/1.1 client, against raw loopback servers that send exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gpufleet.router.upstream import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def replies(data: bytes, *, close: bool) -> Handler:
    """A server handler that reads one request, answers with exactly `data`, and maybe hangs up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return handler


def run(handler: Handler, client: Callable[[UpstreamPool, int], Awaitable[object]]) -> object:
    """Serve `handler` on a free loopback port and run `client(pool, port)` against it."""

    async def main() -> object:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(connect_timeout_s=2)
        try:
            return await client(pool, port)
        finally:
            await pool.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_content_length_answer_and_keep_alive_reuse() -> None:
    connections = []

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        connections.append(writer)
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}')
            await writer.drain()

    async def client(pool, port):  # type: ignore[no-untyped-def]
        bodies = []
        for _ in range(3):
            resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
            assert resp.status == 200 and resp.header("content-type") == "application/json"
            bodies.append(await resp.read())
            resp.release()
        return bodies

    assert run(handler, client) == [b'{"a":1}'] * 3
    assert len(connections) == 1  # one connection served all three


def test_chunked_answer_is_decoded_piece_by_piece_with_trailers_skipped() -> None:
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()

    async def client(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
        pieces = []
        while chunk := await resp.readany():
            pieces.append(chunk)
        resp.release()
        return pieces

    assert run(handler, client) == [b"data: one\n\n", b"data: two\n\n"]


def test_body_delimited_by_close_and_interim_100_skipped() -> None:
    handler = replies(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil the end", close=True)

    async def client(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
        body = await resp.read()
        resp.release()
        return resp.status, body

    assert run(handler, client) == (200, b"until the end")


def test_reused_connection_closed_before_answering_is_replaced_once_without_an_error() -> None:
    served = []
    connections = []

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        connections.append(1)
        first_connection = len(connections) == 1
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if first_connection:
            # the next request arrives just as the server gives up the idle connection
            await read_request(reader)
            writer.close()

    async def client(pool, port):  # type: ignore[no-untyped-def]
        out = []
        for _ in range(2):
            resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
            out.append(await resp.read())
            resp.release()
        return out

    assert run(handler, client) == [b"ok", b"ok"]
    assert len(served) == 2 and len(connections) == 2


def test_connection_lost_before_the_head_is_an_error_on_a_fresh_connection() -> None:
    handler = replies(b"", close=True)

    async def client(pool, port):  # type: ignore[no-untyped-def]
        with pytest.raises(UpstreamDisconnected):
            await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)

    run(handler, client)


def test_connection_lost_mid_body_raises_on_read() -> None:
    handler = replies(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", close=True)

    async def client(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
        with pytest.raises(UpstreamDisconnected):
            await resp.read()
        resp.close()

    run(handler, client)


def test_deadline_covers_head_and_body() -> None:
    async def slow_head(reader, writer):  # type: ignore[no-untyped-def]
        await read_request(reader)
        await asyncio.sleep(5)

    async def client_head(pool, port):  # type: ignore[no-untyped-def]
        with pytest.raises(asyncio.TimeoutError):
            await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=0.2)

    run(slow_head, client_head)

    async def slow_body(reader, writer):  # type: ignore[no-untyped-def]
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(5)

    async def client_body(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=0.3)
        with pytest.raises(asyncio.TimeoutError):
            await resp.read()
        resp.close()

    run(slow_body, client_body)


def test_not_http_is_a_protocol_error() -> None:
    handler = replies(b"SSH-2.0-OpenSSH\r\n\r\n", close=False)

    async def client(pool, port):  # type: ignore[no-untyped-def]
        with pytest.raises(UpstreamProtocolError):
            await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)

    run(handler, client)


def test_refused_connection_is_a_connect_error() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = UpstreamPool()
        with pytest.raises(UpstreamConnectError):
            await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=2)

    asyncio.run(main())


def test_closing_a_response_drops_the_connection_so_the_server_sees_it() -> None:
    result = {}

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        result["eof"] = await reader.read(1) == b""  # the client hung up

    async def client(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=5)
        assert await resp.readany() == b"first"
        resp.close()
        for _ in range(100):
            if "eof" in result:
                break
            await asyncio.sleep(0.01)

    run(handler, client)
    assert result == {"eof": True}


def test_slow_consumer_pauses_reading_and_still_gets_everything() -> None:
    total = 8 * 1024 * 1024

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()

    async def client(pool, port):  # type: ignore[no-untyped-def]
        resp = await pool.post("127.0.0.1", port, HEAD, b"{}", timeout_s=20)
        await asyncio.sleep(0.3)  # let the server push while nobody reads
        conn = resp._conn
        paused_at = conn._buffered
        got = len(await resp.read())
        resp.release()
        return paused_at, got

    paused_at, got = run(handler, client)
    assert got == total
    assert paused_at < 4 * 1024 * 1024  # reading paused near the 1 MiB high-water mark


def test_https_replica_is_verified_against_the_trusted_cas(tmp_path, monkeypatch) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        try:
            await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
        await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            untrusted = UpstreamPool()
            with pytest.raises(UpstreamConnectError):  # self-signed, not trusted: refused
                await untrusted.post("localhost", port, HEAD, b"{}", timeout_s=5, tls=True)
            await untrusted.close()
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the operator trusts this CA
            trusted = UpstreamPool()
            resp = await trusted.post("localhost", port, HEAD, b"{}", timeout_s=5, tls=True)
            assert await resp.read() == b"secure"
            resp.release()
            await trusted.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
