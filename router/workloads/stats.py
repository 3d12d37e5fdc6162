"""Numbers from results: one nearest-rank percentile for the demo, the simulator and the live bench,
and the summary of HTTP results (`Summary`, `summarize`, `summarize_by_model`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import overload

from gpufleet.router.workloads.driver import Result

__all__ = ["Summary", "percentile", "summarize", "summarize_by_model"]


@overload
def percentile(values: Iterable[float], q: float) -> float | None: ...


@overload
def percentile(values: Iterable[float], q: float, empty: float) -> float: ...


def percentile(values: Iterable[float], q: float, empty: float | None = None) -> float | None:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q % of values at or
    below it, no interpolation; `empty` (default None) when there are no values."""
    xs = sorted(values)
    if not xs:
        return empty
    # the epsilon keeps q / 100 * n from rounding up past a whole rank (0.07 * 100 = 7.000000000000001)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100.0 * len(xs) - 1e-9) - 1))
    return xs[k]


@dataclass
class Summary:
    """Aggregate numbers over results (replica-served requests only for prefix hits and TTFT)."""

    requests: int
    ok: int
    errors: int
    prefix_hit_ratio: float
    """Cached prompt tokens / prompt tokens, over requests a replica served."""
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    per_replica: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    wall_s: float = 0.0
    status_counts: dict[int, int] = field(default_factory=dict)


def summarize_by_model(results: Sequence[Result], wall_s: float = 0.0) -> dict[str, Summary]:
    """`summarize` per model (one deployment serves each model), in first-seen order."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.model, []).append(r)
    return {m: summarize(rs, wall_s) for m, rs in groups.items()}


def summarize(results: Sequence[Result], wall_s: float = 0.0) -> Summary:
    """Aggregate results. Prediction-cache hits are counted apart: no replica served them."""
    served = [r for r in results if r.ok and r.cache != "hit"]
    prompt = sum(r.prompt_tokens for r in served)
    cached = sum(r.cached_tokens for r in served)
    ttfts = [r.ttft_s for r in served if r.ttft_s is not None]
    return Summary(
        requests=len(results),
        ok=sum(r.ok for r in results),
        errors=sum(not r.ok for r in results),
        prefix_hit_ratio=cached / prompt if prompt else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        per_replica=dict(sorted(Counter(r.replica for r in served if r.replica).items())),
        cache_hits=sum(1 for r in results if r.ok and r.cache == "hit"),
        wall_s=wall_s,
        status_counts=dict(sorted(Counter(r.status for r in results).items())),
    )
