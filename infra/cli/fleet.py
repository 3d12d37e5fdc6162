"""`gpufleet validate` and `gpufleet plan`: the declaration checked, compiled and priced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NotRequired, TypedDict

import typer
from rich.console import Console

from gpufleet.infra.cli._common import (
    CatalogOpt,
    OutOpt,
    UserError,
    console,
    declaration_errors,
    emit,
    err_console,
    legacy_format,
    output_option,
    progress,
    user_errors,
)

if TYPE_CHECKING:
    from gpufleet.infra.plan import Plan
    from gpufleet.provider_adapters.live import LiveFinding

EXIT_OVER_BUDGET = 3

PLAN_FORMATS = {
    "table": "for people",
    "json": "for tools (schema gpufleet.plan/v1)",
    "markdown": "a pull-request comment",
    "infracost-json": "Infracost's JSON output format (infracost comment, infracost output)",
}

FileArg = Annotated[Path, typer.Argument(help="The fleet declaration (fleet.yaml).", show_default=False)]


def _n(count: int, word: str) -> str:
    """`1 pool`, `2 pools`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def validate(file: FileArg, catalog: CatalogOpt = None) -> None:
    """Check a declaration; exit 1 with every problem listed.

    Exit 0 when the declaration is valid and compiles into a plan.
    """
    from gpufleet.infra import plan as plan_mod

    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
    console.print(
        f"[green]ok[/] {file}: fleet {p.fleet}, {_n(len(p.pools), 'pool')}, {_n(len(p.deployments), 'deployment')}, "
        f"{len(p.warnings)} warning{'' if len(p.warnings) == 1 else 's'}" + (":" if p.warnings else ""),
        highlight=False,
    )
    for w in p.warnings:
        console.print(f"  [yellow]warning[/] {w.subject}: {w.message} ({w.code})", highlight=False, soft_wrap=True)


def plan(
    file: FileArg,
    output: Annotated[str, output_option(PLAN_FORMATS)] = "table",
    out: OutOpt = None,
    compare: Annotated[
        Path | None, typer.Option("--compare", metavar="<plan.json>", help="An earlier `plan -o json` to diff against.")
    ] = None,
    max_monthly_usd: Annotated[
        float | None,
        typer.Option("--max-monthly-usd", help="CI gate: exit 3 when baseline + warm per month exceeds this."),
    ] = None,
    catalog: CatalogOpt = None,
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
    allow_unchecked: Annotated[
        bool,
        typer.Option(
            "--allow-unchecked",
            help="With --live: exit 0 even when a pool could not be checked (no credentials, no API access).",
        ),
    ] = False,
    format_old: Annotated[str | None, typer.Option("--format", "-f", hidden=True)] = None,
) -> None:
    """Compile a declaration: placement, KV, failover, cost.

    The plan as a table, as JSON for tools or as a pull-request comment; with --compare, the change
    against an earlier plan; with --max-monthly-usd, a budget gate for CI (exit 3).
    """
    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra import report

    output = legacy_format(format_old, "-f/--format", PLAN_FORMATS, output)
    if max_monthly_usd is not None and max_monthly_usd < 0:
        raise typer.BadParameter(
            f"{max_monthly_usd:g} is negative; a budget is $0 or more", param_hint="--max-monthly-usd"
        )
    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
        change = None
        old = None
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

    def show(target: Console) -> None:
        target.print(report.tables(p, change))
        if capacity is not None:
            _print_capacity(capacity, target)
        if findings is not None:
            _print_findings(findings, target)

    budget = None
    if max_monthly_usd is not None:
        committed = report.monthly_committed(p)
        budget = {
            "max_monthly_usd": max_monthly_usd,
            "monthly_committed_usd": committed,
            "over": committed > max_monthly_usd,
        }

    text: str | None = None
    if output == "json":
        data = _plan_json(p, change, capacity, findings)
        if budget is not None:
            data["budget"] = budget
        text = json.dumps(data, indent=2) + "\n"
    elif output == "infracost-json":
        from gpufleet.infra import infracost

        text = json.dumps(infracost.document(p, str(file), old), indent=2) + "\n"
    elif output == "markdown":
        text = report.markdown(p, change)
        if capacity is not None:
            text += _capacity_markdown(capacity)
        if findings is not None:
            text += _findings_markdown(findings)
        if budget is not None:
            text += _budget_markdown(budget)
    emit(show, text, out)
    if findings and any(f.severity == "error" for f in findings):
        raise typer.Exit(1)
    unchecked = sorted({f.pool for f in findings or [] if f.check == "unchecked" and f.severity != "info"})
    if unchecked and not allow_unchecked:
        # A check that could not run is not a pass: CI must not go green on missing credentials.
        err_console.print(
            f"[bold red]error:[/] --live could not check pool(s) {', '.join(unchecked)} (see above); "
            "give --allow-unchecked to accept that",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)

    if budget is not None:
        committed, limit = budget["monthly_committed_usd"], budget["max_monthly_usd"]
        if budget["over"]:
            err_console.print(
                f"[bold red]over budget:[/] baseline + warm is ${committed:,.2f}/month, above --max-monthly-usd ${limit:,.2f}",
                highlight=False,
            )
            raise typer.Exit(EXIT_OVER_BUDGET)
        err_console.print(
            f"within budget: baseline + warm is ${committed:,.2f}/month, --max-monthly-usd ${limit:,.2f}",
            highlight=False,
        )


