"""Stage 5 of the plan: what the fleet costs, from its pools' baseline, warm and max nodes."""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.infra.plan.model import HOURS_PER_MONTH, Cost, PoolPlan

__all__ = ["fleet_cost", "usd"]


def usd(x: float) -> float:
    """Dollars per hour as the plan states them (4 decimals)."""
    return round(x, 4)


def fleet_cost(pools: Sequence[PoolPlan]) -> Cost:
    """The fleet's cost per hour and per month (HOURS_PER_MONTH), summed over its pools."""
    baseline = sum(p.baseline_usd_per_hour for p in pools)
    warm = sum(p.warm_usd_per_hour for p in pools)
    peak = sum(p.peak_usd_per_hour for p in pools)
    return Cost(
        baseline_usd_per_hour=usd(baseline),
        warm_usd_per_hour=usd(warm),
        peak_usd_per_hour=usd(peak),
        baseline_usd_per_month=round(baseline * HOURS_PER_MONTH, 2),
        warm_usd_per_month=round(warm * HOURS_PER_MONTH, 2),
        peak_usd_per_month=round(peak * HOURS_PER_MONTH, 2),
    )
