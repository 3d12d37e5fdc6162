"""Routing policies as pure objects: one signature, a registry, pool priority, cache awareness, sessions."""

from __future__ import annotations

import pytest

from gpufleet.router.config import CacheAwareSettings, RouterSettings, SessionSettings
from gpufleet.router.policies import registry
from gpufleet.router.policies.profile import ProfilePolicy
from gpufleet.router.policies.session import SessionPolicy
from gpufleet.router.prefix import features_from_body
from gpufleet.router.types import Outcome, ReplicaState, RequestFeatures

SETTINGS = RouterSettings()
# Every policy a router can run (the simulator's oracle needs its engines).
ROUTER_POLICIES = registry.policy_names()


def reps(
    n: int, *, pool: str = "a", priority: int = 0, kv: int = 100_000, max_conc: int = 8, start: int = 0
) -> list[ReplicaState]:
    return [
        ReplicaState(
            id=f"{pool}{i}",
            model="m",
            pool=pool,
            priority=priority,
            kv_capacity_tokens=kv,
            max_concurrent_requests=max_conc,
        )
        for i in range(start, start + n)
    ]


def feats(system: str, user: str = "q", session: str | None = None) -> RequestFeatures:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return features_from_body(body, model="m", block_size_tokens=16, chars_per_token=4.0, session_id=session)


def route(policy, f, replicas):  # type: ignore[no-untyped-def]
    d = policy.choose(f, replicas)
    policy.on_routed(f, d)
    return d


def test_registry_has_every_declared_policy_with_one_signature() -> None:
    shipped = {"round_robin", "random", "least_load", "session", "cache_aware", "cache_aware_tokens"}
    assert set(ROUTER_POLICIES) == shipped | {"consistent_hash", "sglang_cache_aware"}
    assert set(registry.policy_names(context=("engines",))) == set(ROUTER_POLICIES) | {"oracle"}
    rs = reps(3)
    for name in ROUTER_POLICIES:
        p = registry.make(name, SETTINGS, seed=1)
        assert p.name == name
        d = p.choose(feats("x" * 200), rs)
        assert d.outcome is Outcome.ROUTED and d.replica in rs


def test_unknown_policy_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="cache_aware"):
        registry.make("fastest", SETTINGS)


def test_round_robin_cycles_through_replicas() -> None:
    p, rs = registry.make("round_robin", SETTINGS), reps(3)
    assert [p.choose(feats("s"), rs).replica.id for _ in range(6)] == ["a0", "a1", "a2", "a0", "a1", "a2"]


def test_random_is_reproducible_with_a_seed_and_uses_every_replica() -> None:
    rs = reps(3)
    a = [registry.make("random", SETTINGS, seed=7).choose(feats("s"), rs).replica.id for _ in range(1)]
    p1, p2 = registry.make("random", SETTINGS, seed=7), registry.make("random", SETTINGS, seed=7)
    seq1 = [p1.choose(feats("s"), rs).replica.id for _ in range(60)]
    seq2 = [p2.choose(feats("s"), rs).replica.id for _ in range(60)]
    assert seq1 == seq2 and set(seq1) == {"a0", "a1", "a2"} and a


def test_least_load_picks_fewest_in_flight() -> None:
    rs = reps(3)
    rs[0].in_flight, rs[1].in_flight, rs[2].in_flight = 3, 1, 2
    assert registry.make("least_load", SETTINGS).choose(feats("s"), rs).replica is rs[1]


def test_cache_aware_sends_a_prefix_back_to_the_replica_that_holds_it() -> None:
    p, rs = registry.make("cache_aware", SETTINGS), reps(4)
    sys_a = "system prompt A. " * 40
    first = route(p, feats(sys_a, "q1"), rs)
    again = route(p, feats(sys_a, "q2"), rs)
    assert again.replica is first.replica
    assert again.reason == "prefix" and again.matched_blocks >= 10
    assert again.prefill_tokens < first.prefill_tokens


def test_cache_aware_spreads_distinct_prefixes_over_idle_replicas() -> None:
    p, rs = registry.make("cache_aware", SETTINGS), reps(4)
    chosen = {route(p, feats(f"prefix number {i} " * 30), rs).replica.id for i in range(40)}
    assert len(chosen) == 4


def test_cache_aware_moves_a_hot_prefix_when_its_replica_queue_costs_more_than_prefill() -> None:
    p, rs = registry.make("cache_aware", SETTINGS), reps(2)
    hot = "hot shared system prompt. " * 80  # ~520 tokens
    first = route(p, feats(hot, "u0"), rs)
    holder = first.replica
    # the holder is busy: many requests queued ahead, each costing in-flight tokens
    holder.in_flight = 20
    holder.queued_prefill_tokens = 500
    moved = route(p, feats(hot, "u1"), rs)
    assert moved.replica is not holder
    # now both hold the prefix; with equal load the match decides by rendezvous, either is fine
    holder.in_flight, holder.queued_prefill_tokens = 0, 0
    assert route(p, feats(hot, "u2"), rs).reason == "prefix"


def test_cache_aware_prefers_holder_under_light_load() -> None:
    p, rs = registry.make("cache_aware", SETTINGS), reps(2)
    hot = "hot shared system prompt. " * 80
    holder = route(p, feats(hot, "u0"), rs).replica
    holder.in_flight = 2
    assert route(p, feats(hot, "u1"), rs).replica is holder