def _budget_markdown(budget: dict[str, Any]) -> str:
    committed, limit = budget["monthly_committed_usd"], budget["max_monthly_usd"]
    verdict = "**over budget**" if budget["over"] else "within budget"
    mark = ":x:" if budget["over"] else ":white_check_mark:"
    return f"\n{mark} Budget gate: {verdict}: baseline + warm ${committed:,.2f}/month against a limit of ${limit:,.2f}/month.\n"


def _plan_json(p: Any, change: Any, capacity: CapacityReport | None, findings: list[Any] | None) -> dict[str, Any]:
    data: dict[str, Any] = p.to_json_dict()
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
                {
                    "name": d.name,
                    "status": d.status,
                    "delta_usd_per_month": d.delta_usd_per_month,
                    "changed": list(d.fields),
                }
                for d in change.pools
            ],
            "deployments": [{"name": n, "changed": what} for n, what in change.deployments],
        }
    return data


class OffloadReport(TypedDict):
    """What the KV offload tier saves (`CapacityReport.offload`)."""

    replicas_with: int | None
    replicas_without: int | None
    monthly_saving_usd: float | None


class CapacityReport(TypedDict):
    """`plan --ttft-p99-s`'s capacity result, as the JSON plan's `capacity` object holds it."""

    deployment: str
    workload: str
    requests: int
    arrival_rps: float
    ttft_p99_s: float
    gpus_per_replica: int
    usd_per_replica_month: float
    replicas: dict[str, int | None]
    """Replicas needed per policy (None: more than the simulation tries)."""
    monthly_saving_usd: float | None
    offload: NotRequired[OffloadReport]
    """Only when the deployment has a KV offload tier."""


def _capacity(
    p: Plan,
    workload: str | None,
    trace: Path | None,
    ttft_p99_s: float | None,
    deployment: str | None,
    *,
    rps: float | None,
    rate: float,
    requests: int,
) -> CapacityReport:
    """Replicas a deployment needs for the TTFT p99 target under round_robin and cache_aware (simulated)."""
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
        with progress(bar=False) as bar:
            bar.add_task(f"simulating {len(wl.requests)} requests of {wl.name} on {name} for each policy", total=None)
            result = capacity_mod.compare(wl, sim_fleet, ttft_p99_s)
    dep = p.deployment(name)
    report: CapacityReport = {
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
    if result.has_offload:
        report["offload"] = {
            "replicas_with": result.replicas.get("cache_aware"),
            "replicas_without": result.without_offload,
            "monthly_saving_usd": None if result.offload_saving_usd is None else round(result.offload_saving_usd, 2),
        }
    return report


def _capacity_text(c: CapacityReport) -> tuple[str, str, list[tuple[str, str, str]]]:
    """The capacity result's heading, summary and rows (policy, replicas needed, $/month)."""

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
    rows = [(pol, need(pol), cost(pol)) for pol in c["replicas"]]
    off = c.get("offload")
    if off is not None:
        n = off["replicas_without"]
        rows.append(
            (
                "cache_aware without kv_offload",
                "more than 64" if n is None else str(n),
                "-" if n is None else f"${n * c['usd_per_replica_month']:,.2f}",
            )
        )
        s = off["monthly_saving_usd"]
        summary += (
            f"; the KV offload tier saves ${s:,.2f}/month ({n} -> {off['replicas_with']} replicas)"
            if s is not None
            else "; offload saving not computed: a variant did not meet the target within 64 replicas"
        )
    return head, summary, rows


def _capacity_markdown(c: CapacityReport) -> str:
    head, summary, rows = _capacity_text(c)
    lines = ["", f"**Capacity** ({head})", "", "| policy | replicas needed | $/month |", "|---|---:|---:|"]
    lines += [f"| {pol} | {need} | {cost} |" for pol, need, cost in rows]
    return "\n".join([*lines, "", summary, ""]) + "\n"


def _print_capacity(c: CapacityReport, target: Console) -> None:
    from rich.table import Table

    head, summary, rows = _capacity_text(c)
    table = Table(title=head, title_justify="left")
    for col in ("policy", "replicas needed", "$/month"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for row in rows:
        table.add_row(*row)
    target.print(table)
    target.print(summary, highlight=False)


def _live_findings(p: Plan, catalogs: list[Path] | None) -> list[LiveFinding]:
    """Run the live checks of every pool whose cloud has an adapter (AWS, GCP)."""
    from gpufleet.infra import catalog as catalog_mod
    from gpufleet.provider_adapters import errors, live

    with user_errors(errors.AdapterError, *declaration_errors()):
        adapters = live.adapters_for_plan(p)
        cat = catalog_mod.load([*(catalogs or [])])
        return live.check_plan(p, adapters, cat)


def _findings_markdown(findings: list[Any]) -> str:
    lines = ["", "**Live checks**", ""] + [f"- {f.severity}: `{f.pool}` ({f.check}): {f.message}" for f in findings]
    if not findings:
        lines.append("- every pool passed")
    return "\n".join(lines) + "\n"


def _print_findings(findings: list[Any], target: Console) -> None:
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    target.print("[bold]live checks:[/]" + (" every pool passed" if not findings else ""))
    for f in findings:
        target.print(
            f"  [{style.get(f.severity, '')}]{f.severity}[/]: {f.pool} ({f.check}): {f.message}", highlight=False
        )


def register(app: typer.Typer) -> None:
    """Add `validate` and `plan`."""
    app.command("validate")(validate)
    app.command("plan")(plan)
