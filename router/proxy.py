"""The router's request path: validate -> features -> clamp -> prediction cache -> route and retry.

`Proxy.handle(request, path)` serves POST /v1/chat/completions and /v1/completions: read the
body (bounded) -> parse -> model -> features (prefix hashes, session id) -> clamp `max_tokens`
-> prediction cache -> `policy.choose` -> forward; a connection error, a 5xx or a stream that
closes before its first byte is retried on another replica (at most `max_retries` times) and
counts toward that replica's ejection.

The path is hot and was tuned (`bench/router_overhead.py` measures it): what every attempt
needs is gathered once into one `ProxyRequest` (`__slots__`); the model's replicas and each
replica's upstream target were resolved when the replica set was built; metric children are
looked up once per label value. The wire-format rules (body, output budget, usage) are the pure
functions of `gpufleet.router.wire`.

Errors are raised as `gpufleet.router.errors` types and rendered as OpenAI-style JSON
(`error_response`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import Counter

from gpufleet.router import errors, guard, wire
from gpufleet.router.config import RouterSettings
from gpufleet.router.health import Failure, HealthTracker, classify_status
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policies import Policy
from gpufleet.router.prediction_cache import (
    ANONYMOUS_TENANT,
    PredictionCache,
    RedisPredictionCache,
    SSEAssembler,
    cache_key,
    is_cacheable,
    replay_sse,
)
from gpufleet.router.prefix import features_from_body
from gpufleet.router.replicas import ModelReplicas, ReplicaSet
from gpufleet.router.sessions import SessionBinder
from gpufleet.router.tenant import CachedTokensFilter, TenantResolver, hide_cached_tokens
from gpufleet.router.types import Decision, Outcome, ReplicaState, RequestFeatures
from gpufleet.router.upstream import (
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)
from gpufleet.router.upstream.request import HOP_BY_HOP, forward_headers

if TYPE_CHECKING:
    from gpufleet.router.kvevents.runtime import KvEvents

__all__ = ["JSON", "Proxy", "ProxyRequest", "error_response"]

log = logging.getLogger("gpufleet.router")

JSON = "application/json"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def error_response(exc: errors.RouterError, extra: Mapping[str, str] | None = None) -> web.Response:
    """The OpenAI-style JSON answer for a router error, with its headers and any `extra` ones."""
    headers = dict(exc.headers)
    if extra:
        headers.update(extra)
    return web.Response(status=exc.status, body=exc.to_body(), content_type=JSON, headers=headers)


_CACHED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# The generating endpoints whose vLLM requests take `cache_salt` (embeddings keep no prefix cache).
_SALTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """One proxied request as every attempt on a replica needs it, built once after validation."""

    request: web.Request
    path: str
    features: RequestFeatures
    group: ModelReplicas
    body: bytes
    """The body to forward (re-encoded when the output budget was clamped)."""
    headers: bytes
    """The client's end-to-end headers, already as request-head lines."""
    stream: bool
    cache_key: str | None
    """Where to store the answer in the prediction cache; None when it is not cached."""
    cache_state: str | None
    """The `x-gpufleet-cache` header value: miss, bypass or None."""
    output_budget: int
    """The most tokens the answer may have (max_tokens, else what the context leaves)."""


