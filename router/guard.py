"""The router's HTTP server guard: connection limits, header timeouts, JSON for malformed HTTP, quiet logs.

aiohttp's server parses HTTP strictly (it refuses Content-Length with Transfer-Encoding, a
duplicate Content-Length, bare CR or LF line ends, obs-fold continuation lines and the HTTP/2
preface, all with a 400), but it answers those in plain text and logs a traceback for each, so
any client can fill the log; it keeps a connection that sends nothing open forever, and has no
bound on connections. `GuardedAppRunner` serves an app with:

- every protocol error answered as the API's JSON error (`{"error": {...}}`, code `bad_http`),
  with `Connection: close`, and at most one log line per kind of error per
  `RateLimitedLog.interval_s` (no traceback: it is the client's mistake);
- a *header timeout* (`server.header_timeout_s`): a connection must deliver a complete request
  head that long after it opened, or after its first byte on a kept-alive connection; then it
  gets a 408 and is closed (slowloris, idle sockets that never speak);
- an *idle timeout* (`server.idle_timeout_s`): a kept-alive connection idle between requests is
  closed (aiohttp's keep-alive timer);
- a *connection limit* (`server.max_connections`, clamped below the process's open-file limit):
  a connection over it gets a 503 and is closed at once, so the router keeps the descriptors it
  needs for its replicas;
- a bound on one header line (`server.max_header_bytes`; longer gets a 400).

The body timeout (`server.body_timeout_s`) is the request path's: `Proxy` reads a body under it.

This reads two attributes of aiohttp's `RequestHandler` that are not public API
(`_request_in_progress`, `_messages`: whether a request is being handled or queued); the tests
in tests/router/test_router_guard.py pin the behaviour, so an aiohttp upgrade that moves them fails
there, not in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gpufleet.router.config import ServerSettings

__all__ = ["GuardedAppRunner", "RateLimitedLog", "fd_limited_connections"]

log = logging.getLogger("gpufleet.router.guard")


class RateLimitedLog:
    """At most one line per key per `interval_s`; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *, clock: Any = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def line(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg % args` unless `key` logged within the interval; True when it was written."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) > 1024:  # bounded: keys are kinds of error, but never trust that
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg += " (%d similar in the last %gs not logged)"
            args = (*args, n, self.interval_s)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


CLIENT_ERRORS = RateLimitedLog(log)
"""The one rate-limited log of client mistakes seen by the server (malformed HTTP, timeouts, limits)."""


def _json_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response with the API's JSON error body, closing the connection."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


def fd_limited_connections(wanted: int, reserve: int = 256) -> int:
    """`wanted`, raising the soft open-file limit toward the hard one and clamping below it.

    `reserve` descriptors stay free for the replicas' connections, logs and health checks.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted + reserve
        if soft != resource.RLIM_INFINITY and soft < target:
            new = target if hard == resource.RLIM_INFINITY else min(target, hard)
            if new > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
    except (ValueError, OSError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


class _GuardedHandler(RequestHandler):
    """aiohttp's request handler with the guard's timers, limit and JSON errors."""

    _guard_server: _GuardedServer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        g = self._guard_server
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guard_counted = False
        if g.guard_open >= g.guard_max:
            CLIENT_ERRORS.line(logging.WARNING, "max_connections", "connection refused: %d open", g.guard_open)
            g.guard_refused += 1
            t = transport
            if isinstance(t, asyncio.WriteTransport):
                t.write(_json_error(503, "Service Unavailable", "too many connections", "too_many_connections"))
            transport.close()
            return
        g.guard_open += 1
        self._guard_counted = True
        self._guard_arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_guard_counted", False):
            self._guard_server.guard_open -= 1
            self._guard_counted = False
        self._guard_cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._guard_timer is None and not self._busy():
            self._guard_arm()  # the first byte of a new request on a kept-alive connection
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._guard_cancel()  # a complete head arrived

    def _busy(self) -> bool:
        return bool(self._request_in_progress or self._messages)

    def _guard_arm(self) -> None:
        self._guard_cancel()
        self._guard_timer = self._loop.call_later(self._guard_server.guard_settings.header_timeout_s, self._expired)

    def _guard_cancel(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _expired(self) -> None:
        self._guard_timer = None
        if self._busy() or self.transport is None:
            return  # a request is being handled: the body timeout is the handler's
        s = self._guard_server.guard_settings
        CLIENT_ERRORS.line(
            logging.INFO, "header_timeout", "closed a connection: no request head in %gs", s.header_timeout_s
        )
        self._guard_server.guard_timeouts += 1
        self.transport.write(
            _json_error(
                408, "Request Timeout", f"no complete request head within {s.header_timeout_s:g}s", "request_timeout"
            )
        )
        self.force_close()  # closes the transport (after the write is flushed) and drops it

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own exception log: a client's broken body is one quiet line, a bug a rate-limited traceback."""
        exc = kw.get("exc_info")
        msg = str(args[0]) if args else "error"
        if isinstance(exc, (RequestPayloadError, HttpProcessingError, ConnectionError)):
            cause = exc.__cause__ or exc
            CLIENT_ERRORS.line(logging.INFO, "payload:" + type(cause).__name__, "%s: %s", msg, type(cause).__name__)
        else:
            key = "5xx:" + (type(exc).__name__ if isinstance(exc, BaseException) else msg)
            CLIENT_ERRORS.line(logging.ERROR, key, msg, *args[1:], exc_info=isinstance(exc, BaseException))

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A protocol error (or a bug that escaped a handler): the API's JSON error, one quiet log line."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        kind = type(exc).__name__ if exc is not None else str(status)
        if status >= 500:
            CLIENT_ERRORS.line(logging.ERROR, "5xx:" + kind, "internal error handling a request: %s", kind)
            text, code = "internal router error", None
        else:
            first = (message or (exc and str(exc)) or "bad request").strip().splitlines()[0][:200]
            CLIENT_ERRORS.line(logging.INFO, "bad_http:" + kind, "malformed HTTP from a client: %s", first)
            text, code = f"malformed HTTP request: {first}", "bad_http"
        err = {
            "message": text,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None,
            "code": code,
        }
        resp = web.Response(status=status, body=json.dumps({"error": err}).encode(), content_type="application/json")
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    """aiohttp's low-level server making `_GuardedHandler`s (its class is swapped in by the runner)."""

    guard_settings: ServerSettings
    guard_max: int
    guard_open: int
    guard_refused: int
    guard_timeouts: int

    def __call__(self) -> RequestHandler:
        h = _GuardedHandler(self, loop=self._loop, **self._kwargs)
        h._guard_server = self
        return h


class GuardedAppRunner(web.AppRunner):
    """An `AppRunner` whose connections are guarded by `settings` (see the module docstring)."""

    def __init__(self, app: web.Application, settings: ServerSettings, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", settings.idle_timeout_s)
        kwargs.setdefault("max_line_size", settings.max_header_bytes)
        kwargs.setdefault("max_field_size", settings.max_header_bytes)
        super().__init__(app, **kwargs)
        self.guard_settings = settings

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # adds only __call__ and counters: the same object
        g: _GuardedServer = server  # type: ignore[assignment]
        g.guard_settings = self.guard_settings
        g.guard_max = fd_limited_connections(self.guard_settings.max_connections)
        g.guard_open = g.guard_refused = g.guard_timeouts = 0
        if g.guard_max < self.guard_settings.max_connections:
            log.warning(
                "server.max_connections %d lowered to %d by the open-file limit",
                self.guard_settings.max_connections,
                g.guard_max,
            )
        return g

    @property
    def guard(self) -> _GuardedServer | None:
        """The guarded server (open connections, refusals, timeouts), once set up."""
        server = self.server
        return server if isinstance(server, _GuardedServer) else None
