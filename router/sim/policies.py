"""Policies the shipped ones are measured against: consistent hashing, SGLang's cache_aware, the oracle.

They subclass the router's own `Policy` (same signature, same pool-priority filter, same load
accounting) and register in the router's one registry (`gpufleet.router.policies.registry`,
which loads this module the first time it is read), so the simulator builds every policy by name
the same way, shipped or baseline. The oracle needs the simulator's engines (`needs`): the
simulator passes them as context, and a router config cannot name it.

consistent_hash
    A hash ring (160 virtual nodes per replica) keyed by the chained hash of the prompt's first
    `prefix_blocks` blocks: the usual "hash the system prompt" affinity. No load signal.

sglang_cache_aware
    A model of SGLang router 0.3.x's `cache_aware` (sgl-model-gateway `policies/cache_aware.rs`
    and `tree.rs`), at block rather than character granularity:
      * load = in-flight requests per worker; the system is *imbalanced* when
        `max - min > balance_abs_threshold` and `max > min * balance_rel_threshold`; then the
        least-loaded worker is chosen (and the request still inserted into its tree);
      * otherwise the longest prefix match over the union of all workers' approximate trees gives
        `match_rate = matched / prompt length`; above `cache_threshold` the request goes to the
        worker owning the deepest matched node (the first one that inserted it), else to the
        least-loaded worker (ties to the first in the list, as observed against 0.3.2);
      * the trees grow with every routed request and are trimmed only every
        `eviction_interval_s`, per worker, to `max_tree_size` characters (LRU), independent of
        any replica's real KV capacity. Defaults are the 0.3.x CLI's: 0.3, 64, 1.5, 120 s, 2^26.

oracle
    Knows every replica's exact cache (the kvmodel engine's block pool) and queue (prompt tokens
    still to prefill, running and waiting), and picks the replica with the earliest estimated
    first token: (queued prefill + this request's uncached prompt) / prefill rate, plus one decode
    step per prefill chunk while the replica decodes. Ties go to the longer exact prefix.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gpufleet.router import kvmodel
from gpufleet.router.config import RouterSettings
from gpufleet.router.policies import Policy, registry
from gpufleet.router.policies.base import rendezvous
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures, stable_hash

__all__ = [
    "DEFAULT_ORDER",
    "ConsistentHashPolicy",
    "OracleChoice",
    "OraclePolicy",
    "SGLangCacheAwareModel",
    "pending_prefill_tokens",
]


class ConsistentHashPolicy(Policy):
    """Hash ring on the prompt's first blocks (see the module docs)."""

    name = "consistent_hash"

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefix_blocks: int = 8,
        vnodes: int = 160,
    ) -> None:
        super().__init__(settings, seed=seed, clock=clock)
        self.prefix_blocks = prefix_blocks
        self.vnodes = vnodes
        self._rings: dict[tuple[str, ...], tuple[list[int], list[ReplicaState]]] = {}

    def _ring(self, tier: Sequence[ReplicaState]) -> tuple[list[int], list[ReplicaState]]:
        key = tuple(r.id for r in tier)
        ring = self._rings.get(key)
        if ring is None:
            points = sorted((stable_hash(f"{r.id}#{v}"), i) for i, r in enumerate(tier) for v in range(self.vnodes))
            ring = self._rings[key] = ([p for p, _ in points], [tier[i] for _, i in points])
        return ring

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        hashes = features.block_hashes
        key = hashes[min(self.prefix_blocks, len(hashes)) - 1] if hashes else features.affinity_key
        points, owners = self._ring(tier)
        i = bisect.bisect_left(points, key) % len(points)
        return Decision(owners[i], reason="hash")


