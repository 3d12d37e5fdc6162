"""gpufleet's router against the SGLang and vLLM routers over loopback HTTP, every synthetic workload.

    GPUFLEET_PEERS_VENV=/tmp/peers-venv .venv/bin/python bench/routing_live.py --json docs/routing-live.json

Each run starts fresh `replica-sim` processes (the plan's `qwen-32b` replicas, `--speedup` times
faster) and one router in front of them, sends the same seeded workload open-loop, and stops
everything. Peers missing from the virtualenv are skipped with the reason. One table at the end.
At `--speedup` above 1 the Python router competes for CPU with the replicas and the driver on a
small machine; keep 1 for comparisons of routing quality.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.table import Table

from gpufleet.infra.cli._common import progress as progress_display
from gpufleet.infra.cli._common import report_console
from gpufleet.router.sim import fleet as fleet_mod
from gpufleet.router.sim import live
from gpufleet.router.workloads import generators

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(HERE / "fleet.yaml"))
    ap.add_argument("--deployment", default="qwen-32b")
    ap.add_argument("--workloads", default="shared_prompts,rag,multiturn,mix")
    ap.add_argument("--loads", default="0.8,2.0")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--routers", default=",".join(live.ROUTERS))
    ap.add_argument("--peers-venv", default=os.environ.get("GPUFLEET_PEERS_VENV"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    console = report_console(170)
    fl = fleet_mod.fleet_from_file(args.fleet, args.deployment)
    routers = tuple(r for r in args.routers.split(",") if r)
    peers = Path(args.peers_venv) if args.peers_venv else None
    rows = []
    cases = [(w, float(x)) for w in args.workloads.split(",") if w for x in args.loads.split(",") if x]
    with progress_display(on=console) as bar:
        overall = bar.add_task("runs", total=len(cases) * len(routers))
        for w, load in cases:
            wl = generators.make_workload(w, args.requests, seed=args.seed, settings=fl.settings, keep_bodies=True)
            with live.at_load(wl, fl, routers, load) as (wl, tokenizer):
                task = bar.add_task(f"{w} @ {load}", total=len(wl) * len(routers))
                order = list(routers)

                def progress(r: str, n: int, _task=task, _n=len(wl), _order=order) -> None:  # noqa: B008 (binds the loop values)
                    bar.update(_task, completed=_order.index(r) * _n + n)

                for res in live.run_live(
                    wl, fl, routers, speedup=args.speedup, peers_venv=peers, progress=progress, tokenizer=tokenizer
                ):
                    rows.append({"workload": w, "load": load, **res.to_dict()})
                    bar.advance(overall)
            bar.remove_task(task)
    t = Table(
        title=f"over loopback HTTP: {args.requests} requests per run, replicas x{args.speedup:g} (wall seconds)",
        title_justify="left",
    )
    for col in ("workload", "load", "router", "ok", "hit", "TTFT p50 s", "TTFT p99 s", "req/s", "note"):
        t.add_column(col, justify="left" if col in ("workload", "router", "note") else "right")
    for r in rows:
        if r["skipped"]:
            t.add_row(
                r["workload"], f"{r['load']:.1f}", r["router"], "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"
            )
        else:
            t.add_row(
                r["workload"],
                f"{r['load']:.1f}",
                r["router"],
                str(r["ok"]),
                f"{r['hit_ratio']:.3f}",
                f"{r['ttft_p50_s']:.3f}",
                f"{r['ttft_p99_s']:.3f}",
                f"{r['throughput_rps']:.1f}",
                "; ".join(r["error_samples"]),
            )
    console.print(t)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "schema": "gpufleet.bench-live-suite/v1",
                    "speedup": args.speedup,
                    "requests": args.requests,
                    "runs": rows,
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
