"""Run several policies on one workload and fleet; show the results as a table, JSON and a plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from gpufleet.router.policies import registry
from gpufleet.router.sim import engine, metrics
from gpufleet.router.sim.fleet import SimFleet
from gpufleet.router.sim.policies import DEFAULT_ORDER
from gpufleet.router.workloads.ceiling import ceiling_hit_ratio
from gpufleet.router.workloads.types import Workload

__all__ = [
    "BenchRun",
    "goals_lines",
    "parse_policies",
    "plot_runs",
    "results_table",
    "goals_markdown",
    "markdown_tables",
    "run_policies",
    "to_json",
    "write_json",
]


@dataclass
class BenchRun:
    """Every policy's result on one workload at one load."""

    workload: str
    fleet: str
    requests: int
    load: float
    """Offered load actually simulated (after scaling), see `metrics.offered_load`."""
    natural_load: float
    """Offered load of the workload as generated or replayed, before `--load` scaling."""
    infinite_cache_hit_ratio: float
    summaries: dict[str, metrics.PolicySummary]
    goals: list[metrics.Goal]
    ttfts: dict[str, list[float]] = field(default_factory=dict, repr=False)


def parse_policies(text: str | None, profiles: Iterable[str] = ()) -> list[str]:
    """`a,b,c` -> names, checked against the registry with the simulator's context and the
    fleet's own `router.profiles` (all registered ones, in order, when empty)."""
    if not text:
        return list(DEFAULT_ORDER)
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = sorted({*registry.policy_names(context=("engines",)), *profiles})
    bad = [p for p in names if p not in known]
    if bad:
        raise ValueError(f"unknown policy {', '.join(bad)}; choose from {', '.join(known)}")
    return names


def run_policies(
    workload: Workload,
    fleet: SimFleet,
    policies: Sequence[str],
    *,
    load: float | None = None,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
    kv_state: str = "approximate",
    routers: int = 1,
    event_delay_s: float = 0.02,
    peer_interval_s: float | None = None,
) -> BenchRun:
    """Scale `workload` to `load` (if given) and simulate every policy on it (`engine.simulate`
    says what `kv_state`, `routers`, `event_delay_s` and `peer_interval_s` do)."""
    natural = metrics.offered_load(workload, fleet)
    if load is not None:
        if load <= 0:
            raise ValueError("--load must be positive")
        if natural > 0:
            workload = workload.scaled(natural / load)
    summaries: dict[str, metrics.PolicySummary] = {}
    ttfts: dict[str, list[float]] = {}
    for name in policies:
        cb = (lambda n, _name=name: progress(_name, n)) if progress else None
        res = engine.simulate(
            workload,
            fleet,
            name,
            seed=seed,
            progress=cb,
            kv_state=kv_state,
            routers=routers,
            event_delay_s=event_delay_s,
            peer_interval_s=peer_interval_s,
        )
        summaries[name] = metrics.summarize(res)
        ttfts[name] = sorted(r.ttft_s for r in res.records if r.outcome == "ok" and r.ttft_s is not None)
    return BenchRun(
        workload=workload.name,
        fleet=fleet.name,
        requests=len(workload),
        load=metrics.offered_load(workload, fleet),
        natural_load=natural,
        infinite_cache_hit_ratio=ceiling_hit_ratio(workload.requests, fleet.settings.block_size_tokens),
        summaries=summaries,
        goals=metrics.evaluate_goals(summaries),
        ttfts=ttfts,
    )


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:,.0f}"


