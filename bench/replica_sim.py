"""How much load one `gpufleet replica-sim` process serves, so benchmarks know it is not their bottleneck.

Run: .venv/bin/python bench/replica_sim.py [--requests 1000] [--concurrency 1 8 32 64]

Starts one replica-sim subprocess on a free loopback port with prefill and decode rates set so
high that the engine model adds no time, replays the seeded mixed workload of
`gpufleet.router.workloads.mixed` (streaming, 4 output tokens) at each concurrency, and prints a table:
requests per second, TTFT p50/p99 as the client sees it, and the CPU seconds the replica and the
driver used. Whatever remains is the cost of HTTP, SSE and the KV bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from gpufleet.infra.cli._common import progress as progress_display
from gpufleet.infra.cli._common import report_console
from gpufleet.router.workloads import driver, mixed, stats


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    args = ap.parse_args()
    console = report_console(170)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpufleet.infra.cli.replica_sim",
                "replica-sim",
                "--model",
                "m",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--prefill-tokens-per-s",
                "1e12",
                "--decode-tokens-per-s",
                "1e9",
                "--max-running",
                "1024",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            table = Table(
                title=f"one replica-sim, {args.requests} streamed requests per row (mixed workload, 4 output tokens)"
            )
            for col in (
                "concurrency",
                "req/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "errors",
                "replica CPU s",
                "driver CPU s",
            ):
                table.add_column(col, justify="right")
            with progress_display(on=console) as progress:
                for conc in args.concurrency:
                    reqs = mixed.generate(
                        mixed.WorkloadSpec(models=("m",), n_requests=args.requests, seed=conc, max_tokens=4)
                    )
                    task = progress.add_task(f"concurrency {conc}", total=len(reqs))
                    cpu0, drv0 = _cpu_s(proc.pid), resource.getrusage(resource.RUSAGE_SELF).ru_utime
                    t0 = time.perf_counter()
                    results = asyncio.run(
                        driver.drive(url, reqs, concurrency=conc, on_result=lambda _r, t=task: progress.advance(t))
                    )
                    wall = time.perf_counter() - t0
                    s = stats.summarize(results, wall)
                    table.add_row(
                        str(conc),
                        f"{len(results) / wall:.0f}",
                        f"{(s.ttft_p50_s or 0) * 1000:.2f}",
                        f"{(s.ttft_p99_s or 0) * 1000:.2f}",
                        str(s.errors),
                        f"{_cpu_s(proc.pid) - cpu0:.2f}",
                        f"{resource.getrusage(resource.RUSAGE_SELF).ru_utime - drv0:.2f}",
                    )
            console.print(table)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
