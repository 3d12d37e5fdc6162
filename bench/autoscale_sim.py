"""Autoscaling by pool priority against independent per-pool scalers (HPA-like), on a demand ramp.

Run: .venv/bin/python bench/autoscale_sim.py [--plan stacks/multicloud/fleet.yaml] [--deployment NAME]
     [--peak-rps 14] [--stock 1] [--json out.json] [--plot out.png]

Virtual time, 15 s ticks. One deployment's failover chain from the plan; demand in requests/s
ramps from `--base-rps` to `--peak-rps`, holds, and falls. The cluster model is shared by both
runs: a new replica is ready after `--load-s` (model load) on a node that is up or warm, after
`--boot-s` more on a new node, and never on a pool whose cloud has no more nodes to give
(`--stock`: nodes obtainable in the top pool, a stock-out); nodes of a pool = its serving nodes +
its declared warm nodes, at least its baseline. Each ready replica serves `--replica-rps`
requests/s taking `--service-s` each; what exceeds the ready capacity queues (at the router).
TTFT per tick = `--ttft0-s` / (1 - utilisation) plus the queue's wait, weighted by requests.

- **priority**: `gpufleet.infra.controller.autoscale.scale` on the deployment (the function the
  controller and `gpufleet up` run): total in flight over a per-replica target, the chain filled
  by priority, a Pending replica past `pending_timeout_s` marks its pool full.
- **per-pool HPA**: one scaler per pool (a StatefulSet each, HPA's rule and the same delays),
  min = its baseline replicas or 1 (an HPA cannot scale from 0), max = the pool's capacity; each
  sees only the load the router sends its pool (by priority: the top pool's replicas up to their
  capacity, the spill to the next).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from gpufleet.infra import spec
from gpufleet.infra.cli._common import report_console
from gpufleet.infra.controller import autoscale as a
from gpufleet.infra.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 15.0


@dataclass
class Rep:
    created: float
    ready_at: float  # math.inf: Pending for good (no node to be had)


@dataclass
class Pool:
    name: str
    priority: int
    per_node: int  # replicas per node
    max_nodes: int
    stock: int  # nodes the cloud can give
    warm: int
    baseline_nodes: int
    usd_per_node_hour: float
    reps: list[Rep] = field(default_factory=list)
    node_ready_at: list[float] = field(default_factory=list)  # nodes booting

    def ready(self, now: float) -> int:
        return sum(1 for r in self.reps if r.ready_at <= now)

    def nodes(self, now: float) -> int:
        serving = math.ceil(len([r for r in self.reps if r.ready_at < math.inf]) / self.per_node)
        return min(self.max_nodes, self.stock, max(self.baseline_nodes, serving + self.warm))

    def grow(self, now: float, load_s: float, boot_s: float) -> None:
        placed = len([r for r in self.reps if r.ready_at < math.inf])
        fast = (
            min(self.max_nodes, self.stock, max(self.baseline_nodes, math.ceil(placed / self.per_node)) + self.warm)
        ) * self.per_node
        if placed < fast:
            self.reps.append(Rep(now, now + load_s))
        elif math.ceil((placed + 1) / self.per_node) <= min(self.max_nodes, self.stock):
            self.reps.append(Rep(now, now + boot_s + load_s))
        else:
            self.reps.append(Rep(now, math.inf))

    def shrink(self, now: float) -> None:
        # a Pending one first, else the newest
        self.reps.sort(key=lambda r: (r.ready_at <= now, r.created))
        self.reps.pop(0)

    def set(self, n: int, now: float, load_s: float, boot_s: float) -> None:
        while len(self.reps) < n:
            self.grow(now, load_s, boot_s)
        while len(self.reps) > n:
            self.shrink(now)


def demand(t: float, args: argparse.Namespace) -> float:
    """Requests/s: base, a ramp to peak, a plateau, a fall, base again."""
    ramp, hold = args.ramp_min * 60, args.hold_min * 60
    if t < 600:
        return args.base_rps
    t -= 600
    if t < ramp:
        return args.base_rps + (args.peak_rps - args.base_rps) * t / ramp
    t -= ramp
    if t < hold:
        return args.peak_rps
    t -= hold
    if t < ramp:
        return args.peak_rps - (args.peak_rps - args.base_rps) * t / ramp
    return args.base_rps


def run(plan: Plan, dep_name: str, mode: str, args: argparse.Namespace, auto: spec.Autoscaling) -> dict:
    dep = plan.deployment(dep_name)
    per_node = {p.pool: p.replicas_per_node for p in dep.pools}
    base = {pl.pool: pl.replicas for pl in dep.placement}
    pools = []
    for i, name in enumerate(dep.failover):
        pp = plan.pool(name)
        pools.append(
            Pool(
                name,
                pp.priority,
                per_node[name],
                pp.max_nodes,
                args.stock if i == 0 and args.stock is not None else pp.max_nodes,
                pp.warm_nodes,
                pp.baseline_nodes,
                pp.usd_per_node_hour,
            )
        )
    for p in pools:
        p.reps = [Rep(-1e9, -1e9) for _ in range(base.get(p.name, 0))]
    facts = a.AutoscaleFacts.from_plan(
        plan.model_copy(update={"deployments": [dep.model_copy(update={"autoscaling": auto})]})
    )
    state = a.AutoscaleState()
    hpa_mem: dict[str, tuple[float | None, float | None, float]] = {p.name: (None, None, -1e9) for p in pools}
    backlog = 0.0
    rows, ttfts = [], []
    node_hours = cost = 0.0
    horizon = args.hours * 3600
    t = 0.0
    while t < horizon:
        lam = demand(t, args)
        ready = {p.name: p.ready(t) for p in pools}
        cap = sum(ready.values()) * args.replica_rps
        served = min(lam + backlog / TICK_S, cap)
        backlog = max(0.0, backlog + (lam - served) * TICK_S)
        util = served / cap if cap else 1.0
        wait = backlog / cap if cap else 60.0
        ttft = args.ttft0_s / max(0.05, 1 - min(util, 0.95)) + wait
        ttfts.append((ttft, lam * TICK_S))
        in_flight = served * args.service_s + backlog
        if mode == "priority":
            observed = {
                (dep.name, p.name): a.PoolObservation(
                    len(p.reps), ready[p.name], tuple(r.created for r in p.reps if r.ready_at > t)
                )
                for p in pools
            }
            d = a.scale(facts, observed, {dep.name: a.LoadSample(t, in_flight)}, state, t)
            state = d.state
            for p in pools:
                p.set(d.targets[(dep.name, p.name)], t, args.load_s, args.boot_s)
        else:
            # the router's priority routing decides what each pool's scaler sees
            left = lam + backlog / TICK_S
            for p in pools:
                pool_cap = ready[p.name] * args.replica_rps
                mine = min(left, pool_cap) if p is not pools[-1] else left
                left -= mine
                per = (mine * args.service_s) / max(1, ready[p.name])
                lo = max(1, base.get(p.name, 0))
                hi = min(dep.max_replicas, p.max_nodes * p.per_node)
                cur = len(p.reps)
                ratio = per / auto.target if ready[p.name] else (1.0 if mine == 0 else 2.0)
                want = cur if abs(ratio - 1) <= auto.tolerance else math.ceil(max(1, ready[p.name]) * ratio)
                want = max(lo, min(hi, want))
                up, down, last = hpa_mem[p.name]
                if want > cur:
                    up = up if up is not None else t
                    if t - up >= auto.scale_up_delay_s:
                        cur, up, last = want, None, t
                    down = None
                elif want < cur:
                    down = down if down is not None else t
                    if t - max(down, last) >= auto.scale_down_delay_s:
                        cur, down, last = want, None, t
                    up = None
                else:
                    up = down = None
                hpa_mem[p.name] = (up, down, last)
                p.set(max(lo, cur), t, args.load_s, args.boot_s)
        nodes = {p.name: p.nodes(t) for p in pools}
        node_hours += sum(nodes.values()) * TICK_S / 3600
        cost += sum(nodes[p.name] * p.usd_per_node_hour for p in pools) * TICK_S / 3600
        rows.append(
            {
                "t_min": round(t / 60, 2),
                "demand_rps": round(lam, 2),
                "replicas": {p.name: len(p.reps) for p in pools},
                "ready": dict(ready),
                "ttft_s": round(ttft, 3),
                "queued": round(backlog, 1),
            }
        )
        t += TICK_S
    ttfts.sort()
    total = sum(w for _, w in ttfts)

    def pct(q: float) -> float:
        acc = 0.0
        for v, w in ttfts:
            acc += w
            if acc >= q * total:
                return v
        return ttfts[-1][0]

    return {
        "mode": mode,
        "ttft_p50_s": round(pct(0.5), 3),
        "ttft_p90_s": round(pct(0.9), 3),
        "ttft_p99_s": round(pct(0.99), 3),
        "node_hours": round(node_hours, 1),
        "cost_usd": round(cost, 0),
        "peak_replicas": {p.name: max(r["replicas"][p.name] for r in rows) for p in pools},
        "pending_replica_hours": round(
            sum(r["replicas"][p.name] - r["ready"][p.name] for r in rows for p in pools) * TICK_S / 3600, 1
        ),
        "timeline": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, default=ROOT / "stacks" / "multicloud" / "fleet.yaml")
    ap.add_argument("--deployment", default=None, help="default: the first with more than one pool")
    ap.add_argument("--base-rps", type=float, default=3.0)
    ap.add_argument("--peak-rps", type=float, default=14.0)
    ap.add_argument("--ramp-min", type=float, default=30.0)
    ap.add_argument("--hold-min", type=float, default=30.0)
    ap.add_argument("--hours", type=float, default=2.5)
    ap.add_argument("--replica-rps", type=float, default=1.0, help="requests/s one replica serves")
    ap.add_argument("--service-s", type=float, default=4.0, help="seconds one request takes at low load")
    ap.add_argument("--ttft0-s", type=float, default=0.3)
    ap.add_argument("--load-s", type=float, default=60.0, help="model load on a node that is up or warm")
    ap.add_argument("--boot-s", type=float, default=240.0, help="a new node's provisioning")
    ap.add_argument("--stock", type=int, default=1, help="nodes the top pool's cloud can give (stock-out)")
    ap.add_argument("--target", type=float, default=None, help="in flight per replica (default 70%% of capacity)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    from gpufleet.infra import plan as plan_mod

    plan = plan_mod.compile_file(str(args.plan))
    dep = next(
        (d for d in plan.deployments if d.name == args.deployment or (args.deployment is None and len(d.failover) > 1)),
        None,
    )
    if dep is None:
        raise SystemExit(f"{args.plan}: no deployment {args.deployment or 'with more than one pool'}")
    auto = dep.autoscaling or spec.Autoscaling(
        signal="in_flight",
        target=args.target or 0.7 * args.replica_rps * args.service_s,
        scale_up_delay_s=30,
        scale_down_delay_s=300,
    )
    results = [run(plan, dep.name, mode, args, auto) for mode in ("priority", "per-pool HPA")]
    console = report_console(150)
    t = Table(
        title=f"{dep.name} over {' -> '.join(dep.failover)}: {args.base_rps:g} -> {args.peak_rps:g} req/s in "
        f"{args.ramp_min:g} min, {args.hold_min:g} min at peak, back; top pool stock {args.stock} node(s); "
        f"{auto.signal} target {auto.target:g}",
        title_justify="left",
    )
    for col in (
        "scaler",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "peak replicas per pool",
        "Pending replica-h",
        "node-hours",
        "cost $",
    ):
        t.add_column(col, justify="left" if col in ("scaler", "peak replicas per pool") else "right")
    for r in results:
        t.add_row(
            r["mode"],
            f"{r['ttft_p50_s']:.2f} s",
            f"{r['ttft_p90_s']:.2f} s",
            f"{r['ttft_p99_s']:.2f} s",
            ", ".join(f"{k} {v}" for k, v in r["peak_replicas"].items()),
            f"{r['pending_replica_hours']:.1f}",
            f"{r['node_hours']:.1f}",
            f"{r['cost_usd']:,.0f}",
        )
    console.print(t)
    tl = Table(title="replicas per pool over time (priority | per-pool HPA)", title_justify="left")
    for col in ("min", "demand req/s", "priority", "TTFT", "per-pool HPA", "TTFT"):
        tl.add_column(col, justify="right" if col != "priority" and col != "per-pool HPA" else "left")
    for i in range(0, len(results[0]["timeline"]), 20):
        a_, b_ = results[0]["timeline"][i], results[1]["timeline"][i]
        tl.add_row(
            f"{a_['t_min']:.0f}",
            f"{a_['demand_rps']:.1f}",
            " / ".join(str(v) for v in a_["replicas"].values()),
            f"{a_['ttft_s']:.2f}",
            " / ".join(str(v) for v in b_["replicas"].values()),
            f"{b_['ttft_s']:.2f}",
        )
    console.print(tl)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )
        console.print(f"wrote {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for r, style in zip(results, ("-", "--")):
            xs = [row["t_min"] for row in r["timeline"]]
            for name in r["peak_replicas"]:
                axes[0].plot(xs, [row["replicas"][name] for row in r["timeline"]], style, label=f"{r['mode']}: {name}")
            axes[1].plot(xs, [row["ttft_s"] for row in r["timeline"]], style, label=r["mode"])
        axes[0].set_ylabel("replicas")
        axes[0].legend(fontsize=7)
        axes[1].set_ylabel("TTFT (s)")
        axes[1].set_xlabel("minutes")
        axes[1].set_yscale("log")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        console.print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
