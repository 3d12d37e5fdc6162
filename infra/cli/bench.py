"""`gpufleet bench`: routing policies in simulation (`bench sim`) and over loopback HTTP against the peer routers (`bench live`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.infra.cli._common import (
    OutOpt,
    UserError,
    deprecated,
    emit,
    err_console,
    group,
    output_option,
    progress,
    user_errors,
)

if TYPE_CHECKING:
    from gpufleet.router.sim.fleet import SimFleet
    from gpufleet.router.workloads.types import Workload

_WORKLOADS = "shared_prompts, rag, multiturn, mix, demo"

BENCH_FORMATS = {"table": "for people", "json": "for tools"}

_Fleet = Annotated[Path, typer.Option("--fleet", metavar="<file>", help="fleet declaration (fleet.yaml)")]
_Deployment = Annotated[str, typer.Option("--deployment", help="deployment whose replicas are simulated")]
_Workload = Annotated[str | None, typer.Option("--workload", metavar="<name>", help=f"one of: {_WORKLOADS}")]
_Trace = Annotated[Path | None, typer.Option("--trace", metavar="<file>", help="Mooncake-format trace (JSON lines)")]
_Seed = Annotated[int, typer.Option("--seed", help="seed of the workload and the random policies")]
_Output = Annotated[str, output_option(BENCH_FORMATS)]
_LegacyJson = Annotated[Path | None, typer.Option("--json", hidden=True)]


def _json_out(legacy: Path | None, output: str, out: Path | None) -> tuple[str, Path | None]:
    """`--json PATH` of earlier versions is `-o json --out PATH`."""
    if legacy is None:
        return output, out
    deprecated("--json PATH", f"-o json --out {legacy}")
    return "json", out or legacy


def _domain_errors() -> tuple[type[BaseException], ...]:
    from gpufleet.infra import catalog, spec
    from gpufleet.router.sim import trace

    return (ValueError, trace.TraceError, spec.FleetError, catalog.CatalogError)


def _fleet_and_workload(
    fleet: Path,
    deployment: str,
    workload: str | None,
    trace: Path | None,
    *,
    requests: int,
    seed: int,
    rate: float = 1.0,
    replicas: int | None = None,
    keep_bodies: bool = False,
) -> tuple[SimFleet, Workload]:
    """The simulated fleet from the plan and the workload (generated, or replayed from a trace)."""
    from gpufleet.router.sim import fleet as fleet_mod

    if (workload is None) == (trace is None):
        raise UserError("give exactly one of --workload NAME or --trace FILE")
    if not fleet.is_file():
        raise UserError(f"fleet file {fleet} not found")
    sim_fleet = fleet_mod.fleet_from_file(fleet, deployment, replicas=replicas)
    return sim_fleet, build_workload(
        sim_fleet, workload, trace, requests=requests, seed=seed, rate=rate, keep_bodies=keep_bodies
    )


def build_workload(
    sim_fleet: SimFleet,
    workload: str | None,
    trace: Path | None,
    *,
    requests: int,
    seed: int,
    rate: float = 1.0,
    rate_rps: float | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """A named synthetic workload (at `rate_rps`, default the generator's) or a trace replay."""
    from gpufleet.router.sim import trace as trace_mod
    from gpufleet.router.workloads import generators

    if (workload is None) == (trace is None):
        raise UserError("give exactly one of --workload NAME or --trace FILE")
    if requests < 0:
        raise UserError("--requests must be >= 0")
    settings = sim_fleet.settings
    if trace is not None:
        wl = trace_mod.trace_workload(
            trace_mod.load_trace(trace),
            name=trace.stem,
            rate_multiplier=rate,
            seed=seed,
            settings=settings,
            limit=requests or None,
            keep_bodies=keep_bodies,
        )
    else:
        assert workload is not None  # exactly one of the two, checked above
        extra = {"rate_rps": rate_rps} if rate_rps is not None else {}
        wl = generators.make_workload(
            workload,
            requests or 2000,
            seed=seed,
            settings=settings,
            keep_bodies=keep_bodies,
            **extra,
        )
    if not wl.requests:
        raise UserError("the workload has no requests")
    return wl


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    bench = group(
        "Benchmarks: routing policies in simulation and over HTTP. `bench sim` runs the router's own "
        "policies in the discrete-event simulator; `bench live` sends traffic over loopback HTTP through "
        "gpufleet's router and the SGLang and vLLM routers."
    )

    @bench.command("sim")
    def sim(
        fleet: _Fleet,
        deployment: _Deployment,
        workload: _Workload = None,
        trace: _Trace = None,
        load: Annotated[
            float | None,
            typer.Option(
                "--load", help="scale arrivals to this offered load (no-cache prefill work / fleet prefill capacity)"
            ),
        ] = None,
        rate: Annotated[float, typer.Option("--rate", help="trace rate multiplier (ignored with --load)")] = 1.0,
        policies: Annotated[
            str | None, typer.Option("--policies", help="comma-separated policies (default: all)")
        ] = None,
        requests: Annotated[
            int, typer.Option("--requests", help="requests to generate, or the first N of a trace (0: all)")
        ] = 2000,
        replicas: Annotated[
            int | None, typer.Option("--replicas", help="simulate this many replicas instead of the plan's")
        ] = None,
        seed: _Seed = 0,
        kv_state: Annotated[
            str,
            typer.Option(
                "--kv-state", help="approximate (the router's own guesses) or events (engines' KV events, precise)"
            ),
        ] = "approximate",
        routers: Annotated[
            int,
            typer.Option("--routers", min=1, help="independent router instances splitting the traffic at random"),
        ] = 1,
        event_delay_ms: Annotated[
            float, typer.Option("--event-delay-ms", min=0, help="delay of engine KV events to the routers")
        ] = 20.0,
        peer_interval_ms: Annotated[
            float | None,
            typer.Option(
                "--peer-interval-ms",
                min=0,
                help="how often the routers exchange their per-replica queue state (default: the fleet's "
                "router.peer_interval_s; 0: never)",
            ),
        ] = None,
        output: _Output = "table",
        out: OutOpt = None,
        plot: Annotated[
            Path | None,
            typer.Option("--plot", metavar="<png>", help="write a PNG of TTFT distributions and hit ratios"),
        ] = None,
        json_out: _LegacyJson = None,
    ) -> None:
        """Simulate routing policies over a deployment's replicas.

        A workload or trace replayed over the deployment's replicas from the plan, once per policy.
        """
        import json

        from gpufleet.router.sim import report

        output, out = _json_out(json_out, output, out)
        with user_errors(*_domain_errors()):
            if kv_state not in ("approximate", "events"):
                raise UserError(f"--kv-state must be approximate or events, not {kv_state!r}")
            sim_fleet, wl = _fleet_and_workload(
                fleet, deployment, workload, trace, requests=requests, seed=seed, rate=rate, replicas=replicas
            )
            # The fleet's own router.profiles run by name beside the registered policies.
            names = report.parse_policies(policies, sim_fleet.settings.profiles)
            with progress() as bar:
                tasks = {n: bar.add_task(f"{n:20s}", total=len(wl)) for n in names}
                run = report.run_policies(
                    wl,
                    sim_fleet,
                    names,
                    load=load,
                    seed=seed,
                    progress=lambda n, done: bar.update(tasks[n], completed=done),
                    kv_state=kv_state,
                    routers=routers,
                    event_delay_s=event_delay_ms / 1000,
                    peer_interval_s=None if peer_interval_ms is None else peer_interval_ms / 1000,
                )

            def show(target: Any) -> None:
                target.print(report.results_table(run))
                if kv_state != "approximate" or routers > 1:
                    peers = sim_fleet.settings.peer_interval_s if peer_interval_ms is None else peer_interval_ms / 1000
                    target.print(
                        f"kv state {kv_state}, {routers} router(s), events delayed {event_delay_ms:g} ms"
                        + (f", peer state every {peers * 1000:g} ms" if routers > 1 and peers > 0 else "")
                    )
                target.print(f"offered load {run.load:.2f} (as generated: {run.natural_load:.2f})")
                target.print("goals for cache_aware:")
                for line in report.goals_lines(run):
                    target.print("  " + line, markup=False, highlight=False)

            emit(show, json.dumps(report.to_json([run]), indent=2) + "\n" if output == "json" else None, out)
            if plot is not None:
                report.plot_runs([run], plot)
                err_console.print(f"wrote {plot}", highlight=False)

    @bench.command("live")
    def live_cmd(
        fleet: _Fleet,
        deployment: _Deployment,
        workload: _Workload = None,
        trace: _Trace = None,
        load: Annotated[
            float,
            typer.Option(
                "--load", help="offered load before the speed-up (see bench sim), in the tokens the replicas count"
            ),
        ] = 0.8,
        requests: Annotated[
            int, typer.Option("--requests", help="requests to send (scaled down from bench sim)")
        ] = 200,
        speedup: Annotated[
            float,
            typer.Option(
                "--speedup",
                help="replicas run this many times faster than the plan's hardware; arrivals too (above 1 the Python router competes for CPU on small machines)",
            ),
        ] = 1.0,
        routers: Annotated[
            str,
            typer.Option(
                "--routers",
                help="comma-separated: gpufleet, gpufleet-events (precise mode, from the replicas' KV events), sglang, vllm",
            ),
        ] = "gpufleet,gpufleet-events,sglang,vllm",
        peers_venv: Annotated[
            Path | None,
            typer.Option(
                "--peers-venv",
                envvar="GPUFLEET_PEERS_VENV",
                help="virtualenv with sglang-router and vllm-router (outside the project)",
            ),
        ] = None,
        seed: _Seed = 0,
        output: _Output = "table",
        out: OutOpt = None,
        json_out: _LegacyJson = None,
    ) -> None:
        """Send one workload over HTTP through gpufleet's router and the peers.

        A scaled-down workload over loopback HTTP through gpufleet's router and the SGLang and
        vLLM routers, in front of the same simulated replicas.
        """
        import json

        from rich.table import Table

        from gpufleet.router.sim import live

        output, out = _json_out(json_out, output, out)
        with user_errors(*_domain_errors()):
            names = tuple(r.strip() for r in routers.split(",") if r.strip())
            bad = [r for r in names if r not in live.ROUTERS]
            if bad or not names:
                raise UserError(f"unknown router {', '.join(bad) or '(none)'}; choose from {', '.join(live.ROUTERS)}")
            if requests < 1 or speedup <= 0 or load <= 0:
                raise UserError("--requests, --speedup and --load must be positive")
            sim_fleet, wl = _fleet_and_workload(
                fleet, deployment, workload, trace, requests=requests, seed=seed, keep_bodies=True
            )
            with live.at_load(wl, sim_fleet, names, load) as (wl, tokenizer), progress() as bar:
                tasks = {r: bar.add_task(f"{r:10s}", total=len(wl)) for r in names}
                results = live.run_live(
                    wl,
                    sim_fleet,
                    names,
                    speedup=speedup,
                    peers_venv=peers_venv,
                    progress=lambda r, n: bar.update(tasks[r], completed=n),
                    tokenizer=tokenizer,
                )
            t = Table(
                title=(
                    f"{wl.name} over HTTP: {len(wl)} requests, load {load:.2f}, replicas {speedup:g}x "
                    f"the plan's speed (times are wall seconds of the sped-up run)"
                ),
                title_justify="left",
            )
            for col in ("router", "ok", "errors", "hit", "TTFT p50 ms", "TTFT p99 ms", "req/s", "note"):
                t.add_column(col, justify="left" if col in ("router", "note") else "right")
            for r in results:
                if r.skipped:
                    t.add_row(r.router, "-", "-", "-", "-", "-", "-", f"skipped: {r.skipped}")
                    continue
                note = "; ".join(r.error_samples)
                t.add_row(
                    r.router,
                    str(r.ok),
                    str(r.errors),
                    f"{r.hit_ratio:.3f}",
                    f"{r.ttft_p50_s * 1000:,.0f}",
                    f"{r.ttft_p99_s * 1000:,.0f}",
                    f"{r.throughput_rps:.1f}",
                    note,
                )
            data = {
                "schema": "gpufleet.bench-live/v1",
                "workload": wl.name,
                "requests": len(wl),
                "load": load,
                "speedup": speedup,
                "routers": [r.to_dict() for r in results],
            }
            emit(lambda target: target.print(t), json.dumps(data, indent=2) + "\n" if output == "json" else None, out)

    app.add_typer(bench, name="bench")
