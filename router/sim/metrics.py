"""Per-policy metrics of a simulation and the issue's goals, judged against the oracle.

Definitions
    hit_ratio       prompt tokens served from the prefix cache / prompt tokens (finished requests)
    ttft            time from arrival to first token; p50/p90/p99 over finished requests
    latency         arrival to last token
    throughput_rps  finished requests / (last finish - first arrival)
    imbalance       max / mean of per-replica prefill work (prompt tokens actually computed)
    prefill_gpu_s   computed prompt tokens / the replica's prefill rate, times its GPUs
    prefill_usd     prefill GPU-seconds at the pool's price per GPU-hour
    load            prompt tokens per second the workload would need with no cache at all / the
                    fleet's prefill capacity (tokens per second)

Goals (for gpufleet's `cache_aware`, per workload and load; `noise` is a relative margin)
    hit      hit_ratio >= 0.95 x oracle
    ttft     p50 and p99 within 1.15 x oracle
    vs_ll    p99 <= least_load p99 x (1 + noise)
    vs_sgl   p99 <= SGLang model p99 x (1 + noise) (met trivially when the two are within noise)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from gpufleet.router.sim.engine import SimResult
from gpufleet.router.sim.fleet import SimFleet
from gpufleet.router.workloads.stats import percentile
from gpufleet.router.workloads.types import Workload

__all__ = ["Goal", "PolicySummary", "evaluate_goals", "offered_load", "summarize"]

NOISE = 0.05
"""Relative difference below which two TTFT percentiles count as equal (same-seed runs differ by
routing alone; repeated seeds move p99 by a few percent on these workload sizes)."""


def offered_load(workload: Workload, fleet: SimFleet) -> float:
    """Prefill work with no cache at all, per second, over the fleet's prefill capacity."""
    if not workload.requests:
        return 0.0
    return workload.prompt_tokens / workload.span_s / fleet.prefill_capacity_tokens_per_s


@dataclass(frozen=True)
class PolicySummary:
    """One row of the results table (and one entry of the JSON)."""

    policy: str
    requests: int
    finished: int
    rejected: int
    failed: int
    hit_ratio: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    throughput_rps: float
    imbalance: float
    prefill_gpu_s: float
    prefill_usd: float
    requests_per_replica: tuple[int, ...]
    tier_hit_ratio: float = 0.0
    """Of `hit_ratio`, the share served from the CPU and disk tiers (kv_offload)."""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["requests_per_replica"] = list(self.requests_per_replica)
        return d


def summarize(result: SimResult) -> PolicySummary:
    """Reduce one simulation to its metrics."""
    ok = [r for r in result.records if r.outcome == "ok"]
    # a finished request has its first token and its end
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    if ok:
        t0 = min(r.arrival_s for r in result.records)
        span = max(r.finish_s for r in ok if r.finish_s is not None) - t0
        throughput = len(ok) / span if span > 0 else float("nan")
    else:
        throughput = 0.0
    work = [rep.prefill_tokens for rep in result.replicas]
    mean = sum(work) / len(work) if work else 0.0
    imbalance = max(work) / mean if mean > 0 else 1.0
    gpu_s = usd = 0.0
    for rep, spec in zip(result.replicas, result.fleet.replicas):
        s = rep.prefill_tokens / spec.engine.prefill_tokens_per_s * spec.gpus
        gpu_s += s
        usd += s / 3600.0 * spec.usd_per_gpu_hour
    return PolicySummary(
        policy=result.policy,
        requests=len(result.records),
        finished=len(ok),
        rejected=sum(r.outcome == "rejected" for r in result.records),
        failed=sum(r.outcome == "failed" for r in result.records),
        hit_ratio=cached / prompt if prompt else 0.0,
        ttft_p50_s=percentile(ttft, 50, math.nan),
        ttft_p90_s=percentile(ttft, 90, math.nan),
        ttft_p99_s=percentile(ttft, 99, math.nan),
        latency_p50_s=percentile(lat, 50, math.nan),
        latency_p99_s=percentile(lat, 99, math.nan),
        throughput_rps=throughput,
        imbalance=imbalance,
        prefill_gpu_s=gpu_s,
        prefill_usd=usd,
        requests_per_replica=tuple(rep.requests for rep in result.replicas),
        tier_hit_ratio=sum(r.tier_cached_tokens for r in ok) / prompt if prompt else 0.0,
    )


@dataclass(frozen=True)
class Goal:
    """One of the issue's goals for `cache_aware` on one run: met or not, and the numbers."""

    name: str
    met: bool | None
    """None when the run lacks a policy the goal compares with."""
    detail: str


def _within(a: float, b: float, factor: float) -> bool:
    return a <= b * factor


def evaluate_goals(
    summaries: Mapping[str, PolicySummary], *, subject: str = "cache_aware", noise: float = NOISE
) -> list[Goal]:
    """Judge `subject` against the oracle, least_load and the SGLang model (module docs)."""
    me = summaries.get(subject)
    if me is None:
        return [Goal("all", None, f"{subject} was not run")]
    goals: list[Goal] = []
    orc = summaries.get("oracle")
    if orc is None:
        goals.append(Goal("hit >= 0.95 x oracle", None, "oracle not run"))
        goals.append(Goal("ttft p50/p99 <= 1.15 x oracle", None, "oracle not run"))
    else:
        ratio = me.hit_ratio / orc.hit_ratio if orc.hit_ratio > 0 else 1.0
        goals.append(
            Goal(
                "hit >= 0.95 x oracle",
                ratio >= 0.95 or me.hit_ratio >= orc.hit_ratio,
                f"{me.hit_ratio:.3f} vs {orc.hit_ratio:.3f} (x{ratio:.2f})",
            )
        )
        r50 = me.ttft_p50_s / orc.ttft_p50_s if orc.ttft_p50_s > 0 else 1.0
        r99 = me.ttft_p99_s / orc.ttft_p99_s if orc.ttft_p99_s > 0 else 1.0
        goals.append(
            Goal("ttft p50/p99 <= 1.15 x oracle", r50 <= 1.15 and r99 <= 1.15, f"p50 x{r50:.2f}, p99 x{r99:.2f}")
        )
    ll = summaries.get("least_load")
    if ll is None:
        goals.append(Goal("p99 <= least_load (+noise)", None, "least_load not run"))
    else:
        goals.append(
            Goal(
                "p99 <= least_load (+noise)",
                _within(me.ttft_p99_s, ll.ttft_p99_s, 1 + noise),
                f"{me.ttft_p99_s:.3f}s vs {ll.ttft_p99_s:.3f}s",
            )
        )
    sg = summaries.get("sglang_cache_aware")
    if sg is None:
        goals.append(Goal("p99 beats sglang model", None, "sglang_cache_aware not run"))
    else:
        same = abs(me.ttft_p99_s - sg.ttft_p99_s) <= noise * max(me.ttft_p99_s, sg.ttft_p99_s)
        met = same or me.ttft_p99_s < sg.ttft_p99_s
        goals.append(
            Goal(
                "p99 beats sglang model",
                met,
                f"{me.ttft_p99_s:.3f}s vs {sg.ttft_p99_s:.3f}s" + (" (within noise)" if same else ""),
            )
        )
    return goals
