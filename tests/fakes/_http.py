"""A tiny threaded JSON HTTP server on 127.0.0.1:0 that the fakes route requests through."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["HttpError", "JsonServer", "Request", "Stream"]


class HttpError(Exception):
    """Raised by a route to answer with `status` and a JSON `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class Request:
    """What a route sees: path match groups, query (last value wins), parsed JSON body, headers."""

    def __init__(self, match: re.Match[str], query: dict[str, str], body: Any, headers: dict[str, str]) -> None:
        self.match = match
        self.query = query
        self.body = body
        self.headers = headers


class Stream:
    """Returned by a route to answer 200 with a chunked body: one JSON document per line, as the
    Kubernetes API server streams watch events. `events` is iterated outside the server's lock;
    it yields a dict to send or None (nothing to send yet: the server checks it is not stopping)."""

    def __init__(self, events: Iterator[dict[str, Any] | None]) -> None:
        self.events = events


Route = Callable[[Request], Any]


class JsonServer:
    """Routes `(method, path regex)` to handlers returning JSON-able data (status 200).

    Handlers run under one lock, so a fake's state changes are atomic per request. Every
    request is appended to `log` as (method, path) for tests that assert on calls made.
    """

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Route]] = []
        self.lock = threading.RLock()
        self.log: list[tuple[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, method: str, pattern: str, handler: Route) -> None:
        self._routes.append((method, re.compile(pattern + r"$"), handler))

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> JsonServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                status, payload = 404, {"error": {"code": 404, "message": f"no route {method} {parts.path}"}}
                with server.lock:
                    server.log.append((method, parts.path))
                    for m, pattern, handler in server._routes:
                        match = pattern.match(parts.path)
                        if m == method and match:
                            try:
                                status, payload = 200, handler(Request(match, query, body, dict(self.headers)))
                            except HttpError as exc:
                                status, payload = exc.status, exc.body
                            break
                if isinstance(payload, Stream):
                    self._stream(payload)
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, stream: Stream) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for event in stream.events:
                        if server._httpd is None:  # stopping
                            break
                        if event is None:
                            continue
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:  # the client went away
                    pass
                self.close_connection = True

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> JsonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
