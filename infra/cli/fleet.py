"""`gpufleet validate` and `gpufleet plan`: the declaration checked, compiled and priced."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra.cli._common import (
    CatalogOpt,
    UserError,
    console,
    declaration_errors,
    err_console,
    user_errors,
)

EXIT_OVER_BUDGET = 3


class PlanFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


FileArg = Annotated[Path, typer.Argument(help="The fleet declaration (fleet.yaml).", show_default=False)]


def validate(file: FileArg, catalog: CatalogOpt = None) -> None:
    """Check a fleet declaration: exit 0 when valid, 1 with every problem listed."""
    from gpufleet.infra import plan as plan_mod

    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
    console.print(
        f"[green]ok[/] {file}: fleet {p.fleet}, {len(p.pools)} pools, {len(p.deployments)} deployments, "
        f"{len(p.warnings)} warning(s)",
        highlight=False,
    )


def plan(
    file: FileArg,
    format: Annotated[
        PlanFormat, typer.Option("--format", "-f", help="table for people, json for tools, markdown for a PR comment.")
    ] = PlanFormat.table,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="An earlier `plan --format json` to diff against.")
    ] = None,
    max_monthly_usd: Annotated[
        float | None,
        typer.Option("--max-monthly-usd", help="CI gate: exit 3 when baseline + warm per month exceeds this."),
    ] = None,
    catalog: CatalogOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the output to this file instead of stdout.")
    ] = None,
    workload: Annotated[
        str | None,
        typer.Option(
            "--workload", help="Capacity planning: a simulated workload (shared_prompts, rag, multiturn, mix, demo)."
        ),
    ] = None,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Capacity planning: a request trace in the Mooncake format.")
    ] = None,
    ttft_p99_s: Annotated[
        float | None, typer.Option("--ttft-p99-s", help="Capacity planning: the TTFT p99 target in seconds.")
    ] = None,
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Capacity planning: the deployment (default: the first).")
    ] = None,
    rps: Annotated[
        float | None, typer.Option("--rps", help="Capacity planning: arrival rate of a --workload, requests/s.")
    ] = None,
    rate: Annotated[float, typer.Option("--rate", help="Capacity planning: --trace rate multiplier.")] = 1.0,
    requests: Annotated[
        int, typer.Option("--requests", help="Capacity planning: requests to simulate (a trace's first N; 0: all).")
    ] = 1000,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Check the plan against the clouds (offered types and zones, GPU quota, spot price) "
            "with the environment's credentials; exit 1 on an error finding.",
        ),
    ] = False,
) -> None:
    """Compile the declaration into a plan: placement, KV capacity, failover, cost."""
    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra import report

    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
        change = None
        if compare is not None:
            try:
                old = json.loads(compare.read_text())
            except OSError as exc:
                raise UserError(f"{compare}: cannot read: {exc.strerror}") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{compare}:{exc.lineno}: not JSON: {exc.msg}") from None
            change = report.diff(old, p)

    findings = _live_findings(p, catalog) if live else None
    capacity = None
    if workload is not None or trace is not None or ttft_p99_s is not None:
        capacity = _capacity(p, workload, trace, ttft_p99_s, deployment, rps=rps, rate=rate, requests=requests)

    if format is PlanFormat.json:
        data = p.to_json_dict()
        if capacity is not None:
            data["capacity"] = capacity
        if findings is not None:
            data["live"] = [
                {"severity": f.severity, "pool": f.pool, "check": f.check, "message": f.message} for f in findings
            ]
        if change is not None:
            data["compare"] = {
                "old_usd_per_month": change.old_usd_per_month,
                "new_usd_per_month": change.new_usd_per_month,
                "delta_usd_per_month": change.delta_usd_per_month,
                "pools": [
                    {"name": d.name, "status": d.status, "delta_usd_per_month": d.delta_usd_per_month}
                    for d in change.pools
                ],
            }
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
        _emit(text, out)
    elif format is PlanFormat.markdown:
        _emit(report.markdown(p, change), out)
    else:
        if out is not None:
            from rich.console import Console

            with out.open("w") as fh:
                Console(file=fh, width=160).print(report.tables(p, change))
        else:
            console.print(report.tables(p, change))

    if capacity is not None and format is not PlanFormat.json:
        _print_capacity(capacity, markdown=format is PlanFormat.markdown, out=out)
    if findings is not None and format is not PlanFormat.json:
        _print_findings(findings, markdown=format is PlanFormat.markdown, out=out)
    if findings and any(f.severity == "error" for f in findings):
        raise typer.Exit(1)

    if max_monthly_usd is not None:
        committed = report.monthly_committed(p)
        if committed > max_monthly_usd:
            err_console.print(
                f"[bold red]over budget:[/] baseline + warm is ${committed:,.2f}/month, above --max-monthly-usd ${max_monthly_usd:,.2f}",
                highlight=False,
            )
            raise typer.Exit(EXIT_OVER_BUDGET)


def _capacity(
    p,
    workload: str | None,
    trace: Path | None,
    ttft_p99_s: float | None,
    deployment: str | None,
    *,
    rps: float | None,
    rate: float,
    requests: int,
) -> dict:
    """Replicas a deployment needs for the TTFT p99 target under round_robin and cache_aware (simulated)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gpufleet.infra.cli.bench import build_workload
    from gpufleet.router.sim import capacity as capacity_mod
    from gpufleet.router.sim import fleet as fleet_mod
    from gpufleet.router.sim import trace as trace_mod

    with user_errors(trace_mod.TraceError, ValueError, *declaration_errors()):
        if ttft_p99_s is None:
            raise UserError("capacity planning needs --ttft-p99-s with --workload or --trace")
        if rps is not None and rps <= 0:
            raise UserError("--rps must be positive")
        name = deployment or p.deployments[0].name
        if name not in {d.name for d in p.deployments}:
            raise UserError(
                f"--deployment {name!r} is not in the plan; deployments: {', '.join(d.name for d in p.deployments)}"
            )
        sim_fleet = fleet_mod.fleet_from_plan(p, name)
        wl = build_workload(sim_fleet, workload, trace, requests=requests, seed=0, rate=rate, rate_rps=rps)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True
        ) as bar:
            bar.add_task(f"simulating {len(wl.requests)} requests of {wl.name} on {name} for each policy", total=None)
            result = capacity_mod.compare(wl, sim_fleet, ttft_p99_s)
    dep = p.deployment(name)
    return {
        "deployment": name,
        "workload": wl.name,
        "requests": len(wl.requests),
        "arrival_rps": round(len(wl.requests) / wl.span_s, 3),
        "ttft_p99_s": ttft_p99_s,
        "gpus_per_replica": dep.gpus_per_replica,
        "usd_per_replica_month": round(result.usd_per_replica_month, 2),
        "replicas": dict(result.replicas),
        "monthly_saving_usd": None if result.monthly_saving_usd is None else round(result.monthly_saving_usd, 2),
    }


