"""`gpufleet up` (run a local fleet from its plan) and `gpufleet demo` (drive traffic through it)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.infra.cli._common import UserError, compile_declaration, console, declaration_errors, user_errors

if TYPE_CHECKING:
    from gpufleet.infra.local import LocalRuntime
    from gpufleet.infra.plan import Plan
    from gpufleet.router.workload import Summary

DEFAULT_LOCAL_FLEET = Path("stacks/local/fleet.yaml")


def _plan(file: Path) -> Plan:
    from gpufleet.infra.local import LocalRuntimeError, check_local

    with user_errors(*declaration_errors(), LocalRuntimeError):
        plan = compile_declaration(file)
        check_local(plan)
    return plan


def _start(plan: Plan, label: str, **kw: Any) -> LocalRuntime:
    """Start a LocalRuntime behind a progress bar; user-facing errors become one line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gpufleet.infra.local import LocalRuntime, LocalRuntimeError

    with user_errors(LocalRuntimeError):
        rt = LocalRuntime(plan, **kw)
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(label, total=len(rt.replicas) + 1)

            def step(msg: str) -> None:
                progress.update(task, advance=1, description=f"{label}: {msg}")

            rt.start(step)
    return rt


def _replica_table(rt: LocalRuntime) -> Any:
    from rich.table import Table

    t = Table(title=f"fleet {rt.plan.fleet}: replicas", title_justify="left")
    for col in ("replica", "deployment", "pool", "priority", "role", "url"):
        t.add_column(col)
    for r in rt.replicas:
        role = r.role if r.state != "dead" else "dead"
        t.add_row(r.id, r.deployment, r.pool, str(r.priority), role, r.url)
    return t


def _install_sigterm() -> None:
    """SIGTERM stops `up` the way Ctrl-C does (via KeyboardInterrupt in the main thread)."""

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


@dataclass
class _Row:
    """One row of a demo table: a run (or one deployment's share of it) and what it showed."""

    label: str
    deployment: str
    summary: Summary
    ceiling: float | None = None
    spills: int = 0
    replicas: list[tuple[str, str]] = field(default_factory=list)
    """(replica id, pool) of the deployment, so idle replicas show as 0."""


def _per_replica(row: _Row) -> str:
    """Requests per replica grouped by pool: `local-l4 31/30/29/31, local-l40s 0`."""
    if not row.replicas:
        return ""
    by_pool: dict[str, list[str]] = {}
    for rid, pool in row.replicas:
        by_pool.setdefault(pool, []).append(str(row.summary.per_replica.get(rid, 0)))
    return ", ".join(f"{pool} {'/'.join(ns)}" for pool, ns in by_pool.items())


