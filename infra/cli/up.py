"""`gpufleet up` (run a local fleet from its plan) and `gpufleet demo` (drive traffic through it)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.infra.cli._common import UserError, console, user_errors

if TYPE_CHECKING:
    from gpufleet.infra.local import LocalRuntime
    from gpufleet.infra.plan import Plan
    from gpufleet.router.workload import Summary

DEFAULT_LOCAL_FLEET = Path("stacks/local/fleet.yaml")


def _plan(file: Path) -> Plan:
    from gpufleet.infra.cli.fleet import _compile, _domain_errors
    from gpufleet.infra.local import LocalRuntimeError, check_local

    with user_errors(*_domain_errors(), LocalRuntimeError):
        plan = _compile(file, None)
        check_local(plan)
    return plan


def _start(plan: Plan, label: str, **kw: Any) -> LocalRuntime:
    """Start a LocalRuntime behind a progress bar; user-facing errors become one line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gpufleet.infra.local import LocalRuntime, LocalRuntimeError

    with user_errors(LocalRuntimeError):
        rt = LocalRuntime(plan, **kw)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
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
    return "-" if x is None else f"{x * 1000:.1f}"


def _summary_table(title: str, rows: list[tuple[str, Summary]], pools: dict[str, str]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (
        ("policy", "left"), ("requests", "right"), ("errors", "right"), ("prefix-hit ratio", "right"),
        ("TTFT p50 ms", "right"), ("TTFT p99 ms", "right"), ("prediction-cache hits", "right"),
        ("requests per replica", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, s in rows:
        per = "\n".join(f"{rid} ({pools.get(rid, '?')}): {n}" for rid, n in s.per_replica.items())
        t.add_row(
            name, str(s.requests), str(s.errors), f"{s.prefix_hit_ratio:.1%}", _ms(s.ttft_p50_s), _ms(s.ttft_p99_s),
            str(s.cache_hits), per,
        )
    return t


def register(app: typer.Typer) -> None:
    """Add `up` and `demo` to the root app."""

    @app.command("up")
    def up(
        file: Annotated[Path, typer.Argument(help="fleet declaration whose pools are all `cloud: local`")],
        port: Annotated[int | None, typer.Option(help="router port (0: any free port) [default: router.port]")] = None,
        ready_timeout_s: Annotated[float, typer.Option(help="seconds a simulated replica or the router may take to start")] = 60.0,
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
                plan, f"starting {plan.fleet}", router_port=port, ready_timeout_s=ready_timeout_s,
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
                console.print(f"admin endpoints: bearer token from ${env} (set it before `gpufleet up` to know it)", highlight=False)
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
        requests: Annotated[int, typer.Option(help="requests per policy run")] = 240,
        concurrency: Annotated[int, typer.Option(help="requests in flight")] = 16,
        seed: Annotated[int, typer.Option(help="workload seed")] = 0,
        max_tokens: Annotated[int, typer.Option(help="tokens generated per request")] = 16,
    ) -> None:
        """Bring the local fleet up, compare round_robin with cache_aware on a mixed workload, then fail its top pool."""
        import asyncio
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from gpufleet.router import workload

        if requests < 1 or concurrency < 1:
            with user_errors():
                raise UserError("--requests and --concurrency must be >= 1")
        plan = _plan(file)
        models = tuple(dict.fromkeys(d.model for d in plan.deployments))
        weights = tuple(3.0 if i == 0 else 1.0 for i in range(len(models)))
        # Many distinct prefixes for the request count: where a policy sends a prefix decides how
        # often it is prefilled again, which is what the table compares.
        shape = dict(n_system_prompts=12, n_docs=100, model_weights=weights, max_tokens=max_tokens)
        reqs = workload.generate(workload.WorkloadSpec(models=models, n_requests=requests, seed=seed, **shape))
        _install_sigterm()
        runtimes: list[LocalRuntime] = []
        rows: list[tuple[str, Summary]] = []
        pools: dict[str, str] = {}
        t_start = time.monotonic()

        def run_load(rt: LocalRuntime, batch: list[workload.WorkRequest], label: str) -> Summary:
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=True,
            ) as progress:
                task = progress.add_task(label, total=len(batch))
                t0 = time.perf_counter()
                results = asyncio.run(workload.drive(
                    rt.endpoint, batch, concurrency=concurrency, on_result=lambda _r: progress.advance(task),
                ))
            return workload.summarize(results, time.perf_counter() - t0)

        try:
            for policy in ("round_robin", "cache_aware"):
                settings = _plan_settings(plan).model_copy(update={"policy": policy})
                rt = _start(plan, f"starting {plan.fleet} ({policy})", router_port=0, settings=settings)
                runtimes.append(rt)
                pools.update({r.id: r.pool for r in rt.replicas})
                rows.append((policy, run_load(rt, reqs, f"{policy}: {len(reqs)} requests")))
                if policy != "cache_aware":
                    rt.stop()  # a fresh fleet per policy: no policy inherits the other's warm caches
            console.print(_summary_table(
                f"{len(reqs)} requests (shared system prompts, RAG, multi-turn chat), concurrency {concurrency}, seed {seed}",
                rows, pools,
            ))
            rt = runtimes[-1]
            top = max(rt.plan.pools, key=lambda p: p.priority)
            killed = rt.kill_pool(top.name)
            console.print(f"[bold]killed pool {top.name}[/]: {', '.join(killed) or 'no replicas'}", highlight=False)
            for ev in rt.check(load=False):
                console.print(f"  [yellow]{ev}[/]", highlight=False)
            spill_reqs = workload.generate(workload.WorkloadSpec(
                models=models, n_requests=max(20, requests // 4), seed=seed + 1, **shape,
            ))
            after = run_load(rt, spill_reqs, f"after losing {top.name}")
            rt.wait_routable([r.id for r in rt.replicas if r.state == "active"], timeout_s=10)
            later = run_load(rt, workload.generate(workload.WorkloadSpec(
                models=models, n_requests=max(20, requests // 4), seed=seed + 2, **shape,
            )), "after promotion")
            console.print(_summary_table(
                f"spill-over: pool {top.name} (priority {top.priority}) lost",
                [("right after", after), ("after warm promotion", later)], pools,
            ))
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
