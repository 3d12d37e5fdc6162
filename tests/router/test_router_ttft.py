"""The default profile's plugins on tables: the `ttft` and `added_prefill` scorers, the `session_affinity` picker,
and `cache_aware` against its reference formula on random states."""

from __future__ import annotations

import math
import random

import pytest

from gpufleet.router.config import RouterSettings
from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext
from gpufleet.router.policies.filters.pool_priority import PoolPriority
from gpufleet.router.policies.least_load import least_loaded
from gpufleet.router.policies.pickers.session_affinity import SessionAffinity
from gpufleet.router.policies.profile import ProfilePolicy
from gpufleet.router.policies.scorers.added_prefill import AddedPrefill
from gpufleet.router.policies.scorers.prefix import PrefixScorer
from gpufleet.router.policies.scorers.ttft import TtftScorer
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

S = RouterSettings()
NOW = [100.0]
CTX = PluginContext(S, clock=lambda: NOW[0])


def rep(i: int, *, prefill: float = 10_000.0, decode: float = 50.0, **kw: int) -> ReplicaState:
    r = ReplicaState(id=f"r{i}", model="m", kv_capacity_tokens=16_000)
    r.prefill_tokens_per_s, r.decode_tokens_per_s = prefill, decode
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def cands(rs: list[ReplicaState], prompt: int = 1000, matched: list[int] | None = None, sid: str | None = None):  # type: ignore[no-untyped-def]
    c = Candidates(RequestFeatures("m", prompt_tokens=prompt, session_id=sid, affinity_key=3), rs)
    c.matched_blocks = matched
    return c


def ttft() -> TtftScorer:
    return TtftScorer(TtftScorer.Params(), CTX)


# -- ttft ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "prompt", "matched", "expected_s"),
    [
        ({}, 1000, 0, 1000 / 10_000),  # idle: the own prefill
        ({}, 1000, 50, 200 / 10_000),  # 50 blocks of 16 cached: 200 tokens left
        ({"queued_prefill_tokens": 4000, "in_flight": 1, "queued_requests": 1}, 1000, 0, 0.5),  # queue ahead
        # two decoding: one step of (1 + 0.01) / 50 s per 8192-token chunk of work
        ({"in_flight": 2}, 1000, 0, 0.1 + 1.01 / 50),
        ({"in_flight": 2, "queued_prefill_tokens": 9000, "queued_requests": 0}, 1000, 0, 1.0 + 2 * 1.01 / 50),
    ],
)
def test_ttft_estimates_queue_own_prefill_and_decode_slowdown(state, prompt, matched, expected_s) -> None:  # type: ignore[no-untyped-def]
    got = ttft().score(cands([rep(0, **state)], prompt, [matched]))
    assert got[0] == pytest.approx(expected_s)


def test_ttft_uses_each_replicas_own_rates_and_the_whole_prompt_without_a_prefix_scorer() -> None:
    fast, slow = rep(0, prefill=20_000.0), rep(1, prefill=5_000.0)
    assert ttft().score(cands([fast, slow], 1000, None)) == pytest.approx([0.05, 0.2])
    unknown = ReplicaState(id="u", model="m")  # no rates in its config: the defaults
    assert ttft().score(cands([unknown], 1000, None)) == pytest.approx([0.1])


def test_ttft_adds_other_routers_load_from_a_fresh_engine_sample_only() -> None:
    sc = ttft()
    sc.on_routed(RequestFeatures("m"), Decision(rep(9), prefill_tokens=2000))  # mean foreign prefill 2000
    r = rep(0)
    r.report_engine_load(waiting=3, running=0, kv_usage=None, now=NOW[0])  # none of them ours
    assert sc.score(cands([r], 1000, [0]))[0] == pytest.approx((3 * 2000 + 1000) / 10_000)
    r.report_engine_load(waiting=0, running=4, kv_usage=None, now=NOW[0])
    assert sc.score(cands([r], 1000, [0]))[0] == pytest.approx(0.1 + 1.03 / 50)
    r.engine_sampled_at = NOW[0] - 2.5  # older than stale_after_s: ignored
    assert sc.score(cands([r], 1000, [0]))[0] == pytest.approx(0.1)


