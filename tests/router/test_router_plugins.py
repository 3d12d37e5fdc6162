"""Routing plugins: each filter, scorer and picker on a table; profiles; the open registry.

The pin: the `cache_aware_tokens` profile (the default until the TTFT estimate replaced it)
computes, bit for bit, the cost the router used before and so makes the same choices (compared
with a reference implementation on random states). `cache_aware` is pinned to its own reference:
the TTFT estimate of `scorers/ttft.py` plus half the added prefill.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from gpufleet.router.config import CacheAwareSettings, ProfileSettings, RouterSettings
from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer, rendezvous
from gpufleet.router.policies.filters.pool_priority import PoolPriority
from gpufleet.router.policies.pickers.min_cost import MinCost
from gpufleet.router.policies.profile import ProfilePolicy
from gpufleet.router.policies.scorers.in_flight import InFlight
from gpufleet.router.policies.scorers.kv_usage import KvUsage
from gpufleet.router.policies.scorers.prefix import PrefixScorer
from gpufleet.router.policies.scorers.queued_prefill import QueuedPrefill
from gpufleet.router.prefix import PrefixIndex
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

S = RouterSettings()
CTX = PluginContext(S)


def rep(i: int, **kw: object) -> ReplicaState:
    return ReplicaState(id=f"r{i}", model="m", kv_capacity_tokens=kw.pop("kv", 16_000), **kw)  # type: ignore[arg-type]


def feats(blocks: Sequence[int] = (), prompt: int = 0, key: int = 7) -> RequestFeatures:
    return RequestFeatures("m", tuple(blocks), prompt or len(blocks) * 16, affinity_key=key)


# -- filters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "kept", "spilled"),
    [
        # (priority, healthy, in_flight / max) per replica
        ([(1, True, "0/2"), (0, True, "0/2")], ["r0"], False),
        ([(1, True, "2/2"), (0, True, "0/2")], ["r1"], True),  # top pool saturated: spill
        ([(1, False, "0/2"), (1, True, "1/2"), (0, True, "0/2")], ["r1"], False),
        ([(0, True, "0/2"), (0, True, "1/2")], ["r0", "r1"], False),
        ([(1, False, "0/2"), (0, False, "0/2")], [], False),
        ([], [], False),
    ],
)
def test_pool_priority_keeps_the_available_replicas_of_the_best_pool(
    replicas: list[tuple[int, bool, str]], kept: list[str], spilled: bool
) -> None:
    rs = []
    for i, (prio, healthy, load) in enumerate(replicas):
        n, cap = (int(x) for x in load.split("/"))
        rs.append(rep(i, priority=prio, healthy=healthy, in_flight=n, max_concurrent_requests=cap))
    tier, below = PoolPriority().filter(feats(), rs)
    assert [r.id for r in tier] == kept and below is spilled


# -- scorers: every one in prefill tokens ---------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "queued", "in_flight_64", "in_flight_0"),
    [
        ({}, 0, 0, 0),
        ({"queued_prefill_tokens": 500}, 500, 0, 0),
        ({"in_flight": 3, "queued_prefill_tokens": 10}, 10, 192, 0),
    ],
)
def test_load_scorers_count_queued_prefill_and_in_flight_requests(
    state: dict[str, int], queued: int, in_flight_64: int, in_flight_0: int
) -> None:
    c = Candidates(feats(), [rep(0, **state)])
    assert QueuedPrefill().score(c) == [queued]
    assert InFlight(InFlight.Params(), CTX).score(c) == [in_flight_64]
    assert InFlight(InFlight.Params(cost_tokens=0), CTX).score(c) == [in_flight_0]


@pytest.mark.parametrize(
    ("held", "prompt_blocks", "min_match", "matched", "uncached"),
    [
        (0, 10, 1, 0, 160),
        (4, 10, 1, 4, 96),
        (4, 10, 5, 0, 160),  # a match below min_match_blocks counts as none
        (10, 10, 1, 10, 0),
        (10, 10, 0, 10, 0),
    ],
)
def test_prefix_scorer_costs_the_uncached_prompt(
    held: int, prompt_blocks: int, min_match: int, matched: int, uncached: int
) -> None:
    sc = PrefixScorer(PrefixScorer.Params(min_match_blocks=min_match), CTX)
    r0, r1 = rep(0), rep(1)
    blocks = list(range(1, prompt_blocks + 1))
    sc.index(r0).insert(blocks[:held])
    c = Candidates(feats(blocks), [r0, r1])
    assert sc.score(c) == [uncached, prompt_blocks * 16]
    assert c.matched_blocks == [matched, 0]


def test_prefix_scorer_learns_from_the_lifecycle_hooks() -> None:
    sc = PrefixScorer(PrefixScorer.Params(), CTX)
    r = rep(0, kv=160)  # 10 blocks
    f = feats(range(1, 9))
    sc.on_routed(f, Decision(r))
    assert sc.cached_blocks("r0") == 8
    sc.on_completed(f, r, ok=True, output_tokens=4 * 16)  # 4 output blocks push 2 prompt blocks out
    assert sc.cached_blocks("r0") == 10 and sc.index(r).match(f.block_hashes) == 6
    sc.on_replica_reset("r0")
    assert sc.cached_blocks("r0") == 0


@pytest.mark.parametrize(
    ("usage", "capacity", "sent", "uncached", "shortfall"),
    [
        (None, 1000, 0, 800, 0.0),  # no sample yet
        (0.0, 1000, 0, 800, 0.0),
        (0.5, 1000, 0, 800, 300.0),
        (0.5, 1000, 200, 800, 500.0),  # sent since the sample takes memory too
        (1.0, 1000, 0, 0, 0.0),
    ],
)
def test_kv_usage_scorer_costs_the_shortfall_of_free_kv_memory(
    usage: float | None, capacity: int, sent: int, uncached: int, shortfall: float
) -> None:
    sc = KvUsage(None, CTX)
    r = rep(0, kv=capacity)
    if usage is not None:
        r.report_kv_usage(usage)
    c = Candidates(feats(prompt=uncached), [r])
    sc.score(c)  # takes the sample
    if sent:
        sc.on_routed(c.features, Decision(r, prefill_tokens=sent))
    assert sc.score(c) == [shortfall]
    r.report_kv_usage(usage or 0.0)  # a new sample includes what was sent
    assert sc.score(c) == [max(0.0, uncached - capacity * (1 - (usage or 0.0)))]


# -- the picker ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        ([3.0, 1.0, 2.0], {1}),
        ([1.0], {0}),
        ([2, 2.0, 5], None),  # a tie: rendezvous decides
        ([0, 0, 0, 0], None),
    ],
)
def test_min_cost_picks_the_lowest_and_breaks_ties_by_rendezvous(costs: list[float], expected: set[int] | None) -> None:
    rs = [rep(i) for i in range(len(costs))]
    for key in range(20):
        c = Candidates(feats(key=key), rs)
        i = MinCost().pick(c, costs)
        if expected is not None:
            assert i in expected
        else:
            ties = [j for j, x in enumerate(costs) if x == min(costs)]
            assert i == max(ties, key=lambda j: rendezvous(key, rs[j].id_hash))


# -- the pin: cache_aware_tokens is the previous default's formula, bit for bit ---------------------


def _reference_costs(
    features: RequestFeatures, tier: Sequence[ReplicaState], index: PrefixScorer, ca: CacheAwareSettings
) -> list[float]:
    """The router's cache_aware cost, as it was written in one loop before it became a profile."""
    out = []
    bt = S.block_size_tokens
    for r in tier:
        m = index.index(r).match(features.block_hashes) if features.block_hashes else 0
        if m < ca.min_match_blocks:
            m = 0
        out.append(
            ca.load_weight * (r.queued_prefill_tokens + r.in_flight * ca.in_flight_cost_tokens)
            + max(0, features.prompt_tokens - m * bt)
        )
    return out


