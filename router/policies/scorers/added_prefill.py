"""`added_prefill`: the prefill the request adds to the replica, in **seconds** (its uncached prompt / prefill rate).

    added  = max(0, prompt_tokens - matched_blocks x block_size_tokens) / prefill_tokens_per_s
    behind = max(0, min over the candidates of their queued requests - 1)
    queued = this router's queued requests + its peers' (fresh reports) + other routers' waiting
             ones the engine reported (a fresh `/metrics` sample, as `ttft` counts them)
    score  = added x (1 + behind)

`ttft` is what the request itself waits; this is what it makes the requests behind it wait. A
greedy choice by `ttft` alone leaves a replica's cache as soon as a queue forms there and pays for
the re-prefill with everyone's later first tokens: charging the added work once more keeps
requests on their cache until the queue costs more than twice the prefill saved (measured in
docs/routing.md, *cache_aware*). With equal cache credit on equally fast replicas it is the same
everywhere, so the cost still reduces to the load balance. The uncached prompt comes from the
profile's `prefix` scorer (`Candidates.uncached_tokens`, a lower tier's transfer included; without
one, the whole prompt).

How many requests wait behind it depends on how loaded the fleet is. Below saturation a queue
drains between arrivals and the added work delays about one request; when even the shortest
queue holds requests that have not started (`behind`: the requests queued on the replica, every
router's, less the one in prefill), the fleet is saturated, and by Little's law about as many more arrive
behind this one while that queue lasts, each waiting for its added prefill: the work it adds
counts `1 + behind` times. Then recomputing a prefix elsewhere costs capacity the whole fleet
needs, and the request stays on its cache (docs/routing.md, *Overload*: without it,
`shared_prompts` at load 3.6 had 1.7 x the SGLang model's TTFT p99). Below saturation `behind`
is 0 and the score is what it was. `queue_behind: false` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer
from gpufleet.router.types import ReplicaState

__all__ = ["AddedPrefill"]


class AddedPrefill(Scorer):
    """Seconds of prefill the request adds per replica (module docs)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        default_prefill_tokens_per_s: float = Field(
            default=10_000.0, gt=0, description="prefill rate of a replica whose config has none"
        )
        queue_behind: bool = Field(
            default=True,
            description="count the added prefill once per request expected behind it when the fleet is saturated",
        )
        stale_after_s: float = Field(
            default=2.0, gt=0, description="an engine-load sample or peer report older than this is ignored"
        )

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.default_rate = params.default_prefill_tokens_per_s
        self.block_size_tokens = ctx.settings.block_size_tokens
        self.queue_behind = params.queue_behind
        self.stale_after_s = params.stale_after_s
        self.clock: Callable[[], float] = ctx.clock

    def queued(self, r: ReplicaState, now: float) -> int:
        """Requests queued on `r` (not yet at their first token), every router's: this router's
        exactly, its peers' as of a fresh report, the rest as a fresh engine sample showed them."""
        n = r.queued_requests
        peers = r.peer_load(now, self.stale_after_s)
        if peers is not None:
            n += peers[1]
        if now - r.engine_sampled_at <= self.stale_after_s:
            n += r.foreign_load(peers is not None)[0]
        return n

    def behind(self, replicas: Sequence[ReplicaState]) -> int:
        """Requests expected to queue behind this one (module docs): 0 below saturation."""
        if not self.queue_behind or not replicas:
            return 0
        now = self.clock()
        best = 1 << 62
        for r in replicas:
            # Own queued requests are a lower bound of every router's: skip what cannot be shorter.
            if r.queued_requests < best:
                best = min(best, self.queued(r, now))
                if best <= 1:
                    return 0  # a queue with at most the request in prefill: not saturated
        return best - 1

    def score(self, candidates: Candidates) -> Sequence[float]:
        prompt = candidates.features.prompt_tokens
        bt = self.block_size_tokens
        matched = candidates.matched_blocks
        rate = self.default_rate
        reps = candidates.replicas
        uncached = candidates.uncached_tokens
        k = 1 + self.behind(reps)
        if uncached is not None:
            return [k * u / (r.prefill_tokens_per_s or rate) for r, u in zip(reps, uncached)]
        if matched is None:
            return [k * prompt / (r.prefill_tokens_per_s or rate) for r in reps]
        return [k * max(0, prompt - m * bt) / (r.prefill_tokens_per_s or rate) for r, m in zip(reps, matched)]

    def bind(self, *, clock: Callable[[], float], **context: object) -> None:
        self.clock = clock


registry.register("added_prefill", AddedPrefill)
