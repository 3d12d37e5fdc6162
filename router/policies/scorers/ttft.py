"""`ttft`: the request's estimated time to first token on each replica, in **seconds**.

    ahead    = own queued prefill tokens                        (this router's, exact, now)
             + peers' queued prefill tokens                     (peer routers' reports, exact)
             + foreign waiting requests x mean prefill tokens   (other routers', engine-reported)
    work     = ahead + the request's own uncached prompt tokens (from the prefix scorer's match)
    decoding = own requests past their first token + foreign running requests
    score    = work / prefill_tokens_per_s
             + ceil(work / step_tokens) x step_s   if decoding > 0
             + max(0, slot_s - ahead / prefill_tokens_per_s)   if the engine is full
    step_s   = (1 + decode_batch_penalty x (decoding - 1)) / decode_tokens_per_s
    slot_s   = (in the engine - full + 1) x mean output tokens x step_s / full

A replica prefills the queue ahead of the request and then the request's uncached prompt at its
prefill rate (the plan's, per pool); while it also decodes, every prefill chunk of a step shares
that step with one decode token of each running sequence, which the step time of the decode rate
prices (vLLM's chunked prefill: `--max-num-batched-tokens` is the chunk, the replica's
`max_batched_tokens` in the router config, `ReplicaState.step_tokens`). That is the oracle's
estimate (`gpufleet.router.sim.policies`) with what a router can know instead of the engines'
internals.

An engine runs a bounded number of requests at once (`--max-num-seqs`, or fewer when its KV memory
is full); the rest wait for a running one to finish, which takes decode time, not prefill time.
`full` is that bound as the engine's samples show it (`ReplicaState.engine_full_running`: the
most requests it ran while it also reported waiting ones, counted only when this router's own
queued prefill fitted in one step or the KV memory was full: a wait for the step's token budget, as
long prompts cause with a few requests running, is not a slot limit), capped by
`max_concurrent_requests`.
When the requests in the engine (own in-flight + foreign) reach it, this request starts after
`in the engine - full + 1` finishes, one every mean decode time (mean output tokens of the
completed requests x step_s) / `full`; the prefill queued ahead runs meanwhile, so only what the
slot wait adds beyond it counts.

Load has two sources, combined (`ReplicaState.foreign_load`): the router's own accounting, exact
for its own requests and without lag, and the engine-reported load of the replica's `/metrics`
(`engine_metrics_interval_s`), which also counts what other router replicas sent. What the engine
reported beyond this router's own requests *at the sample* is the other routers' load; a sample
older than `stale_after_s` is ignored. Foreign waiting requests are priced at the mean uncached
prefill of the requests this router routed (it sees the same traffic mix). Between samples the
other routers keep routing: per request this router sent to a replica since its sample, they are
taken to have sent `share` more there (`foreign_share`: their in-flight requests per one of this
router's, over every replica's sample), counted as waiting. With one router `share` is 0 and the
estimate is the router's own accounting alone.

Where the routers exchange their own counts (`peer_interval_s`, `router.peers`; each peer's
report on `ReplicaState.peers`), a fresh report (at most `stale_after_s` old) gives the other
routers' load as it is, not as the engine shows it: the peers' queued prefill *tokens* go into
`ahead` exactly, their queued requests are foreign waiting and the rest of their in-flight ones
foreign running. vLLM counts a prefilling request as running, so without the reports another
router's fresh 3k-token prefill is priced as one decoding sequence until its first token. The
engine sample then counts only what it shows beyond this router and the reporting peers at the
sample (`foreign_load(beyond_peers=True)`: routers that do not report, clients beside the
routers), priced as before, and the guess of what the others sent meanwhile runs from the
freshest of the sample and the reports; `share` is the peers' in-flight (plus the unreported)
per one of this router's at the report. Without a fresh report everything is as above.

Several routers see the same samples and the same caches, so where the estimates are closer than
that guess is accurate they would all pick the same replica and herd onto it. With `share > 0`
each router adds a uniform draw of up to `share x mean prefill tokens / prefill rate` (one mean
request of the other routers' per replica) to each cost, from its own seeded generator, so that
near-equal replicas are taken in a different order by each router (random tie-breaking within the
estimate's error). With fresh peer reports of every replica the guess covers only what was sent
since the last report, so the draw is scaled by the requests this router sent since (the others
sent about `share` times as many, unseen), at most 1 (`unknown_fraction`): right after a report
the estimate is exact and nothing is drawn. Requests with a session id get none: their stay-or-move bound
(`session.max_penalty_s`) is of the same size, and noise there only moves sessions off their cache.

The uncached prompt comes from the scorer that provides matches (`prefix`, approximate or from
engine events): `Candidates.uncached_tokens` (a lower KV tier's transfer cost included), else
`matched_blocks`; without one the whole prompt is uncached.
With equal cache credit everywhere the score orders replicas by the work queued on them and their
decode load alone: the best load balance. A replica without rates in its config falls back to
`default_prefill_tokens_per_s` and `default_decode_tokens_per_s`.
"""

from __future__ import annotations

