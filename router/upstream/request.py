"""The raw bytes of a proxied request: each replica's parsed target, request lines and forwarded headers.

Everything that does not change from one request to the next (the URL's host, port and
scheme, the request line and `Host` header of each proxied path) is parsed and encoded once,
when the replica set is built, so a request only formats its headers and length into bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from yarl import URL

__all__ = ["COMPLETION_PATHS", "HOP_BY_HOP", "UpstreamTarget", "forward_headers", "url_host"]

# Every path the router proxies (router.wire.ENDPOINTS): request lines are built once per replica.
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
"""The OpenAI-compatible paths the router proxies to a replica."""

# RFC 9110 hop-by-hop headers, plus ones the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
        "Host",
        "Content-Length",
        "Accept-Encoding",
    )
)
"""Headers that are not passed on, in either direction (lower case)."""
_HOP_BY_HOP_AND_TYPE = HOP_BY_HOP | {"content-type", "content-encoding"}


def url_host(host: str) -> str:
    """`host` as it goes into a URL or a ZMQ tcp:// endpoint (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def forward_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """The client's end-to-end headers as request-head lines.

    Not forwarded: the hop-by-hop headers, every header the `Connection` header names (RFC 9110
    §7.6.1), `Content-Type` and `Content-Length` (the proxy sets them) and `Content-Encoding`
    (the server inflated the body, so the forwarded body is plain).
    """
    items = list(headers)
    drop = _HOP_BY_HOP_AND_TYPE
    named = [v for k, v in items if k.lower() == "connection"]
    if named:
        drop = drop | {t.strip().lower() for v in named for t in v.split(",") if t.strip()}
    # aiohttp decoded the header bytes as UTF-8 with surrogateescape: encode them back alike.
    return "".join(f"{k}: {v}\r\n" for k, v in items if k.lower() not in drop).encode("utf-8", "surrogateescape")


class UpstreamTarget:
    """One replica endpoint parsed once: the pool's connection key and a request line per path."""

    __slots__ = ("host", "port", "tls", "_lines")

    def __init__(self, url: str, paths: Iterable[str] = COMPLETION_PATHS) -> None:
        """Parse `url` (http:// or https:// with a host); raises ValueError otherwise."""
        u = URL(url)
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError(f"url must be http:// or https:// with a host, not {url!r}")
        self.host: str = u.host
        self.tls = u.scheme == "https"
        self.port: int = u.port or (443 if self.tls else 80)
        base = u.path.rstrip("/")
        host_header = u.host if u.is_default_port() else f"{u.host}:{self.port}"
        self._lines = {path: f"POST {base}{path} HTTP/1.1\r\nHost: {host_header}\r\n".encode() for path in paths}

    def head(self, path: str, headers: bytes, body_length: int) -> bytes:
        """The request head of a JSON POST to `path`: request line, Host, `headers`, type and length."""
        return b"%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            self._lines[path],
            headers,
            body_length,
        )