class _Retryable(Exception):
    """An attempt failed by a replica failure before any byte reached the client: try another replica."""

    def __init__(self, kind: Failure, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind


def _response_headers(
    upstream: UpstreamResponse, replica: str, cache: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    out = {k: v for k, v in upstream.headers if k.lower() not in HOP_BY_HOP}
    out["x-gpufleet-replica"] = replica
    if cache is not None:
        out["x-gpufleet-cache"] = cache
    if extra:
        out.update(extra)
    return out


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
        self.policy = policy
        self.metrics = metrics
        self.health = health
        self.upstream = upstream
        self.cache = cache
        self.kv: KvEvents | None = None
        self._m_requests: dict[tuple[str, int], Counter] = {}
        self._m_decisions: dict[str, Counter] = {}
        self._in_flight = 0
        self._retries_in_flight = 0

    # -- validate, features, clamp, cache ---------------------------------------------------
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
                session_id=wire.session_id(request.headers, body, s.session),
                salt=salt,
            )
            if self.kv is not None:  # precise mode: the engine's tokens and block keys
                features = await self.kv.refine(body, features, len(raw), tenant)
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
                        return await self._answer_from_cache(request, hit, body, stream)
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
            return await self._route(req)
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

    # -- route and retry --------------------------------------------------------------------
    def _retry_allowed(self) -> bool:
        """The retry budget: retries in flight stay under a share of the requests in flight."""
        b = self.settings.retry
        return self._retries_in_flight < max(b.min_retry_concurrency, b.budget_percent / 100 * self._in_flight)

    async def _route(self, req: ProxyRequest) -> web.StreamResponse:
        features = req.features
        candidates: list[ReplicaState] = req.group.replicas
        failures: list[str] = []
        timeouts = 0
        self._in_flight += 1
        try:
            while True:
                pool = candidates
                if any(x.suspect for x in pool):
                    # A suspect replica is being checked: keep off it while anything else can serve.
                    trusted = [x for x in pool if not x.suspect]
                    if any(x.available for x in trusted):
                        pool = trusted
                decision = self.policy.choose(features, pool)
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
                retry = bool(failures)
                if retry:
                    self._retries_in_flight += 1
                self._on_decision(req, r, decision)
                try:
                    return await self._attempt(req, r, decision)
                except _Retryable as exc:
                    failures.append(f"{r.id}: {exc}")
                    timeouts += exc.kind is Failure.FIRST_BYTE
                    if len(failures) > self.settings.max_retries:
                        if timeouts == len(failures):
                            raise errors.UpstreamTimeout(
                                f"no replica answered in time: {'; '.join(failures)}"
                            ) from None
                        raise errors.UpstreamFailed(f"no replica answered: {'; '.join(failures)}") from None
                    if not self._retry_allowed():
                        self.metrics.retry_budget_exhausted.inc()
                        raise errors.UpstreamFailed(
                            f"no replica answered and the retry budget is spent: {'; '.join(failures)}",
                            headers={"Retry-After": "1"},
                        ) from None
                    self.metrics.retries.labels(r.id).inc()
                    candidates = [x for x in candidates if x is not r]
                finally:
                    if retry:
                        self._retries_in_flight -= 1
        finally:
            self._in_flight -= 1

    def _on_decision(self, req: ProxyRequest, r: ReplicaState, d: Decision) -> None:
        features = req.features
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
        if r.priority < req.group.top_priority:
            d.spilled = True
        if d.spilled:
            m.spills.labels(features.model, r.pool).inc()
        self.policy.on_routed(features, d)
        if features.session_id is not None and self.sessions is not None:
            self.sessions.bound(features.session_id, r.id)

    def _session_headers(self, req: ProxyRequest, replica: str) -> dict[str, str] | None:
        """The signed session token naming `replica`, for a request with a session id."""
        sid = req.features.session_id
        if sid is None or self.sessions is None:
            return None
        return self.sessions.headers(sid, replica)

    def first_byte_deadline_s(self, req: ProxyRequest, r: ReplicaState) -> float:
        """Seconds the attempt on `r` may take to its first byte (the whole answer when not streamed).

        The prompt's prefill and the prefill queued ahead of it at the replica's planned rate, for a
        non-streamed answer also its output budget at the decode rate, times `first_byte.factor`,
        at least `first_byte.floor_s`; never more than `request_timeout_s`.
        """
        s = self.settings
        fb = s.first_byte
        if not fb.enabled:
            return s.request_timeout_s
        tokens = req.features.prompt_tokens + r.queued_prefill_tokens
        expected = tokens / (r.prefill_tokens_per_s or fb.default_prefill_tokens_per_s)
        if not req.stream:
            expected += req.output_budget / (r.decode_tokens_per_s or fb.default_decode_tokens_per_s)
        return min(s.request_timeout_s, max(fb.floor_s, fb.factor * expected))

    def _failed(self, r: ReplicaState, kind: Failure, detail: str) -> _Retryable:
        """Count a replica failure and build the exception that retries the request elsewhere."""
        self.health.failure(r, kind, detail)
        return _Retryable(kind, detail)

    def _timed_out(self, r: ReplicaState, after_s: float) -> errors.UpstreamTimeout:
        """Count a timeout after the first byte against the replica and build the 504 to raise."""
        self.health.failure(r, Failure.TIMEOUT, f"no answer in {after_s:g}s")
        self._count(r.id, 504)
        return errors.UpstreamTimeout(f"replica {r.id} did not answer within {after_s:g}s")

    def _count(self, replica: str, status: int) -> None:
        key = (replica, status)
        child = self._m_requests.get(key)
        if child is None:
            child = self._m_requests[key] = self.metrics.requests.labels(replica, str(status))
        child.inc()

    def _record_usage(self, replica: ReplicaState, usage: Any) -> int:
        prompt, completion, cached = wire.usage_numbers(usage)
        rm = self.metrics.replica[replica.id]
        if prompt:
            rm.reported_prompt_tokens.inc(prompt)
        if cached is not None:
            rm.reported_cached_tokens.inc(cached)
        return completion

    # -- one attempt on one replica ---------------------------------------------------------
    async def _attempt(self, req: ProxyRequest, r: ReplicaState, decision: Decision) -> web.StreamResponse:
        """One try on one replica. Raises _Retryable when it failed before anything reached the client."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rm = self.metrics.replica[r.id]
        first_byte_s = self.first_byte_deadline_s(req, r)
        timeout_s = self.settings.request_timeout_s
        final = first_byte_s >= timeout_s  # the request timeout itself: a timeout is then a 504
        r.begin(decision.prefill_tokens)
        gauge = rm.in_flight
        gauge.inc()
        ok = False
        drained = False  # the upstream answer was read to its end
        output_tokens = 0
        prefilled = False
        try:
            target = self.replicas.targets[r.id]
            head = target.head(req.path, req.headers, len(req.body))
            try:
                resp = await self.upstream.post(
                    target.host, target.port, head, req.body, timeout_s=first_byte_s, tls=target.tls
                )
            except TimeoutError:
                if final:
                    raise self._timed_out(r, timeout_s) from None
                raise self._failed(r, Failure.FIRST_BYTE, f"nothing in {first_byte_s:.1f}s") from None
            except UpstreamConnectError as exc:
                raise self._failed(r, Failure.CONNECT, str(exc)) from None
            except UpstreamProtocolError as exc:
                raise self._failed(r, Failure.PROTOCOL, str(exc)) from None
            except UpstreamClientError as exc:
                raise self._failed(r, Failure.RESET, str(exc)) from None
            try:
                kind = classify_status(resp.status)
                if kind is not None and kind.retryable:
                    self._count(r.id, resp.status)
                    raise self._failed(r, kind, f"HTTP {resp.status}")
                ctype = resp.header("Content-Type")
                is_sse = req.stream and resp.status == 200 and ctype.startswith("text/event-stream")
                try:
                    # For a stream, the first chunk; otherwise the whole answer. Until it is
                    # here nothing has reached the client, so a failure can still be retried.
                    data = await (resp.readany() if is_sse else resp.read())
                except TimeoutError:
                    if final:
                        raise self._timed_out(r, timeout_s) from None
                    raise self._failed(r, Failure.FIRST_BYTE, f"nothing in {first_byte_s:.1f}s") from None
                except UpstreamProtocolError as exc:
                    raise self._failed(r, Failure.PROTOCOL, str(exc)) from None
                except UpstreamClientError as exc:
                    raise self._failed(r, Failure.RESET, f"{exc} before the first byte") from None
                if is_sse and not data:
                    raise self._failed(r, Failure.RESET, "stream closed before the first byte")
                r.prefill_done(decision.prefill_tokens)
                prefilled = True
                rm.ttft.observe(loop.time() - t0)
                if is_sse:
                    resp.set_deadline(t0 + timeout_s)  # the first byte came: the rest has the request timeout
                    out, ok, output_tokens = await self._relay_stream(req, resp, data, r, t0)
                    drained = ok
                    return out
                drained = True
                if kind is not None:
                    # The engine answered an error for this input: the client's answer, passed on in
                    # the API's error shape; never retried, never held against the replica.
                    self.health.answered_error(r, resp.status)
                    self._count(r.id, resp.status)
                    rm.latency.observe(loop.time() - t0)
                    self.metrics.request_failures.labels(str(resp.status)).inc()
                    headers = _response_headers(resp, r.id, req.cache_state)
                    headers.pop("Content-Type", None)
                    headers.pop("Content-Encoding", None)
                    return web.Response(
                        status=resp.status,
                        body=errors.replica_error_body(resp.status, data),
                        content_type=JSON,
                        headers=headers,
                    )
                # A compressed answer (we never ask for one) is passed through untouched, but
                # is neither parsed for usage nor cached.
                plain = not resp.header("Content-Encoding")
                ok = True
                self.health.success(r)
                if plain and b'"usage"' in data:
                    try:
                        output_tokens = self._record_usage(r, json.loads(data).get("usage"))
                    except (ValueError, AttributeError):
                        pass
                if plain and req.cache_key is not None and self.cache is not None:
                    await self.cache.store(req.cache_key, data)
                self._count(r.id, resp.status)
                rm.latency.observe(loop.time() - t0)
                if plain and self.settings.hide_cached_tokens:
                    data = hide_cached_tokens(data)
                headers = _response_headers(resp, r.id, req.cache_state, self._session_headers(req, r.id))
                return web.Response(status=resp.status, body=data, headers=headers)
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
            self.policy.on_completed(req.features, r, ok=ok, output_tokens=output_tokens)

    async def _answer_from_cache(
        self, request: web.Request, answer: bytes, body: Mapping[str, Any], stream: bool
    ) -> web.StreamResponse:
        """A cached answer as a new one: its own id, `created` and `x-request-id` (as an engine gives)."""
        doc = json.loads(answer)
        doc["id"] = _fresh_id(doc.get("id"))
        doc["created"] = int(time.time())
        answer = json.dumps(doc, separators=(",", ":")).encode()
        if self.settings.hide_cached_tokens:
            answer = hide_cached_tokens(answer)
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        headers = {"x-gpufleet-cache": "hit", "x-request-id": request_id}
        if not stream:
            return web.Response(body=answer, content_type=JSON, headers=headers)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        for event in replay_sse(answer, include_usage=include_usage):
            await out.write(event)
        await out.write_eof()
        return out

    async def _relay_stream(
        self, req: ProxyRequest, resp: UpstreamResponse, first: bytes, r: ReplicaState, t0: float
    ) -> tuple[web.StreamResponse, bool, int]:
        """Pass SSE through chunk by chunk, starting with the already-read first chunk.

        Returns (response, finished cleanly, completion tokens reported). A client that goes
        away raises out of here (write error or cancellation), which closes the upstream.
        """
        loop = asyncio.get_running_loop()
        headers = _response_headers(resp, r.id, req.cache_state, self._session_headers(req, r.id))
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(req.request)
        key = req.cache_key
        assembler = SSEAssembler() if key is not None else None
        usage = None
        chunk = first
        failed: BaseException | None = None
        hide = CachedTokensFilter() if self.settings.hide_cached_tokens else None
        idle_s = self.settings.stream_idle_timeout_s
        end = t0 + self.settings.request_timeout_s
        while chunk:
            # A stream that stalls (a hung replica) is cut after idle_s, not held to the end.
            resp.set_deadline(min(end, loop.time() + idle_s))
            if assembler is not None:
                assembler.feed(chunk)
            else:
                usage = wire.usage_from_sse_chunk(chunk) or usage
            if hide is not None:
                chunk = hide.feed(chunk)
                if not chunk:
                    chunk = b" "  # nothing complete yet; keep the loop going
                    try:
                        chunk = await resp.readany()
                    except (TimeoutError, UpstreamClientError) as exc:
                        failed = exc
                        break
                    continue
            await out.write(chunk)
            try:
                chunk = await resp.readany()
            except (TimeoutError, UpstreamClientError) as exc:
                failed = exc
                break
        if hide is not None and (rest := hide.flush()):
            await out.write(rest)
        if failed is not None:
            # The replica broke mid-stream: the client already has bytes, so no retry. Say so
            # in the stream (as vLLM does) and leave out [DONE], so clients see it is truncated.
            kind = Failure.TIMEOUT if isinstance(failed, TimeoutError) else Failure.RESET
            self.health.failure(
                r, kind, f"no data for {idle_s:g}s mid-stream" if kind is Failure.TIMEOUT else "mid-stream"
            )
            err = errors.UpstreamFailed(f"replica {r.id} failed mid-stream ({type(failed).__name__})")
            await out.write(b"data: " + err.to_body() + b"\n\n")
        ok = failed is None
        if assembler is not None:
            usage = assembler.usage
            answer = assembler.result()
            if ok and answer is not None and self.cache is not None and key is not None:
                await self.cache.store(key, answer)
        output_tokens = self._record_usage(r, usage) if usage else 0
        await out.write_eof()
        self._count(r.id, resp.status if ok else 502)
        self.metrics.replica[r.id].latency.observe(loop.time() - t0)
        if ok:
            self.health.success(r)
        return out, ok, output_tokens


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


def _fresh_id(old: Any) -> str:
    """A new completion id shaped like the cached one's (`chatcmpl-...`, `cmpl-...`)."""
    prefix = old.split("-", 1)[0] if isinstance(old, str) and "-" in old else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"
