"""What reading every router pod costs the controller each round (`infra/controller/router_load.py`).

    .venv/bin/python bench/router_load.py [--json OUT] [--rounds 30]

N router pods (1, 2, 4, 8, 16), each a loopback HTTP server rendering a REAL `RouterMetrics`
registry with R replicas (16, 64, 256) that carry in-flight gauges, queued prefill and a filled
time-to-first-token histogram; `RouterLoadReader.read()` scrapes all pods at once, parses and
adds up. Per (N, R): wall-clock p50 / p99 of one read, the process's CPU per read (every
thread: the servers' rendering is precomputed, so this is the reader's HTTP, parse and merge;
`time.process_time`), and the bytes of one pod's exposition. Last row: 4 pods of which one is dead
(a closed port: refused at once) and one hangs (accepts, never answers): the read is bounded by
`timeout_s` and still returns the two live pods, partial.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpufleet.infra.controller import router_load as rl
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.types import ReplicaState

PODS = (1, 2, 4, 8, 16)
REPLICAS = (16, 64, 256)


def _registry(replicas: int, seed: int) -> RouterMetrics:
    rng = random.Random(seed)
    ids = [f"llama-p{i % 4}-{i}" for i in range(replicas)]
    m = RouterMetrics([(rid, "m") for rid in ids], "cache_aware")
    states = []
    for rid in ids:
        m.in_flight.labels(rid).set(rng.randint(0, 64))
        s = ReplicaState(id=rid, model="m")
        s.begin(rng.randint(0, 20_000))
        states.append(s)
        ttft = m.replica[rid].time_to_first_token
        for _ in range(50):
            ttft.observe(rng.lognormvariate(-1.5, 0.8))
    m.watch_replicas(lambda: states)
    return m


class _Pod:
    def __init__(self, metrics: RouterMetrics | None) -> None:
        body = metrics.render() if metrics is not None else b""
        self.size = len(body)
        hang = metrics is None

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if hang:
                    time.sleep(30)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure(urls: dict[str, str], rounds: int, timeout_s: float) -> dict[str, Any]:
    now = [0.0]
    reader = rl.RouterLoadReader(lambda: urls, timeout_s=timeout_s, window_s=60, clock=lambda: now[0])
    walls, cpus = [], []
    load = None
    for i in range(rounds):
        now[0] = 15.0 * i
        t0, c0 = time.perf_counter(), time.process_time()
        load = reader.read()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return {
        "wall_p50_ms": 1000 * statistics.median(walls),
        "wall_p99_ms": 1000 * walls[min(len(walls) - 1, int(0.99 * len(walls)))],
        "cpu_ms": 1000 * statistics.mean(cpus),
        "answered": len(load.answered) if load else 0,
        "failed": len(load.failed) if load else 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    rows = []
    for replicas in REPLICAS:
        pods = [_Pod(_registry(replicas, seed)) for seed in range(max(PODS))]
        try:
            for n in PODS:
                urls = {f"router-{i}": p.url for i, p in enumerate(pods[:n])}
                row = {"pods": n, "replicas": replicas, "bytes_per_pod": pods[0].size}
                row.update(_measure(urls, args.rounds, timeout_s=2.0))
                rows.append(row)
        finally:
            for p in pods:
                p.stop()
    live = [_Pod(_registry(64, s)) for s in range(2)]
    hung = _Pod(None)
    try:
        urls = {"router-0": live[0].url, "router-1": live[1].url, "router-hung": hung.url,
                "router-dead": f"http://127.0.0.1:{_closed_port()}/metrics"}  # fmt: skip
        row = {"pods": 4, "replicas": 64, "bytes_per_pod": live[0].size, "note": "1 dead, 1 hung, timeout 0.5 s"}
        row.update(_measure(urls, min(args.rounds, 5), timeout_s=0.5))
        rows.append(row)
    finally:
        for p in (*live, hung):
            p.stop()

    table = Table(title="router_load: one read of every router pod", title_justify="left")
    for col in ("pods", "replicas", "KiB/pod", "wall p50 ms", "wall p99 ms", "cpu ms", "answered", "failed", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["pods"]), str(r["replicas"]), f"{r['bytes_per_pod'] / 1024:.0f}", f"{r['wall_p50_ms']:.1f}",
            f"{r['wall_p99_ms']:.1f}", f"{r['cpu_ms']:.1f}", str(r["answered"]), str(r["failed"]), r.get("note", ""),
        )  # fmt: skip
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
