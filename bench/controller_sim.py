"""Requests that wait for a cold node, with and without the warm-capacity controller.

Run: .venv/bin/python bench/controller_sim.py [--plan stacks/multicloud/fleet.yaml] [--deployment NAME]
     [--peak-factor 1.75] [--ramp-min 20] [--delays 5,10,15] [--hours 3]

Reads the fleet plan (a fleet YAML is compiled; a plan JSON is read), takes one deployment's
failover chain, and drives a ramping workload through the model in gpufleet.infra.controller.sim:
the same cluster-autoscaler model in both runs; the controller run adds `decide`, the function
`gpufleet controller run` uses. Prints one row per provisioning delay and mode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from gpufleet.infra.controller import sim
from gpufleet.infra.controller.decision import ControllerSettings, FleetFacts

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict:
    if path.suffix in (".yaml", ".yml"):
        from gpufleet.infra import plan

        return plan.compile_file(str(path)).to_json_dict()
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, default=ROOT / "stacks" / "multicloud" / "fleet.yaml")
    ap.add_argument("--deployment", default=None)
    ap.add_argument(
        "--peak-factor",
        type=float,
        default=1.75,
        help="peak demand as a multiple of the top pool's capacity at max_nodes",
    )
    ap.add_argument("--delays", default="5,10,15", help="node provisioning delays to try, minutes")
    ap.add_argument("--ramp-min", type=float, default=20.0, help="minutes from base to peak demand")
    ap.add_argument("--hours", type=float, default=3.0)
    ap.add_argument("--rps-per-replica", type=float, default=1.0)
    args = ap.parse_args()

    plan = load(args.plan)
    facts = FleetFacts.from_plan(plan)
    deps = {d["name"]: d for d in plan["deployments"]}
    dep = deps[args.deployment] if args.deployment else next(d for d in plan["deployments"] if len(d["failover"]) > 1)
    chain = next(d.chain for d in facts.deployments if d.name == dep["name"])
    top = facts.pools[chain[0]]
    per_node = max(1, top.gpus_per_node // dep["gpus_per_replica"])
    base = sum(p["replicas"] for p in dep["placement"])
    peak = args.peak_factor * top.max_nodes * per_node
    prices = {p["name"]: float(p["usd_per_node_hour"]) for p in plan["pools"]}
    settings = ControllerSettings()

    table = Table(
        title=f"controller simulation: {dep['name']} over {' -> '.join(chain)}, demand {base} -> {peak:.0f} "
        f"replicas (ramp {args.ramp_min:g} min, hold 30 min), {args.hours:g} h",
        title_justify="left",
    )
    for col in (
        "node delay",
        "mode",
        "requests",
        "waited for a cold node",
        "replica-min short",
        "max short",
        "node-hours",
        "cost $",
        "actions",
    ):
        table.add_column(col, justify="left" if col in ("mode",) else "right")
    delays = [float(x) for x in args.delays.split(",")]
    runs = [(delay, mode) for delay in delays for mode in ("without controller", "with controller")]
    for delay, mode in track(runs, description="simulating", transient=True):
        result = sim.simulate(
            facts,
            chain,
            dep["gpus_per_replica"],
            sim.ramp(base, peak, up_s=args.ramp_min * 60),
            duration_s=args.hours * 3600,
            provision_delay_s=delay * 60,
            usd_per_node_hour=prices,
            requests_per_replica_s=args.rps_per_replica,
            controller=settings if mode == "with controller" else None,
        )
        share = result.waited / result.requests if result.requests else 0.0
        table.add_row(
            f"{delay:g} min",
            mode,
            f"{result.requests:,.0f}",
            f"{result.waited:,.0f} ({share:.1%})",
            f"{result.short_replica_minutes:,.0f}",
            str(result.max_short_replicas),
            f"{result.node_hours:.1f}",
            f"{result.usd:,.0f}",
            str(result.actions),
        )
    Console(width=max(140, Console().width)).print(table)


if __name__ == "__main__":
    main()
