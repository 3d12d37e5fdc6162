"""`added_prefill`: the prefill the request adds to the replica, in **seconds** (its uncached prompt / prefill rate).

    score = max(0, prompt_tokens - matched_blocks x block_size_tokens) / prefill_tokens_per_s

`ttft` is what the request itself waits; this is what it makes the requests behind it wait. A
greedy choice by `ttft` alone leaves a replica's cache as soon as a queue forms there and pays for
the re-prefill with everyone's later first tokens: charging the added work once more keeps
requests on their cache until the queue costs more than twice the prefill saved (measured in
docs/routing.md, *cache_aware*). With equal cache credit on equally fast replicas it is the same
everywhere, so the cost still reduces to the load balance. The uncached prompt comes from the
profile's `prefix` scorer (`Candidates.uncached_tokens`, a lower tier's transfer included; without
one, the whole prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer

__all__ = ["AddedPrefill"]


class AddedPrefill(Scorer):
    """Seconds of prefill the request adds per replica (module docs)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        default_prefill_tokens_per_s: float = Field(
            default=10_000.0, gt=0, description="prefill rate of a replica whose config has none"
        )

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.default_rate = params.default_prefill_tokens_per_s
        self.block_size_tokens = ctx.settings.block_size_tokens

    def score(self, candidates: Candidates) -> Sequence[float]:
        prompt = candidates.features.prompt_tokens
        bt = self.block_size_tokens
        matched = candidates.matched_blocks
        rate = self.default_rate
        reps = candidates.replicas
        uncached = candidates.uncached_tokens
        if uncached is not None:
            return [u / (r.prefill_tokens_per_s or rate) for r, u in zip(reps, uncached)]
        if matched is None:
            return [prompt / (r.prefill_tokens_per_s or rate) for r in reps]
        return [max(0, prompt - m * bt) / (r.prefill_tokens_per_s or rate) for r, m in zip(reps, matched)]


registry.register("added_prefill", AddedPrefill)