def _reference_pick(features: RequestFeatures, tier: Sequence[ReplicaState], costs: list[float]) -> ReplicaState:
    best, best_cost, best_tie = None, math.inf, -1
    for r, cost in zip(tier, costs):
        if cost < best_cost:
            best, best_cost, best_tie = r, cost, -1
        elif cost == best_cost:
            if best_tie < 0:
                best_tie = rendezvous(features.affinity_key, best.id_hash)  # type: ignore[union-attr]
            tie = rendezvous(features.affinity_key, r.id_hash)
            if tie > best_tie:
                best, best_tie = r, tie
    assert best is not None
    return best


@pytest.mark.parametrize("load_weight", [0.5, 0.3, 0.7, 1.0, 0.0, 1 / 3, 2.5])
def test_cache_aware_tokens_profile_costs_and_choices_are_the_reference_formula_bit_for_bit(
    load_weight: float,
) -> None:
    rng = random.Random(int(load_weight * 1000))
    ca = CacheAwareSettings(
        load_weight=load_weight, min_match_blocks=rng.choice([0, 1, 3]), in_flight_cost_tokens=rng.choice([0, 64, 37])
    )
    settings = RouterSettings(cache_aware=ca)
    policy = registry.make("cache_aware_tokens", settings)
    assert isinstance(policy, ProfilePolicy)
    prefix = next(s for s in policy.scorers if isinstance(s, PrefixScorer))
    rs = [rep(i, kv=rng.choice([320, 1600, 16_000])) for i in range(rng.choice([1, 4, 16]))]
    prompts = [[rng.randrange(1, 10) * 1000 + j for j in range(rng.randrange(0, 30))] for _ in range(12)]
    for n in range(400):
        blocks = rng.choice(prompts)[: rng.randrange(0, 30)]
        f = feats(blocks, prompt=len(blocks) * 16 + rng.randrange(0, 16), key=rng.randrange(4))
        for r in rs:
            r.in_flight = rng.randrange(0, 5)
            r.queued_prefill_tokens = rng.choice([0, 0, rng.randrange(0, 3000)])
        tier, _ = PoolPriority().filter(f, rs)
        expected = _reference_costs(f, tier, prefix, ca)
        got = policy.costs(Candidates(f, tier))
        assert [float(x).hex() for x in got] == [float(x).hex() for x in expected]
        d = policy.choose(f, rs)
        assert d.replica is _reference_pick(f, tier, expected)
        policy.on_routed(f, d)
        if n % 3 == 0:
            policy.on_completed(f, d.replica, ok=True, output_tokens=rng.randrange(0, 200))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["cache_aware", "cache_aware_tokens"])
