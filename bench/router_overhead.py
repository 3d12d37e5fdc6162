"""Latency the gpufleet router adds, and the throughput it sustains, against calling a replica directly.

    .venv/bin/python bench/router_overhead.py [--rate 500] [--seconds 10] [--concurrency 64]

Processes (all on 127.0.0.1, all stopped at the end):
  - N instant replicas: a minimal OpenAI-compatible aiohttp server answering a fixed chat
    completion at once, so every millisecond measured is transport and proxy work;
  - the router: `gpufleet router serve` (cache_aware) in front of them;
  - optionally the SGLang router (cache_aware) in front of the same replicas, when
    /tmp/peers-venv/bin/python can import sglang_router (see ../shared/peers/README.md; it is
    never a project dependency). Skipped with a note otherwise.

Two measurements per target:
  1. open loop at --rate req/s for --seconds: latency p50/p99 (client side), and the added
     latency against the direct path;
  2. closed loop with --concurrency clients for --seconds: requests/s, and requests per second of
     the router process's own CPU time (req/s per core), read from /proc.

The request is a chat completion with a 2,000-character system prompt (shared by 8 groups) and
a short user turn, so prefix hashing and the index do real work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = Path(os.environ.get("GPUFLEET_PEERS_PYTHON", "/tmp/peers-venv/bin/python"))
LOOPBACK_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}

ANSWER = json.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 16}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 520,
            "completion_tokens": 16,
            "total_tokens": 536,
            "prompt_tokens_details": {"cached_tokens": 512},
        },
    }
).encode()


def _serve_replica(port_file: str) -> None:
    """Child process: an instant OpenAI-compatible replica (chat completions, health, models)."""
    import logging

    from aiohttp import web

    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # SGLang's gRPC probe is not HTTP/1

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_post("/generate", completions)
        for path in ("/health", "/v1/models", "/health_generate"):
            app.router.add_get(path, ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # the bench stops its children with SIGINT
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready within {timeout:.0f}s")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # process whose CPU we charge (None for direct)


def _body(i: int) -> bytes:
    system = f"You are support agent {i % 8}. Follow the handbook carefully. " * 36
    return json.dumps(
        {
            "model": "m",
            "max_tokens": 16,
            "messages": [{"role": "system", "content": system[:2000]}, {"role": "user", "content": f"question {i}"}],
        }
    ).encode()


async def _open_loop(url: str, rate: float, seconds: float, progress, task) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    import aiohttp

    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    bodies = [_body(i) for i in range(64)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, trust_env=False) as s:
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            nonlocal errors
            t0 = loop.time()
            try:
                async with s.post(
                    url + "/v1/chat/completions", data=bodies[i % 64], headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            lat.append(loop.time() - t0)
            progress.advance(task)

        start = loop.time()
        pending = []
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*pending)
    return lat, errors


async def _closed_loop(url: str, concurrency: int, seconds: float, progress, task) -> tuple[int, float, int]:  # type: ignore[no-untyped-def]
    import aiohttp

    done = 0
    errors = 0
    bodies = [_body(i) for i in range(64)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, trust_env=False) as s:
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + seconds

        async def worker(w: int) -> None:
            nonlocal done, errors
            i = w
            while loop.time() < stop_at:
                try:
                    async with s.post(
                        url + "/v1/chat/completions", data=bodies[i % 64], headers={"Content-Type": "application/json"}
                    ) as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                            progress.advance(task)
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                i += concurrency

        t0 = loop.time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = loop.time() - t0
    return done, elapsed, errors


def _stop(p: subprocess.Popen) -> None:
    """Interrupt a child's process group, then kill it if it does not exit in time."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _client_cost(url: str, lib: str, n: int = 3000, workers: int = 8) -> float:
    """CPU microseconds this process spends per proxied-style request with an HTTP client library."""
    body = _body(1)
    headers = {"Content-Type": "application/json"}
    per = n // workers
    if lib == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        ) as s:

            async def one_worker() -> None:
                for _ in range(per):
                    async with s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                        await r.read()

            await one_worker()  # warm the pool
            c0 = time.process_time()
            await asyncio.gather(*(one_worker() for _ in range(workers)))
            return (time.process_time() - c0) / (per * workers) * 1e6
    if lib == "gpufleet upstream":
        from gpufleet.router.upstream import UpstreamPool
        from gpufleet.router.upstream.request import UpstreamTarget

        target = UpstreamTarget(url)
        head = target.head("/v1/chat/completions", b"", len(body))  # as the proxy builds it
        pool = UpstreamPool()

        async def one_worker_lean() -> None:
            for _ in range(per):
                resp = await pool.post(target.host, target.port, head, body, timeout_s=30)
                await resp.read()
                resp.release()

        await one_worker_lean()
        c0 = time.process_time()
        await asyncio.gather(*(one_worker_lean() for _ in range(workers)))
        cost = (time.process_time() - c0) / (per * workers) * 1e6
        await pool.close()
        return cost
    import httpx

    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=64)) as c:

        async def one_worker_httpx() -> None:
            for _ in range(per):
                r = await c.post(url + "/v1/chat/completions", content=body, headers=headers)
                r.read()

        await one_worker_httpx()
        c0 = time.process_time()
        await asyncio.gather(*(one_worker_httpx() for _ in range(workers)))
        return (time.process_time() - c0) / (per * workers) * 1e6