def results_table(run: BenchRun) -> Table:
    """One row per policy, with the infinite-cache ceiling in the title."""
    t = Table(
        title=(
            f"{run.workload} on {run.fleet}: {run.requests} requests, load {run.load:.2f}, "
            f"infinite-cache hit ratio {run.infinite_cache_hit_ratio:.3f}"
        ),
        title_justify="left",
    )
    for col in (
        "policy",
        "hit",
        "TTFT p50 ms",
        "p90 ms",
        "p99 ms",
        "e2e p50 ms",
        "e2e p99 ms",
        "req/s",
        "imbalance",
        "prefill GPU-s",
        "prefill $",
        "rejected",
        "failed",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")
    tiered = any(s.tier_hit_ratio > 0 for s in run.summaries.values())
    if tiered:  # a kv_offload deployment: how much of the hit came from its CPU (and disk) tier
        t.add_column("of it CPU/disk", justify="right")
    for s in run.summaries.values():
        t.add_row(
            s.policy,
            f"{s.hit_ratio:.3f}",
            _ms(s.ttft_p50_s),
            _ms(s.ttft_p90_s),
            _ms(s.ttft_p99_s),
            _ms(s.latency_p50_s),
            _ms(s.latency_p99_s),
            f"{s.throughput_rps:.2f}",
            f"{s.imbalance:.2f}",
            f"{s.prefill_gpu_s:,.0f}",
            f"{s.prefill_usd:.2f}",
            str(s.rejected),
            str(s.failed),
            *([f"{s.tier_hit_ratio:.3f}"] if tiered else []),
        )
    return t


def goals_lines(run: BenchRun) -> list[str]:
    """Plain lines saying which goals `cache_aware` meets on this run."""
    out = []
    for g in run.goals:
        mark = "n/a" if g.met is None else ("MET" if g.met else "NOT MET")
        out.append(f"{mark:8s} {g.name}: {g.detail}")
    return out


def to_json(runs: Sequence[BenchRun]) -> dict[str, Any]:
    """JSON form: per run the load, ceiling, per-policy metrics and goals."""
    return {
        "schema": "gpufleet.bench-sim/v1",
        "runs": [
            {
                "workload": r.workload,
                "fleet": r.fleet,
                "requests": r.requests,
                "load": round(r.load, 4),
                "natural_load": round(r.natural_load, 4),
                "infinite_cache_hit_ratio": round(r.infinite_cache_hit_ratio, 4),
                "policies": {k: _clean(s.to_dict()) for k, s in r.summaries.items()},
                "goals": [{"name": g.name, "met": g.met, "detail": g.detail} for g in r.goals],
            }
            for r in runs
        ],
    }


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else (round(v, 6) if isinstance(v, float) else v))
        for k, v in d.items()
    }


def write_json(runs: Sequence[BenchRun], path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(runs), indent=2) + "\n")


_COLORS = {
    "random": "#9e9e9e",
    "round_robin": "#ff7f0e",
    "least_load": "#2ca02c",
    "session": "#9467bd",
    "consistent_hash": "#8c564b",
    "sglang_cache_aware": "#d62728",
    "cache_aware": "#1f77b4",
    "oracle": "#000000",
}


