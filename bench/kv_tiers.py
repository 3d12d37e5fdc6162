"""What a CPU KV tier buys: Mooncake traces on GPU-only replicas against GPU + CPU tier replicas.

    .venv/bin/python bench/kv_tiers.py                       # both traces, load 0.8 and 2.0
    .venv/bin/python bench/kv_tiers.py --json docs/kv-tiers-results.json --plot docs/kv-tiers.png

The two deployments of bench/fleet-tiered.yaml are the same Llama-3.1-8B replicas on an L40S node
(g6e.48xlarge), one without and one with `kv_offload: {cpu_gib: 168}` (the most the node's memory
allows for 8 replicas); the simulator takes both from the plan, so the tier's size and PCIe rate
are the plan's. Each trace (../shared/traces/mooncake, skipped with a note when absent; the first
`--requests` of each) is scaled to each offered load (no-cache prefill work / fleet prefill
capacity, the same for both variants) and routed by the router's own policies. The last table is
where a lower tier stops paying, per machine family and model: a load costs
`latency + tokens / link rate`, a recompute `tokens / prefill rate`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra.cli._common import report_console
from gpufleet.infra.plan import assembly, tiers
from gpufleet.router.sim import fleet as fleet_mod
from gpufleet.router.sim import report, trace

HERE = Path(__file__).resolve().parent
TRACES = HERE.parent.parent / "shared" / "traces" / "mooncake"
MACHINES = (("aws", "g6.12xlarge"), ("aws", "g6e.48xlarge"), ("aws", "p4de.24xlarge"), ("aws", "p5.48xlarge"))
MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-32B", "meta-llama/Llama-3.1-70B-Instruct")


def breakeven_rows(cat: catalog_mod.Catalog) -> list[dict[str, Any]]:
    """Per machine and model: prefill vs CPU/disk load rates, and the shortest hit worth loading."""
    rows = []
    lat = tiers.TIER_LOAD_LATENCY_S
    for cloud, name in MACHINES:
        m = cat.machine(cloud, name)
        assert m is not None
        gpu = cat.gpu(m.gpu)
        assert gpu is not None
        link = cat.host_link(m)
        disk = cat.network_disks.get(cloud)
        for model_name in MODELS:
            model = cat.model(model_name)
            assert model is not None
            # The fewest GPUs (a power of two) whose memory holds the weights with room for KV.
            gpus = 1
            while model.weight_bytes > 0.7 * gpus * gpu.memory_bytes and gpus <= m.gpus:
                gpus *= 2
            if gpus > m.gpus:
                continue
            prefill = gpus * gpu.bf16_tflops * 1e12 * assembly.PREFILL_MFU / (2 * model.params_b * 1e9)
            kv = model.kv_bytes_per_token
            per_node = m.gpus // gpus
            rates = {
                "cpu": gpus * link.host_to_device_gb_per_s * 1e9 / kv,
                "nvme": link.nvme_read_gb_per_s / per_node * 1e9 / kv,
                "gp3": (disk.read_gb_per_s if disk else 1.0) * 1e9 / kv,
            }
            row: dict[str, Any] = {
                "machine": name,
                "gpu": f"{gpus}x {m.gpu}",
                "pcie_gen": link.pcie_gen,
                "model": model_name.split("/")[1],
                "prefill_tokens_per_s": round(prefill),
            }
            for tier, rate in rates.items():
                row[f"{tier}_tokens_per_s"] = round(rate)
                # load(n) = lat + n / rate < n / prefill  <=>  n > lat / (1/prefill - 1/rate)
                row[f"{tier}_breakeven_tokens"] = round(lat / (1 / prefill - 1 / rate)) if rate > prefill else None
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(HERE / "fleet-tiered.yaml"))
    ap.add_argument("--gpu-only", default="llama-8b", help="deployment without kv_offload")
    ap.add_argument("--tiered", default="llama-8b-offload", help="the same deployment with kv_offload")
    ap.add_argument("--requests", type=int, default=2000, help="first N requests of each trace (0: all)")
    ap.add_argument("--loads", default="0.8,2.0")
    ap.add_argument("--policies", default="round_robin,cache_aware")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write hit ratio / TTFT bars and the break-even curves here (PNG)")
    args = ap.parse_args(argv)

    console = report_console(170)
    names = report.parse_policies(args.policies)
    loads = [float(x) for x in args.loads.split(",") if x]
    variants = {
        "GPU only": fleet_mod.fleet_from_file(args.fleet, args.gpu_only),
        "GPU + CPU": fleet_mod.fleet_from_file(args.fleet, args.tiered),
    }
    eng = variants["GPU + CPU"].replicas[0].engine
    if not eng.cpu_capacity_tokens:
        console.print(f"[red]{args.tiered} has no kv_offload in {args.fleet}[/]")
        return 1
    console.print(
        f"replica: {eng.kv_capacity_tokens:,} GPU KV tokens, {eng.cpu_capacity_tokens:,} CPU KV tokens "
        f"({eng.cpu_capacity_tokens / eng.kv_capacity_tokens:.1f}x), prefill {eng.prefill_tokens_per_s:,.0f} tok/s, "
        f"CPU hit {eng.cpu_load_tokens_per_s:,.0f} tok/s, {len(variants['GPU only'].replicas)} replicas"
    )
    results: list[dict[str, Any]] = []
    paths = sorted(TRACES.glob("*.jsonl")) if TRACES.is_dir() else []
    if not paths:
        console.print(f"[yellow]skipping the Mooncake traces: {TRACES} is not present[/]")
    for path in paths:
        recs = trace.load_trace(path)
        wl = trace.trace_workload(
            recs, name=path.stem, seed=args.seed, settings=variants["GPU only"].settings, limit=args.requests or None
        )
        for load in loads:
            for variant, fl in variants.items():
                t0 = time.perf_counter()
                run = report.run_policies(wl, fl, names, load=load, seed=args.seed)
                for pol, s in run.summaries.items():
                    results.append(
                        {
                            "trace": path.stem,
                            "requests": run.requests,
                            "load": load,
                            "variant": variant,
                            "policy": pol,
                            "infinite_cache_hit_ratio": run.infinite_cache_hit_ratio,
                            **{
                                k: getattr(s, k)
                                for k in (
                                    "hit_ratio",
                                    "tier_hit_ratio",
                                    "ttft_p50_s",
                                    "ttft_p99_s",
                                    "prefill_gpu_s",
                                    "prefill_usd",
                                    "finished",
                                    "rejected",
                                )
                            },
                        }
                    )
                console.print(
                    f"  {path.stem} load {load:g} {variant}: {time.perf_counter() - t0:.1f} s", highlight=False
                )

    if results:
        table = Table(title=f"Mooncake traces, first {args.requests or 'all'} requests each", title_justify="left")
        for col in (
            "trace",
            "load",
            "policy",
            "KV tiers",
            "hit",
            "of it CPU",
            "inf. cache",
            "hit / inf",
            "TTFT p50",
            "TTFT p99",
            "prefill GPU-s",
            "prefill $",
        ):
            table.add_column(col, justify="left" if col in ("trace", "policy", "KV tiers") else "right")
        for r in results:
            ceil = r["infinite_cache_hit_ratio"]
            table.add_row(
                r["trace"].replace("_trace", ""),
                f"{r['load']:g}",
                r["policy"],
                r["variant"],
                f"{r['hit_ratio']:.3f}",
                f"{r['tier_hit_ratio']:.3f}",
                f"{ceil:.3f}",
                f"{r['hit_ratio'] / ceil:.2f}" if ceil else "-",
                f"{r['ttft_p50_s']:.2f} s",
                f"{r['ttft_p99_s']:.2f} s",
                f"{r['prefill_gpu_s']:,.0f}",
                f"{r['prefill_usd']:.2f}",
            )
        console.print(table)

    cat = catalog_mod.bundled()
    be = breakeven_rows(cat)
    bt = Table(
        title=f"where a lower tier stops paying (load latency {tiers.TIER_LOAD_LATENCY_S * 1000:g} ms; "
        "break-even: the shortest hit a load beats recompute on; '-': never)",
        title_justify="left",
    )
    for col in ("machine", "GPUs", "PCIe", "model", "prefill tok/s", "CPU tok/s", "CPU from", "NVMe tok/s"):
        bt.add_column(col, justify="left" if col in ("machine", "GPUs", "model") else "right")
    for col in ("NVMe from", "gp3 tok/s", "gp3 from"):
        bt.add_column(col, justify="right")

    def tok(x: int | None) -> str:
        return "-" if x is None else f"{x:,}"

    for r in be:
        bt.add_row(
            r["machine"],
            r["gpu"],
            f"Gen{r['pcie_gen']}",
            r["model"],
            f"{r['prefill_tokens_per_s']:,}",
            f"{r['cpu_tokens_per_s']:,}",
            tok(r["cpu_breakeven_tokens"]),
            f"{r['nvme_tokens_per_s']:,}",
            tok(r["nvme_breakeven_tokens"]),
            f"{r['gp3_tokens_per_s']:,}",
            tok(r["gp3_breakeven_tokens"]),
        )
    console.print(bt)

    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "breakeven": be}, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.plot and results:
        plot(results, be, Path(args.plot))
        console.print(f"wrote {args.plot}")
    return 0


def plot(results: list[dict[str, Any]], be: list[dict[str, Any]], path: Path) -> None:
    """Hit ratio and TTFT p50 per run (GPU only vs GPU + CPU, cache_aware), and the break-even curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ca = [r for r in results if r["policy"] == "cache_aware"] or results
    keys = sorted({(r["trace"], r["load"]) for r in ca})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.38
    for ax, metric, label in ((axes[0], "hit_ratio", "prefix-hit ratio"), (axes[1], "ttft_p50_s", "TTFT p50 (s)")):
        for j, variant in enumerate(("GPU only", "GPU + CPU")):
            vals = [
                next((r[metric] for r in ca if (r["trace"], r["load"]) == k and r["variant"] == variant), 0.0)
                for k in keys
            ]
            ax.bar([i + (j - 0.5) * width for i in range(len(keys))], vals, width, label=variant)
        if metric == "hit_ratio":
            ceil = [next(r["infinite_cache_hit_ratio"] for r in ca if (r["trace"], r["load"]) == k) for k in keys]
            ax.scatter(range(len(keys)), ceil, marker="_", s=400, color="black", label="infinite cache", zorder=3)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{t.replace('_trace', '')}\nload {ld:g}" for t, ld in keys], fontsize=8)
        if metric == "ttft_p50_s":
            ax.set_yscale("log")
        ax.set_title(f"{label}, cache_aware", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    lat = tiers.TIER_LOAD_LATENCY_S
    ns = [16 * 2**i for i in range(0, 13)]
    for r in be:
        if r["model"] != "Llama-3.1-8B-Instruct":
            continue
        p = r["prefill_tokens_per_s"]
        for tier, style in (("cpu", "-"), ("gp3", ":")):
            rate = r[f"{tier}_tokens_per_s"]
            ax.plot(ns, [(lat + n / rate) / (n / p) for n in ns], style, label=f"{r['machine']} {tier}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hit length (tokens)")
    ax.set_ylabel("load time / recompute time")
    ax.set_title("Llama-3.1-8B: a load pays below 1", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


if __name__ == "__main__":
    raise SystemExit(main())
