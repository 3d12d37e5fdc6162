"""`gpufleet bench`: the routing simulator (`bench sim`) on a workload or a Mooncake trace."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gpufleet.infra.cli._common import UserError, console, user_errors

_WORKLOADS = "shared_prompts, rag, multiturn, mix, demo"


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    bench = typer.Typer(help="Benchmarks: routing policies in simulation.", no_args_is_help=True)

    @bench.command("sim")
    def sim(
        fleet: Annotated[Path, typer.Option("--fleet", help="fleet declaration (fleet.yaml)")],
        deployment: Annotated[str, typer.Option("--deployment", help="deployment whose replicas are simulated")],
        workload: Annotated[Optional[str], typer.Option("--workload", help=f"one of: {_WORKLOADS}")] = None,
        trace: Annotated[Optional[Path], typer.Option("--trace", help="Mooncake-format trace (JSON lines)")] = None,
        load: Annotated[Optional[float], typer.Option("--load", help="scale arrivals to this offered load (no-cache prefill work / fleet prefill capacity)")] = None,
        rate: Annotated[float, typer.Option("--rate", help="trace rate multiplier (ignored with --load)")] = 1.0,
        policies: Annotated[Optional[str], typer.Option("--policies", help="comma-separated policies (default: all)")] = None,
        requests: Annotated[int, typer.Option("--requests", help="requests to generate, or the first N of a trace (0: all)")] = 2000,
        replicas: Annotated[Optional[int], typer.Option("--replicas", help="simulate this many replicas instead of the plan's")] = None,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON here")] = None,
        plot: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG of TTFT distributions and hit ratios")] = None,
    ) -> None:
        """Simulate routing policies on a workload or trace over a deployment's replicas from the plan."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from gpufleet.infra import catalog as catalog_mod
        from gpufleet.infra import spec as spec_mod
        from gpufleet.router.sim import fleet as fleet_mod
        from gpufleet.router.sim import report, trace as trace_mod, workloads

        domain_errors = (ValueError, trace_mod.TraceError, spec_mod.FleetError, catalog_mod.CatalogError)
        with user_errors(*domain_errors):
            if (workload is None) == (trace is None):
                raise UserError("give exactly one of --workload NAME or --trace FILE")
            if requests < 0:
                raise UserError("--requests must be >= 0")
            names = report.parse_policies(policies)
            if not fleet.is_file():
                raise UserError(f"fleet file {fleet} not found")
            sim_fleet = fleet_mod.fleet_from_file(fleet, deployment, replicas=replicas)
            if trace is not None:
                recs = trace_mod.load_trace(trace)
                wl = trace_mod.trace_workload(
                    recs, name=trace.stem, rate_multiplier=rate, seed=seed, settings=sim_fleet.settings,
                    limit=requests or None,
                )
            else:
                wl = workloads.make_workload(workload, requests or 2000, seed=seed, settings=sim_fleet.settings)  # type: ignore[arg-type]
            if not wl.requests:
                raise UserError("the workload has no requests")
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=True,
            ) as bar:
                tasks = {n: bar.add_task(f"{n:20s}", total=len(wl)) for n in names}
                run = report.run_policies(
                    wl, sim_fleet, names, load=load, seed=seed,
                    progress=lambda n, done: bar.update(tasks[n], completed=done),
                )
            console.print(report.results_table(run))
            console.print(f"offered load {run.load:.2f} (as generated: {run.natural_load:.2f})")
            console.print("goals for cache_aware:")
            for line in report.goals_lines(run):
                console.print("  " + line, markup=False, highlight=False)
            if json_out is not None:
                report.write_json([run], json_out)
                console.print(f"wrote {json_out}")
            if plot is not None:
                report.plot_runs([run], plot)
                console.print(f"wrote {plot}")

    app.add_typer(bench, name="bench")
