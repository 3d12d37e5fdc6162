"""Plan time at scale: 100 pools x 50 deployments (goal: under 1 s).

Run: .venv/bin/python bench/plan_scale.py [--pools 100] [--deployments 50] [--repeat 5]
Prints a table of load+validate and compile times (best and median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

import yaml
from rich.table import Table

from gpufleet.infra import catalog, plan, spec
from gpufleet.infra.cli._common import report_console

MACHINES = [
    ("aws", "p5.48xlarge", "us-east-1"),
    ("aws", "g6e.12xlarge", "us-east-1"),
    ("gcp", "a3-highgpu-8g", "us-central1"),
    ("gcp", "g2-standard-48", "us-central1"),
]
MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B", "mistralai/Mistral-7B-Instruct-v0.3"]


def fleet_text(n_pools: int, n_deployments: int) -> str:
    pools = []
    for i in range(n_pools):
        cloud, machine, region = MACHINES[i % len(MACHINES)]
        pools.append(
            {
                "name": f"pool-{i}",
                "cloud": cloud,
                "region": region,
                "instance_type": machine,
                "priority": 1000 - i,
                "min_nodes": 1,
                "max_nodes": 40,
                "warm_nodes": 1,
            }
        )
    deps = [
        {
            "name": f"dep-{j}",
            "model": MODELS[j % len(MODELS)],
            "min_replicas": 4,
            "max_replicas": 64,
            "max_model_len": 8192,
            "gpus_per_replica": 1 + j % 2,
        }
        for j in range(n_deployments)
    ]
    doc = {
        "fleet": "scale",
        "clouds": {
            "aws": {"region": "us-east-1", "cluster": "c"},
            "gcp": {"project": "p", "region": "us-central1", "cluster": "c"},
        },
        "nodepools": pools,
        "deployments": deps,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, default=100)
    ap.add_argument("--deployments", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    text = fleet_text(args.pools, args.deployments)
    cat = catalog.bundled()
    load_t, compile_t = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fleet, smap = spec.load_text(text, "scale.yaml")
        t1 = time.perf_counter()
        p = plan.compile_fleet(fleet, smap, cat)
        t2 = time.perf_counter()
        load_t.append(t1 - t0)
        compile_t.append(t2 - t1)
    total = [a + b for a, b in zip(load_t, compile_t)]
    table = Table(
        title=f"plan scale: {args.pools} pools x {args.deployments} deployments ({sum(len(d.replicas) for d in p.deployments)} replicas placed)"
    )
    for col in ("stage", "best s", "median s"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, xs in (("load + validate", load_t), ("compile", compile_t), ("total", total)):
        table.add_row(name, f"{min(xs):.3f}", f"{statistics.median(xs):.3f}")
    console = report_console(170)
    console.print(table)
    goal = statistics.median(total) < 1.0
    console.print(f"goal (< 1 s median total): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
