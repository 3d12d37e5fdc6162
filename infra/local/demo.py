"""`gpufleet demo`: round_robin against cache_aware on the same traffic, then a pool failure.

The orchestration: one seeded workload (`gpufleet.router.workloads.mixed.demo_spec`, traffic per
model in proportion to its preferred pool's prefill capacity); a fresh fleet per policy replays
its first `requests` (so no policy inherits the other's warm caches); then the preferred pools of
the cache_aware fleet are killed and the same workload goes on, right after and once the
promoted standbys are routable. What the user sees (progress, tables, events) goes through a
`DemoUI`, so the CLI keeps only argument parsing, printing and exit codes. Precise mode (the
tokenizer the demo routes on, the router's KV state after each run) is
`gpufleet.infra.local.demo_precise`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from rich.table import Table

from gpufleet.infra.local import demo_precise
from gpufleet.infra.local.demo_precise import kv_state_line
from gpufleet.infra.local.processes import pid_alive
from gpufleet.infra.local.runtime import LocalRuntime
from gpufleet.infra.plan import Plan
from gpufleet.router.config import RouterSettings
from gpufleet.router.prefix import render_prompt
from gpufleet.router.workloads import driver, mixed, stats
from gpufleet.router.workloads.ceiling import ceiling_hit_ratio
from gpufleet.router.workloads.types import WorkRequest

__all__ = [
    "DemoOptions",
    "DemoResult",
    "DemoUI",
    "Row",
    "kv_state_line",
    "run_demo",
    "summary_table",
    "traffic_weights",
]


class DemoUI(Protocol):
    """What the demo shows while it runs (the CLI implements it with rich)."""

    def start(self, plan: Plan, label: str, settings: RouterSettings, autoscale: bool = False) -> LocalRuntime:
        """Start a runtime for `plan` with `settings` (showing its progress), router on any free port."""
        ...

    def batch(self, label: str, total: int) -> AbstractContextManager[Callable[[], None]]:
        """A progress display for `total` requests; the callable advances it by one."""
        ...

    def show(self, renderable: Any) -> None:
        """Print a line (rich markup) or a table."""
        ...


@dataclass(frozen=True)
class DemoOptions:
    """The demo's knobs (the CLI's options)."""

    requests: int = 300
    """Requests per policy run."""
    load: float = 1.0
    """Prompt tokens per second over the preferred pools' prefill capacity, as if nothing were cached."""
    rate: float | None = None
    """Arrivals per second, Poisson (default: from `load`)."""
    concurrency: int = 64
    seed: int = 0
    max_tokens: int = 16
    motion: bool = True
    """Run the motion phase (autoscaling under a ramp, a router killed mid-traffic) at the end."""
    plot: str | None = None
    """Write the motion phase's timeline as a PNG here."""
    precise: bool = True
    """Route in precise mode (KV events): with the declared tokenizer, else one the demo trains
    on its own traffic (`gpufleet.infra.local.demo_tokenizer`)."""


@dataclass
class Row:
    """One row of a demo table: a run (or one deployment's share of it) and what it showed."""

    label: str
    deployment: str
    summary: stats.Summary
    ceiling: float | None = None
    spills: int = 0
    replicas: list[tuple[str, str]] = field(default_factory=list)
    """(replica id, pool) of the deployment, so idle replicas show as 0."""


@dataclass
class DemoResult:
    """What the demo measured, and whether its teardown left any process behind."""

    rate: float = 0.0
    rows: list[Row] = field(default_factory=list)
    spill_rows: list[Row] = field(default_factory=list)
    interrupted: bool = False
    """Ctrl-C (or SIGTERM) stopped it early; the runtimes were torn down all the same."""
    processes: int = 0
    left: list[int] = field(default_factory=list)
    """Pids of children still alive after teardown (none expected)."""
    motion: Any = None
    """The motion phase's `gpufleet.infra.local.motion.MotionResult` (None when skipped)."""
    phases: list[tuple[str, float]] = field(default_factory=list)
    """(phase, wall seconds) in the order they ran: fleet starts, runs, stops, the motion phase."""


def traffic_weights(plan: Plan) -> dict[str, float]:
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


def _preferred_pools(plan: Plan) -> list[str]:
    """Pools some deployment prefers and could fail over from: the demo's pool failure."""
    return list(dict.fromkeys(d.failover[0] for d in plan.deployments if len(d.failover) > 1))


def _spills(rt: LocalRuntime) -> dict[str, int]:
    """The router's spill counter per model (`gpufleet_router_spills_total` on /metrics)."""
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


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _per_replica(row: Row) -> str:
    """Requests per replica grouped by pool: `local-l4 31/30/29/31, local-l40s 0`."""
    if not row.replicas:
        return ""
    by_pool: dict[str, list[str]] = {}
    for rid, pool in row.replicas:
        by_pool.setdefault(pool, []).append(str(row.summary.per_replica.get(rid, 0)))
    return ", ".join(f"{pool} {'/'.join(ns)}" for pool, ns in by_pool.items())


