"""A lean HTTP/1.1 client for the proxy's one job: POST a JSON body to a replica, relay the answer.

Why not a general client: measured against an instant replica, aiohttp's client costs about
80 µs of CPU per request and a raw keep-alive connection about 25 µs (httpx about 700 µs;
`bench/router_overhead.py` prints the comparison). The router's request path is nothing but
that call, so the general machinery (cookies, redirects, proxies, compression, multipart,
tracing, URL parsing) is paid for on every request for nothing. This package does only what the
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
  timer; `TimeoutError` when it fires;
- `close()` drops the connection at once, so a cancelled client cancels the replica's work.

Errors: `UpstreamConnectError` (could not connect), `UpstreamDisconnected` (connection lost
before the response head, or mid-body), `UpstreamProtocolError` (not HTTP/1.x), all subclasses
of `UpstreamClientError`; timeouts raise `asyncio.TimeoutError`.

Modules: `connection` (one connection, its parser, `UpstreamResponse`, the errors), `pool`
(`UpstreamPool`), `request` (the bytes of a proxied request: `UpstreamTarget`, forwarded headers).
"""

from gpufleet.router.upstream.connection import (
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamResponse,
)
from gpufleet.router.upstream.pool import UpstreamPool

__all__ = [
    "UpstreamClientError",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
]