def test_with_equal_cache_credit_the_cost_is_the_best_load_balance() -> None:
    rng = random.Random(5)
    for _ in range(300):
        rs = [
            rep(
                i,
                in_flight=rng.randrange(0, 6),
                queued_prefill_tokens=rng.choice([0, rng.randrange(0, 20_000)]),
            )
            for i in range(rng.randrange(2, 8))
        ]
        for r in rs:
            r.queued_requests = min(r.in_flight, r.queued_prefill_tokens // 2000)
        m = rng.randrange(0, 60)
        c = cands(rs, 1000, [m] * len(rs))
        costs = ttft().score(c)
        best = min(range(len(rs)), key=costs.__getitem__)
        # Nobody has less work queued and fewer decodes at once (the cost is monotone in both).
        for r in rs:
            dominated = r.queued_prefill_tokens < rs[best].queued_prefill_tokens and (
                r.in_flight - r.queued_requests
            ) <= (rs[best].in_flight - rs[best].queued_requests)
            assert not dominated
        # All idle but one: the idle ones tie and least_load would pick among the same.
        if all(r.in_flight == 0 and r.queued_prefill_tokens == 0 for r in rs[1:]) and rs[0].in_flight:
            assert best != 0 and least_loaded(rs, 3) is not rs[0]


def test_added_prefill_is_the_uncached_prompt_in_seconds_of_each_replica() -> None:
    sc = AddedPrefill(AddedPrefill.Params(), CTX)
    assert sc.score(cands([rep(0), rep(1, prefill=2000.0)], 1000, [10, 0])) == pytest.approx([0.084, 0.5])


def test_added_prefill_counts_once_per_request_expected_behind_it_when_every_queue_waits() -> None:
    sc = AddedPrefill(AddedPrefill.Params(), CTX)
    # One request in prefill on each replica: not saturated, the added prefill counts once.
    rs = [rep(0, in_flight=1, queued_requests=1), rep(1, in_flight=3, queued_requests=3)]
    assert sc.score(cands(rs, 1000, [10, 0])) == pytest.approx([0.084, 0.1])
    # Even the shortest queue holds 2 requests that have not started: 2 more expected behind.
    rs[0].in_flight = rs[0].queued_requests = 3
    assert sc.score(cands(rs, 1000, [10, 0])) == pytest.approx([3 * 0.084, 3 * 0.1])
    off = AddedPrefill(AddedPrefill.Params(queue_behind=False), CTX)
    assert off.score(cands(rs, 1000, [10, 0])) == pytest.approx([0.084, 0.1])


def test_the_requests_behind_count_every_routers_queue_from_peer_reports_and_fresh_engine_samples() -> None:
    sc = AddedPrefill(AddedPrefill.Params(), CTX)
    rs = [rep(0, in_flight=1, queued_requests=1), rep(1, in_flight=1, queued_requests=1)]
    assert sc.behind(rs) == 0  # this router's own queues: one request in prefill on each
    # The engines report 3 more waiting, from routers that do not report: 4 queued on each.
    for r in rs:
        r.report_engine_load(waiting=4, running=0, kv_usage=None, now=NOW[0])
    assert sc.behind(rs) == 3
    # A peer reports 2 queued on r0 and r1 (as of now): they are part of the engine's 4 waiting, not more.
    for r in rs:
        r.report_peer_load("peer", queued_prefill_tokens=4000, queued_requests=2, in_flight=2, now=NOW[0])
    assert sc.behind(rs) == 3
    for r in rs:
        r.engine_sampled_at = NOW[0] - 2.5  # a stale sample: only the fresh peer reports count
    assert sc.behind(rs) == 2


def test_a_saturated_fleet_keeps_a_request_on_its_cache_where_greedy_ttft_would_move_it() -> None:
    # The holder of a 3k-token prefix has 6 requests queued (8k tokens), the other replica 3 (1.5k):
    # by its own TTFT the request is better off recomputing the prefix on the other replica.
    holder = rep(0, in_flight=6, queued_requests=6, queued_prefill_tokens=8_000)
    other = rep(1, in_flight=3, queued_requests=3, queued_prefill_tokens=1_500)
    c = cands([holder, other], 3200, [190, 0])
    t = ttft().score(c)
    assert t[1] < t[0]
    on = [a + 0.5 * b for a, b in zip(t, AddedPrefill(AddedPrefill.Params(), CTX).score(c))]
    off = [a + 0.5 * b for a, b in zip(t, AddedPrefill(AddedPrefill.Params(queue_behind=False), CTX).score(c))]
    assert off[1] < off[0]  # charged once, the recompute still looks cheaper: it moves
    assert on[0] < on[1]  # with 2 more requests waiting behind it everywhere, it stays on its cache


# -- session_affinity ---------------------------------------------------------------------------------


def picker(**kw: float) -> SessionAffinity:
    return SessionAffinity(SessionAffinity.Params(**kw), CTX)


@pytest.mark.parametrize(
    ("costs", "bound", "expected", "reason"),
    [
        ([0.3, 0.2, 0.25], "r0", 0, "session"),  # 0.1 worse: within the default penalty
        ([0.31, 0.2, 0.25], "r0", 1, "session_moved"),  # 0.11 worse: moves to the best
        ([0.3, 0.2], "r5", 1, "session_moved"),  # its replica is not a candidate (filtered out)
        ([0.3, 0.2], None, 1, None),  # a new session: the best
        ([8.7, 8.0, 9.0], "r0", 0, "session"),  # 0.7 s worse on an 8 s best: within 10 % of it
        ([8.9, 8.0, 9.0], "r0", 1, "session_moved"),  # 0.9 s worse: beyond 10 % (0.8 s), moves
    ],
)
def test_session_affinity_stays_within_the_penalty_else_moves(costs, bound, expected, reason) -> None:  # type: ignore[no-untyped-def]
    p = picker()
    rs = [rep(i) for i in range(len(costs))]
    c = cands(rs, sid="s")
    c.features.session_replica = bound
    assert p.pick(c, costs) == expected and c.reason == reason


def test_session_affinity_relative_bound_is_the_larger_one_and_can_be_turned_off() -> None:
    rs = [rep(0), rep(1)]
    c = cands(rs, sid="s")
    c.features.session_replica = "r0"
    assert picker(max_penalty_fraction=0.0).pick(c, [8.3, 8.0]) == 1  # the fixed 0.1 s alone: moves
    assert picker(max_penalty_fraction=0.5).pick(c, [11.9, 8.0]) == 0  # within half the best cost
    assert picker(max_penalty_fraction=0.5).pick(c, [0.69, 0.1]) == 1  # 0.59 > max(0.1, 0.05)
    assert picker(max_penalty_s=1.0, max_penalty_fraction=0.01).pick(c, [8.9, 8.0]) == 0  # 0.9 < 1.0


def test_session_affinity_remembers_rebinds_after_a_move_and_expires() -> None:
    p = picker(max_penalty_s=0.05)
    rs = [rep(0), rep(1)]

    def route(costs: list[float]) -> int:
        c = cands(rs, sid="s")
        i = p.pick(c, costs)
        p.on_routed(c.features, Decision(rs[i]))
        return i

    assert route([0.1, 0.2]) == 0
    assert route([0.14, 0.1]) == 0  # sticky within 0.05
    assert route([0.2, 0.1]) == 1  # moved ...
    assert route([0.1, 0.12]) == 1  # ... and stays
    NOW[0] += S.session.ttl_s + 1
    try:
        assert route([0.1, 0.12]) == 0  # expired: a new session
    finally:
        NOW[0] -= S.session.ttl_s + 1
    # Requests without a session id get the best, and are not remembered.
    c = cands(rs)
    assert p.pick(c, [0.2, 0.1]) == 1 and len(p) == 1


def test_session_memory_is_bounded() -> None:
    s = RouterSettings.model_validate({"session": {"max_sessions": 3}})
    p = SessionAffinity(SessionAffinity.Params(), PluginContext(s))
    for k in range(10):
        p.on_routed(RequestFeatures("m", session_id=f"s{k}"), Decision(rep(0)))
    assert len(p) == 3


# -- cache_aware against its reference ----------------------------------------------------------------


def _reference(f: RequestFeatures, tier: list[ReplicaState], prefix: PrefixScorer, mean: float) -> list[float]:
    out = []
    # Requests expected behind this one: the shortest queue's waiting ones (all but the one in prefill).
    behind = max(0, min(r.queued_requests for r in tier) - 1)
    for r in tier:
        m = prefix.index(r).match(f.block_hashes) if f.block_hashes else 0
        own = max(0, f.prompt_tokens - m * 16)
        ahead = r.queued_prefill_tokens
        dec = r.in_flight - r.queued_requests
        work = ahead + own
        est = work / r.prefill_tokens_per_s
        if dec > 0:
            est += max(1, math.ceil(work / 8192)) * (1 + 0.01 * (dec - 1)) / r.decode_tokens_per_s
        out.append(est + 0.5 * (1 + behind) * own / r.prefill_tokens_per_s)
    return out


def test_cache_aware_is_ttft_plus_half_the_added_prefill_on_random_states() -> None:
    rng = random.Random(11)
    policy = registry.make("cache_aware", S)
    assert isinstance(policy, ProfilePolicy)
    prefix = next(s for s in policy.scorers if isinstance(s, PrefixScorer))
    sc = next(s for s in policy.scorers if isinstance(s, TtftScorer))
    rs = [rep(i, prefill=rng.choice([5000.0, 20_000.0]), decode=rng.choice([30.0, 80.0])) for i in range(6)]
    prompts = [[rng.randrange(1, 10) * 1000 + j for j in range(rng.randrange(1, 40))] for _ in range(10)]
    for _ in range(300):
        blocks = rng.choice(prompts)
        f = RequestFeatures("m", tuple(blocks), len(blocks) * 16 + 5, affinity_key=rng.randrange(9))
        for r in rs:
            r.in_flight = rng.randrange(0, 5) + rng.choice([0, 4])  # half the time, a saturated fleet
            r.queued_requests = rng.randrange(0, r.in_flight + 1)
            r.queued_prefill_tokens = rng.randrange(0, 9000) if r.queued_requests else 0
        tier, _ = PoolPriority().filter(f, rs)
        expected = _reference(f, list(tier), prefix, sc.mean_prefill_tokens)
        assert policy.costs(Candidates(f, tier)) == pytest.approx(expected, rel=1e-12)
        d = policy.choose(f, rs)
        assert d.replica is tier[min(range(len(tier)), key=expected.__getitem__)] or expected.count(min(expected)) > 1
        policy.on_routed(f, d)


# -- ttft: a full engine, other routers between samples, herding ----------------------------------------


def test_the_engine_running_limit_is_learned_from_samples_that_report_waiting_requests() -> None:
    r = rep(0)
    r.report_engine_load(waiting=0, running=30, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 0  # room left: no limit seen yet
    r.report_engine_load(waiting=2, running=40, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 40  # it ran 40 and could not start more
    r.report_engine_load(waiting=0, running=45, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 45  # it ran more later: the limit is at least that
    r.report_engine_load(waiting=3, running=10, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 45  # a short wait at a low count does not lower it


def test_a_wait_for_the_step_token_budget_is_not_taken_for_the_running_limit() -> None:
    # Three 12k-token prompts of this router queued on an engine that prefills 8k tokens a step:
    # the engine runs 2 and holds one back for the budget, not for a slot.
    r = rep(0, step_tokens=8192)
    for _ in range(3):
        r.begin(12_000)
    r.report_engine_load(waiting=1, running=2, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 0
    r.report_engine_load(waiting=1, running=2, kv_usage=0.1, now=NOW[0])  # memory to spare: still the budget
    assert r.engine_full_running == 0
    # With KV memory so full that a mean queued prompt (12k tokens of the 16k) does not fit, the
    # wait is for memory: the engine's limit at this prompt mix.
    r.report_engine_load(waiting=1, running=2, kv_usage=0.5, now=NOW[0])
    assert r.engine_full_running == 2
    r = rep(0, step_tokens=8192)
    for _ in range(3):
        r.begin(12_000)
    # Once its own queued prefill fits in a step, a wait is for a slot or memory: learned.
    for _ in range(3):
        r.prefill_done(12_000)
    r.begin(100)
    r.report_engine_load(waiting=1, running=64, kv_usage=None, now=NOW[0])
    assert r.engine_full_running == 64


def test_ttft_prices_prefill_chunks_by_the_replicas_own_step_budget() -> None:
    # The same decoding load and prompt: a replica computing 2k tokens a step takes 4 steps for an
    # 8k-token prompt where an 8k-budget replica takes 1, each step priced at the decode step time.
    sc = ttft()
    small, large = rep(0, step_tokens=2048, in_flight=1), rep(1, step_tokens=8192, in_flight=1)
    es = sc.score(cands([small, large], prompt=8192))
    step_s = 1 / 50.0
    assert es[0] - es[1] == pytest.approx(3 * step_s)


def test_ttft_waits_for_a_slot_on_a_full_engine_one_finish_per_mean_decode_over_full() -> None:
    sc = ttft()
    for _ in range(4):
        sc.on_completed(RequestFeatures("m"), rep(9), ok=True, output_tokens=100)  # mean output 100
    sc.on_completed(RequestFeatures("m"), rep(9), ok=False, output_tokens=0)  # a failure does not count
    # 4 of ours running and 1 waiting (the engine says so): full at 4, nobody else's
    full = rep(0, in_flight=5, queued_requests=1, queued_prefill_tokens=500)
    full.report_engine_load(waiting=1, running=4, kv_usage=None, now=NOW[0])
    room = rep(1, in_flight=5, queued_requests=1, queued_prefill_tokens=500)
    room.report_engine_load(waiting=1, running=4, kv_usage=None, now=NOW[0])
    room.in_flight, room.queued_requests, room.queued_prefill_tokens = 3, 0, 0  # since: one started, two ended
    step = (1 + 0.01 * 3) / 50
    got = sc.score(cands([full, room], 1000, [0, 0]))
    # full: 5 in the engine, limit 4: two must finish first, each 100 x step / 4 s on average, while
    # the 500 tokens queued ahead prefill (0.05 s of it overlaps)
    assert got[0] == pytest.approx(0.15 + step + (2 * 100 * step / 4 - 0.05))
    assert got[1] == pytest.approx(0.1 + (1 + 0.01 * 2) / 50)  # 3 in the engine: room


def test_ttft_prefill_queued_ahead_overlaps_the_slot_wait() -> None:
    sc = ttft()
    sc.on_completed(RequestFeatures("m"), rep(9), ok=True, output_tokens=100)
    r = rep(0, in_flight=5, queued_requests=1, queued_prefill_tokens=20_000)
    r.report_engine_load(waiting=1, running=4, kv_usage=None, now=NOW[0])  # limit 4, 5 in the engine
    step = (1 + 0.01 * 3) / 50
    slot_s = 2 * 100 * step / 4  # two finishes
    # 2 s of prefill ahead is longer than the slot wait: the slot adds nothing
    assert sc.score(cands([r], 1000, [0]))[0] == pytest.approx(2.1 + 3 * step)
    assert slot_s < 2.0


def test_other_routers_are_taken_to_keep_routing_in_proportion_between_samples() -> None:
    sc = ttft()
    sc.on_routed(RequestFeatures("m"), Decision(rep(9), prefill_tokens=1000))  # mean prefill 1000
    a, b = rep(0, in_flight=1), rep(1, in_flight=1)
    for r in (a, b):  # one own and three foreign running on each: the others send 3 per one of ours
        r.report_engine_load(waiting=0, running=4, kv_usage=None, now=NOW[0])
    sc_ = TtftScorer(TtftScorer.Params(), CTX)
    assert sc.foreign_share([a, b], NOW[0]) == pytest.approx(3.0)
    a.begin(1000)  # this router sent one more to a since the sample
    step = (1 + 0.01 * 3) / 50
    c = cands([a, b], 1000, [0, 0], sid="s")  # a session: no tie-breaking noise
    got = sc.score(c)
    # a: own queued 1000 + 3 foreign presumed waiting x 1000 + own 1000; b: just its own prompt
    assert got[0] == pytest.approx((1000 + 3000 + 1000) / 10_000 + step)
    assert got[1] == pytest.approx(0.1 + step)
    assert sc_.foreign_share([rep(2)], NOW[0]) == 0.0  # no sample: nothing known of others


def test_near_equal_costs_are_drawn_apart_per_router_only_with_other_routers() -> None:
    def build(seed: int) -> TtftScorer:
        sc = TtftScorer(TtftScorer.Params(), PluginContext(S, seed=seed, clock=lambda: NOW[0]))
        sc.on_routed(RequestFeatures("m"), Decision(rep(9), prefill_tokens=1000))
        return sc

    def states(foreign: int) -> list[ReplicaState]:
        rs = [rep(i, in_flight=1) for i in range(4)]
        for r in rs:
            r.report_engine_load(waiting=0, running=1 + foreign, kv_usage=None, now=NOW[0])
        return rs

    alone = build(0).score(cands(states(0), 1000, [0] * 4))
    assert len(set(alone)) == 1  # one router: exact own accounting, equal replicas tie (rendezvous)
    firsts = set()
    for seed in range(8):
        got = build(seed).score(cands(states(3), 1000, [0] * 4))
        base = min(got)
        assert max(got) - base <= 3 * 1000 / 10_000  # within one mean request of the others, share 3
        firsts.add(got.index(base))
    assert len(firsts) > 1  # different routers take the equal replicas in different orders
    session = build(1).score(cands(states(3), 1000, [0] * 4, sid="s"))
    assert len(set(session)) == 1  # sessions get no noise
