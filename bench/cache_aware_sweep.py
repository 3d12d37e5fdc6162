"""Sweep cache_aware's `load_weight` and `in_flight_cost_tokens` where the goals are hardest.

    .venv/bin/python bench/cache_aware_sweep.py

Each row is gpufleet's own `cache_aware_tokens` profile (the default before the TTFT estimate) with
other parameters (the fleet's
`router.cache_aware` section: the weight of its `queued_prefill` and `in_flight` scorers and the
latter's `cost_tokens`), on the synthetic workloads of bench/routing.py; the SGLang model is shown
for reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from gpufleet.infra.cli._common import progress as progress_display
from gpufleet.infra.cli._common import report_console
from gpufleet.router.config import CacheAwareSettings
from gpufleet.router.sim import engine, metrics
from gpufleet.router.sim import fleet as fleet_mod
from gpufleet.router.workloads import generators

HERE = Path(__file__).resolve().parent
CASES = (("shared_prompts", 0.8), ("shared_prompts", 2.0), ("rag", 0.8), ("multiturn", 2.0), ("mix", 0.8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(HERE / "fleet.yaml"))
    ap.add_argument("--deployment", default="qwen-32b")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--load-weights", default="1.0,0.5,0.25")
    ap.add_argument("--in-flight-costs", default="64,0")
    args = ap.parse_args(argv)
    console = report_console(170)
    base = fleet_mod.fleet_from_file(args.fleet, args.deployment)
    weights = [float(x) for x in args.load_weights.split(",")]
    costs = [int(x) for x in args.in_flight_costs.split(",")]
    variants = [(lw, c) for lw in weights for c in costs]
    table = Table(
        title="cache_aware settings: TTFT p99 s (hit ratio); SGLang model for reference", title_justify="left"
    )
    table.add_column("settings")
    for w, load in CASES:
        table.add_column(f"{w} @ {load}", justify="right")
    rows: dict[str, list[str]] = {"sglang_cache_aware": []}
    for lw, c in variants:
        rows[f"load_weight={lw:g}, in_flight_cost_tokens={c}"] = []
    with progress_display(on=console) as bar:
        task = bar.add_task("simulating", total=len(CASES) * (len(variants) + 1))
        for w, load in CASES:
            wl = generators.make_workload(w, args.requests, settings=base.settings)
            wl = wl.scaled(metrics.offered_load(wl, base) / load)
            s = metrics.summarize(engine.simulate(wl, base, "sglang_cache_aware"))
            rows["sglang_cache_aware"].append(f"{s.ttft_p99_s:.2f} ({s.hit_ratio:.2f})")
            bar.advance(task)
            for lw, c in variants:
                ca = CacheAwareSettings.model_validate(
                    {**base.settings.cache_aware.model_dump(), "load_weight": lw, "in_flight_cost_tokens": c}
                )
                settings = base.settings.model_copy(update={"cache_aware": ca})
                fl = fleet_mod.SimFleet(base.name, base.replicas, settings)
                s = metrics.summarize(engine.simulate(wl, fl, "cache_aware_tokens"))
                rows[f"load_weight={lw:g}, in_flight_cost_tokens={c}"].append(f"{s.ttft_p99_s:.2f} ({s.hit_ratio:.2f})")
                bar.advance(task)
    for name, cells in rows.items():
        table.add_row(name, *cells)
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