def test_a_profile_decision_reports_matched_blocks_and_prefill_like_cache_aware(name: str) -> None:
    p = registry.make(name, S)
    rs = [rep(0), rep(1)]
    f = feats(range(1, 11))
    first = p.choose(f, rs)
    p.on_routed(f, first)
    again = p.choose(f, rs)
    assert (first.reason, first.matched_blocks, first.prefill_tokens) == ("load", 0, 160)
    assert (again.replica, again.reason, again.matched_blocks, again.prefill_tokens) == (first.replica, "prefix", 10, 0)


# -- composition and the open registry ------------------------------------------------------------


class PreferReplica(Scorer):
    """A test scorer: every replica but `replica_id` costs `penalty_tokens`."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        replica_id: str
        penalty_tokens: int = 10_000

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.params = params

    def score(self, candidates: Candidates) -> Sequence[float]:
        return [0 if r.id == self.params.replica_id else self.params.penalty_tokens for r in candidates.replicas]


@pytest.fixture
def prefer_replica() -> Iterator[None]:
    registry.register("prefer_replica", PreferReplica)
    yield
    registry.unregister("scorer", "prefer_replica")


def _settings(profile: dict[str, object], **extra: object) -> RouterSettings:
    return RouterSettings.model_validate({"policy": "mine", "profiles": {"mine": profile}, **extra})


def test_a_scorer_registered_outside_gpufleet_composes_into_a_profile(prefer_replica: None) -> None:
    s = _settings(
        {
            "filters": ["pool_priority"],
            "scorers": [{"type": "prefix"}, {"type": "prefer_replica", "weight": 2, "params": {"replica_id": "r2"}}],
            "picker": {"type": "min_cost"},
        }
    )
    p = registry.make(s.policy, s)
    assert isinstance(p, ProfilePolicy) and p.name == "mine"
    rs = [rep(i) for i in range(4)]
    for i in range(10):
        f = feats(range(i * 100, i * 100 + 5))
        d = p.choose(f, rs)
        p.on_routed(f, d)
        assert d.replica is rs[2]
    rs[2].healthy = False  # the filters still apply
    assert p.choose(feats([1]), rs).replica is not rs[2]


def test_profile_defaults_are_the_pool_priority_filter_and_min_cost_picker() -> None:
    prof = ProfileSettings.model_validate({"scorers": ["queued_prefill"]})
    assert [f.type for f in prof.filters] == ["pool_priority"] and prof.picker.type == "min_cost"


def _errors(exc: ValidationError) -> list[tuple[tuple[object, ...], str]]:
    return [(tuple(e["loc"]), e["msg"]) for e in exc.errors()]


@pytest.mark.parametrize(
    ("profile", "loc", "words"),
    [
        (
            {"scorers": [{"type": "fastest"}]},
            ("profiles", "mine", "scorers", 0, "type"),
            ["unknown scorer 'fastest'", "prefix", "queued_prefill", "in_flight", "kv_usage"],
        ),
        (
            {"scorers": ["prefix"], "filters": ["pool_priority", "nearest"]},
            ("profiles", "mine", "filters", 1, "type"),
            ["unknown filter 'nearest'", "pool_priority"],
        ),
        (
            {"scorers": ["prefix"], "picker": "best"},
            ("profiles", "mine", "picker", "type"),
            ["unknown picker 'best'", "min_cost"],
        ),
        (
            {"scorers": [{"type": "prefix", "params": {"min_match": 2}}]},
            ("profiles", "mine", "scorers", 0, "params", "min_match"),
            ["unknown parameter of scorer 'prefix'", "min_match_blocks"],
        ),
        (
            {"scorers": [{"type": "queued_prefill", "params": {"x": 1}}]},
            ("profiles", "mine", "scorers", 0, "params", "x"),
            ["its parameters: none"],
        ),
        (
            {"scorers": [{"type": "in_flight", "params": {"cost_tokens": -1}}]},
            ("profiles", "mine", "scorers", 0, "params", "cost_tokens"),
            ["greater than or equal to 0"],
        ),
        (
            {"scorers": [{"type": "prefix", "weight": -1}]},
            ("profiles", "mine", "scorers", 0, "weight"),
            ["greater than or equal to 0"],
        ),
        ({"scorers": ["prefix"], "filters": []}, ("profiles", "mine", "filters"), ["must include pool_priority"]),
        ({"scorers": []}, ("profiles", "mine", "scorers"), ["at least 1"]),
    ],
)
def test_an_unknown_plugin_or_parameter_is_an_error_at_its_field_listing_what_exists(
    profile: dict[str, object], loc: tuple[object, ...], words: list[str]
) -> None:
    with pytest.raises(ValidationError) as info:
        _settings(profile)
    [(got_loc, msg)] = _errors(info.value)
    assert got_loc == loc
    for w in words:
        assert w in msg


def test_unknown_policy_lists_registered_policies_and_the_sections_profiles() -> None:
    with pytest.raises(ValidationError) as info:
        RouterSettings.model_validate({"policy": "fastest", "profiles": {"mine": {"scorers": ["prefix"]}}})
    [(loc, msg)] = _errors(info.value)
    assert loc == ("policy",) and msg.startswith("must be one of") and "'mine'" in msg and "'round_robin'" in msg


def test_a_router_cannot_name_a_policy_that_needs_the_simulator() -> None:
    with pytest.raises(ValidationError, match="needs engines"):
        RouterSettings(policy="oracle")
    with pytest.raises(ValueError, match="needs engines"):
        registry.make("oracle", S)
    assert registry.make("oracle", S, engines={}).name == "oracle"


def test_a_profile_may_not_take_a_registered_name() -> None:
    with pytest.raises(ValidationError) as info:
        RouterSettings.model_validate({"profiles": {"least_load": {"scorers": ["prefix"]}}})
    assert _errors(info.value)[0][0] == ("profiles", "least_load")


def test_a_plugin_module_that_fails_to_import_is_an_error_at_its_entry() -> None:
    with pytest.raises(ValidationError) as info:
        RouterSettings.model_validate({"plugins": ["gpufleet.router.policies", "no_such_module_xyz"]})
    [(loc, msg)] = _errors(info.value)
    assert loc == ("plugins", 1)
    assert (
        msg
        == "cannot import plugin module 'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )


def test_register_rejects_a_taken_name_and_a_factory_without_a_kind(prefer_replica: None) -> None:
    registry.register("prefer_replica", PreferReplica)  # the same factory again: no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.register("prefer_replica", QueuedPrefill)
    with pytest.raises(ValueError, match="kind="):
        registry.register("nameless", lambda params, ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("cache_aware", lambda settings: None, kind="policy")


def test_a_plugin_that_fails_to_build_is_named_in_the_error() -> None:
    class Broken(Scorer):
        def __init__(self, params: object, ctx: PluginContext) -> None:
            raise RuntimeError("no model file")

        def score(self, candidates: Candidates) -> Sequence[float]:
            return []

    registry.register("broken_scorer", Broken)
    try:
        s = _settings({"scorers": ["prefix", "broken_scorer"]})
        with pytest.raises(
            registry.PluginError, match="cannot build scorer 'broken_scorer' .*RuntimeError: no model file"
        ):
            registry.make(s.policy, s)
    finally:
        registry.unregister("scorer", "broken_scorer")


def test_settings_blocks_are_the_params_of_the_named_profile_and_policy() -> None:
    s = RouterSettings.model_validate(
        {"cache_aware": {"load_weight": 0.25, "min_match_blocks": 2, "added_prefill_weight": 0.75}}
    )
    p = registry.make("cache_aware_tokens", s)
    assert isinstance(p, ProfilePolicy)
    assert [(r.type, r.weight, r.params) for r in p.profile.scorers] == [
        ("queued_prefill", 0.25, {}),
        ("in_flight", 0.25, {"cost_tokens": 64}),
        ("prefix", 1.0, {"min_match_blocks": 2}),
    ]
    p = registry.make("cache_aware", s)
    assert isinstance(p, ProfilePolicy)
    assert [(r.type, r.weight, r.params) for r in p.profile.scorers] == [
        ("prefix", 0.0, {"min_match_blocks": 2}),
        ("ttft", 1.0, {}),
        ("added_prefill", 0.75, {}),
    ]
    assert p.profile.picker.type == "session_affinity"
    assert "kv_usage" in registry.names("scorer")


def test_the_simulator_runs_a_profile_of_the_fleet_settings(prefer_replica: None) -> None:
    from gpufleet.router.sim import engine, fleet
    from gpufleet.router.workloads import generators

    s = _settings({"scorers": [{"type": "prefer_replica", "params": {"replica_id": "r1"}}]})
    f = fleet.uniform_fleet(3, kv_capacity_tokens=20_000, settings=s)
    res = engine.simulate(generators.rag(30, seed=1), f, "mine")
    assert res.policy == "mine" and {r.replica for r in res.records} == {"r1"}


def test_prefix_index_is_what_the_prefix_scorer_sizes_from_declared_capacity() -> None:
    sc = PrefixScorer(PrefixScorer.Params(), CTX)
    idx = sc.index(rep(0, kv=160))
    assert isinstance(idx, PrefixIndex) and idx.capacity_blocks == 10


def test_public_api_is_pinned() -> None:
    from gpufleet.router import policies
    from gpufleet.router.policies import base, policy, profile

    assert sorted(registry.__all__) == sorted(
        [
            "ENTRY_POINT_GROUP",
            "Entry",
            "Kind",
            "NoParams",
            "PluginError",
            "entry",
            "is_policy",
            "load_entry_points",
            "load_plugin",
            "make",
            "make_part",
            "names",
            "parse_params",
            "policy_names",
            "policy_problem",
            "register",
            "unregister",
        ]
    )
    assert sorted(base.__all__) == sorted(
        ["Candidates", "Component", "Filter", "Hooks", "Picker", "PluginContext", "PluginError", "Scorer", "rendezvous"]
    )
    assert policy.__all__ == ["Policy"] and sorted(profile.__all__) == [
        "ProfilePolicy",
        "cache_aware_profile",
        "cache_aware_tokens_profile",
    ]
    assert "Policy" in policies.__all__ and "registry" in policies.__all__
    assert registry.names("filter") == ["pool_priority"]
    assert registry.names("picker") == ["min_cost", "session_affinity"]
    assert {"prefix", "queued_prefill", "in_flight", "kv_usage", "ttft", "added_prefill"} <= set(
        registry.names("scorer")
    )
    modules = [policies, base, policy, profile, registry]
    modules += [getattr(policies, n) for n in policies.__all__ if not n[0].isupper()]
    for mod in modules:
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
