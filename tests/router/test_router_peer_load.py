"""Peer routers' reports on `ReplicaState` and how the `ttft` scorer prices them (tables, no I/O)."""

from __future__ import annotations

import pytest

from gpufleet.router.config import RouterSettings
from gpufleet.router.policies.base import Candidates, PluginContext
from gpufleet.router.policies.scorers.ttft import TtftScorer
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

S = RouterSettings()
NOW = [100.0]
CTX = PluginContext(S, clock=lambda: NOW[0])


def rep(i: int) -> ReplicaState:
    r = ReplicaState(id=f"r{i}", model="m", kv_capacity_tokens=16_000)
    r.prefill_tokens_per_s, r.decode_tokens_per_s = 10_000.0, 50.0
    return r


def scorer(mean_prefill: int = 1000) -> TtftScorer:
    sc = TtftScorer(TtftScorer.Params(), CTX)
    sc.on_routed(RequestFeatures("m"), Decision(rep(9), prefill_tokens=mean_prefill))
    return sc


def score(sc: TtftScorer, rs: list[ReplicaState], prompt: int = 1000) -> list[float]:
    c = Candidates(RequestFeatures("m", prompt_tokens=prompt, session_id="s", affinity_key=3), rs)
    c.matched_blocks = [0] * len(rs)  # a session: no tie-breaking draw
    return list(sc.score(c))


def test_peer_reports_are_summed_while_fresh_and_forgotten_on_demand() -> None:
    r = rep(0)
    assert r.peer_load(NOW[0], 2.0) is None  # nobody reported
    r.report_peer_load("a", 3000, 2, 5, NOW[0] - 0.1)
    r.report_peer_load("b", 1000, 1, 1, NOW[0] - 3.0)  # older than the bound: left out
    assert r.peer_load(NOW[0], 2.0) == (3000, 2, 5)
    r.report_peer_load("a", 500, 9, 4, NOW[0])  # a newer report replaces the peer's last; queued <= in flight
    assert r.peer_load(NOW[0], 2.0) == (500, 4, 4)
    r.report_peer_load("c", -5, -1, -2, NOW[0])  # garbage counts as nothing
    assert r.peer_load(NOW[0], 2.0) == (500, 4, 4)
    r.forget_peer("a")
    r.forget_peer("unknown")
    assert r.peer_load(NOW[0], 2.0) == (0, 0, 0)  # c still reports (zeros), b is stale


def test_engine_sample_beyond_the_reporting_peers_is_the_load_of_routers_that_do_not_report() -> None:
    r = rep(0)
    r.begin(100)  # one own request, queued
    r.report_peer_load("a", 2000, 1, 3, NOW[0])  # a peer: 3 in flight, 1 of them queued
    r.report_engine_load(waiting=3, running=4, kv_usage=None, now=NOW[0])  # 7 in the engine
    assert r.foreign_load() == (2, 4)  # every other router: 7 - 1 own, 3 - 1 own waiting
    assert r.foreign_load(beyond_peers=True) == (1, 2)  # 7 - 1 - 3 from a router that does not report


def test_ttft_prices_the_peers_queued_prefill_exactly_where_the_engine_sample_cannot() -> None:
    sc = scorer(mean_prefill=1000)
    a, b = rep(0), rep(1)
    # The engines show one running request on each (vLLM: a prefilling request is running) ...
    for r in (a, b):
        r.report_engine_load(waiting=0, running=1, kv_usage=None, now=NOW[0])
    step = 1.0 / 50
    # ... which without peers looks the same: one decoding sequence of another router each.
    assert score(sc, [a, b]) == pytest.approx([0.1 + step, 0.1 + step])
    # The peer says: on a it is a 6000-token prefill with no first token yet; on b it decodes.
    a.report_peer_load("p", 6000, 1, 1, NOW[0])
    b.report_peer_load("p", 0, 0, 1, NOW[0])
    for r in (a, b):  # the next samples: the engines hold nothing beyond this router and the peer
        r.report_engine_load(waiting=0, running=1, kv_usage=None, now=NOW[0])
    assert score(sc, [a, b]) == pytest.approx([(6000 + 1000) / 10_000, 0.1 + step])


def test_without_fresh_peer_reports_the_estimate_is_the_engine_samples_alone() -> None:
    sc = scorer(mean_prefill=2000)
    r = rep(0)
    r.report_engine_load(waiting=3, running=0, kv_usage=None, now=NOW[0])
    engine_only = (3 * 2000 + 1000) / 10_000
    assert score(sc, [r]) == pytest.approx([engine_only])
    r.report_peer_load("p", 500, 1, 1, NOW[0] - 5.0)  # a stale report changes nothing
    assert score(sc, [r]) == pytest.approx([engine_only])


def test_between_peer_reports_the_others_are_taken_to_keep_routing_in_proportion() -> None:
    sc = scorer(mean_prefill=1000)
    a, b = rep(0), rep(1)
    for r in (a, b):
        r.begin(0)  # one own request each, past its prefill
        r.prefill_done(0)
        r.report_peer_load("p", 0, 0, 3, NOW[0])  # the peers run 3 per one of ours
    assert sc.foreign_share([a, b], NOW[0]) == pytest.approx(3.0)
    a.begin(1000)  # one more sent to a since the report: the others sent about 3 more there
    step = (1 + 0.01 * 3) / 50
    assert score(sc, [a, b])[0] == pytest.approx((1000 + 3 * 1000 + 1000) / 10_000 + step)
    a.report_peer_load("p", 0, 0, 3, NOW[0])  # the next report: what they really sent is known
    assert score(sc, [a, b])[0] == pytest.approx((1000 + 1000) / 10_000 + step)


def test_the_tie_breaking_draw_shrinks_to_what_was_sent_since_the_peers_reported() -> None:
    def states() -> list[ReplicaState]:
        rs = [rep(i) for i in range(4)]
        for r in rs:
            r.begin(0)
            r.prefill_done(0)
            r.report_engine_load(waiting=0, running=4, kv_usage=None, now=NOW[0])
        return rs

    sc = scorer()
    rs = states()
    assert sc.unknown_fraction(rs, NOW[0]) == 1.0  # engine samples alone: a guess since each
    for r in rs:
        r.report_peer_load("p", 0, 0, 3, NOW[0])
    assert sc.unknown_fraction(rs, NOW[0]) == 0.0  # just reported: nothing unseen
    rs[0].begin(100)
    assert sc.unknown_fraction(rs, NOW[0]) == 1.0  # one sent since: up to one request per other router
    c = Candidates(RequestFeatures("m", prompt_tokens=1000, affinity_key=3), states())
    c.matched_blocks = [0] * 4
    for r in c.replicas:
        r.report_peer_load("p", 0, 0, 3, NOW[0])
    assert len(set(sc.score(c))) == 1  # nothing unseen: no draw, equal replicas tie
