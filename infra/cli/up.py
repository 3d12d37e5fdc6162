"""`gpufleet up` (run a local fleet from its plan) and `gpufleet demo` (drive traffic through it)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.infra.cli._common import UserError, console, declaration_errors, progress, user_errors

if TYPE_CHECKING:
    from gpufleet.infra.local import LocalRuntime
    from gpufleet.infra.plan import Plan
    from gpufleet.router.config import RouterSettings

# The embedded default is package data, so `gpufleet demo` runs from any directory after
# `pip install gpufleet[router]`; stacks/local/fleet.yaml is a copy kept equal by a test.
EMBEDDED_FLEET = "data/fleets/local.yaml"


@contextmanager
def embedded_fleet() -> Iterator[Path]:
    """The embedded default fleet (package data) as a file path for as long as the block runs."""
    from importlib import resources

    with resources.as_file(resources.files("gpufleet.infra").joinpath(EMBEDDED_FLEET)) as path:
        yield path


def _plan(file: Path) -> Plan:
    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra.local import LocalRuntimeError, check_local

    with user_errors(*declaration_errors(), LocalRuntimeError):
        plan = plan_mod.compile_file(file)
        check_local(plan)
    return plan


def _start(plan: Plan, label: str, **kw: Any) -> LocalRuntime:
    """Start a LocalRuntime behind a progress bar; user-facing errors become one line."""
    from gpufleet.infra.local import LocalRuntime, LocalRuntimeError

    with user_errors(LocalRuntimeError):
        rt = LocalRuntime(plan, **kw)
        with progress() as bar:
            task = bar.add_task(label, total=len(rt.replicas) + 1)

            def step(msg: str) -> None:
                bar.update(task, advance=1, description=f"{label}: {msg}")

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


def scaling_lines(plan: Plan, autoscale: bool) -> list[str]:
    """One line per deployment: how `up` scales it (the plan's scaling, or off with --no-autoscale)."""
    out = []
    for d in plan.deployments:
        if autoscale or d.autoscaling is None:
            out.append(f"scaling {d.name}: {d.scaling_summary()}")
        else:
            out.append(
                f"scaling {d.name}: autoscaling off (--no-autoscale): standbys promoted for min_replicas "
                f"and by load, up to {d.max_replicas}"
            )
    return out


class _Signals:
    """`up`'s SIGINT/SIGTERM: during start-up both stop at once (KeyboardInterrupt); once the fleet
    runs the first asks for a drain, the second forces (every child SIGKILLed)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.rt: LocalRuntime | None = None
        self.count = 0

    def __call__(self, _signum: int, _frame: object) -> None:
        self.count += 1
        if self.rt is None:
            raise KeyboardInterrupt
        if self.count == 1:
            self.stop.set()
            return
        console.print("second signal: stopping now", style="yellow")
        self.rt.force()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self)
            signal.signal(signal.SIGTERM, self)


def _check_router_port(plan: Plan, port: int | None) -> None:
    """Refuse at once when the router's port is taken: before any replica starts, not after."""
    import socket

    want = plan.router.port if port is None else port
    if not want:
        return
    host = plan.clouds.local.host if plan.clouds.local is not None else "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, want))
        except OSError as exc:
            with user_errors():
                raise UserError(
                    f"router port {want} on {host} is not free ({exc.strerror}); stop what holds it, "
                    "or give --port 0 for any free port (or another --port)"
                ) from None


def _install_sigterm() -> None:
    """SIGTERM stops `up` the way Ctrl-C does (via KeyboardInterrupt in the main thread)."""

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


class _RichDemoUI:
    """`gpufleet.infra.local.demo.DemoUI` on the console: progress bars, tables, one-line errors."""

    def start(self, plan: Plan, label: str, settings: RouterSettings, autoscale: bool = False) -> LocalRuntime:
        return _start(plan, label, router_port=0, settings=settings, autoscale=autoscale)

    @contextmanager
    def batch(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        with progress() as bar:
            task = bar.add_task(label, total=total)
            yield lambda: bar.advance(task)

    def show(self, renderable: Any) -> None:
        console.print(renderable, highlight=False)


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
        autoscale: Annotated[
            bool,
            typer.Option(
                help="run the autoscaling decision each round: replicas between min and max by pool priority "
                "(off: standbys are promoted for min_replicas and by load)"
            ),
        ] = True,
    ) -> None:
        """Run a local fleet: replicas, standbys, router; until Ctrl-C.

        Every pool of the declaration must be `cloud: local`: simulated vLLM replicas, warm
        standbys and the router run as processes of this machine, supervised and restarted.
        Ctrl-C or SIGTERM drains (in-flight requests finish within router.drain_timeout_s);
        a second one stops at once.
        """
        plan = _plan(file)
        if port is not None and not 0 <= port <= 65535:
            with user_errors():
                raise UserError(f"--port {port}: must be between 0 and 65535")
        _check_router_port(plan, port)
        signals = _Signals()
        signals.install()
        rt = None
        drained = True
        try:
            rt = _start(
                plan,
                f"starting {plan.fleet}",
                router_port=port,
                ready_timeout_s=ready_timeout_s,
                on_event=lambda m: console.print(f"[yellow]{m}[/]", highlight=False),
                autoscale=autoscale,
            )
            console.print(_replica_table(rt))
            console.print(rt.routing_mode(), highlight=False)
            for line in scaling_lines(plan, autoscale):
                console.print(line, highlight=False)
            env = rt.settings.admin_token.env
            console.print(
                f"router for fleet [bold]{plan.fleet}[/] (policy {rt.settings.policy}) listening on {rt.endpoint}",
                highlight=False,
            )
            console.print(f"OpenAI base URL: {rt.endpoint}/v1   (Ctrl-C to drain and stop)", highlight=False)
            if env:
                console.print(
                    f"admin endpoints: bearer token from ${env} (set it before `gpufleet up` to know it)",
                    highlight=False,
                )
            signals.rt = rt
            if signals.count:  # a signal during the last lines above
                signals.stop.set()
            while not signals.stop.wait(supervise_interval_s):
                rt.check()
            timeout = rt.settings.drain_timeout_s
            console.print(
                f"draining: in-flight requests have up to {timeout:g}s (Ctrl-C again to stop now)", highlight=False
            )
            drained = rt.drain()
        except KeyboardInterrupt:
            pass
        finally:
            if rt is not None:
                n = len(rt.pids())
                rt.stop()
                console.print(f"stopped {n} processes" + ("" if drained else " (drain timed out)"), highlight=False)

    @app.command("demo")
    def demo(
        file: Annotated[
            Path | None,
            typer.Argument(help="local fleet declaration (default: the embedded one, stacks/local/fleet.yaml)"),
        ] = None,
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
        motion: Annotated[
            bool, typer.Option(help="end with the motion phase: autoscaling under a ramp, a router killed mid-traffic")
        ] = True,
        plot: Annotated[Path | None, typer.Option(help="write the motion phase's timeline as a PNG here")] = None,
        precise: Annotated[
            bool,
            typer.Option(
                help="route in precise mode (KV events): the declared tokenizer, else one trained on the demo's traffic"
            ),
        ] = True,
    ) -> None:
        """Run the local demo: policies, a failover, the fleet in motion.

        Brings the local fleet up, compares round_robin with cache_aware on a mixed workload,
        kills the preferred pools to show the spill-over, then autoscales a deployment from its
        top pool into the next under a load ramp and kills the router mid-traffic; no cloud, no
        credentials.
        """
        from gpufleet.infra.local import demo as demo_mod

        if requests < 1 or concurrency < 1:
            with user_errors():
                raise UserError("--requests and --concurrency must be >= 1")
        if load <= 0 or (rate is not None and rate <= 0):
            with user_errors():
                raise UserError("--load and --rate must be > 0")
        if file is None:
            with embedded_fleet() as embedded:
                plan = _plan(embedded)
            file = Path("stacks/local/fleet.yaml")  # the name the embedded fleet is known by
        else:
            plan = _plan(file)
        if not demo_mod.traffic_weights(plan):
            with user_errors():
                raise UserError(f"{file}: no deployment has a baseline replica (min_replicas >= 1) to send traffic to")
        opts = demo_mod.DemoOptions(
            requests=requests,
            load=load,
            rate=rate,
            concurrency=concurrency,
            seed=seed,
            max_tokens=max_tokens,
            motion=motion,
            plot=str(plot) if plot else None,
            precise=precise,
        )
        _install_sigterm()
        result = demo_mod.run_demo(plan, opts, _RichDemoUI())
        if result.left:
            raise typer.Exit(1)
