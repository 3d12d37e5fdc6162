"""Precise mode in the server: tokenizer, index and event streams, built from the router config.

`build(config, registry)` returns a `KvEvents` when `settings.kv_events.enabled` and a tokenizer
loads, else None with one clear log line saying why routing stays approximate. The server passes
`KvEvents.index` to the policy (`kv_index` context: the prefix scorer's source), starts and stops
`streams` in its lifespan, and calls `refine` on every request's features: the prompt's tokens
and block keys as the engine will see them replace the character-based estimate.

Tokenizing never holds a request longer than `kv_events.tokenize_deadline_s`: a long body waits
for the tokenizer's threads at most that long, and not at all when they are all busy; past it the
request is routed on the estimate and `gpufleet_router_kv_tokenize_fallbacks_total{reason}`
counts it (its tokens still land in the tenant's token cache for the next turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.router.config import ReplicaConfig, RouterConfig
from gpufleet.router.kvevents import keys, ranks
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.kvevents.subscriber import EventStreams, KvEventMetrics, StreamEndpoint
from gpufleet.router.kvevents.tokencache import ANONYMOUS, Lookup, TokenCache
from gpufleet.router.kvevents.tokenize import PromptTokenizer, TokenizerError
from gpufleet.router.types import RequestFeatures
from gpufleet.router.upstream.request import url_host

__all__ = ["NO_TOKENIZER", "KvEvents", "build", "endpoint_of", "endpoints_of"]

log = logging.getLogger("gpufleet.router.kvevents")

NO_TOKENIZER = "precise mode is off: no tokenizer configured (router.kv_events.tokenizer); routing stays approximate"
"""What the router (and the local runtime, before it starts one) says of kv_events on without a tokenizer."""


def endpoint_of(replica: ReplicaConfig, port: int, replay_port: int | None) -> StreamEndpoint | None:
    """The replica's stream endpoints: as configured, else its url's host with the given ports."""
    if replica.kv_events_endpoint is not None:
        return StreamEndpoint(replica.kv_events_endpoint, replica.kv_events_replay_endpoint)
    host = urlsplit(replica.url).hostname
    if not host:
        return None
    host = url_host(host)
    replay = f"tcp://{host}:{replay_port}" if replay_port is not None else None
    return StreamEndpoint(f"tcp://{host}:{port}", replay)


def endpoints_of(replica: ReplicaConfig, port: int, replay_port: int | None) -> list[StreamEndpoint]:
    """Every data-parallel rank's stream endpoints (`ranks`: the ports offset by the rank); [] when the
    replica has none (no host in its url, or endpoints the ranks cannot be offset from)."""
    base = endpoint_of(replica, port, replay_port)
    if base is None:
        return []
    try:
        return [
            StreamEndpoint(pub, rep)
            for pub, rep in ranks.rank_endpoints(base.endpoint, base.replay_endpoint, replica.data_parallel_size)
        ]
    except ValueError as exc:  # the config validates this; a replica added at run time may still
        log.error("kv events: replica %s: %s; it routes approximately", replica.id, exc)
        return []


class _TokenCacheCollector(Collector):
    """The token cache's counters, read at scrape time (the tokenizer's threads update them)."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self.cache
        tokens = CounterMetricFamily(
            "gpufleet_router_kv_token_cache_tokens",
            "Prompt tokens precise mode took from its token cache (hit) or had to encode (miss)",
            labels=["result"],
        )
        tokens.add_metric(["hit"], c.hits)
        tokens.add_metric(["miss"], c.misses)
        yield tokens
        yield GaugeMetricFamily(
            "gpufleet_router_kv_token_cache_size_tokens", "Token ids held in the token cache", c.tokens
        )


