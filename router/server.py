"""The router's HTTP server: an OpenAI-compatible proxy in front of vLLM / SGLang replicas.

`create_app(config)` builds an aiohttp application that owns, through its lifespan
(`cleanup_ctx`), the upstream connection pool (`gpufleet.router.upstream`, a lean HTTP/1.1
client: about a third of aiohttp's client cost per request), an aiohttp client session for the
active health checks, and the health-check task: no singletons, so tests and benchmarks build as
many routers as they like. `start(config, host, port)` runs it
on an `AppRunner` with handler cancellation, so a client that disconnects cancels the handler
and with it the upstream request.

Request path (`Router.proxy`): read the body (bounded) -> parse -> model -> features (prefix
hashes, session id) -> clamp `max_tokens` -> prediction cache -> `policy.choose` -> forward;
a connection error, a 5xx or a stream that closes before its first byte is retried on another
replica (at most `max_retries` times) and counts toward that replica's ejection.

Errors are raised as `gpufleet.router.errors` types and rendered as OpenAI-style JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from gpufleet.router import errors
from gpufleet.router.config import AdminToken, RouterConfig
from gpufleet.router.health import HealthChecker, HealthTracker
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policy import Policy, make_policy
from gpufleet.router.prediction_cache import (
    SSEAssembler,
    cache_key,
    is_cacheable,
    make_prediction_cache,
    replay_sse,
    tenant_of,
)
from gpufleet.router.prefix import features_from_body
from gpufleet.router.types import Decision, Outcome, ReplicaState, RequestFeatures
from gpufleet.router.upstream import UpstreamClientError, UpstreamPool, UpstreamResponse

__all__ = ["ROUTER_KEY", "Router", "create_app", "resolve_admin_token", "start"]

log = logging.getLogger("gpufleet.router")

ROUTER_KEY: web.AppKey[Router] = web.AppKey("gpufleet_router")

# RFC 9110 hop-by-hop headers, plus ones the proxy recomputes itself.
_HOP_BY_HOP = frozenset(
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
_HOP_BY_HOP_AND_TYPE = _HOP_BY_HOP | {"content-type"}
_SECRET_ENV_DEFAULT = "GPUFLEET_ADMIN_TOKEN"
_JSON = "application/json"


def resolve_admin_token(ref: AdminToken, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token named by `ref` (env var or file), or None when none is configured.

    A `secret` reference is mounted by the stacks as the GPUFLEET_ADMIN_TOKEN env var.
    """
    env = os.environ if environ is None else environ
    if ref.file is not None:
        try:
            token = Path(ref.file).read_text().strip()
        except OSError as exc:
            raise errors.ConfigError(f"admin token file {ref.file}: {exc.strerror or exc}") from None
    elif ref.env is not None:
        token = env.get(ref.env, "").strip()
    elif ref.secret is not None:
        token = env.get(_SECRET_ENV_DEFAULT, "").strip()
    else:
        token = ""
    return token or None


def _json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=_JSON, headers=headers)


def _error_response(exc: errors.RouterError, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = dict(exc.headers)
    if extra:
        headers.update(extra)
    return web.Response(status=exc.status, body=exc.to_body(), content_type=_JSON, headers=headers)


class _Retryable(Exception):
    """An attempt failed before any byte reached the client: try another replica."""


def _usage_numbers(usage: Any) -> tuple[int, int, int | None]:
    """(prompt tokens, completion tokens, cached tokens or None) from an OpenAI `usage` object."""
    if not isinstance(usage, dict):
        return 0, 0, None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        (int(cached) if isinstance(cached, int) else None),
    )


def _usage_from_sse_chunk(chunk: bytes) -> Any:
    """The `usage` object of an SSE chunk that carries one (cheap pre-check, then parse)."""
    if b'"usage"' not in chunk:
        return None
    found = None
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                ev = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("usage"):
                found = ev["usage"]
    return found


