"""The simulator gives policies each replica's KV usage the way the live router's scrape would."""

from __future__ import annotations

from gpufleet.router.config import RouterSettings
from gpufleet.router.policies.least_load import LeastLoadPolicy
from gpufleet.router.sim import engine, fleet
from gpufleet.router.types import RequestFeatures
from gpufleet.router.workloads.types import MODEL, SimRequest, Workload


class _Recorder(LeastLoadPolicy):
    """Least load, remembering what it saw of replica r0 at every decision."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[float, float | None, int]] = []

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        r0 = next(r for r in replicas if r.id == "r0")
        self.seen.append((self.clock(), r0.kv_usage, r0.kv_usage_samples))
        return super()._pick(features, tier, replicas)


def _workload() -> Workload:
    # One replica, long decodes: each arrival adds memory that stays reserved for the whole run.
    reqs = [
        SimRequest(f"q{i}", 0.5 + i * 1.0, RequestFeatures(MODEL, (), 1_000, affinity_key=i + 1), 5_000)
        for i in range(12)
    ]
    return Workload("kv", reqs)


def _fleet(scrape: bool, interval_s: float = 4.0) -> fleet.SimFleet:
    settings = RouterSettings.model_validate({"health": {"scrape_kv_usage": scrape, "interval_s": interval_s}})
    return fleet.uniform_fleet(1, kv_capacity_tokens=100_000, decode_tokens_per_s=50.0, settings=settings)


def test_kv_usage_is_sampled_once_per_health_interval_and_stale_in_between() -> None:
    pol = _Recorder(seed=0)
    engine.simulate(_workload(), _fleet(True), pol)
    # Arrivals at 0.5, 1.5, ..., 11.5 s; samples at 4 s and 8 s only.
    counts = [n for _, _, n in pol.seen]
    assert counts == [0] * 4 + [1] * 4 + [2] * 4
    assert all(u is None for _, u, n in pol.seen if n == 0)
    # Within an interval the value does not move although each arrival reserved more memory.
    by_sample: dict[int, set[float | None]] = {}
    for _, u, n in pol.seen:
        by_sample.setdefault(n, set()).add(u)
    assert all(len(v) == 1 for v in by_sample.values())
    first, second = by_sample[1].pop(), by_sample[2].pop()
    # 4 requests (1,000 + 5,000 tokens each) were admitted before 4 s, 8 before 8 s.
    assert first == 4 * 6_000 / 100_000
    assert second == 8 * 6_000 / 100_000


def test_without_scraping_policies_see_no_kv_usage() -> None:
    pol = _Recorder(seed=0)
    engine.simulate(_workload(), _fleet(False), pol)
    assert all(u is None and n == 0 for _, u, n in pol.seen)
