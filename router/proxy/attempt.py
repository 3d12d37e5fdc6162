"""One attempt on one replica: the first-byte deadline, the upstream call, and what its outcome counts for.

A failure before any byte reached the client (connect, reset, protocol, first-byte timeout, a
retryable status) is counted against the replica (`HealthTracker.failure`) and raised as
`Retryable`, for `route.Dispatcher` to try another replica. An error the engine answered for
this input is passed on in the API's shape and never held against the replica. A stream is
relayed by `stream.relay_stream` once its first chunk is here.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter

from gpufleet.router import errors, wire
from gpufleet.router.config import RouterSettings
from gpufleet.router.health import Failure, HealthTracker, classify_status
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policies import Policy
from gpufleet.router.prediction_cache import PredictionCache, RedisPredictionCache
from gpufleet.router.proxy.request import ProxyRequest, Retryable
from gpufleet.router.proxy.responses import JSON, response_headers
from gpufleet.router.proxy.stream import relay_stream
from gpufleet.router.replicas import ReplicaSet
from gpufleet.router.sessions import SessionBinder
from gpufleet.router.tenant import hide_cached_tokens
from gpufleet.router.types import Decision, ReplicaState
from gpufleet.router.upstream import (
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
)

if TYPE_CHECKING:
    from gpufleet.router.kvevents.runtime import KvEvents

__all__ = ["Attempts"]


class Attempts:
    """Tries a request on one chosen replica, with the per-replica bookkeeping every answer needs."""

    def __init__(
        self,
        settings: RouterSettings,
        replicas: ReplicaSet,
        policy: Policy,
        metrics: RouterMetrics,
        health: HealthTracker,
        upstream: UpstreamPool,
        cache: PredictionCache | RedisPredictionCache | None,
        sessions: SessionBinder | None,
    ) -> None:
        self.settings = settings
        self.replicas = replicas
        self.policy = policy
        self.metrics = metrics
        self.health = health
        self.upstream = upstream
        self.cache = cache
        self.sessions = sessions
        self.kv: KvEvents | None = None
        """Precise mode's parts (set by the server): which data-parallel rank holds a prompt."""
        self._m_requests: dict[tuple[str, int], Counter] = {}

    def session_headers(self, req: ProxyRequest, replica: str) -> dict[str, str] | None:
        """The signed session token naming `replica`, for a request with a session id."""
        sid = req.features.session_id
        if sid is None or self.sessions is None:
            return None
        return self.sessions.headers(sid, replica)

    def _rank_pinned(self, req: ProxyRequest, r: ReplicaState) -> bytes:
        """The forwarded headers, plus vLLM's `X-data-parallel-rank` naming the rank of a data-parallel
        replica that holds the prompt's prefix (by its KV events; a client's own header wins)."""
        kv = self.kv
        if kv is None or not req.features.block_hashes:
            return req.headers
        rank = kv.rank_for(r.id, req.features.block_hashes)
        if rank is None or b"x-data-parallel-rank:" in req.headers.lower():
            return req.headers
        return req.headers + b"X-data-parallel-rank: %d\r\n" % rank

    def expected_prefill_s(self, r: ReplicaState, prefill_tokens: int) -> float:
        """Seconds until a request sent to `r` now with `prefill_tokens` of uncached prompt has its
        first token: the prefill queued ahead and its own at the replica's planned rate."""
        rate = r.prefill_tokens_per_s or self.settings.first_byte.default_prefill_tokens_per_s
        return (r.queued_prefill_tokens + prefill_tokens) / rate

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

    def _failed(self, r: ReplicaState, kind: Failure, detail: str) -> Retryable:
        """Count a replica failure and build the exception that retries the request elsewhere."""
        self.health.failure(r, kind, detail)
        return Retryable(kind, detail)

    def _timed_out(self, r: ReplicaState, after_s: float) -> errors.UpstreamTimeout:
        """Count a timeout after the first byte against the replica and build the 504 to raise."""
        self.health.failure(r, Failure.TIMEOUT, f"no answer in {after_s:g}s")
        self.count(r.id, 504)
        return errors.UpstreamTimeout(f"replica {r.id} did not answer within {after_s:g}s")

    def count(self, replica: str, status: int) -> None:
        """One answer of `replica` with `status` in `gpufleet_router_requests_total`."""
        key = (replica, status)
        child = self._m_requests.get(key)
        if child is None:
            child = self._m_requests[key] = self.metrics.requests.labels(replica, str(status))
        child.inc()

    def record_usage(self, replica: ReplicaState, usage: Any) -> int:
        """Count the token usage a replica reported; returns its completion tokens."""
        prompt, completion, cached = wire.usage_numbers(usage)
        rm = self.metrics.replica[replica.id]
        if prompt:
            rm.reported_prompt_tokens.inc(prompt)
        if cached is not None:
            rm.reported_cached_tokens.inc(cached)
        return completion

    async def run(self, req: ProxyRequest, r: ReplicaState, decision: Decision) -> web.StreamResponse:
        """One try on one replica. Raises Retryable when it failed before anything reached the client."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rm = self.metrics.replica[r.id]
        first_byte_s = self.first_byte_deadline_s(req, r)
        timeout_s = self.settings.request_timeout_s
        final = first_byte_s >= timeout_s  # the request timeout itself: a timeout is then a 504
        prefill_s = self.expected_prefill_s(r, decision.prefill_tokens)
        r.begin(decision.prefill_tokens)
        gauge = rm.in_flight
        gauge.inc()
        ok = False
        drained = False  # the upstream answer was read to its end
        output_tokens = 0
        prefilled = False

        def estimated_prefilled() -> None:
            # A non-streamed answer arrives whole, at its end: its first token is never seen, and
            # counting its prompt as queued prefill until then would make a replica decoding long
            # answers look like one with a long prefill queue. Its prefill ends when expected.
            nonlocal prefilled
            if not prefilled:
                prefilled = True
                r.prefill_done(decision.prefill_tokens)

        prefill_timer = None if req.stream else loop.call_later(prefill_s, estimated_prefilled)
        try:
            target = self.replicas.targets[r.id]
            head = target.head(req.path, self._rank_pinned(req, r), len(req.body))
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
                    self.count(r.id, resp.status)
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
                if not prefilled:
                    r.prefill_done(decision.prefill_tokens)
                    prefilled = True
                rm.ttft.observe(loop.time() - t0)
                if is_sse:
                    rm.time_to_first_token.observe(loop.time() - t0)
                    resp.set_deadline(t0 + timeout_s)  # the first byte came: the rest has the request timeout
                    out, ok, output_tokens = await relay_stream(self, req, resp, data, r, t0)
                    drained = ok
                    return out
                drained = True
                if kind is not None:
                    # The engine answered an error for this input: the client's answer, passed on in
                    # the API's error shape; never retried, never held against the replica.
                    self.health.answered_error(r, resp.status)
                    self.count(r.id, resp.status)
                    rm.latency.observe(loop.time() - t0)
                    self.metrics.request_failures.labels(str(resp.status)).inc()
                    headers = response_headers(resp, r.id, req.cache_state)
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
                        output_tokens = self.record_usage(r, json.loads(data).get("usage"))
                    except (ValueError, AttributeError):
                        pass
                if plain and req.cache_key is not None and self.cache is not None:
                    await self.cache.store(req.cache_key, data)
                self.count(r.id, resp.status)
                rm.latency.observe(loop.time() - t0)
                if plain and self.settings.hide_cached_tokens:
                    data = hide_cached_tokens(data)
                headers = response_headers(resp, r.id, req.cache_state, self.session_headers(req, r.id))
                return web.Response(status=resp.status, body=data, headers=headers)
            finally:
                # Closing (not releasing) drops the upstream connection when the answer was not
                # read to the end: that is how a cancelled client cancels the replica's work.
                if drained:
                    resp.release()
                else:
                    resp.close()
        finally:
            if prefill_timer is not None:
                prefill_timer.cancel()
            if not prefilled:
                r.prefill_done(decision.prefill_tokens)
            r.end()
            gauge.dec()
            self.policy.on_completed(req.features, r, ok=ok, output_tokens=output_tokens)