import math
import random
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
        self.mean_output_tokens = 0.0
        """Mean output tokens of the requests completed so far (EWMA): how long a running request holds its slot."""
        self._completed = 0
        self._rng = random.Random(ctx.seed)

    def estimate(self, r: ReplicaState, uncached_tokens: float, now: float, share: float = 0.0) -> float:
        """Estimated seconds to first token of a request needing `uncached_tokens` of prefill on `r`;
        `share`: other routers' requests per request of this router (`foreign_share`)."""
        p = self.params
        ahead = float(r.queued_prefill_tokens)
        decoding = r.in_flight - r.queued_requests
        f_wait, f_run = 0.0, 0
        peers = r.peer_load(now, p.stale_after_s)
        sampled = now - r.engine_sampled_at <= p.stale_after_s
        if peers is not None:
            # Peer routers' own counts, exact as of their report: their queued prefill in tokens.
            tokens, queued, in_flight = peers
            ahead += tokens
            f_wait, f_run = float(queued), in_flight - queued
        if sampled or peers is not None:
            # The engine sample beyond what this router and the reporting peers had then: routers
            # that do not report. Other routers keep routing after the freshest of the sample and
            # the peers' reports, seeing what this one sees: as many per request this router sent
            # here since, as their share of the load.
            w, run = r.foreign_load(peers is not None) if sampled else (0, 0)
            since = r.sampled_routed if peers is None else max(r.sampled_routed, r.peer_routed)
            guess = w + share * (r.routed - since)
            ahead += guess * self.mean_prefill_tokens
            f_wait += guess
            f_run += run
            decoding += f_run
        work = ahead + uncached_tokens
        prefill = r.prefill_tokens_per_s or p.default_prefill_tokens_per_s
        est = work / prefill
        if decoding > 0:
            decode = r.decode_tokens_per_s or p.default_decode_tokens_per_s
            step_s = (1.0 + p.decode_batch_penalty * (decoding - 1)) / decode
            est += max(1, math.ceil(work / r.step_tokens)) * step_s
            full = min(r.engine_full_running, r.max_concurrent_requests) or r.max_concurrent_requests
            behind = r.in_flight + f_wait + f_run - full
            if behind >= 0:
                # The engine runs no more than `full` at once: this request starts after
                # `behind + 1` of them finish, one every mean decode time / `full`; the prefill
                # queued ahead runs meanwhile, so the later of the two bounds its start.
                slot_s = (behind + 1) * self.mean_output_tokens * step_s / full
                est += max(0.0, slot_s - ahead / prefill)
        return est

    def foreign_share(self, replicas: Sequence[ReplicaState], now: float) -> float:
        """Other routers' in-flight requests per in-flight request of this router, over the
        replicas' fresh peer reports (with what the engine shows beyond them) or else fresh
        engine-load samples (0 with one router, or before any sample or report)."""
        own = foreign = 0
        stale = self.params.stale_after_s
        for r in replicas:
            sampled = now - r.engine_sampled_at <= stale
            peers = r.peer_load(now, stale)
            if peers is not None:
                own += r.peer_own_in_flight
                foreign += peers[2] + (sum(r.foreign_load(True)) if sampled else 0)
            elif sampled:
                own += r.sampled_in_flight
                foreign += sum(r.foreign_load())
        return foreign / own if own else 0.0

    def unknown_fraction(self, replicas: Sequence[ReplicaState], now: float) -> float:
        """How much of one request per other router the estimate may miss: 1 with engine samples
        alone (what the others sent since a sample is a guess); with fresh peer reports of every
        replica, the requests this router sent since the last report (the others sent about
        `share` times as many since, unseen), at most 1."""
        stale = self.params.stale_after_s
        since = 0
        for r in replicas:
            if r.peer_load(now, stale) is None:
                return 1.0
            since += r.routed - r.peer_routed
        return min(1.0, float(since))

    def score(self, candidates: Candidates) -> Sequence[float]:
        prompt = candidates.features.prompt_tokens
        bt = self.block_size_tokens
        now = self.clock()
        estimate = self.estimate
        reps = candidates.replicas
        share = self.foreign_share(reps, now)
        uncached = candidates.uncached_tokens
        if uncached is not None:
            est = [estimate(r, u, now, share) for r, u in zip(reps, uncached)]
        elif candidates.matched_blocks is None:
            est = [estimate(r, prompt, now, share) for r in reps]
        else:
            est = [estimate(r, max(0, prompt - m * bt), now, share) for r, m in zip(reps, candidates.matched_blocks)]
        if share > 0 and candidates.features.session_id is None:
            # What other routers sent since the samples is a guess, off by about their share of one
            # mean request's prefill per replica: costs closer than that are not told apart, and
            # routers that all took the lowest would herd onto it. Each router draws its own order.
            # Not for sessions: their stay-or-move bound (`session.max_penalty_s`) is of that size.
            rng = self._rng.random
            default = self.params.default_prefill_tokens_per_s
            spread = share * self.mean_prefill_tokens * self.unknown_fraction(reps, now)
            est = [e + rng() * spread / (r.prefill_tokens_per_s or default) for e, r in zip(est, reps)]
        return est

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        self._routed += 1
        # A plain mean over the first 64 requests, then an EWMA that follows the mix.
        alpha = max(1.0 / self._routed, 1.0 / 64)
        self.mean_prefill_tokens += alpha * (decision.prefill_tokens - self.mean_prefill_tokens)

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        if not ok:
            return
        self._completed += 1
        alpha = max(1.0 / self._completed, 1.0 / 64)
        self.mean_output_tokens += alpha * (output_tokens - self.mean_output_tokens)

    def bind(self, *, clock: Callable[[], float], **context: object) -> None:
        self.clock = clock


registry.register("ttft", TtftScorer)