def summary_table(title: str, rows: list[Row]) -> Table:
    """One table of runs: a bold row for all traffic, then one per deployment."""
    t = Table(title=title, title_justify="left")
    for col, right in (
        ("run", False),
        ("deployment", False),
        ("requests", True),
        ("errors", True),
        ("prefix hits", True),
        ("ceiling", True),
        ("TTFT p50", True),
        ("TTFT p99", True),
        ("pred. cache", True),
        ("spills", True),
        ("requests per replica", False),
    ):
        t.add_column(col, justify="right" if right else "left")
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


class _Demo:
    """One demo run: the plan, the traffic and the runtimes it started."""

    def __init__(self, plan: Plan, opts: DemoOptions, ui: DemoUI) -> None:
        self.plan, self.opts, self.ui = plan, opts, ui
        self.settings = plan.router
        weights = traffic_weights(plan)
        models = tuple(weights)
        # One workload: the policy runs replay its first `requests`; the spill-over runs continue it
        # (same documents and system prompts, conversations carry on), as traffic would.
        self.n_spill = max(20, opts.requests // 6)
        n = opts.requests + 2 * self.n_spill
        spec = mixed.demo_spec(
            models, n, seed=opts.seed, max_tokens=opts.max_tokens, model_weights=[weights[m] for m in models]
        )
        self.everything = mixed.generate(spec)
        self.rate = opts.rate if opts.rate is not None else self._rate(sum(weights.values()))
        self.runtimes: list[LocalRuntime] = []
        self.phases: list[tuple[str, float]] = []
        self.tokenizer_dir: Path | None = None
        """The tokenizer the demo trained (precise mode), removed at teardown."""

    def precise_mode(self) -> None:
        """Turn precise mode on (`opts.precise`): the declared tokenizer, else one trained on this
        demo's traffic (`demo_precise`); say which."""
        line = demo_precise.declared_mode(self.settings, self.opts.precise)
        if line is not None:
            self.ui.show(line)
            return
        with self.timed("tokenizer"):
            self.tokenizer_dir = Path(tempfile.mkdtemp(prefix="gpufleet-demo-tokenizer-"))
            texts = (render_prompt(r.body) for r in self.everything)
            self.settings, lines = demo_precise.with_trained_tokenizer(self.settings, texts, self.tokenizer_dir)
        self.plan = self.plan.model_copy(update={"router": self.settings})
        for line in lines:
            self.ui.show(line)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the wall time of `phase` (shown at the end: where the demo's minutes go)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((phase, time.monotonic() - t0))

    def _rate(self, capacity_tokens_per_s: float) -> float:
        """Arrivals per second offering `load` x the preferred pools' prefill capacity, every prompt token counted."""
        reqs = self.everything[: self.opts.requests]
        mean_tokens = sum(len(render_prompt(r.body)) for r in reqs) / len(reqs) / self.settings.chars_per_token
        return round(self.opts.load * capacity_tokens_per_s / mean_tokens, 1)

    def run_load(
        self, rt: LocalRuntime, batch: list[WorkRequest], label: str, arrival_seed: int, ceiling: bool = True
    ) -> list[Row]:
        """Send `batch` through `rt`'s router; a row for all traffic and one per deployment."""
        before = _spills(rt)
        with self.ui.batch(f"{label}: {len(batch)} requests at {self.rate} req/s", len(batch)) as advance:
            t0 = time.perf_counter()
            results = asyncio.run(
                driver.drive(
                    rt.endpoint,
                    batch,
                    concurrency=self.opts.concurrency,
                    on_result=lambda _r: advance(),
                    rate_per_s=self.rate,
                    arrival_seed=arrival_seed,
                    # one client with an API key: the prediction cache caches only named tenants
                    headers={"Authorization": "Bearer gpufleet-demo"},
                )
            )
        wall = time.perf_counter() - t0
        for msg in list(dict.fromkeys(f"{r.status or 'no status'} {r.error}" for r in results if not r.ok))[:3]:
            self.ui.show(f"  [red]{label}: error[/] {msg}")
        after = _spills(rt)
        spilled = {m: after.get(m, 0) - before.get(m, 0) for m in set(after) | set(before)}
        bt, cpt = self.settings.block_size_tokens, self.settings.chars_per_token

        # The ceiling over what the replicas served, in the order it was sent (a replica can only
        # hold prompts sent before): requests the prediction cache answered never reached one.
        sent = {r.index: r.sent_s for r in results if not (r.ok and r.cache == "hit")}
        served = sorted((r for r in batch if r.index in sent), key=lambda r: (sent[r.index], r.index))

        def ceil(model: str | None) -> float | None:
            return ceiling_hit_ratio(served, bt, chars_per_token=cpt, model=model) if ceiling else None

        out = [Row(label, "all", stats.summarize(results, wall), spills=sum(spilled.values()), ceiling=ceil(None))]
        by_model = stats.summarize_by_model(results, wall)
        for d in self.plan.deployments:
            if d.model in by_model:
                reps = [(r.id, r.pool) for r in rt.replicas if r.deployment == d.name and r.role == "active"]
                out.append(
                    Row(
                        label,
                        d.name,
                        by_model[d.model],
                        spills=spilled.get(d.model, 0),
                        replicas=reps,
                        ceiling=ceil(d.model),
                    )
                )
        return out

    def compare_policies(self, result: DemoResult) -> None:
        """round_robin, then cache_aware on a fresh fleet, on the same first `requests`."""
        reqs = self.everything[: self.opts.requests]
        for policy in ("round_robin", "cache_aware"):
            settings = self.settings.model_copy(update={"policy": policy})
            with self.timed(f"start ({policy})"):
                rt = self.ui.start(self.plan, f"starting {self.plan.fleet} ({policy})", settings)
            self.runtimes.append(rt)
            with self.timed(policy):
                result.rows.extend(self.run_load(rt, reqs, policy, self.opts.seed))
            self.ui.show(f"  {policy}: {kv_state_line(rt)}")
            if policy != "cache_aware":
                with self.timed(f"stop ({policy})"):
                    rt.stop()  # a fresh fleet per policy: no policy inherits the other's warm caches
        self.ui.show(
            summary_table(
                f"{len(reqs)} requests (system prompts, RAG, multi-turn chat), Poisson {self.rate} req/s "
                f"(load {self.opts.load:g}), seed {self.opts.seed}; ceiling: an infinite cache per model",
                result.rows,
            )
        )

    def spill_over(self, result: DemoResult) -> None:
        """Kill the preferred pools of the last fleet and continue the traffic: right after, after promotion."""
        rt = self.runtimes[-1]
        lost = _preferred_pools(rt.plan)
        killed = [rid for pool in lost for rid in rt.kill_pool(pool)]
        self.ui.show(f"[bold]killed pool(s) {', '.join(lost) or '-'}[/]: {', '.join(killed) or 'no replicas'}")
        for ev in rt.check(load=False):
            self.ui.show(f"  [yellow]{ev}[/]")
        n, first = self.n_spill, self.opts.requests
        seed = self.opts.seed
        with self.timed("right after"):
            result.spill_rows += self.run_load(rt, self.everything[first : first + n], "right after", seed + 1, False)
        with self.timed("wait for promotion"):
            rt.wait_routable([r.id for r in rt.replicas if r.state == "active"], timeout_s=10)
        with self.timed("after promotion"):
            result.spill_rows += self.run_load(rt, self.everything[first + n :], "after promotion", seed + 2, False)
        self.ui.show(f"  after promotion: {kv_state_line(rt)}")
        self.ui.show(
            summary_table(
                f"spill-over: pool(s) {', '.join(lost)} lost, the same traffic goes on; spills from the router's /metrics",
                result.spill_rows,
            )
        )

    def motion(self, result: DemoResult) -> None:
        """The motion phase on a fleet of its own (`gpufleet.infra.local.motion`); the others stop first."""
        from gpufleet.infra.local import motion

        with self.timed("stop (cache_aware)"):
            for rt in self.runtimes:
                rt.stop()

        def factory(mplan: Plan) -> LocalRuntime:
            with self.timed("start (motion)"):
                rt = self.ui.start(mplan, f"starting {mplan.fleet} (autoscaling)", mplan.router, autoscale=True)
            self.runtimes.append(rt)
            return rt

        t0 = time.monotonic()
        result.motion = motion.run_motion(self.plan, factory, self.ui.show)
        start = next((s for name, s in self.phases if name == "start (motion)"), 0.0)
        self.phases.append(("motion", time.monotonic() - t0 - start))
        if self.opts.plot:
            motion.plot(result.motion, self.opts.plot)
            self.ui.show(f"wrote {self.opts.plot}")

    def teardown(self, result: DemoResult, started: float) -> None:
        """Stop every runtime and count the children still alive."""
        pids = [p for rt in self.runtimes for p in rt.pids()]
        with self.timed("teardown"):
            for rt in self.runtimes:
                rt.stop()
            if self.tokenizer_dir is not None:
                shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
        result.processes = len(pids)
        result.left = [p for p in pids if pid_alive(p)]
        result.phases = list(self.phases)
        took = ", ".join(f"{name} {s:.1f}" for name, s in self.phases)
        self.ui.show(
            f"tore down {len(pids)} processes, {len(result.left)} left; demo took {time.monotonic() - started:.1f} s "
            f"({took})"
        )


def run_demo(plan: Plan, opts: DemoOptions, ui: DemoUI) -> DemoResult:
    """The whole demo. Every runtime is stopped on the way out (also on Ctrl-C, `interrupted`, and
    on errors) and the teardown shown; `left` lists the children that survived their stop.
    ValueError when no deployment takes traffic."""
    if not traffic_weights(plan):
        raise ValueError("no deployment has a baseline replica (min_replicas >= 1) to send traffic to")
    demo = _Demo(plan, opts, ui)
    result = DemoResult(rate=demo.rate)
    started = time.monotonic()
    try:
        demo.precise_mode()
        demo.compare_policies(result)
        demo.spill_over(result)
        if opts.motion:
            demo.motion(result)
    except KeyboardInterrupt:
        result.interrupted = True
        ui.show("[yellow]interrupted[/]")
    finally:
        demo.teardown(result, started)
    return result
