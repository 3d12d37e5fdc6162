"""The simulator drives the default profile's sessions and engine-load samples as the router does."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from gpufleet.router.policies import registry
from gpufleet.router.sim import engine, fleet
from gpufleet.router.workloads import generators


def _replicas_per_session(res: engine.SimResult, wl) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    sid = {r.id: r.features.session_id for r in wl.requests}
    out: dict[str, set[str]] = defaultdict(set)
    for rid, replica, _ in res.decisions:
        out[sid[rid]].add(replica)
    return out


def test_several_routers_keep_sessions_where_the_echoed_token_says() -> None:
    f = fleet.uniform_fleet(4, kv_capacity_tokens=60_000)
    wl = generators.multiturn(300, seed=3, rate_rps=4.0)
    res = engine.simulate(wl, f, "cache_aware", routers=4, record_decisions=True)
    per = _replicas_per_session(res, wl)
    multi = [s for s, reps in per.items() if len(reps) > 1]
    assert len(per) > 30 and len(multi) <= 0.1 * len(per), (len(multi), len(per))
    # The same routers without the session picker (the old profile) scatter more sessions.
    old = engine.simulate(wl, f, "cache_aware_tokens", routers=4, record_decisions=True)
    assert len([s for s, r in _replicas_per_session(old, wl).items() if len(r) > 1]) > len(multi)


def test_every_router_gets_engine_load_samples_and_sees_the_others_requests() -> None:
    f = fleet.uniform_fleet(2, kv_capacity_tokens=60_000, prefill_tokens_per_s=2_000.0)
    wl = generators.shared_prompts(200, seed=1, rate_rps=20.0)
    seen: list[tuple[int, int]] = []

    def look(pol, req, d) -> None:  # type: ignore[no-untyped-def]
        states = d.replica and [d.replica]
        if states:
            seen.append(states[0].foreign_load())

    engine.simulate(wl, f, "cache_aware", routers=2, on_decision=look)
    # Each router sent about half: the other half shows up as foreign load in the samples.
    assert any(w + r > 0 for w, r in seen)
    single: list[tuple[int, int]] = []
    engine.simulate(wl, f, "cache_aware", on_decision=lambda p, q, d: single.append(d.replica.foreign_load()))  # type: ignore[union-attr]
    assert all(x == (0, 0) for x in single)  # one router: the engines hold only its own requests
    assert "cache_aware" in registry.policy_names()


def test_the_waiting_gauge_is_the_schedulers_so_a_light_load_never_shows_a_full_engine() -> None:
    # vLLM counts a request as waiting after a step could not schedule it; one that arrived during
    # the step in progress is scheduled when it ends. With room for everything, no sample may say
    # the engine is full (which the `ttft` scorer would price as a wait for a slot).
    f = fleet.uniform_fleet(2, kv_capacity_tokens=200_000)
    wl = generators.shared_prompts(300, seed=2, rate_rps=20.0)
    states: list[object] = []
    engine.simulate(wl, f, "cache_aware", on_decision=lambda p, q, d: states.append(d.replica))
    assert states and all(s.engine_full_running == 0 for s in states)  # type: ignore[attr-defined]
    # A fleet with 4 running slots per engine under the same load does fill up, and the samples say so.
    small = fleet.SimFleet(
        "small", tuple(dataclasses.replace(r, engine=dataclasses.replace(r.engine, max_running=4)) for r in f.replicas)
    )
    full: list[int] = []
    engine.simulate(wl, small, "cache_aware", on_decision=lambda p, q, d: full.append(d.replica.engine_full_running))  # type: ignore[union-attr]
    assert max(full) == 4
