"""The routing benchmark suite: every workload at load 0.8 and 2.0, every policy, one results table each.

    .venv/bin/python bench/routing.py                       # synthetic workloads + Mooncake traces
    .venv/bin/python bench/routing.py --json docs/routing-results.json --plot docs/routing.png

Synthetic workloads run on `qwen-32b` of bench/fleet.yaml (a small KV cache per replica, where the
choice of replica decides hits); Mooncake traces (read from ../shared/traces/mooncake when present,
skipped with a note otherwise) run on `llama-8b-long` (128k context). The last table says, per
workload and load, which of the issue's goals gpufleet's cache_aware meets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from gpufleet.infra.cli._common import progress as progress_display
from gpufleet.infra.cli._common import report_console
from gpufleet.router.sim import fleet as fleet_mod
from gpufleet.router.sim import report, trace
from gpufleet.router.workloads import generators
from gpufleet.router.workloads.types import Workload

HERE = Path(__file__).resolve().parent
TRACES = HERE.parent.parent / "shared" / "traces" / "mooncake"
SYNTHETIC = ("shared_prompts", "rag", "multiturn", "mix", "hot_prefix")
LOADS = (0.8, 2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(HERE / "fleet.yaml"))
    ap.add_argument("--deployment", default="qwen-32b", help="deployment for the synthetic workloads")
    ap.add_argument("--trace-deployment", default="llama-8b-long", help="deployment for trace replay")
    ap.add_argument("--requests", type=int, default=2000, help="requests per synthetic workload")
    ap.add_argument("--trace-requests", type=int, default=2000, help="first N requests of each trace (0: all)")
    ap.add_argument("--workloads", default=",".join(SYNTHETIC) + ",traces")
    ap.add_argument("--loads", default=",".join(str(x) for x in LOADS))
    ap.add_argument("--policies", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every run's results here")
    ap.add_argument("--plot", default=None, help="write TTFT CDFs and hit ratios of every run here (PNG)")
    ap.add_argument("--markdown", default=None, help="write the result tables as Markdown here (for docs)")
    args = ap.parse_args(argv)

    console = report_console(170)
    names = report.parse_policies(args.policies)
    loads = [float(x) for x in args.loads.split(",") if x]
    wanted = [w for w in args.workloads.split(",") if w]
    syn_fleet = fleet_mod.fleet_from_file(args.fleet, args.deployment)
    jobs: list[tuple[Workload, fleet_mod.SimFleet]] = []
    for w in wanted:
        if w == "traces":
            if not TRACES.is_dir():
                console.print(f"[yellow]skipping Mooncake traces: {TRACES} is not present[/]")
                continue
            tr_fleet = fleet_mod.fleet_from_file(args.fleet, args.trace_deployment)
            for path in sorted(TRACES.glob("*.jsonl")):
                recs = trace.load_trace(path)
                jobs.append(
                    (
                        trace.trace_workload(
                            recs,
                            name=path.stem,
                            seed=args.seed,
                            settings=tr_fleet.settings,
                            limit=args.trace_requests or None,
                        ),
                        tr_fleet,
                    )
                )
        else:
            jobs.append(
                (generators.make_workload(w, args.requests, seed=args.seed, settings=syn_fleet.settings), syn_fleet)
            )

    runs: list[report.BenchRun] = []
    total = sum(len(wl) for wl, _ in jobs) * len(loads) * len(names)
    t0 = time.perf_counter()
    with progress_display(on=console) as bar:
        overall = bar.add_task("all runs (requests simulated)", total=total)
        done_before = 0
        for wl, fl in jobs:
            for load in loads:
                task = bar.add_task(f"{wl.name} @ {load}", total=len(wl) * len(names))
                base = names.index  # position of a policy in the run, for the progress offset

                def progress(name: str, n: int, _task=task, _base=base, _n=len(wl), _before=done_before) -> None:  # noqa: B008 (binds the loop values)
                    done = _base(name) * _n + n
                    bar.update(_task, completed=done)
                    bar.update(overall, completed=_before + done)

                run = report.run_policies(wl, fl, names, load=load, seed=args.seed, progress=progress)
                done_before += len(wl) * len(names)
                bar.remove_task(task)
                runs.append(run)
                console.print(report.results_table(run))
                for line in report.goals_lines(run):
                    console.print("  " + line, markup=False, highlight=False)
    wall = time.perf_counter() - t0
    console.print(goals_table(runs))
    console.print(f"simulated {total:,} request routings in {wall:.0f} s ({total / wall:,.0f} per second)")
    if args.json:
        report.write_json(runs, args.json)
        console.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown_tables(report.to_json(runs)))
        console.print(f"wrote {args.markdown}")
    if args.plot:
        report.plot_runs(runs, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def goals_table(runs: list[report.BenchRun]) -> Table:
    """Per workload and load: which goals cache_aware meets."""
    t = Table(title="goals for gpufleet cache_aware (MET / NOT MET / n/a)", title_justify="left")
    t.add_column("workload")
    t.add_column("load", justify="right")
    names = [g.name for g in runs[0].goals] if runs else []
    for n in names:
        t.add_column(n)
    for r in runs:
        cells = ["n/a" if g.met is None else ("MET" if g.met else "[red]NOT MET[/]") for g in r.goals]
        t.add_row(r.workload, f"{r.load:.2f}", *cells)
    return t


if __name__ == "__main__":
    raise SystemExit(main())