class SGLangCacheAwareModel(Policy):
    """A block-granular model of SGLang router 0.3.x `cache_aware` (see the module docs)."""

    name = "sglang_cache_aware"

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 120.0,
        max_tree_size_chars: int = 2**26,
    ) -> None:
        super().__init__(settings, seed=seed, clock=clock)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_size_chars = max_tree_size_chars
        s = self.settings
        self._block_chars = max(1, int(s.block_size_tokens * s.chars_per_token))
        # The union tree: block -> workers holding it, in insertion order (the first is "the" owner).
        self._owners: dict[int, dict[str, None]] = {}
        # Per worker: its blocks, least recently used first (what its eviction pass trims).
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._next_eviction: float | None = None

    def tree_chars(self, replica_id: str) -> int:
        """Characters the model's tree attributes to a worker (SGLang's `tenant_char_count`)."""
        return len(self._lru.get(replica_id, ())) * self._block_chars

    def _maybe_evict(self) -> None:
        now = self.clock()
        if self._next_eviction is None:
            self._next_eviction = now + self.eviction_interval_s
            return
        if now < self._next_eviction:
            return
        self._next_eviction = now + self.eviction_interval_s
        limit = self.max_tree_size_chars // self._block_chars
        for rid, lru in self._lru.items():
            while len(lru) > limit:
                h, _ = lru.popitem(last=False)
                owners = self._owners.get(h)
                if owners is not None:
                    owners.pop(rid, None)
                    if not owners:
                        del self._owners[h]

    def _insert(self, hashes: Sequence[int], rid: str) -> None:
        lru = self._lru.setdefault(rid, OrderedDict())
        owners_map = self._owners
        # Tail first so that the head of the prompt is the most recently used.
        for h in reversed(hashes):
            owners = owners_map.get(h)
            if owners is None:
                owners_map[h] = {rid: None}
            elif rid not in owners:
                owners[rid] = None
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        self._maybe_evict()
        loads = [r.in_flight for r in tier]
        hi, lo = max(loads), min(loads)
        least = tier[loads.index(lo)]  # ties to the first in the list
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            return Decision(least, reason="imbalanced")
        hashes = features.block_hashes
        depth = 0
        owner: str | None = None
        for h in hashes:
            owners = self._owners.get(h)
            if not owners:
                break
            depth += 1
            owner = next(iter(owners))
        text_chars = max(1, int(features.prompt_tokens * self.settings.chars_per_token))
        rate = depth * self._block_chars / text_chars
        if rate > self.cache_threshold and owner is not None:
            for r in tier:
                if r.id == owner:
                    return Decision(r, reason="prefix", matched_blocks=depth)
            return Decision(tier[0], reason="owner_unavailable")  # SGLang falls back to the first healthy
        return Decision(least, reason="load")

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        if decision.replica is not None and features.block_hashes:
            self._insert(features.block_hashes, decision.replica.id)

    def on_replica_reset(self, replica_id: str) -> None:
        lru = self._lru.pop(replica_id, None)
        for h in lru or ():
            owners = self._owners.get(h)
            if owners is not None:
                owners.pop(replica_id, None)
                if not owners:
                    del self._owners[h]

    def cached_blocks(self, replica_id: str) -> int:
        return len(self._lru.get(replica_id, ()))


@dataclass(frozen=True, slots=True)
class OracleChoice:
    """The oracle's view of one eligible replica for one request."""

    replica_id: str
    matched_blocks: int
    """Leading prompt blocks the replica's KV cache holds right now (exact)."""
    pending_prefill_tokens: int
    """Prompt tokens queued ahead on the replica (running and waiting requests)."""
    decoding: bool
    est_ttft_s: float
    queue_s: float = 0.0
    """Estimated wait before this request's own prefill begins (memory, slots, work ahead)."""


def pending_prefill_tokens(engine: kvmodel.ReplicaEngine) -> int:
    """Prompt tokens the engine must still prefill for requests it already holds.

    Waiting requests are counted without the prefix they would reuse if they started now.
    """
    running, waiting, _, _ = _queue(engine)
    return running + waiting