def _summary_table(title: str, rows: list[_Row]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (
        ("run", "left"),
        ("deployment", "left"),
        ("requests", "right"),
        ("errors", "right"),
        ("prefix hits", "right"),
        ("ceiling", "right"),
        ("TTFT p50", "right"),
        ("TTFT p99", "right"),
        ("pred. cache", "right"),
        ("spills", "right"),
        ("requests per replica", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    last = None
    for row in rows:
        s = row.summary
        if last is not None and row.label != last:
            t.add_section()
        t.add_row(
            row.label if row.label != last else "",
            row.deployment,
            str(s.requests),
            str(s.errors),
            f"{s.prefix_hit_ratio:.1%}",
            "-" if row.ceiling is None else f"{row.ceiling:.1%}",
            _ms(s.ttft_p50_s),
            _ms(s.ttft_p99_s),
            str(s.cache_hits),
            str(row.spills),
            _per_replica(row),
            style="bold" if row.deployment == "all" else None,
        )
        last = row.label
    return t


def _spills(rt: LocalRuntime) -> dict[str, int]:
    """The router's spill counter per model (`gpufleet_router_spills_total` on /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    try:
        text = httpx.get(rt.endpoint + "/metrics", timeout=5.0, trust_env=False).text
    except httpx.HTTPError:
        return out
    for fam in text_string_to_metric_families(text):
        if fam.name == "gpufleet_router_spills":
            for sample in fam.samples:
                if sample.name.endswith("_total"):
                    model = sample.labels.get("model", "")
                    out[model] = out.get(model, 0) + int(sample.value)
    return out


def _preferred_pools(plan: Plan) -> list[str]:
    """Pools some deployment prefers and could fail over from: the demo's pool failure."""
    return list(dict.fromkeys(d.failover[0] for d in plan.deployments if len(d.failover) > 1))


def _traffic_weights(plan: Plan) -> dict[str, float]:
    """Traffic share per model: the prefill tokens/s of the replicas the router sends it to.

    That is a deployment's baseline replicas in the highest-priority pool holding any (the tier
    the router uses while nothing fails). Operators size a model's pool to its traffic, so the
    demo sends each model the share of load its pool was sized for.
    """
    out: dict[str, float] = {}
    for d in plan.deployments:
        if not d.replicas:
            continue
        perf = {p.pool: p.prefill_tokens_per_s for p in d.pools}
        tier = max(r.priority for r in d.replicas)
        cap = sum(perf.get(r.pool, 0.0) for r in d.replicas if r.priority == tier)
        out[d.model] = out.get(d.model, 0.0) + cap
    return out


def register(app: typer.Typer) -> None:
    """Add `up` and `demo` to the root app."""

    @app.command("up")
    def up(
        file: Annotated[Path, typer.Argument(help="fleet declaration whose pools are all `cloud: local`")],
        port: Annotated[
            int | None, typer.Option(help="router port, 0 for any free port (default: the fleet's router.port)")
        ] = None,
        ready_timeout_s: Annotated[
            float, typer.Option(help="seconds a simulated replica or the router may take to start")
        ] = 60.0,
        supervise_interval_s: Annotated[float, typer.Option(help="seconds between supervision rounds")] = 1.0,
    ) -> None:
        """Run a local fleet from its plan: replicas, warm standbys and the router, until Ctrl-C."""
        plan = _plan(file)
        if port is not None and not 0 <= port <= 65535:
            with user_errors():
                raise UserError(f"--port {port}: must be between 0 and 65535")
        _install_sigterm()
        rt = None
        failed = False
        try:
            rt = _start(
                plan,
                f"starting {plan.fleet}",
                router_port=port,
                ready_timeout_s=ready_timeout_s,
                on_event=lambda m: console.print(f"[yellow]{m}[/]", highlight=False),
            )
            console.print(_replica_table(rt))
            env = rt.settings.admin_token.env
            console.print(
                f"router for fleet [bold]{plan.fleet}[/] (policy {rt.settings.policy}) listening on {rt.endpoint}",
                highlight=False,
            )
            console.print(f"OpenAI base URL: {rt.endpoint}/v1   (Ctrl-C to stop)", highlight=False)
            if env:
                console.print(
                    f"admin endpoints: bearer token from ${env} (set it before `gpufleet up` to know it)",
                    highlight=False,
                )
            stop = threading.Event()
            while not stop.wait(supervise_interval_s):
                rt.check()
                if rt.router_proc is not None and rt.router_proc.poll() is not None:
                    # without its router the fleet serves nobody: stop it all rather than linger
                    failed = True
                    break
        except KeyboardInterrupt:
            pass
        finally:
            if rt is not None:
                n = len(rt.pids())
                rt.stop()
                console.print(f"stopped {n} processes", highlight=False)
        if failed:
            with user_errors():
                raise UserError("the router exited; the fleet was stopped")

    @app.command("demo")
    def demo(
        file: Annotated[Path, typer.Argument(help="local fleet declaration")] = DEFAULT_LOCAL_FLEET,
        requests: Annotated[int, typer.Option(help="requests per policy run")] = 300,
        load: Annotated[
            float,
            typer.Option(
                help="offered load: prompt tokens per second over the preferred pools' prefill capacity (as if nothing were cached)",
            ),
        ] = 1.0,
        rate: Annotated[float | None, typer.Option(help="arrivals per second, Poisson (default: from --load)")] = None,
        concurrency: Annotated[int, typer.Option(help="cap on requests in flight")] = 64,
        seed: Annotated[int, typer.Option(help="workload seed")] = 0,
        max_tokens: Annotated[int, typer.Option(help="tokens generated per request")] = 16,
    ) -> None:
        """Bring the local fleet up, compare round_robin with cache_aware on a mixed workload, then fail its preferred pools."""
        import asyncio
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from gpufleet.router import workload
        from gpufleet.router.prefix import render_prompt

        if requests < 1 or concurrency < 1:
            with user_errors():
                raise UserError("--requests and --concurrency must be >= 1")
        if load <= 0 or (rate is not None and rate <= 0):
            with user_errors():
                raise UserError("--load and --rate must be > 0")
        plan = _plan(file)
        settings0 = _plan_settings(plan)
        weights = _traffic_weights(plan)
        models = tuple(weights)
        if not models:
            with user_errors():
                raise UserError(f"{file}: no deployment has a baseline replica (min_replicas >= 1) to send traffic to")

        def make(n: int, s: int) -> list[workload.WorkRequest]:
            spec = workload.demo_spec(
                models, n, seed=s, max_tokens=max_tokens, model_weights=[weights[m] for m in models]
            )
            return workload.generate(spec)

        # One workload: the policy runs replay its first `requests`; the spill-over runs continue it
        # (same documents and system prompts, conversations carry on), as traffic would.
        n_spill = max(20, requests // 4)
        everything = make(requests + 2 * n_spill, seed)
        reqs = everything[:requests]
        if rate is None:
            # offered prefill work against the preferred pools' capacity, counting every prompt token
            mean_tokens = sum(len(render_prompt(r.body)) for r in reqs) / len(reqs) / settings0.chars_per_token
            rate = round(load * sum(weights.values()) / mean_tokens, 1)
        _install_sigterm()
        runtimes: list[LocalRuntime] = []
        rows: list[_Row] = []
        t_start = time.monotonic()

        def run_load(
            rt: LocalRuntime,
            batch: list[workload.WorkRequest],
            label: str,
            arrival_seed: int,
            ceiling: bool = True,
        ) -> list[_Row]:
            before = _spills(rt)
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task(f"{label}: {len(batch)} requests at {rate} req/s", total=len(batch))
                t0 = time.perf_counter()
                results = asyncio.run(
                    workload.drive(
                        rt.endpoint,
                        batch,
                        concurrency=concurrency,
                        on_result=lambda _r: progress.advance(task),
                        rate_per_s=rate,
                        arrival_seed=arrival_seed,
                    )
                )
            wall = time.perf_counter() - t0
            for msg in list(dict.fromkeys(f"{r.status or 'no status'} {r.error}" for r in results if not r.ok))[:3]:
                console.print(f"  [red]{label}: error[/] {msg}", highlight=False)
            after = _spills(rt)
            spilled = {m: after.get(m, 0) - before.get(m, 0) for m in set(after) | set(before)}
            bt, cpt = settings0.block_size_tokens, settings0.chars_per_token

            # The ceiling over what the replicas served, in the order it was sent (a replica can only
            # hold prompts sent before): requests the prediction cache answered never reached one.
            sent = {r.index: r.sent_s for r in results if not (r.ok and r.cache == "hit")}
            served = sorted((r for r in batch if r.index in sent), key=lambda r: (sent[r.index], r.index))

            def ceil(model: str | None) -> float | None:
                return (
                    workload.ceiling_hit_ratio(served, block_size_tokens=bt, chars_per_token=cpt, model=model)
                    if ceiling
                    else None
                )

            out = [
                _Row(label, "all", workload.summarize(results, wall), spills=sum(spilled.values()), ceiling=ceil(None))
            ]
            by_model = workload.summarize_by_model(results, wall)
            for d in plan.deployments:
                if d.model in by_model:
                    reps = [(r.id, r.pool) for r in rt.replicas if r.deployment == d.name and r.role == "active"]
                    out.append(
                        _Row(
                            label,
                            d.name,
                            by_model[d.model],
                            spills=spilled.get(d.model, 0),
                            replicas=reps,
                            ceiling=ceil(d.model),
                        )
                    )
            return out

        try:
            for policy in ("round_robin", "cache_aware"):
                settings = settings0.model_copy(update={"policy": policy})
                rt = _start(plan, f"starting {plan.fleet} ({policy})", router_port=0, settings=settings)
                runtimes.append(rt)
                rows.extend(run_load(rt, reqs, policy, seed))
                if policy != "cache_aware":
                    rt.stop()  # a fresh fleet per policy: no policy inherits the other's warm caches
            console.print(
                _summary_table(
                    f"{len(reqs)} requests (system prompts, RAG, multi-turn chat), Poisson {rate} req/s (load {load:g}), "
                    f"seed {seed}; ceiling: an infinite cache per model",
                    rows,
                )
            )
            rt = runtimes[-1]
            lost = _preferred_pools(rt.plan)
            killed = [rid for pool in lost for rid in rt.kill_pool(pool)]
            console.print(
                f"[bold]killed pool(s) {', '.join(lost) or '-'}[/]: {', '.join(killed) or 'no replicas'}",
                highlight=False,
            )
            for ev in rt.check(load=False):
                console.print(f"  [yellow]{ev}[/]", highlight=False)
            spill_rows = run_load(rt, everything[requests : requests + n_spill], "right after", seed + 1, ceiling=False)
            rt.wait_routable([r.id for r in rt.replicas if r.state == "active"], timeout_s=10)
            spill_rows += run_load(rt, everything[requests + n_spill :], "after promotion", seed + 2, ceiling=False)
            console.print(
                _summary_table(
                    f"spill-over: pool(s) {', '.join(lost)} lost, the same traffic goes on; spills from the router's /metrics",
                    spill_rows,
                )
            )
        except KeyboardInterrupt:
            console.print("interrupted", style="yellow")
        finally:
            pids = [p for rt in runtimes for p in rt.pids()]
            for rt in runtimes:
                rt.stop()
            from gpufleet.infra.local import pid_alive

            left = [p for p in pids if pid_alive(p)]
            console.print(
                f"tore down {len(pids)} processes, {len(left)} left; demo took {time.monotonic() - t_start:.1f} s",
                highlight=False,
            )
            if left:
                raise typer.Exit(1)


def _plan_settings(plan: Plan) -> Any:
    from gpufleet.router.config import RouterSettings

    return RouterSettings.model_validate(plan.router)
