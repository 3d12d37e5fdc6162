"""Capacity planning that counts KV reuse: replicas needed for a TTFT p99 target, per policy.

`replicas_needed` simulates the workload on 1, 2, 4, ... copies of the deployment's replica until
TTFT p99 meets the target with nothing rejected, then bisects between the last miss and the first
hit (p99 falls as replicas are added; the bisection assumes so). `compare` does it for
`round_robin` and `cache_aware` and prices the difference per month from the plan's GPU prices.
When the deployment has a CPU KV tier (kv_offload), `compare` also sizes `cache_aware` on the same
replicas without it, so the plan says how many replicas the tier saves and what that is worth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.router.sim import engine, metrics
from gpufleet.router.sim.fleet import SimFleet
from gpufleet.router.workloads.types import Workload

__all__ = ["CapacityResult", "compare", "replicas_needed"]

HOURS_PER_MONTH = 730


def _meets(workload: Workload, fleet: SimFleet, policy: str, n: int, target: float, seed: int) -> tuple[bool, float]:
    s = metrics.summarize(engine.simulate(workload, fleet.with_replicas(n), policy, seed=seed))
    ok = s.rejected == 0 and s.finished > 0 and s.ttft_p99_s <= target
    return ok, s.ttft_p99_s


def replicas_needed(
    workload: Workload,
    fleet: SimFleet,
    policy: str,
    ttft_p99_s: float,
    *,
    max_replicas: int = 64,
    seed: int = 0,
) -> int | None:
    """Fewest replicas (copies of `fleet`'s first replica) meeting `ttft_p99_s`; None if > max."""
    if ttft_p99_s <= 0:
        raise ValueError("the TTFT p99 target must be positive")
    lo, hi = 0, 1  # lo: known to miss (0 replicas always does); hi: candidate
    while True:
        ok, _ = _meets(workload, fleet, policy, hi, ttft_p99_s, seed)
        if ok:
            break
        lo = hi
        if hi >= max_replicas:
            return None
        hi = min(max_replicas, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _meets(workload, fleet, policy, mid, ttft_p99_s, seed)[0]:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class CapacityResult:
    """Replicas per policy for one target, and what the difference is worth."""

    ttft_p99_s: float
    replicas: dict[str, int | None]
    usd_per_replica_month: float
    without_offload: int | None = None
    """cache_aware's replicas on the same replicas without their KV offload tier (None: no tier, or > max)."""
    has_offload: bool = False

    @property
    def offload_saving_usd(self) -> float | None:
        """cache_aware's monthly cost without the tier minus with it (None when not comparable)."""
        ca = self.replicas.get("cache_aware")
        if not self.has_offload or ca is None or self.without_offload is None:
            return None
        return (self.without_offload - ca) * self.usd_per_replica_month

    @property
    def monthly_saving_usd(self) -> float | None:
        """round_robin's monthly cost minus cache_aware's (None when either misses the target)."""
        rr, ca = self.replicas.get("round_robin"), self.replicas.get("cache_aware")
        if rr is None or ca is None:
            return None
        return (rr - ca) * self.usd_per_replica_month


def compare(
    workload: Workload,
    fleet: SimFleet,
    ttft_p99_s: float,
    *,
    policies: Sequence[str] = ("round_robin", "cache_aware"),
    max_replicas: int = 64,
    seed: int = 0,
) -> CapacityResult:
    """Replicas needed under each policy, and the monthly price of one replica."""
    base = fleet.replicas[0]
    tiered = base.engine.cpu_capacity_tokens > 0
    without = None
    if tiered:
        gpu_only = fleet.with_kv_tiers(0, 0.0)
        without = replicas_needed(workload, gpu_only, "cache_aware", ttft_p99_s, max_replicas=max_replicas, seed=seed)
    return CapacityResult(
        ttft_p99_s,
        {p: replicas_needed(workload, fleet, p, ttft_p99_s, max_replicas=max_replicas, seed=seed) for p in policies},
        base.gpus * base.usd_per_gpu_hour * HOURS_PER_MONTH,
        without,
        tiered,
    )