def plot_runs(runs: Sequence[BenchRun], path: str | Path, *, dpi: int = 100) -> None:
    """TTFT CDFs per run (a grid, log scale) above a heat map of hit ratios (policy x run).

    Legible for one run as for a dozen: the figure is at least 7 inches wide, the legend wraps
    into as many rows as it needs above the grid, and the saved area is the drawn one (titles,
    legend and tick labels are never cut off). Saved as a palette PNG so that a dozen runs
    stay small enough to commit with the docs.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from PIL import Image

    ncols = min(4, max(1, len(runs)))
    nrows = math.ceil(len(runs) / ncols)
    policies = list(dict.fromkeys(p for r in runs for p in r.summaries))
    width = max(7.0, 3.6 * ncols)
    legend_cols = max(1, min(len(policies), int(width // 1.7)))
    legend_rows = math.ceil(len(policies) / legend_cols) if policies else 0
    heat_h = 0.3 * len(policies) + 1.2
    fig = plt.figure(figsize=(width, 3.0 * nrows + heat_h + 0.3 * legend_rows + 0.6))
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[3.0] * nrows + [heat_h])
    colors = {p: _COLORS.get(p, plt.cm.tab10(i % 10)) for i, p in enumerate(policies)}
    for k, run in enumerate(runs):
        ax = fig.add_subplot(grid[k // ncols, k % ncols])
        for name, vals in run.ttfts.items():
            if not vals:
                continue
            step = max(1, len(vals) // 300)  # a CDF needs no more points than pixels
            pts = vals[::step]
            n = len(pts)
            ax.plot(
                [max(v, 1e-3) for v in pts],
                [(i + 1) / n for i in range(n)],
                color=colors[name],
                linewidth=1.8 if name == "cache_aware" else 1,
                linestyle="--" if name == "oracle" else "-",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_title(f"TTFT CDF: {run.workload} @ load {run.load:.1f}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel("fraction of requests", fontsize=8)
        if k // ncols == nrows - 1:
            ax.set_xlabel("TTFT (s)", fontsize=8)
    hm = fig.add_subplot(grid[nrows, :])
    data = [[r.summaries[p].hit_ratio if p in r.summaries else float("nan") for r in runs] for p in policies]
    hm.imshow(data, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    hm.set_yticks(range(len(policies)), policies, fontsize=8)
    hm.set_xticks(
        range(len(runs)),
        [f"{r.workload}\n@{r.load:.1f} (inf {r.infinite_cache_hit_ratio:.2f})" for r in runs],
        fontsize=7,
    )
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if not math.isnan(v):
                hm.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
    hm.set_title("prefix-hit ratio (inf = infinite-cache ceiling)", fontsize=9)
    top = 1 - (0.3 * legend_rows + 0.3) / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    handles = [Line2D([], [], color=colors[p], label=p, linestyle="--" if p == "oracle" else "-") for p in policies]
    fig.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=legend_cols, fontsize=8, frameon=False
    )
    buf = io.BytesIO()
    # bbox_inches="tight": the saved area grows to whatever was drawn, so nothing is cut off.
    fig.savefig(buf, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, format="PNG", optimize=True)


def markdown_tables(data: dict[str, Any]) -> str:
    """The results of `to_json` as Markdown: one table per run plus its goals (for docs)."""
    out: list[str] = []
    for r in data["runs"]:
        out.append(
            f"#### {r['workload']} at load {r['load']:.2f} ({r['requests']} requests, "
            f"infinite-cache hit ratio {r['infinite_cache_hit_ratio']:.3f})\n"
        )
        out.append(
            "| policy | hit | TTFT p50 s | p90 s | p99 s | e2e p99 s | req/s | imbalance | prefill GPU-s | rejected |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, s in r["policies"].items():

            def f(x: Any, fmt: str) -> str:
                return "-" if x is None else format(x, fmt)

            bold = "**" if name == "cache_aware" else ""
            out.append(
                f"| {bold}{name}{bold} | {f(s['hit_ratio'], '.3f')} | {f(s['ttft_p50_s'], '.3f')} | "
                f"{f(s['ttft_p90_s'], '.3f')} | {f(s['ttft_p99_s'], '.3f')} | {f(s['latency_p99_s'], '.2f')} | "
                f"{f(s['throughput_rps'], '.2f')} | {f(s['imbalance'], '.2f')} | {f(s['prefill_gpu_s'], ',.0f')} | "
                f"{s['rejected']} |"
            )
        goals = "; ".join(
            f"{'n/a' if g['met'] is None else ('met' if g['met'] else '**not met**')}: {g['name']} ({g['detail']})"
            for g in r["goals"]
        )
        out.append(f"\nGoals for cache_aware: {goals}\n")
    return "\n".join(out)


def goals_markdown(data: dict[str, Any]) -> str:
    """One Markdown row per run of `to_json` data: which goals cache_aware meets, with the numbers."""
    runs = data["runs"]
    if not runs:
        return ""
    names = [g["name"] for g in runs[0]["goals"]]
    out = ["| workload | load | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
    for r in runs:
        cells = []
        for g in r["goals"]:
            mark = "n/a" if g["met"] is None else ("met" if g["met"] else "**not met**")
            cells.append(f"{mark} ({g['detail']})")
        out.append(f"| {r['workload']} | {r['load']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