class KvEvents:
    """The server's precise-mode parts (module docs)."""

    def __init__(self, config: RouterConfig, tokenizer: PromptTokenizer, registry: CollectorRegistry) -> None:
        s = self.settings = config.settings
        ke = s.kv_events
        self.block_size = ke.block_size or s.block_size_tokens
        self.tokenizer = tokenizer
        self.tokenize_deadline_s = ke.tokenize_deadline_s
        self._tokenize_failed = False
        self.fallbacks = Counter(
            "gpufleet_router_kv_tokenize_fallbacks",
            "Requests precise mode routed on the character estimate because tokenizing them took past "
            "kv_events.tokenize_deadline_s (deadline), every tokenizer thread was busy (busy) or it failed (error)",
            ["reason"],
            registry=registry,
        )
        for reason in ("deadline", "busy", "error"):
            self.fallbacks.labels(reason)
        if tokenizer.cache is not None:
            registry.register(_TokenCacheCollector(tokenizer.cache))
        self.index = KvIndex(self.block_size, pending_ttl_s=ke.pending_ttl_s)
        # Data-parallel replicas: which rank holds what (events only), to pin a request's rank.
        self.rank_index = KvIndex(self.block_size, pending_ttl_s=0)
        endpoints: dict[str, list[StreamEndpoint]] = {}
        for r in config.replicas:
            self.index.add_replica(
                r.id,
                r.kv_capacity_tokens // self.block_size,
                tier_capacity_blocks=r.cpu_kv_capacity_tokens // self.block_size,
            )
            eps = endpoints_of(r, ke.port, ke.replay_port)
            if eps:
                endpoints[r.id] = eps
        self.metrics = KvEventMetrics(registry, endpoints)
        self.streams = EventStreams(
            self.index,
            endpoints,
            self.metrics,
            topic=ke.topic,
            silence_s=ke.silence_s,
            replay_timeout_s=ke.replay_timeout_s,
            rank_index=self.rank_index,
        )

    async def refine(
        self,
        body: Mapping[str, Any],
        features: RequestFeatures,
        *,
        salt: str | None = None,
        tenant: str | None = None,
    ) -> RequestFeatures:
        """The features with the prompt's real token count and block keys (unchanged if unreadable,
        or not tokenized within the deadline: module docs).

        The keys carry the `cache_salt` the engine will see: `salt` (the tenant's, set by the router),
        else the client's own `cache_salt`, as vLLM folds it into the first block's hash. `tenant`
        scopes the token cache; only text it misses longer than `tokenize_inline_chars` goes to the
        thread pool."""
        tok = self.tokenizer
        scope = tenant or ANONYMOUS
        try:
            job = tok.prepare(body, scope)  # on the loop: render, and look the chunks up in the cache
            if not isinstance(job, Lookup):
                ids: Sequence[int] = job
            elif job.pending_chars <= tok.inline_chars:
                ids = job.finish()
            elif tok.busy():
                self.fallbacks.labels("busy").inc()
                return features
            else:
                ids = await asyncio.wait_for(tok.finish_async(job), self.tokenize_deadline_s)
        except TimeoutError:
            self.fallbacks.labels("deadline").inc()
            return features
        except Exception:  # a tokenizer failure must not fail the request: route on the estimate
            self.fallbacks.labels("error").inc()
            if not self._tokenize_failed:
                log.exception("kv events: tokenizing a request failed; routing it on the character estimate")
                self._tokenize_failed = True
            return features
        if not ids:
            return features
        if salt is None:
            own = body.get("cache_salt")
            salt = own if isinstance(own, str) and own else None
        bk = keys.prompt_keys(ids, self.block_size, salt)
        features.block_hashes = tuple(bk)
        features.prompt_tokens = len(ids)
        if bk:
            features.affinity_key = bk[0]
        return features

    def replica_added(self, replica: ReplicaConfig) -> None:
        """A replica joined: track it and subscribe to its stream (approximate until it speaks)."""
        ke = self.settings.kv_events
        bs = self.block_size
        self.index.add_replica(
            replica.id, replica.kv_capacity_tokens // bs, tier_capacity_blocks=replica.cpu_kv_capacity_tokens // bs
        )
        eps = endpoints_of(replica, ke.port, ke.replay_port)
        if eps:
            self.streams.add(replica.id, eps)

    def replica_removed(self, replica_id: str) -> None:
        """A replica left: stop its stream and forget its blocks."""
        self.streams.remove(replica_id)
        self.index.remove_replica(replica_id)

    def rank_for(self, replica_id: str, block_keys: Sequence[int]) -> int | None:
        """The data-parallel rank of `replica_id` holding the longest prefix of `block_keys`, or
        None (a replica without ranks, or no rank holds its first block: the engine balances)."""
        streams = self.streams.ranks_of(replica_id)
        if len(streams) < 2 or not block_keys:
            return None
        depths = self.rank_index.match(block_keys, streams)
        best = max(range(len(streams)), key=depths.__getitem__)
        return best if depths[best] > 0 else None

    async def start(self) -> None:
        await self.streams.start()

    async def stop(self) -> None:
        await self.streams.stop()
        self.tokenizer.close()

    def admin_view(self, replica_id: str) -> dict[str, Any] | None:
        return self.streams.admin_view(replica_id)


def build(config: RouterConfig, registry: CollectorRegistry) -> KvEvents | None:
    """Precise mode if enabled and possible, else None (logged once: approximate routing)."""
    s = config.settings
    ke = s.kv_events
    if not ke.enabled:
        return None
    if ke.block_size is not None and ke.block_size != s.block_size_tokens:
        log.warning(
            "kv events: block_size %d differs from block_size_tokens %d: the engines' block size (%d) is used",
            ke.block_size,
            s.block_size_tokens,
            ke.block_size,
        )
    if ke.tokenizer is None:
        log.warning("kv events: %s", NO_TOKENIZER)
        return None
    try:
        tok = PromptTokenizer(
            ke.tokenizer,
            chat_template=ke.chat_template,
            inline_chars=ke.tokenize_inline_chars,
            cache_tokens=ke.token_cache_tokens,
        )
    except TokenizerError as exc:
        log.warning("kv events: precise mode is off: %s; routing stays approximate", exc)
        return None
    if not tok.has_template:
        log.warning(
            "kv events: %s has no chat template: chat prompts are tokenized without one and will not match "
            "an engine that has one (set router.kv_events.chat_template)",
            tok.path,
        )
    return KvEvents(config, tok, registry)
