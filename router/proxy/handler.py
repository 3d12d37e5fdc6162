"""The front of the request path: read, validate, features, clamp, tenant salt, prediction cache.

`Proxy.handle(request, path)` reads the body (bounded in size and time), checks `model` and the
prompt field, builds the request's features (prefix hashes, session id; in precise mode the
engine's tokens), clamps the output budget, salts the body per tenant (`cache_salt`), answers a
prediction-cache hit itself, and hands the rest as one `ProxyRequest` to `route.Dispatcher`.
Every exception is mapped here to its answer: a `RouterError` to its OpenAI-style JSON, a bug
to a 500 that leaks nothing, a client that went away to a counted cancellation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gpufleet.router import errors, guard, wire
from gpufleet.router.config import RouterSettings
from gpufleet.router.health import HealthTracker
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policies import Policy
from gpufleet.router.prediction_cache import (
    ANONYMOUS_TENANT,
    PredictionCache,
    RedisPredictionCache,
    cache_key,
    is_cacheable,
)
from gpufleet.router.prefix import features_from_body
from gpufleet.router.proxy.attempt import Attempts
from gpufleet.router.proxy.request import ProxyRequest
from gpufleet.router.proxy.responses import answer_from_cache, error_response
from gpufleet.router.proxy.route import Dispatcher
from gpufleet.router.replicas import ReplicaSet
from gpufleet.router.sessions import SessionBinder, scoped_session_id
from gpufleet.router.tenant import TenantResolver
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream import UpstreamPool
from gpufleet.router.upstream.request import forward_headers

if TYPE_CHECKING:
    from gpufleet.router.kvevents.runtime import KvEvents

__all__ = ["Proxy"]

log = logging.getLogger("gpufleet.router")

_CACHED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# The generating endpoints whose vLLM requests take `cache_salt` (embeddings keep no prefix cache).
_SALTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class Proxy:
    """The request pipeline over the router's shared state (replicas, policy, health, metrics, cache)."""

    def __init__(
        self,
        settings: RouterSettings,
        replicas: ReplicaSet,
        policy: Policy,
        metrics: RouterMetrics,
        health: HealthTracker,
        upstream: UpstreamPool,
        cache: PredictionCache | RedisPredictionCache | None,
        tenants: TenantResolver | None = None,
        sessions: SessionBinder | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.tenants = tenants or TenantResolver(settings.tenant)
        self.replicas = replicas
        self.metrics = metrics
        self.cache = cache
        self.attempts = Attempts(settings, replicas, policy, metrics, health, upstream, cache, sessions)
        self.dispatcher = Dispatcher(settings, policy, metrics, sessions, self.attempts)

    @property
    def kv(self) -> KvEvents | None:
        """Precise mode's parts (the server sets them on `attempts`), or None."""
        return self.attempts.kv

    def first_byte_deadline_s(self, req: ProxyRequest, r: ReplicaState) -> float:
        """Seconds the attempt on `r` may take to its first byte: `Attempts.first_byte_deadline_s`."""
        return self.attempts.first_byte_deadline_s(req, r)

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        """Handle POST /v1/chat/completions, /v1/completions, /v1/responses and /v1/embeddings."""
        cache_state: str | None = None
        try:
            raw, body = await self._read_json(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise errors.MalformedRequest("`model` is required and must be a string", param="model")
            group = self.replicas.by_model.get(model)
            if group is None:
                raise errors.UnknownModel(f"model {model!r} is not served by this fleet", param="model")
            chat = path.endswith("chat/completions")
            field = wire.ENDPOINTS[path][0]
            if chat and not isinstance(body.get("messages"), list):
                raise errors.MalformedRequest("`messages` must be a list", param="messages")
            if not chat and not isinstance(body.get(field), (str, list)):
                raise errors.MalformedRequest(f"`{field}` must be a string or a list", param=field)
            stream = body.get("stream") is True
            s = self.settings
            tenant = self.tenants.tenant(request.headers, _peer(request))
            salted = tenant is not None and s.tenant_isolation == "kv" and path in _SALTED_PATHS
            salt = self.tenants.salt(tenant) if salted and tenant is not None else None
            features = features_from_body(
                body,
                model=model,
                block_size_tokens=s.block_size_tokens,
                chars_per_token=s.chars_per_token,
                session_id=scoped_session_id(tenant, wire.session_id(request.headers, body, s.session)),
                salt=salt,
            )
            if self.kv is not None:  # precise mode: the engine's tokens and block keys
                features = await self.kv.refine(body, features, salt=salt, tenant=tenant)
            if features.session_id is not None and self.sessions is not None:
                token = request.headers.get(s.session.token_header)
                features.session_replica = await self.sessions.resolve(token, features.session_id)
            reencode = wire.clamp_output(body, features.prompt_tokens, group.max_model_len, path)

            key = None
            # Answers are replayed in the chat/completions shapes: the other endpoints are not cached.
            if self.cache is not None and path in _CACHED_PATHS and is_cacheable(body):
                if "no-cache" in request.headers.get("Cache-Control", "").lower():
                    cache_state = "bypass"
                elif tenant is None and s.prediction_cache.require_tenant:
                    cache_state = "bypass"  # anonymous answers would be shared by every anonymous client
                else:
                    scope = ANONYMOUS_TENANT if s.tenant_isolation == "none" or tenant is None else tenant
                    key = cache_key(scope, model, body, path=path)
                    hit = await self.cache.lookup(key)
                    if hit is not None:
                        self.metrics.cache.labels("hit").inc()
                        return await answer_from_cache(request, hit, body, stream, hide_cached=s.hide_cached_tokens)
                    cache_state = "miss"
                self.metrics.cache.labels(cache_state).inc()
            if salt is not None:
                # After the cache key (a salt differs per router without a shared key; the
                # tenant is in the key already). A client's own cache_salt is replaced.
                reencode = reencode or "cache_salt" in body
                body["cache_salt"] = salt
                if not reencode:
                    raw = _append_field(raw, "cache_salt", salt)
            if reencode:
                raw = json.dumps(body, separators=(",", ":")).encode()
            budget = wire.output_budget(body, features.prompt_tokens, group.max_model_len, path)
            req = ProxyRequest(
                request,
                path,
                features,
                group,
                raw,
                forward_headers(request.headers.items()),
                stream,
                key,
                cache_state,
                budget,
            )
            return await self.dispatcher.route(req)
        except errors.RouterError as exc:
            self.metrics.rejections.labels(str(exc.status)).inc()
            extra = {"x-gpufleet-cache": cache_state} if cache_state else None
            resp = error_response(exc, extra)
            if isinstance(exc, errors.RequestTimeout):
                # Answer and close now: waiting for the rest of a late body (aiohttp lingers) is
                # what the timeout is there to stop, and it must not be read as the next request.
                resp.force_close()
                await resp.prepare(request)
                await resp.write_eof()
                if request.transport is not None:
                    request.transport.close()
            return resp
        except asyncio.CancelledError:
            # The client disconnected (handler cancellation): the upstream request was dropped too.
            self.metrics.cancelled.labels("disconnect").inc()
            log.debug("request to %s cancelled: the client went away", path)
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # the client went away mid-answer: nothing left to tell it
            self.metrics.cancelled.labels("write_failed").inc()
            log.debug("request to %s cancelled: the client closed the connection mid-answer", path)
            raise
        except Exception as exc:
            # A bug of ours must still answer in the API's shape, and must not leak details; the
            # traceback is logged at most once per kind of error per interval.
            key = "bug:" + type(exc).__name__
            guard.CLIENT_ERRORS.line(logging.ERROR, key, "unexpected error while proxying %s", path, exc_info=True)
            self.metrics.rejections.labels("500").inc()
            return error_response(errors.RouterError("internal router error"))

    async def _read_json(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.BodyTooLarge(f"request body is over the limit of {limit} bytes")
        timeout_s = self.settings.server.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()  # the app's client_max_size is the same limit
        except web.HTTPRequestEntityTooLarge:
            raise errors.BodyTooLarge(f"request body is over the limit of {limit} bytes") from None
        except TimeoutError:
            raise errors.RequestTimeout(f"the request body did not arrive within {timeout_s:g}s") from None
        except (RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError, aiohttp.ClientPayloadError) as exc:
            # a body that does not inflate (Content-Encoding) or breaks its chunked framing
            cause = exc.__cause__ or exc
            what = getattr(cause, "message", None) or str(cause) or type(cause).__name__
            raise errors.MalformedRequest(f"request body could not be read: {str(what).strip()[:160]}") from None
        return raw, wire.parse_body(raw)


def _peer(request: web.Request) -> str | None:
    """The TCP peer's address (never a forwarded-for header: a client can write those)."""
    t = request.transport
    peer = t.get_extra_info("peername") if t is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def _append_field(raw: bytes, name: str, value: str) -> bytes:
    """`raw` (a JSON object) with one more string field at its end, without re-encoding it."""
    end = raw.rstrip()
    if not end.endswith(b"}"):  # cannot happen for a parsed object; never guess
        raise ValueError("not a JSON object")
    inner = end[:-1].rstrip()
    sep = b"" if inner.endswith(b"{") else b","
    return inner + sep + json.dumps(name).encode() + b":" + json.dumps(value).encode() + b"}"
