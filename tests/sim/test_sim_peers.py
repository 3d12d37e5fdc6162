"""Simulated routers exchange their own per-replica counts every `peer_interval_s`, as the live ones do."""

from __future__ import annotations

from gpufleet.router.sim import engine, fleet
from gpufleet.router.types import PeerLoad
from gpufleet.router.workloads import generators


def _states_seen(routers: int, **kw: float) -> list[dict[str, PeerLoad]]:
    """The peer reports of the chosen replica's state at each decision."""
    f = fleet.uniform_fleet(2, kv_capacity_tokens=60_000, prefill_tokens_per_s=2_000.0)
    wl = generators.shared_prompts(200, seed=1, rate_rps=20.0)
    seen: list[dict[str, PeerLoad]] = []
    engine.simulate(
        wl,
        f,
        "cache_aware",
        routers=routers,
        on_decision=lambda p, q, d: seen.append(dict(d.replica.peers)) if d.replica is not None else None,
        **kw,  # type: ignore[arg-type]
    )
    return seen


def test_each_router_gets_every_other_routers_counts_and_not_its_own() -> None:
    seen = _states_seen(3, peer_interval_s=0.1)
    reporters = {frozenset(s) for s in seen}
    # Each router's states hold the two others' reports (a router never reports to itself).
    assert {frozenset({"router-1", "router-2"}), frozenset({"router-0", "router-2"})} <= reporters
    assert all(len(s) == 2 for s in reporters)
    # Under this load the peers do queue prefill there, and say so in tokens.
    assert any(p.queued_prefill_tokens > 0 for s in seen for p in s.values())
    assert all(p.queued_requests <= p.in_flight for s in seen for p in s.values())


def test_no_exchange_with_one_router_or_a_zero_interval() -> None:
    assert all(not s for s in _states_seen(1, peer_interval_s=0.1))
    assert all(not s for s in _states_seen(2, peer_interval_s=0.0))