class Router:
    """The router's state: config, replica states, policy, caches, metrics, client session."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        policy: Policy | None = None,
        admin_token: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        s = self.settings = config.settings
        self.replicas: list[ReplicaState] = [
            ReplicaState(
                id=r.id,
                model=r.model,
                pool=r.pool,
                priority=r.priority,
                kv_capacity_tokens=r.kv_capacity_tokens,
                max_model_len=r.max_model_len,
                max_concurrent_requests=r.max_concurrent_requests,
                url=r.url.rstrip("/"),
            )
            for r in config.replicas
        ]
        self.by_model: dict[str, list[ReplicaState]] = {}
        for r in self.replicas:
            self.by_model.setdefault(r.model, []).append(r)
        for group in self.by_model.values():
            group.sort(key=lambda x: -x.priority)  # policies don't need it; admin views read better
        self.max_model_len = {m: min(r.max_model_len for r in g) for m, g in self.by_model.items()}
        self.top_priority = {m: g[0].priority for m, g in self.by_model.items()}
        self.policy = policy or make_policy(s.policy, s)
        self.metrics = RouterMetrics(((r.id, r.model) for r in self.replicas), self.policy.name)
        try:
            self.cache = make_prediction_cache(s.prediction_cache, environ) if s.prediction_cache.enabled else None
        except ValueError as exc:
            raise errors.ConfigError(str(exc)) from None
        self.admin_token = admin_token if admin_token is not None else resolve_admin_token(s.admin_token, environ)
        self.health = HealthTracker(s.health, self.replicas, on_eject=self._ejected, on_readmit=self._readmitted)
        self.session: aiohttp.ClientSession | None = None  # health checks only
        self.upstream: UpstreamPool | None = None  # the proxied requests
        self.checker: HealthChecker | None = None
        self._block_chars = max(1, int(s.block_size_tokens * s.chars_per_token))
        self._m_requests: dict[tuple[str, int], Any] = {}
        self._m_decisions: dict[str, Any] = {}
        # Parsed once: (host, port, tls) and the request line + Host header per endpoint.
        self._targets: dict[str, tuple[str, int, bool, dict[str, bytes]]] = {}
        for r in self.replicas:
            u = URL(r.url)
            if u.scheme not in ("http", "https") or not u.host:
                raise errors.ConfigError(f"replica {r.id}: url must be http:// or https:// with a host, not {r.url!r}")
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            base = u.path.rstrip("/")
            host_header = u.host if u.is_default_port() else f"{u.host}:{port}"
            lines = {
                path: f"POST {base}{path} HTTP/1.1\r\nHost: {host_header}\r\n".encode()
                for path in ("/v1/chat/completions", "/v1/completions")
            }
            self._targets[r.id] = (u.host, port, tls, lines)

    # -- health hooks ---------------------------------------------------------------------
    def _ejected(self, r: ReplicaState) -> None:
        log.warning("replica %s ejected", r.id)
        self.metrics.ejections.labels(r.id).inc()
        self.metrics.healthy.labels(r.id).set(0)
        self.policy.on_replica_reset(r.id)  # whatever it held is no longer a safe prediction

    def _readmitted(self, r: ReplicaState) -> None:
        log.info("replica %s re-admitted", r.id)
        self.metrics.readmissions.labels(r.id).inc()
        self.metrics.healthy.labels(r.id).set(1)

    # -- lifespan -------------------------------------------------------------------------
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: own the client session and the health-check task."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        # No cookies (a proxy must not carry state between tenants), no proxies from the
        # environment (the router talks only to configured replicas), and no compression
        # negotiation: replicas answer plain, and that saves work on every request.
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        self.upstream = UpstreamPool(connect_timeout_s=self.settings.connect_timeout_s)
        self.checker = HealthChecker(self.health, self.replicas, self.session)
        task = asyncio.create_task(self.checker.run())
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await self.session.close()
            await self.upstream.close()
            if self.cache is not None:
                await self.cache.close()

    # -- request helpers ------------------------------------------------------------------
    async def _read_json(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.BodyTooLarge(f"request body is over the limit of {limit} bytes")
        try:
            raw = await request.read()  # the app's client_max_size is the same limit
        except web.HTTPRequestEntityTooLarge:
            raise errors.BodyTooLarge(f"request body is over the limit of {limit} bytes") from None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise errors.MalformedRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(body, dict):
            raise errors.MalformedRequest("request body must be a JSON object")
        return raw, body

    def _clamp(self, body: dict[str, Any], features: RequestFeatures, chat: bool) -> bool:
        """Clamp the output budget so prompt + output fit max_model_len; True if the body changed."""
        limit = self.max_model_len[features.model]
        prompt = features.prompt_tokens
        if prompt >= limit:
            raise errors.PromptTooLong(
                f"the prompt (about {prompt} tokens) does not fit this model's context of {limit} tokens",
                param="messages" if chat else "prompt",
            )
        changed = False
        for field in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
            v = body.get(field)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise errors.MalformedRequest(f"{field} must be a positive integer", param=field)
            if prompt + v > limit:
                body[field] = limit - prompt
                changed = True
        return changed

    def _session_id(self, request: web.Request, body: Mapping[str, Any]) -> str | None:
        ss = self.settings.session
        sid = request.headers.get(ss.header)
        if sid:
            return sid
        if ss.use_body_user:
            user = body.get("user")
            if isinstance(user, str) and user:
                return user
        return None

    @staticmethod
    def _forward_headers(request: web.Request) -> bytes:
        """The client's end-to-end headers as request-head lines (Content-Type is set by the proxy)."""
        # aiohttp decoded the header bytes as UTF-8 with surrogateescape: encode them back alike.
        return "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP_AND_TYPE
        ).encode("utf-8", "surrogateescape")

    @staticmethod
    def _response_headers(upstream: UpstreamResponse, replica: str, cache: str | None) -> dict[str, str]:
        out = {k: v for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP}
        out["x-gpufleet-replica"] = replica
        if cache is not None:
            out["x-gpufleet-cache"] = cache
        return out

    def _timed_out(self, r: ReplicaState) -> errors.UpstreamTimeout:
        """Count a timeout against the replica and build the 504 to raise."""
        self.health.failure(r)
        self._count(r.id, 504)
        return errors.UpstreamTimeout(f"replica {r.id} did not answer within {self.settings.request_timeout_s:g}s")

    def _count(self, replica: str, status: int) -> None:
        key = (replica, status)
        child = self._m_requests.get(key)
        if child is None:
            child = self._m_requests[key] = self.metrics.requests.labels(replica, str(status))
        child.inc()

    def _record_usage(self, replica: ReplicaState, features: RequestFeatures, usage: Any) -> int:
        prompt, completion, cached = _usage_numbers(usage)
        rm = self.metrics.replica[replica.id]
        if prompt:
            rm.reported_prompt_tokens.inc(prompt)
        if cached is not None:
            rm.reported_cached_tokens.inc(cached)
        return completion

    # -- the proxy ------------------------------------------------------------------------
    async def proxy(self, request: web.Request, path: str) -> web.StreamResponse:
        """Handle POST /v1/chat/completions and /v1/completions."""
        cache_state: str | None = None
        try:
            raw, body = await self._read_json(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise errors.MalformedRequest("`model` is required and must be a string", param="model")
            replicas = self.by_model.get(model)
            if replicas is None:
                raise errors.UnknownModel(f"model {model!r} is not served by this fleet", param="model")
            chat = path.endswith("chat/completions")
            if chat and not isinstance(body.get("messages"), list):
                raise errors.MalformedRequest("`messages` must be a list", param="messages")
            if not chat and not isinstance(body.get("prompt"), (str, list)):
                raise errors.MalformedRequest("`prompt` must be a string or a list", param="prompt")
            stream = body.get("stream") is True
            s = self.settings
            features = features_from_body(
                body,
                model=model,
                block_size_tokens=s.block_size_tokens,
                chars_per_token=s.chars_per_token,
                session_id=self._session_id(request, body),
            )
            if self._clamp(body, features, chat):
                raw = json.dumps(body, separators=(",", ":")).encode()

            key = None
            if self.cache is not None and is_cacheable(body):
                if "no-cache" in request.headers.get("Cache-Control", "").lower():
                    cache_state = "bypass"
                else:
                    key = cache_key(tenant_of(request.headers.get("Authorization")), model, body)
                    hit = await self.cache.lookup(key)
                    if hit is not None:
                        self.metrics.cache.labels("hit").inc()
                        return await self._answer_from_cache(request, hit, body, stream)
                    cache_state = "miss"
                self.metrics.cache.labels(cache_state).inc()
            return await self._route(request, path, features, raw, stream, key, cache_state)
        except errors.RouterError as exc:
            self.metrics.rejections.labels(str(exc.status)).inc()
            extra = {"x-gpufleet-cache": cache_state} if cache_state else None
            return _error_response(exc, extra)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise  # the client went away mid-answer: nothing left to tell it
        except Exception:
            # A bug of ours must still answer in the API's shape, and must not leak details.
            log.exception("unexpected error while proxying %s", path)
            self.metrics.rejections.labels("500").inc()
            return _error_response(errors.RouterError("internal router error"))

    async def _answer_from_cache(
        self, request: web.Request, answer: bytes, body: Mapping[str, Any], stream: bool
    ) -> web.StreamResponse:
        headers = {"x-gpufleet-cache": "hit"}
        if not stream:
            return web.Response(body=answer, content_type=_JSON, headers=headers)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        for event in replay_sse(answer, include_usage=include_usage):
            await out.write(event)
        await out.write_eof()
        return out

    async def _route(
        self,
        request: web.Request,
        path: str,
        features: RequestFeatures,
        raw: bytes,
        stream: bool,
        key: str | None,
        cache_state: str | None,
    ) -> web.StreamResponse:
        replicas = self.by_model[features.model]
        candidates: list[ReplicaState] = replicas
        failures: list[str] = []
        headers = self._forward_headers(request)
        while True:
            decision = self.policy.choose(features, candidates)
            r = decision.replica
            if r is None:
                if failures:
                    raise errors.UpstreamFailed(
                        f"no replica answered: {'; '.join(failures)}", headers={"Retry-After": "1"}
                    )
                if decision.outcome is Outcome.SATURATED:
                    raise errors.AllSaturated(
                        f"every replica of {features.model!r} is at its concurrency limit; retry shortly",
                        headers={"Retry-After": "1"},
                    )
                raise errors.NoHealthyReplica(
                    f"no healthy replica serves {features.model!r} right now", headers={"Retry-After": "5"}
                )
            self._on_decision(features, decision)
            try:
                return await self._attempt(request, path, r, decision, features, raw, headers, stream, key, cache_state)
            except _Retryable as exc:
                failures.append(f"{r.id}: {exc}")
                self.health.failure(r)
                if len(failures) > self.settings.max_retries:
                    raise errors.UpstreamFailed(f"no replica answered: {'; '.join(failures)}") from None
                self.metrics.retries.labels(r.id).inc()
                candidates = [x for x in candidates if x is not r]

    def _on_decision(self, features: RequestFeatures, d: Decision) -> None:
        r = d.replica
        assert r is not None
        m = self.metrics
        rm = m.replica[r.id]
        decisions = self._m_decisions.get(d.reason)
        if decisions is None:
            decisions = self._m_decisions[d.reason] = m.decisions.labels(self.policy.name, d.reason)
        decisions.inc()
        rm.prompt_tokens.inc(features.prompt_tokens)
        if d.matched_blocks:
            rm.predicted_hit_tokens.inc(min(features.prompt_tokens, d.matched_blocks * self.settings.block_size_tokens))
        # Relative to the model's top pool, not to the candidates left after failed attempts: a
        # retry that lands on a lower pool because the top pool's replicas died is a spill too.
        if r.priority < self.top_priority[features.model]:
            d.spilled = True
        if d.spilled:
            m.spills.labels(features.model, r.pool).inc()
        self.policy.on_routed(features, d)

    async def _attempt(
        self,
        request: web.Request,
        path: str,
        r: ReplicaState,
        decision: Decision,
        features: RequestFeatures,
        raw: bytes,
        headers: bytes,
        stream: bool,
        key: str | None,
        cache_state: str | None,
    ) -> web.StreamResponse:
        """One try on one replica. Raises _Retryable when nothing has reached the client yet."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        m = self.metrics
        rm = m.replica[r.id]
        r.begin(decision.prefill_tokens)
        gauge = rm.in_flight
        gauge.inc()
        ok = False
        drained = False  # the upstream answer was read to its end
        output_tokens = 0
        prefilled = False
        try:
            host, port, tls, lines = self._targets[r.id]
            head = b"%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
                lines[path],
                headers,
                len(raw),
            )
            try:
                resp = await self.upstream.post(  # type: ignore[union-attr]
                    host, port, head, raw, timeout_s=self.settings.request_timeout_s, tls=tls
                )
            except TimeoutError:
                raise self._timed_out(r) from None
            except UpstreamClientError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from None
            try:
                if resp.status >= 500:
                    self._count(r.id, resp.status)
                    raise _Retryable(f"HTTP {resp.status}")
                ctype = resp.header("Content-Type")
                is_sse = stream and resp.status == 200 and ctype.startswith("text/event-stream")
                try:
                    # For a stream, the first chunk; otherwise the whole answer. Until it is
                    # here nothing has reached the client, so a failure can still be retried.
                    data = await (resp.readany() if is_sse else resp.read())
                except TimeoutError:
                    raise self._timed_out(r) from None
                except UpstreamClientError as exc:
                    raise _Retryable(f"{type(exc).__name__} before the first byte") from None
                if is_sse and not data:
                    raise _Retryable("stream closed before the first byte")
                r.prefill_done(decision.prefill_tokens)
                prefilled = True
                rm.ttft.observe(loop.time() - t0)
                if is_sse:
                    out, ok, output_tokens = await self._relay_stream(
                        request, resp, data, r, features, key, cache_state, t0
                    )
                    drained = ok
                    return out
                drained = True
                # A compressed answer (we never ask for one) is passed through untouched, but
                # is neither parsed for usage nor cached.
                plain = not resp.header("Content-Encoding")
                if resp.status == 200:
                    ok = True
                    self.health.success(r)
                    if plain and b'"usage"' in data:
                        try:
                            output_tokens = self._record_usage(r, features, json.loads(data).get("usage"))
                        except (ValueError, AttributeError):
                            pass
                    if plain and key is not None and self.cache is not None:
                        await self.cache.store(key, data)
                self._count(r.id, resp.status)
                rm.latency.observe(loop.time() - t0)
                return web.Response(
                    status=resp.status, body=data, headers=self._response_headers(resp, r.id, cache_state)
                )
            finally:
                # Closing (not releasing) drops the upstream connection when the answer was not
                # read to the end: that is how a cancelled client cancels the replica's work.
                if drained:
                    resp.release()
                else:
                    resp.close()
        finally:
            if not prefilled:
                r.prefill_done(decision.prefill_tokens)
            r.end()
            gauge.dec()
            self.policy.on_completed(features, r, ok=ok, output_tokens=output_tokens)

    async def _relay_stream(
        self,
        request: web.Request,
        resp: UpstreamResponse,
        first: bytes,
        r: ReplicaState,
        features: RequestFeatures,
        key: str | None,
        cache_state: str | None,
        t0: float,
    ) -> tuple[web.StreamResponse, bool, int]:
        """Pass SSE through chunk by chunk, starting with the already-read first chunk.

        Returns (response, finished cleanly, completion tokens reported). A client that goes
        away raises out of here (write error or cancellation), which closes the upstream.
        """
        loop = asyncio.get_running_loop()
        out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp, r.id, cache_state))
        await out.prepare(request)
        assembler = SSEAssembler() if key is not None else None
        usage = None
        chunk = first
        failed: BaseException | None = None
        while chunk:
            if assembler is not None:
                assembler.feed(chunk)
            else:
                usage = _usage_from_sse_chunk(chunk) or usage
            await out.write(chunk)
            try:
                chunk = await resp.readany()
            except (TimeoutError, UpstreamClientError) as exc:
                failed = exc
                break
        if failed is not None:
            # The replica broke mid-stream: the client already has bytes, so no retry. Say so
            # in the stream (as vLLM does) and leave out [DONE], so clients see it is truncated.
            self.health.failure(r)
            err = errors.UpstreamFailed(f"replica {r.id} failed mid-stream ({type(failed).__name__})")
            await out.write(b"data: " + err.to_body() + b"\n\n")
        ok = failed is None
        if assembler is not None:
            usage = assembler.usage
            answer = assembler.result()
            if ok and answer is not None and self.cache is not None and key is not None:
                await self.cache.store(key, answer)
        output_tokens = self._record_usage(r, features, usage) if usage else 0
        await out.write_eof()
        self._count(r.id, resp.status if ok else 502)
        self.metrics.replica[r.id].latency.observe(loop.time() - t0)
        if ok:
            self.health.success(r)
        return out, ok, output_tokens

    # -- other endpoints ------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the models this fleet serves."""
        created = int(time.time())
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "gpufleet",
                "max_model_len": self.max_model_len[m],
            }
            for m in sorted(self.by_model)
        ]
        return _json_response(200, {"object": "list", "data": data})

    async def health_endpoint(self, request: web.Request) -> web.Response:
        """GET /health: the router process is alive."""
        return _json_response(200, {"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """GET /ready: 200 when every model has at least one healthy replica."""
        down = sorted(m for m, g in self.by_model.items() if not any(r.healthy for r in g))
        if down:
            return _json_response(503, {"status": "not ready", "models_without_healthy_replica": down})
        return _json_response(200, {"status": "ready"})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format."""
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    def _authorize_admin(self, request: web.Request) -> None:
        if self.admin_token is None:
            raise errors.Forbidden("admin endpoints are disabled: no admin token is configured")
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.Unauthorized(
                "admin endpoints need `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(value.strip().encode(), self.admin_token.encode()):
            raise errors.Forbidden("admin token rejected")

    async def admin_replicas(self, request: web.Request) -> web.Response:
        """GET /admin/replicas: state, load, health and estimated cached blocks of every replica."""
        try:
            self._authorize_admin(request)
        except errors.RouterError as exc:
            return _error_response(exc)
        rows = []
        for r in self.replicas:
            failures, readmit_in, backoff = self.health.record(r.id)
            rows.append(
                {
                    "id": r.id,
                    "model": r.model,
                    "pool": r.pool,
                    "priority": r.priority,
                    "url": r.url,
                    "healthy": r.healthy,
                    "in_flight": r.in_flight,
                    "saturated": r.saturated,
                    "queued_prefill_tokens": r.queued_prefill_tokens,
                    "max_concurrent_requests": r.max_concurrent_requests,
                    "kv_capacity_tokens": r.kv_capacity_tokens,
                    "max_model_len": r.max_model_len,
                    "estimated_cached_blocks": self.policy.cached_blocks(r.id),
                    "kv_usage": r.kv_usage,
                    "consecutive_failures": failures,
                    "readmit_in_s": round(readmit_in, 3),
                    "backoff_s": backoff,
                }
            )
        return _json_response(200, {"policy": self.policy.name, "replicas": rows})


_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/ready": "GET",
    "/metrics": "GET",
    "/admin/replicas": "GET",
}


async def _not_found(request: web.Request) -> web.Response:
    """Unknown path: 404; known path, wrong method: 405 with Allow. Both as OpenAI-style JSON."""
    allowed = _ROUTES.get(request.path)
    exc = errors.RequestError(
        f"{request.path} takes {allowed}, not {request.method}"
        if allowed
        else f"no route for {request.method} {request.path}"
    )
    exc.status, exc.code = (405, "method_not_allowed") if allowed else (404, "not_found")
    return _error_response(exc, {"Allow": allowed} if allowed else None)


def create_app(
    config: RouterConfig,
    *,
    policy: Policy | None = None,
    admin_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """Build the router application. The `Router` is reachable as `app[ROUTER_KEY]`."""
    router = Router(config, policy=policy, admin_token=admin_token, environ=environ)
    # client_max_size bounds what aiohttp buffers for a body: it is the router's body limit.
    app = web.Application(client_max_size=config.settings.max_body_bytes)
    app[ROUTER_KEY] = router
    app.cleanup_ctx.append(router.lifespan)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await router.proxy(request, "/v1/chat/completions")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await router.proxy(request, "/v1/completions")

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health_endpoint)
    app.router.add_get("/ready", router.ready)
    app.router.add_get("/metrics", router.metrics_endpoint)
    app.router.add_get("/admin/replicas", router.admin_replicas)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = a free port); returns the runner (call `cleanup()`) and the port.

    Handler cancellation is on: a client disconnect cancels the handler and the upstream request.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