def _print_capacity(c: dict, *, markdown: bool, out: Path | None) -> None:
    def need(policy: str) -> str:
        n = c["replicas"].get(policy)
        return "more than 64" if n is None else str(n)

    def cost(policy: str) -> str:
        n = c["replicas"].get(policy)
        return "-" if n is None else f"${n * c['usd_per_replica_month']:,.2f}"

    saving = c["monthly_saving_usd"]
    summary = (
        f"cache_aware saves ${saving:,.2f}/month against round_robin"
        if saving is not None
        else "no saving computed: a policy did not meet the target within 64 replicas"
    )
    head = (
        f"capacity for {c['deployment']}: {c['workload']} ({c['requests']} requests at {c['arrival_rps']} req/s), "
        f"TTFT p99 <= {c['ttft_p99_s']} s"
    )
    if markdown:
        lines = ["", f"**Capacity** ({head})", "", "| policy | replicas needed | $/month |", "|---|---:|---:|"]
        lines += [f"| {pol} | {need(pol)} | {cost(pol)} |" for pol in c["replicas"]]
        lines += ["", summary, ""]
        text = "\n".join(lines)
        if out is None:
            typer.echo(text)
        else:
            with out.open("a") as fh:
                fh.write(text + "\n")
        return
    from rich.table import Table

    table = Table(title=head, title_justify="left")
    for col in ("policy", "replicas needed", "$/month"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for pol in c["replicas"]:
        table.add_row(pol, need(pol), cost(pol))
    console.print(table)
    console.print(summary, highlight=False)


def _live_findings(p, catalogs: list[Path] | None):
    """Run the live checks of every pool whose cloud has an adapter (AWS, GCP)."""
    from gpufleet.infra import catalog as catalog_mod
    from gpufleet.provider_adapters import errors, live

    with user_errors(errors.AdapterError, *declaration_errors()):
        adapters = live.adapters_for_plan(p)
        cat = catalog_mod.load([*(catalogs or [])])
        return live.check_plan(p, adapters, cat)


def _print_findings(findings, *, markdown: bool, out: Path | None) -> None:
    if markdown:
        lines = ["", "**Live checks**", ""] + [f"- {f.severity}: `{f.pool}` ({f.check}): {f.message}" for f in findings]
        if not findings:
            lines.append("- every pool passed")
        text = "\n".join(lines) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            with out.open("a") as fh:
                fh.write(text)
        return
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    console.print("[bold]live checks:[/]" + (" every pool passed" if not findings else ""))
    for f in findings:
        console.print(
            f"  [{style.get(f.severity, '')}]{f.severity}[/]: {f.pool} ({f.check}): {f.message}", highlight=False
        )


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


def register(app: typer.Typer) -> None:
    """Add `validate` and `plan`."""
    app.command("validate")(validate)
    app.command("plan")(plan)
