"""Precise (KV events) vs approximate routing, with 1, 2 and 4 independent routers, in the simulator.

    .venv/bin/python bench/kv_routers.py                     # table
    .venv/bin/python bench/kv_routers.py --json out.json --markdown out.md

Per workload at each load: the oracle (exact knowledge, one global view) and least_load as
references, then cache_aware in approximate mode and in events mode (engine KV events delivered
after `--event-delay-ms`), each with N routers that split the traffic at random and see only their
own in-flight requests (and, every `--peer-interval-ms`, default the fleet's peer_interval_s, the
other routers' own per-replica counts; 0: never). The goals of issue 10 are checked in the last
columns: events mode hit ratio >= 0.98 x the oracle's and TTFT p50/p99 <= 1.10 x; 4 routers in
events mode >= 0.97 x one router's hit ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.table import Table

from gpufleet.infra.cli._common import report_console
from gpufleet.router.sim import fleet as fleet_mod
from gpufleet.router.sim import metrics, report, trace
from gpufleet.router.workloads import generators

HERE = Path(__file__).resolve().parent
TRACES = HERE.parent.parent / "shared" / "traces" / "mooncake"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(HERE / "fleet.yaml"))
    ap.add_argument("--deployment", default="qwen-32b")
    ap.add_argument("--trace-deployment", default="llama-8b-long")
    ap.add_argument("--workloads", default="multiturn,shared_prompts,rag,mix,hot_prefix,traces")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--loads", default="0.8,2.0")
    ap.add_argument("--routers", default="1,2,4")
    ap.add_argument("--event-delay-ms", type=float, default=20.0)
    ap.add_argument(
        "--peer-interval-ms",
        type=float,
        default=None,
        help="how often N routers exchange their per-replica queue state (default: the fleet's; 0: never)",
    )
    ap.add_argument("--kv-states", default="approximate,events", help="router modes to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    console = report_console(170)
    loads = [float(x) for x in args.loads.split(",") if x]
    ns = [int(x) for x in args.routers.split(",") if x]
    delay = args.event_delay_ms / 1000
    peer_s = None if args.peer_interval_ms is None else args.peer_interval_ms / 1000
    modes = [m for m in args.kv_states.split(",") if m]
    jobs = []
    syn = fleet_mod.fleet_from_file(args.fleet, args.deployment)
    for w in [w for w in args.workloads.split(",") if w]:
        if w == "traces":
            if not TRACES.is_dir():
                console.print(f"[yellow]skipping Mooncake traces: {TRACES} is not present[/]")
                continue
            tr = fleet_mod.fleet_from_file(args.fleet, args.trace_deployment)
            for path in sorted(TRACES.glob("*.jsonl")):
                wl = trace.trace_workload(
                    trace.load_trace(path), name=path.stem, seed=args.seed, settings=tr.settings, limit=args.requests
                )
                jobs.append((wl, tr))
        elif w.endswith("_trace"):  # one Mooncake trace by name
            path = TRACES / f"{w}.jsonl"
            if not path.is_file():
                console.print(f"[yellow]skipping {w}: {path} is not present[/]")
                continue
            tr = fleet_mod.fleet_from_file(args.fleet, args.trace_deployment)
            wl = trace.trace_workload(
                trace.load_trace(path), name=w, seed=args.seed, settings=tr.settings, limit=args.requests
            )
            jobs.append((wl, tr))
        else:
            jobs.append((generators.make_workload(w, args.requests, seed=args.seed, settings=syn.settings), syn))
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for wl, fl in jobs:
        for load in loads:
            base = report.run_policies(wl, fl, ["oracle", "least_load"], load=load, seed=args.seed)
            oracle = base.summaries["oracle"]
            ll = base.summaries["least_load"]
            for name, s in (("oracle", oracle), ("least_load", ll)):
                rows.append(_row(wl.name, load, name, "-", 1, s, oracle, ll, None))
            for mode in modes:
                one = None
                for n in ns:
                    run = report.run_policies(
                        wl,
                        fl,
                        ["cache_aware"],
                        load=load,
                        seed=args.seed,
                        kv_state=mode,
                        routers=n,
                        event_delay_s=delay,
                        peer_interval_s=peer_s,
                    )
                    s = run.summaries["cache_aware"]
                    one = one or s
                    rows.append(_row(wl.name, load, "cache_aware", mode, n, s, oracle, ll, one))
                    console.print(
                        f"{wl.name} @ {load}: cache_aware {mode} x{n}: hit {s.hit_ratio:.3f} "
                        f"(oracle {oracle.hit_ratio:.3f}), p99 {s.ttft_p99_s * 1000:,.0f} ms",
                        highlight=False,
                    )
    console.print(table(rows))
    console.print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0


def _row(workload, load, policy, mode, n, s: metrics.PolicySummary, oracle, ll, one) -> dict[str, object]:
    return {
        "workload": workload,
        "load": load,
        "policy": policy,
        "kv_state": mode,
        "routers": n,
        "hit_ratio": round(s.hit_ratio, 4),
        "hit_vs_oracle": round(s.hit_ratio / oracle.hit_ratio, 3) if oracle.hit_ratio else None,
        "hit_vs_one_router": round(s.hit_ratio / one.hit_ratio, 3) if one is not None and one.hit_ratio else None,
        "ttft_p50_ms": round(s.ttft_p50_s * 1000, 1),
        "ttft_p99_ms": round(s.ttft_p99_s * 1000, 1),
        "p50_vs_oracle": round(s.ttft_p50_s / oracle.ttft_p50_s, 2) if oracle.ttft_p50_s else None,
        "p99_vs_oracle": round(s.ttft_p99_s / oracle.ttft_p99_s, 2) if oracle.ttft_p99_s else None,
        "p99_vs_least_load": round(s.ttft_p99_s / ll.ttft_p99_s, 2) if ll.ttft_p99_s else None,
    }


COLS = (
    "workload",
    "load",
    "policy",
    "kv_state",
    "routers",
    "hit_ratio",
    "hit_vs_oracle",
    "hit_vs_one_router",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "p50_vs_oracle",
    "p99_vs_oracle",
    "p99_vs_least_load",
)


def table(rows: list[dict[str, object]]) -> Table:
    t = Table(title="cache_aware: approximate vs events, N routers (x oracle / least_load)", title_justify="left")
    for c in COLS:
        t.add_column(c, justify="left" if c in ("workload", "policy", "kv_state") else "right")
    for r in rows:
        t.add_row(*("-" if r[c] is None else str(r[c]) for c in COLS))
    return t


def markdown(rows: list[dict[str, object]]) -> str:
    out = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    out += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in COLS) + " |" for r in rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
