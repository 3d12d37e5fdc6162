"""Profiles: routing by composition of filters, weighted scorers and a picker; `cache_aware` is one.

A profile (`config.ProfileSettings`, a `router.profiles` entry or a registered profile) runs

    kept    = the filters, in order                          (pool_priority at least)
    cost[r] = sum over its scorers of weight x score[r]      (one unit per profile)
    choice  = the picker's choice over cost                  (min_cost: lowest, rendezvous ties)

Adjacent scorers of equal weight are added before they are weighted, `w * (a + b)` rather than
`w * a + w * b`, and the weighted terms are added left to right: that is how the cost was always
written, and floating-point sums depend on the order. The decision's reason is the picker's when
it gives one (`session`, `session_moved`), else `prefix` when the chosen replica is predicted to
hold part of the prompt, else `load`.

`cache_aware` (the default) is the profile

    filter         pool_priority
    prefix         weight 0, min_match_blocks     (provides the matched blocks, costs nothing itself)
    ttft           weight 1                       (estimated seconds to first token)
    added_prefill  weight added_prefill_weight    (seconds of prefill the request adds there)
    picker         session_affinity               (a session stays unless it costs > session.max_penalty_s)

i.e. cost = the request's estimated time to first token on the replica (the prefill queued ahead
of it, own and engine-reported, its own uncached prompt at the replica's prefill rate, and the
slowdown from the sequences the replica decodes: `scorers/ttft.py`) plus half the prefill it adds
there, which the requests behind it wait for (`scorers/added_prefill.py`; 0.5 measured in
docs/routing.md), counted once per request expected behind it when the fleet is saturated. A hot prefix stays on a replica that holds it until waiting there costs more
than prefilling it elsewhere; with equal cache credit on equally fast replicas the cost is the
best load balance. Sessions keep their replica within a penalty bound
(`pickers/session_affinity.py`). Its parameters are `cache_aware.min_match_blocks`,
`cache_aware.added_prefill_weight` and the `session:` block.

`cache_aware_tokens` is the previous default, kept by name so its results stay reproducible:

    queued_prefill   weight load_weight
    in_flight        weight load_weight, cost_tokens = in_flight_cost_tokens
    prefix           weight 1,           min_match_blocks
    picker           min_cost

    cost = load_weight * (queued_prefill_tokens + in_flight * in_flight_cost_tokens)
           + (prompt_tokens - matched_blocks * block_size_tokens)

prefill work saved by the replica's predicted cache against the work already queued on it (the
idea behind Dynamo's overlap-vs-load cost, with llm-d's scorers in one unit). The prediction per
replica is bounded by that replica's declared KV capacity, unlike SGLang's global tree-size bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gpufleet.router.config import (
    CacheAwareSettings,
    FilterRef,
    PickerRef,
    ProfileSettings,
    RouterSettings,
    ScorerRef,
)
from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, Component, Filter, Hooks, Picker, PluginContext, Scorer
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["ProfilePolicy", "cache_aware_profile", "cache_aware_tokens_profile"]


def _overrides(part: Component, hook: str) -> bool:
    return getattr(type(part), hook) is not getattr(Hooks, hook)


class ProfilePolicy(Policy):
    """A policy composed of registered plugins (module docs); built by `registry.make`."""

    def __init__(self, name: str, profile: ProfileSettings, ctx: PluginContext) -> None:
        filters: list[Filter] = [registry.make_part("filter", f.type, f.params, ctx) for f in profile.filters]
        super().__init__(ctx.settings, seed=ctx.seed, clock=ctx.clock, filters=filters)
        self.name = name
        self.profile = profile
        self.scorers: list[Scorer] = [registry.make_part("scorer", s.type, s.params, ctx) for s in profile.scorers]
        self.picker: Picker = registry.make_part("picker", profile.picker.type, profile.picker.params, ctx)
        # Scorers that find the matched blocks run first (others may read them); the sum takes
        # the scores in that order and adds them in the profile's.
        order = sorted(range(len(self.scorers)), key=lambda i: not self.scorers[i].provides_matches)
        self._costs = _compile_costs([s.score for s in self.scorers], [s.weight for s in profile.scorers], order)
        parts: list[Component] = [*filters, *self.scorers, self.picker]
        self._parts = parts
        # Only the hooks a part implements are called: the request path stays short.
        self._on_routed = [p.on_routed for p in parts if _overrides(p, "on_routed")]
        self._on_completed = [p.on_completed for p in parts if _overrides(p, "on_completed")]
        self._on_reset = [p.on_replica_reset for p in parts if _overrides(p, "on_replica_reset")]
        self._on_removed = [
            p.on_replica_removed
            for p in parts
            if _overrides(p, "on_replica_removed") or _overrides(p, "on_replica_reset")
        ]

    def costs(self, c: Candidates) -> Sequence[float]:
        """The weighted cost of every candidate (module docs), in estimated prefill tokens."""
        return self._costs(c)

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        c = Candidates(features, tier)
        i = self.picker.pick(c, self._costs(c))
        m = c.matched_blocks[i] if c.matched_blocks is not None else 0
        return Decision(tier[i], reason=c.reason or ("prefix" if m else "load"), matched_blocks=m)

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        for hook in self._on_routed:
            hook(features, decision)

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        for hook in self._on_completed:
            hook(features, replica, ok=ok, output_tokens=output_tokens)

    def on_replica_reset(self, replica_id: str) -> None:
        for hook in self._on_reset:
            hook(replica_id)

    def on_replica_removed(self, replica_id: str) -> None:
        for hook in self._on_removed:
            hook(replica_id)

    def bind(self, *, clock: Callable[[], float], **context: Any) -> None:
        self.clock = clock
        for p in self._parts:
            p.bind(clock=clock, **context)

    def cached_blocks(self, replica_id: str) -> int:
        return sum(p.cached_blocks(replica_id) for p in self._parts)


def _compile_costs(
    scores: Sequence[Callable[[Candidates], Sequence[float]]], weights: Sequence[float], order: Sequence[int]
) -> Callable[[Candidates], list[float]]:
    """The profile's cost function as one comprehension, e.g. for weights (0.5, 0.5, 1) and the
    third scorer first in `order` (it provides the matches):

        lambda c: [w0 * (x0 + x1) + x2 for x2, x0, x1 in zip(f2(c), f0(c), f1(c))]

    Adjacent equal weights are factored out and terms added left to right (module docs); the
    scorers run in `order`. It is compiled once per profile because a loop over scorers and terms
    costs microseconds per request; the source holds only generated names, and the scorers and
    weights are bound as values, not formatted in.
    """
    terms: list[str] = []
    bound: dict[str, object] = {f"f{i}": f for i, f in enumerate(scores)}
    start = 0
    for i in range(1, len(weights) + 1):
        if i < len(weights) and weights[i] == weights[start]:
            continue
        inner = " + ".join(f"x{j}" for j in range(start, i))
        if weights[start] == 1.0:
            terms.append(inner)
        else:
            bound[f"w{start}"] = weights[start]
            terms.append(f"w{start} * ({inner})")
        start = i
    row = "".join(f"x{i}, " for i in order)
    calls = ", ".join(f"f{i}(c)" for i in order)
    source = f"lambda c: [{' + '.join(terms)} for {row}in zip({calls})]"
    fn: Callable[[Candidates], list[float]] = eval(source, {"__builtins__": {"zip": zip}, **bound})
    return fn


def cache_aware_profile(settings: RouterSettings) -> ProfileSettings:
    """The `cache_aware` profile with the settings' `cache_aware:` and `session:` parameters (module docs)."""
    ca = settings.cache_aware
    return ProfileSettings(
        filters=[FilterRef(type="pool_priority")],
        scorers=[
            ScorerRef(type="prefix", weight=0.0, params={"min_match_blocks": ca.min_match_blocks}),
            ScorerRef(type="ttft"),
            ScorerRef(type="added_prefill", weight=ca.added_prefill_weight),
        ],
        picker=PickerRef(type="session_affinity"),
    )


def cache_aware_tokens_profile(settings: RouterSettings) -> ProfileSettings:
    """The `cache_aware_tokens` profile (the previous default) with the `cache_aware:` parameters."""
    ca = settings.cache_aware
    return ProfileSettings(
        filters=[FilterRef(type="pool_priority")],
        scorers=[
            ScorerRef(type="queued_prefill", weight=ca.load_weight),
            ScorerRef(type="in_flight", weight=ca.load_weight, params={"cost_tokens": ca.in_flight_cost_tokens}),
            ScorerRef(type="prefix", params={"min_match_blocks": ca.min_match_blocks}),
        ],
        picker=PickerRef(type="min_cost"),
    )


registry.register("cache_aware", cache_aware_profile, kind="profile", params=CacheAwareSettings)
registry.register("cache_aware_tokens", cache_aware_tokens_profile, kind="profile", params=CacheAwareSettings)
