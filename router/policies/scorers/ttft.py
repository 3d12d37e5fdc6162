"""`ttft`: the request's estimated time to first token on each replica, in **seconds**.

    ahead    = own queued prefill tokens                        (this router's, exact, now)
             + foreign waiting requests x mean prefill tokens   (other routers', engine-reported)
    work     = ahead + the request's own uncached prompt tokens (from the prefix scorer's match)
    decoding = own requests past their first token + foreign running requests
    score    = work / prefill_tokens_per_s
             + ceil(work / chunk_tokens) x step_s   if decoding > 0
    step_s   = (1 + decode_batch_penalty x (decoding - 1)) / decode_tokens_per_s

A replica prefills the queue ahead of the request and then the request's uncached prompt at its
prefill rate (the plan's, per pool); while it also decodes, every prefill chunk of a step shares
that step with one decode token of each running sequence, which the step time of the decode rate
prices (vLLM's chunked prefill: `--max-num-batched-tokens` is the chunk). That is the oracle's
estimate (`gpufleet.router.sim.policies`) with what a router can know instead of the engines'
internals.

Load has two sources, combined (`ReplicaState.foreign_load`): the router's own accounting, exact
for its own requests and without lag, and the engine-reported load of the replica's `/metrics`
(`engine_metrics_interval_s`), which also counts what other router replicas sent. What the engine
reported beyond this router's own requests *at the sample* is the other routers' load; a sample
older than `stale_after_s` is ignored. Foreign waiting requests are priced at the mean uncached
prefill of the requests this router routed (it sees the same traffic mix).

The uncached prompt comes from the scorer that provides matches (`prefix`, approximate or from
engine events): `Candidates.uncached_tokens` (a lower KV tier's transfer cost included), else
`matched_blocks`; without one the whole prompt is uncached.
With equal cache credit everywhere the score orders replicas by the work queued on them and their
decode load alone: the best load balance. A replica without rates in its config falls back to
`default_prefill_tokens_per_s` and `default_decode_tokens_per_s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["TtftScorer"]


class TtftScorer(Scorer):
    """Estimated seconds to first token per replica (module docs)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        chunk_tokens: int = Field(
            default=8192, ge=1, description="prefill tokens per engine step (vLLM --max-num-batched-tokens)"
        )
        decode_batch_penalty: float = Field(
            default=0.01, ge=0, description="relative step-time cost of each extra decoding sequence"
        )
        stale_after_s: float = Field(default=2.0, gt=0, description="an engine-load sample older than this is ignored")
        default_prefill_tokens_per_s: float = Field(
            default=10_000.0, gt=0, description="prefill rate of a replica whose config has none"
        )
        default_decode_tokens_per_s: float = Field(
            default=50.0, gt=0, description="decode rate of a replica whose config has none"
        )

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.params = params
        self.block_size_tokens = ctx.settings.block_size_tokens
        self.clock: Callable[[], float] = ctx.clock
        self.mean_prefill_tokens = 0.0
        """Mean uncached prefill of the requests routed so far (EWMA): the price of a foreign request."""
        self._routed = 0

    def estimate(self, r: ReplicaState, uncached_tokens: float, now: float) -> float:
        """Estimated seconds to first token of a request needing `uncached_tokens` of prefill on `r`."""
        p = self.params
        ahead = float(r.queued_prefill_tokens)
        decoding = r.in_flight - r.queued_requests
        if now - r.engine_sampled_at <= p.stale_after_s:
            f_wait, f_run = r.foreign_load()
            ahead += f_wait * self.mean_prefill_tokens
            decoding += f_run
        work = ahead + uncached_tokens
        prefill = r.prefill_tokens_per_s or p.default_prefill_tokens_per_s
        est = work / prefill
        if decoding > 0:
            decode = r.decode_tokens_per_s or p.default_decode_tokens_per_s
            step_s = (1.0 + p.decode_batch_penalty * (decoding - 1)) / decode
            est += max(1, math.ceil(work / p.chunk_tokens)) * step_s
        return est

    def score(self, candidates: Candidates) -> Sequence[float]:
        prompt = candidates.features.prompt_tokens
        bt = self.block_size_tokens
        now = self.clock()
        estimate = self.estimate
        uncached = candidates.uncached_tokens
        if uncached is not None:
            return [estimate(r, u, now) for r, u in zip(candidates.replicas, uncached)]
        matched = candidates.matched_blocks
        if matched is None:
            return [estimate(r, prompt, now) for r in candidates.replicas]
        return [estimate(r, max(0, prompt - m * bt), now) for r, m in zip(candidates.replicas, matched)]

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        self._routed += 1
        # A plain mean over the first 64 requests, then an EWMA that follows the mix.
        alpha = max(1.0 / self._routed, 1.0 / 64)
        self.mean_prefill_tokens += alpha * (decision.prefill_tokens - self.mean_prefill_tokens)

    def bind(self, *, clock: Callable[[], float], **context: object) -> None:
        self.clock = clock


registry.register("ttft", TtftScorer)
