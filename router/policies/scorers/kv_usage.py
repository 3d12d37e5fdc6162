"""`kv_usage`: the part of the request's uncached prompt that would not fit the replica's free KV memory.

    score = max(0, uncached_prompt_tokens - free_kv_tokens)

`free_kv_tokens` is `kv_capacity_tokens x (1 - kv_usage)` at the replica's last KV-usage sample
(`health.scrape_kv_usage`; the simulator samples the same way), less the prefill tokens routed
there since that sample. The shortfall is prefill that has to wait for memory, in tokens, so a
weight prices it against the other scorers. A replica without a sample scores 0. The uncached
prompt comes from the `prefix` scorer when the profile has one (else the whole prompt).

Registered, but not part of `cache_aware`: on the Mooncake conversation trace it did not close the
gap to the oracle robustly (docs/routing.md, *Where a goal is not met*). No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer
from gpufleet.router.types import Decision, RequestFeatures

__all__ = ["KvUsage"]


class KvUsage(Scorer):
    """Shortfall of free KV memory against the uncached prompt (module docs)."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.block_size_tokens = ctx.settings.block_size_tokens
        self._seen: dict[str, int] = {}
        self._sent_since: dict[str, int] = {}

    def score(self, candidates: Candidates) -> Sequence[float]:
        prompt = candidates.features.prompt_tokens
        bt = self.block_size_tokens
        matched = candidates.matched_blocks
        seen, sent = self._seen, self._sent_since
        out: list[float] = []
        for i, r in enumerate(candidates.replicas):
            if r.kv_usage_samples != seen.get(r.id):
                seen[r.id] = r.kv_usage_samples  # a new sample: what was sent before is in it
                sent[r.id] = 0
            if r.kv_usage is None:
                out.append(0.0)
                continue
            uncached = max(0, prompt - (matched[i] if matched is not None else 0) * bt)
            free = r.kv_capacity_tokens * (1.0 - r.kv_usage) - sent.get(r.id, 0)
            out.append(max(0.0, uncached - free))
        return out

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        if decision.replica is not None:
            rid = decision.replica.id
            self._sent_since[rid] = self._sent_since.get(rid, 0) + decision.prefill_tokens


registry.register("kv_usage", KvUsage)