def test_cache_aware_ties_break_the_same_way_in_independent_instances() -> None:
    rs1, rs2 = reps(5), list(reversed(reps(5)))
    p1, p2 = registry.make("cache_aware", SETTINGS), registry.make("cache_aware", SETTINGS)
    for i in range(30):
        f = feats(f"new prefix {i} " * 20)
        assert p1.choose(f, rs1).replica.id == p2.choose(f, rs2).replica.id


def test_cache_aware_below_min_match_routes_by_load() -> None:
    s = RouterSettings(cache_aware=CacheAwareSettings(min_match_blocks=1000))
    p, rs = registry.make("cache_aware", s), reps(2)
    d = route(p, feats("abc " * 200), rs)
    d2 = p.choose(feats("abc " * 200), rs)
    assert d2.reason == "load" and d2.matched_blocks == 0 and d.replica is not None


def test_cache_aware_forgets_prefixes_beyond_declared_kv_capacity() -> None:
    # 64 tokens of KV = 4 blocks: a 10-block prompt keeps only its head, a second prompt evicts it
    p = registry.make("cache_aware", SETTINGS)
    rs = reps(1, kv=64)
    a, b = feats("A" * 640), feats("B" * 640)
    route(p, a, rs)
    assert p.choose(a, rs).matched_blocks == 4
    route(p, b, rs)
    assert p.choose(a, rs).matched_blocks == 0
    assert p.cached_blocks(rs[0].id) == 4


def test_replica_reset_clears_its_predicted_cache() -> None:
    p, rs = registry.make("cache_aware", SETTINGS), reps(1)
    f = feats("x" * 400)
    route(p, f, rs)
    p.on_replica_reset(rs[0].id)
    assert p.choose(f, rs).matched_blocks == 0


@pytest.mark.parametrize("name", sorted(ROUTER_POLICIES))
def test_every_policy_prefers_the_highest_priority_pool(name: str) -> None:
    top, low = reps(2, pool="top", priority=10), reps(2, pool="low", priority=1)
    p = registry.make(name, SETTINGS, seed=3)
    for i in range(10):
        d = route(p, feats(f"p{i} " * 30, session=f"s{i}"), low + top)
        assert d.replica.pool == "top" and not d.spilled


@pytest.mark.parametrize("name", sorted(ROUTER_POLICIES))
def test_every_policy_spills_only_when_the_top_pool_is_saturated_or_unhealthy(name: str) -> None:
    top, low = reps(2, pool="top", priority=10, max_conc=1), reps(2, pool="low", priority=1)
    p = registry.make(name, SETTINGS, seed=3)
    top[0].in_flight = 1
    d = route(p, feats("x" * 100, session="s1"), top + low)
    assert d.replica is top[1] and not d.spilled
    top[1].healthy = False
    d = route(p, feats("y" * 100, session="s2"), top + low)
    assert d.replica.pool == "low" and d.spilled


@pytest.mark.parametrize("name", sorted(ROUTER_POLICIES))
def test_no_replica_outcomes_distinguish_saturated_from_unhealthy(name: str) -> None:
    rs = reps(2, max_conc=1)
    p = registry.make(name, SETTINGS)
    for r in rs:
        r.in_flight = 1
    assert p.choose(feats("x"), rs).outcome is Outcome.SATURATED
    for r in rs:
        r.healthy = False
    d = p.choose(feats("x"), rs)
    assert d.outcome is Outcome.UNAVAILABLE and d.replica is None


def test_session_sticks_while_healthy_and_not_saturated() -> None:
    p, rs = registry.make("session", SETTINGS), reps(4)
    first = route(p, feats("a", session="alice"), rs).replica
    for i in range(10):
        rs[(i + 1) % 4].in_flight += 1  # other load changes must not move the session
        assert route(p, feats(f"turn {i}", session="alice"), rs).replica is first


def test_session_moves_when_its_replica_fails_and_stays_on_the_new_one() -> None:
    p, rs = registry.make("session", SETTINGS), reps(3)
    first = route(p, feats("a", session="bob"), rs).replica
    first.healthy = False
    moved = route(p, feats("b", session="bob"), rs)
    assert moved.replica is not first and moved.reason == "session_moved"
    first.healthy = True  # the old replica comes back: the session stays where it moved
    assert route(p, feats("c", session="bob"), rs).replica is moved.replica


def test_session_moves_when_its_replica_is_saturated() -> None:
    p, rs = registry.make("session", SETTINGS), reps(2, max_conc=1)
    first = route(p, feats("a", session="carol"), rs).replica
    first.in_flight = 1
    assert route(p, feats("b", session="carol"), rs).replica is not first


def test_session_table_is_a_bounded_lru() -> None:
    s = RouterSettings(session=SessionSettings(max_sessions=10))
    p, rs = registry.make("session", s), reps(3)
    assert isinstance(p, SessionPolicy)
    for i in range(100):
        route(p, feats("x", session=f"s{i}"), rs)
    assert len(p) == 10
    assert p.session_replica("s0") is None and p.session_replica("s99") is not None


def test_session_expires_after_ttl() -> None:
    now = [0.0]
    s = RouterSettings(session=SessionSettings(ttl_s=10))
    p, rs = registry.make("session", s, clock=lambda: now[0]), reps(3)
    route(p, feats("x", session="dave"), rs)
    assert p.choose(feats("x", session="dave"), rs).reason == "session"
    now[0] = 11
    assert p.choose(feats("x", session="dave"), rs).reason == "session_new"


def test_cache_aware_is_the_default_policy() -> None:
    p = registry.make(SETTINGS.policy, SETTINGS)
    assert isinstance(p, ProfilePolicy) and p.name == "cache_aware"