def _peer_available() -> bool:
    """True when the SGLang router is installed in the peers' virtualenv."""
    if not PEERS_PY.exists():
        return False
    return subprocess.run([str(PEERS_PY), "-c", "import sglang_router"], capture_output=True).returncode == 0


def _start_sglang(replica_urls: list[str], procs: list[subprocess.Popen]) -> Target | None:
    if not _peer_available():
        return None
    port, mport = _free_port(), _free_port()
    p = subprocess.Popen(
        [
            str(PEERS_PY),
            "-m",
            "sglang_router.launch_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *replica_urls,
            "--policy",
            "cache_aware",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(mport),
            "--shutdown-grace-period-secs",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **LOOPBACK_ENV},
        start_new_session=True,
    )
    procs.append(p)
    _wait_http(f"http://127.0.0.1:{port}/health", 60)
    return Target("sglang-router", f"http://127.0.0.1:{port}", p.pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop request rate (req/s)")
    ap.add_argument("--seconds", type=float, default=12.0, help="total duration of each kind of measurement per target")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the duration is split into")
    ap.add_argument("--concurrency", type=int, default=64, help="clients in the closed-loop throughput run")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--no-peers", action="store_true", help="skip the SGLang router even if installed")
    ap.add_argument("--serve-replica", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_replica:
        _serve_replica(args.serve_replica)
        return

    from rich.console import Console
    from rich.table import Table

    from gpufleet.infra.cli._common import progress as progress_display

    console = Console(width=max(120, shutil.get_terminal_size().columns))
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    try:
        urls = []
        for i in range(args.replicas):
            pf = tmp / f"replica{i}.port"
            procs.append(
                subprocess.Popen([sys.executable, __file__, "--serve-replica", str(pf)], start_new_session=True)
            )
            deadline = time.monotonic() + 20
            while not pf.exists() or not pf.read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("replica did not start")
                time.sleep(0.05)
            urls.append(f"http://127.0.0.1:{pf.read_text()}")
        for u in urls:
            _wait_http(u + "/health")

        import yaml

        cfg = {
            "fleet": "bench",
            "settings": {"policy": "cache_aware", "health": {"interval_s": 30}},
            "replicas": [
                {
                    "id": f"r{i}",
                    "url": u,
                    "deployment": "d",
                    "model": "m",
                    "pool": "p",
                    "priority": 0,
                    "kv_capacity_tokens": 200_000,
                    "max_model_len": 32768,
                    "max_concurrent_requests": 4096,
                }
                for i, u in enumerate(urls)
            ],
        }
        (tmp / "router.yaml").write_text(yaml.safe_dump(cfg))

        def start_gpufleet() -> Target:
            gport = _free_port()
            gp = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from gpufleet.infra.cli import main; main()",
                    "router",
                    "serve",
                    "--config",
                    str(tmp / "router.yaml"),
                    "--port",
                    str(gport),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(gp)
            _wait_http(f"http://127.0.0.1:{gport}/ready")
            return Target("gpufleet router", f"http://127.0.0.1:{gport}", gp.pid)

        def start_sglang() -> Target | None:
            return _start_sglang(urls, procs)

        # Interleaved rounds, so a burst of background load hits every target alike (each figure
        # is the median over rounds); within a round each router runs alone, started fresh and
        # stopped after, because an idle peer is not idle (SGLang's tree eviction, for one).
        note = ""
        starters: list[tuple[str, Callable[[], Target | None]]] = [
            ("direct (replica)", lambda: Target("direct (replica)", urls[0], None)),
            ("gpufleet router", start_gpufleet),
        ]
        if not args.no_peers:
            if _peer_available():
                starters.append(("sglang-router", start_sglang))
            else:
                note = f"SGLang router not installed at {PEERS_PY}: skipped (see ../shared/peers/README.md)"
        per_round = args.seconds / args.rounds
        names = [n for n, _ in starters]
        lat: dict[str, list[list[float]]] = {n: [] for n in names}
        rps: dict[str, list[float]] = {n: [] for n in names}
        per_cpu: dict[str, list[float]] = {n: [] for n in names}
        errs: dict[str, int] = {n: 0 for n in names}
        with progress_display(on=console) as progress:
            rounds = progress.add_task("rounds", total=args.rounds * len(starters))
            for r in range(args.rounds):
                for name, start in starters:
                    progress.update(rounds, description=f"round {r + 1}/{args.rounds}: {name}")
                    n_procs = len(procs)
                    try:
                        t = start()
                    except RuntimeError as exc:
                        note = f"{name} did not start: {exc}"
                        t = None
                    if t is None:
                        progress.advance(rounds)
                        continue
                    try:
                        w = progress.add_task("  warm-up", total=None)
                        asyncio.run(_closed_loop(t.url, 8, 1.0, progress, w))
                        progress.remove_task(w)
                        task = progress.add_task(f"  {args.rate:.0f} req/s open loop", total=int(args.rate * per_round))
                        got, e1 = asyncio.run(_open_loop(t.url, args.rate, per_round, progress, task))
                        progress.remove_task(task)
                        task2 = progress.add_task(f"  closed loop x{args.concurrency}", total=None)
                        cpu0 = _cpu_seconds(t.pid) if t.pid else 0.0
                        done, elapsed, e2 = asyncio.run(
                            _closed_loop(t.url, args.concurrency, per_round, progress, task2)
                        )
                        cpu = (_cpu_seconds(t.pid) - cpu0) if t.pid else 0.0
                        progress.remove_task(task2)
                    finally:
                        for p in procs[n_procs:]:
                            _stop(p)
                    lat[name].append(got)
                    rps[name].append(done / elapsed)
                    if cpu:
                        per_cpu[name].append(done / cpu)
                    errs[name] += e1 + e2
                    progress.advance(rounds)
        targets = [Target(n, "", None if n.startswith("direct") else 0) for n in names if lat[n]]

        def med(xs: list[float]) -> float:
            return statistics.median(xs) if xs else float("nan")

        base = targets[0].name
        table = Table(
            title=f"Router overhead: {args.replicas} instant replicas; {args.rate:.0f} req/s open loop, then "
            f"{args.concurrency} concurrent clients; {args.rounds} interleaved rounds (each router alone) of "
            f"{per_round:g}s each, medians over rounds"
        )
        for col in (
            "target",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "max req/s",
            "req/s per CPU-s",
            "errors",
        ):
            table.add_column(col, justify="left" if col == "target" else "right")
        for t in targets:
            p50 = [_pct(x, 0.5) for x in lat[t.name]]
            p99 = [_pct(x, 0.99) for x in lat[t.name]]
            direct = t.pid is None
            add50 = [a - _pct(b, 0.5) for a, b in zip(p50, lat[base])]
            add99 = [a - _pct(b, 0.99) for a, b in zip(p99, lat[base])]
            table.add_row(
                t.name,
                f"{med(p50) * 1e3:.2f}",
                f"{med(p99) * 1e3:.2f}",
                "-" if direct else f"{med(add50) * 1e3:+.2f}",
                "-" if direct else f"{med(add99) * 1e3:+.2f}",
                f"{med(rps[t.name]):,.0f}",
                "-" if direct else f"{med(per_cpu[t.name]):,.0f}",
                str(errs[t.name]),
            )
        console.print(table)
        console.print(f"machine: {os.cpu_count()} CPUs; load generator, replicas and router share them.")
        # Why the router proxies with its own lean client: what each client costs per request.
        libs = Table(title="Upstream HTTP client cost (8 concurrent workers against one instant replica)")
        libs.add_column("client library")
        libs.add_column("CPU µs per request", justify="right")
        for lib in ("gpufleet upstream", "aiohttp", "httpx"):
            libs.add_row(lib, f"{asyncio.run(_client_cost(urls[0], lib)):.0f}")
        console.print(libs)
        if note:
            console.print(note, style="yellow")
    finally:
        for p in procs:
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
