"""`prefix`: the prompt tokens the replica would still have to prefill, given its predicted cache.

    score = prompt_tokens - matched_blocks * block_size_tokens      (0 at least)

Per replica a `PrefixIndex` holds the blocks the replica probably has: an LRU bounded by the
replica's declared KV capacity (`kv_capacity_tokens / block_size_tokens`). Routing a prompt there
inserts its blocks (`on_routed`); generated tokens push older prefixes out (`on_completed`); an
ejected or restarted replica starts empty (`on_replica_reset`). A match shorter than
`min_match_blocks` counts as none. This scorer also tells the profile how many blocks matched
(`Candidates.matched_blocks`), which its decision reports. The replicas' indexes share one table
of block -> replicas (`gpufleet.router.holders`), so the candidates are matched in one walk over
the prompt, not one per replica.

Events mode (precise): when the policy is built with a `kv_index` in its context (a
`gpufleet.router.kvevents.index.KvIndex` fed by the engines' KV events), every replica whose
event stream is live is matched against that one index, in one walk for all of them, and a
routed request marks its blocks pending there (`KvIndex.expect`) until the engine's events
confirm them. Replicas whose stream is not live (not yet heard, or silent past the watchdog's
bound) keep using their approximate index, as without events.

The approximate indexes are kept for live replicas too, as the router's memory of where it sent
each prefix. When no live candidate's engine holds even the first block of the prompt (the
prefix was evicted everywhere, or is new), their match comes from that memory: sent back where
it went before, an evicted prefix is rebuilt in one place, not on whichever replica is least
loaded, and its next requests find it there. Measured in the simulator (events mode, memory-bound
`mix` @ 0.8: hit 0.596 -> 0.602, TTFT p99 0.65 -> 0.55 x the oracle's; with 4 routers 0.537 ->
0.554) and unchanged wherever some replica holds the prefix (docs/routing.md).

Lower KV tiers (a replica with `cpu_kv_capacity_tokens`, the plan's kv_offload): a hit in the
CPU tier is not free, it costs its transfer. In the same unit (prefill tokens), the blocks that
continue the GPU match in the CPU tier count as

    tier_tokens x prefill_tokens_per_s / cpu_load_tokens_per_s + tier_load_latency_s x prefill_tokens_per_s

instead of `tier_tokens` (and as `tier_tokens` when that is less: the engine then recomputes).
Approximate mode predicts the tier with a second index per replica, of GPU + CPU capacity:
what it matches beyond the GPU index is in the CPU tier (blocks the GPU evicted move there).
Events mode reads the tier exactly from the engine's `medium="CPU"` events when the replica
publishes them, and falls back to the prediction when it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.holders import BitPool, HolderMasks
from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer
from gpufleet.router.prefix import PrefixIndex
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

if TYPE_CHECKING:
    from gpufleet.router.kvevents.index import KvIndex

__all__ = ["PrefixScorer"]


class PrefixScorer(Scorer):
    """Uncached prompt tokens on each replica, from a per-replica prefix index (module docs)."""

    provides_matches = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        min_match_blocks: int = Field(
            default=1, ge=0, description="below this many matched blocks a match counts as none"
        )
        tier_load_latency_s: float = Field(
            default=0.002, ge=0, description="fixed cost of one load from a lower tier, seconds"
        )

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.min_match_blocks = params.min_match_blocks
        self.tier_load_latency_s = params.tier_load_latency_s
        self.block_size_tokens = ctx.settings.block_size_tokens
        self._indexes: dict[str, PrefixIndex] = {}
        self._shared = HolderMasks()  # block -> the replicas whose index holds it
        self._bits = BitPool()
        # A subclass may answer `index` with something else (an engine's exact cache): then each
        # replica is asked on its own.
        self._one_walk = type(self).index is PrefixScorer.index
        self._deep: dict[str, PrefixIndex] = {}  # GPU + CPU tier, for replicas with a CPU tier
        self.kv: KvIndex | None = ctx.context.get("kv_index")
        self._clock: Callable[[], float] = ctx.clock

    def bind(self, *, clock: Callable[[], float], **context: Any) -> None:
        self._clock = clock
        if "kv_index" in context:
            self.kv = context["kv_index"]

    def index(self, replica: ReplicaState) -> PrefixIndex:
        """The replica's prefix index, sized from its declared KV capacity on first use."""
        idx = self._indexes.get(replica.id)
        if idx is None:
            cap = replica.kv_capacity_tokens // self.block_size_tokens
            idx = self._indexes[replica.id] = PrefixIndex(cap, shared=self._shared, bit=self._bits.take())
        return idx

    def _match_approx(self, hashes: Sequence[int], replicas: Sequence[ReplicaState]) -> list[int]:
        """Leading blocks of `hashes` each replica's index holds: one walk for all of them."""
        get = self._indexes.get
        # `or`: an index not made yet (or still empty) comes from `index`, which makes it.
        if self._one_walk:
            return self._shared.depths(hashes, [(get(r.id) or self.index(r)).bit for r in replicas])
        return [(get(r.id) or self.index(r)).match(hashes) for r in replicas]

    def deep_index(self, replica: ReplicaState) -> PrefixIndex | None:
        """The replica's GPU + CPU-tier prediction (None without a CPU tier)."""
        if not replica.cpu_kv_capacity_tokens:
            return None
        idx = self._deep.get(replica.id)
        if idx is None:
            blocks = (replica.kv_capacity_tokens + replica.cpu_kv_capacity_tokens) // self.block_size_tokens
            idx = self._deep[replica.id] = PrefixIndex(blocks)
        return idx

    def _tier_saving(self, r: ReplicaState, hashes: Sequence[int], m: int, prompt: int) -> float:
        """Prefill tokens a CPU-tier continuation of a GPU match of `m` blocks saves on `r`."""
        rate, prefill = r.cpu_load_tokens_per_s, r.prefill_tokens_per_s
        deep = self.deep_index(r)
        if deep is None or not rate or not prefill:
            return 0.0
        bt = self.block_size_tokens
        kv = self.kv
        if kv is not None and kv.exact(r.id) and kv.blocks(r.id, "CPU"):
            more = kv.held_from(hashes, r.id, m, "CPU")
        else:
            more = max(0, deep.match(hashes) - m)
        tier_tokens = min(more * bt, max(0, prompt - 1 - m * bt))
        if tier_tokens <= 0:
            return 0.0
        cost = tier_tokens * prefill / rate + self.tier_load_latency_s * prefill
        return tier_tokens - cost if cost < tier_tokens else 0.0

    def score(self, candidates: Candidates) -> Sequence[float]:
        f = candidates.features
        hashes = f.block_hashes
        replicas = candidates.replicas
        if hashes:
            kv = self.kv
            if kv is None:
                matched = self._match_approx(hashes, replicas)
            else:
                matched = self._match_events(kv, hashes, replicas)
            if self.min_match_blocks > 1:  # 0 and 1 leave every match as it is
                min_match = self.min_match_blocks
                matched = [m if m >= min_match else 0 for m in matched]
        else:
            matched = [0] * len(replicas)
        candidates.matched_blocks = matched
        prompt = f.prompt_tokens
        bt = self.block_size_tokens
        out: list[float] = [prompt - m * bt if m * bt < prompt else 0 for m in matched]
        if hashes:
            for i, r in enumerate(replicas):
                if r.cpu_kv_capacity_tokens:
                    out[i] -= self._tier_saving(r, hashes, matched[i], prompt)
        candidates.uncached_tokens = out
        return out

    def _match_events(self, kv: KvIndex, hashes: Sequence[int], replicas: Sequence[ReplicaState]) -> list[int]:
        """Exact replicas from the one events index (one walk), the others from their own index."""
        exact = kv.exact
        live = [r.id for r in replicas if exact(r.id)]
        held = kv.match(hashes, live, self._clock()) if live else []
        if not any(held):  # no engine holds any of it: where the router sent it before (module docs)
            return self._match_approx(hashes, replicas)
        if len(live) == len(replicas):
            return held
        by_id = dict(zip(live, held))
        rest = iter(self._match_approx(hashes, [r for r in replicas if r.id not in by_id]))
        return [m if (m := by_id.get(r.id)) is not None else next(rest) for r in replicas]

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        r = decision.replica
        if r is not None and features.block_hashes:
            kv = self.kv
            if kv is not None and kv.exact(r.id):
                kv.expect(r.id, features.block_hashes, self._clock())
            self.index(r).insert(features.block_hashes)  # also where it was sent, for events mode
            deep = self.deep_index(r)
            if deep is not None:
                deep.insert(features.block_hashes)

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        if ok and output_tokens > 0:
            # Generated tokens occupy KV blocks too and push older prefixes out.
            self.index(replica).consume(output_tokens // self.block_size_tokens)
            deep = self.deep_index(replica)
            if deep is not None:
                deep.consume(output_tokens // self.block_size_tokens)

    def on_replica_reset(self, replica_id: str) -> None:
        for indexes in (self._indexes, self._deep):
            idx = indexes.get(replica_id)
            if idx is not None:
                idx.clear()

    def on_replica_removed(self, replica_id: str) -> None:
        idx = self._indexes.pop(replica_id, None)  # its memory goes with it
        if idx is not None:
            idx.clear()  # its marks in the shared table too, and its bit is free again
            self._bits.give_back(idx.bit)
        self._deep.pop(replica_id, None)

    def cached_blocks(self, replica_id: str) -> int:
        if self.kv is not None and self.kv.exact(replica_id):
            return self.kv.blocks(replica_id)
        idx = self._indexes.get(replica_id)
        return len(idx) if idx is not None else 0


registry.register("prefix", PrefixScorer)