def _queue(engine: kvmodel.ReplicaEngine) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """From the engine's request views: (prefill left of running requests, uncached prefill of
    waiting ones, blocks the waiting ones need, and per running request (prefill left, output
    left, blocks held))."""
    bt = engine.params.block_size_tokens
    cache = engine.cache
    run_left = wait_left = wait_blocks = 0
    running: list[tuple[int, int, int]] = []
    for v in engine.requests():
        req = v.request
        blocks = math.ceil((req.prompt_tokens + req.output_tokens) / bt)
        if v.running:
            run_left += v.prefill_left
            running.append((v.prefill_left, req.output_tokens - v.generated_tokens, blocks))
        else:
            hit = min(cache.match(req.block_hashes[: req.prompt_tokens // bt]), (req.prompt_tokens - 1) // bt)
            wait_left += req.prompt_tokens - hit * bt
            wait_blocks += blocks - hit
    return run_left, wait_left, wait_blocks, running


def _start_delay(
    engine: kvmodel.ReplicaEngine, running: list[tuple[int, int, int]], need_blocks: int, step_s: float
) -> float:
    """When requests queued ahead plus `need_blocks` more would fit (memory and running slots).

    Running requests are assumed to finish in order of their remaining work (prefill left at the
    prefill rate, then one decode step per token left); each frees the blocks it reserved.
    """
    p = engine.params
    cache = engine.cache
    free = cache.num_blocks - cache.used_blocks + len(cache.lru_order())
    slots = p.max_running - engine.num_running - engine.num_waiting - 1
    if need_blocks <= free and slots >= 0:
        return 0.0
    ends = sorted(
        (max(0, prefill) / p.prefill_tokens_per_s + max(0, out) * step_s, blocks) for prefill, out, blocks in running
    )
    t = 0.0
    for t, blocks in ends:
        free += blocks
        slots += 1
        if need_blocks <= free and slots >= 0:
            return t
    return t


class OraclePolicy(Policy):
    """Exact cache and queue knowledge; earliest estimated first token (see the module docs)."""

    name = "oracle"
    needs: ClassVar[tuple[str, ...]] = ("engines",)

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        engines: Mapping[str, kvmodel.ReplicaEngine] | None = None,
    ) -> None:
        super().__init__(settings, seed=seed, clock=clock)
        self.engines: Mapping[str, kvmodel.ReplicaEngine] = engines or {}

    def bind(self, *, clock: Callable[[], float], **context: Any) -> None:
        """Run on the simulator's clock, reading its `engines` (by replica id)."""
        super().bind(clock=clock)
        self.engines = context.get("engines", self.engines)

    def explain(self, features: RequestFeatures, tier: Sequence[ReplicaState]) -> list[OracleChoice]:
        """The oracle's estimate for every replica of `tier`."""
        out = []
        prompt = features.prompt_tokens
        for r in tier:
            e = self.engines[r.id]
            p = e.params
            bt = p.block_size_tokens
            m = e.cache.match(features.block_hashes[: prompt // bt])
            m = min(m, (prompt - 1) // bt) if prompt > 0 else 0
            own = max(0, prompt - m * bt)
            run_left, wait_left, wait_blocks, running = _queue(e)
            n_dec = max(1, e.num_running)
            step_s = (1.0 + p.decode_batch_penalty * (n_dec - 1)) / p.decode_tokens_per_s
            # The router does not know the output length; the prompt's blocks are the floor.
            start = _start_delay(e, running, wait_blocks + math.ceil(prompt / bt) - m, step_s)
            # Running prefill still left when this request can start, then everything waiting.
            ahead = max(0.0, run_left - start * p.prefill_tokens_per_s) + wait_left
            work = ahead + own
            est = start + work / p.prefill_tokens_per_s
            decoding = e.num_running > 0
            if decoding:
                est += max(1, math.ceil(work / p.max_batched_tokens)) * step_s
            out.append(
                OracleChoice(r.id, m, run_left + wait_left, decoding, est, start + ahead / p.prefill_tokens_per_s)
            )
        return out

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        choices = self.explain(features, tier)
        key = features.affinity_key
        best_i = min(
            range(len(tier)),
            key=lambda i: (choices[i].est_ttft_s, -choices[i].matched_blocks, -rendezvous(key, tier[i].id_hash)),
        )
        return Decision(tier[best_i], reason="oracle", matched_blocks=choices[best_i].matched_blocks)


for _baseline in (ConsistentHashPolicy, SGLangCacheAwareModel, OraclePolicy):
    registry.register(_baseline.name, _baseline)

DEFAULT_ORDER = (
    "random",
    "round_robin",
    "least_load",
    "session",
    "consistent_hash",
    "sglang_cache_aware",
    "cache_aware_tokens",
    "cache_aware",
    "oracle",
)
"""The simulator's run order when no policies are named: baselines around cache_aware."""
