"""Fault-injection soak of a local fleet: mixed traffic through the router while replicas die, hang
and get poisoned, hostile input arrives and thousands of connections idle.

    python bench/soak.py                  # about 8 minutes at 15 req/s
    python bench/soak.py --seconds 90     # the CI version (tests/local/test_soak.py)
    python bench/soak.py --json out.json

The fleet is real processes (`infra/local`: `gpufleet replica-sim` replicas in two pools, the
router, the supervisor restarting what dies). Traffic is open-loop at `--rate` req/s: streamed
chat, sessions (`x-session-id`), deterministic requests of four tenants (each naming itself by a
different identity header), and completions. Phases, each a share of `--seconds`:

    baseline    nothing wrong
    poison      one request every 2 s that the engine fails on (a 500 for that input)
    sigkill     one top-pool replica SIGKILLed (the supervisor restarts it)
    sigstop     one replica SIGSTOPped for 20 s (scaled), then SIGCONT
    sigstop75   one replica SIGSTOPped for 75 s (scaled), then SIGCONT
    pool_kill   every replica of the top pool SIGKILLed
    bad_input   the hostile corpus (router/workloads/hostile.py), every case, twice
    idle        2000 idle connections and 50 slow heads held open

Per phase it counts, for the normal traffic (each request in the phase in which it ended): OK (a complete answer), clean errors (an HTTP error
with a JSON body), broken streams (a stream cut after its first byte, ended with an error
event), hangs (no answer within --hang-s), lost (no HTTP answer at all); and the replicas
ejected (the router's ejections_total). Poison requests and corpus cases are counted apart: 5xx
answers to bad input, wrong answers, tracebacks in the router's log, cached answers that crossed
tenants. Exit code 1 when a goal is missed (0 hangs, 0 lost, 0 ejections by poison, 0 5xx and 0
tracebacks from bad input, 0 cross-tenant hits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from gpufleet.infra import plan as plan_mod
from gpufleet.infra.local import processes
from gpufleet.infra.local.runtime import LocalRuntime
from gpufleet.router.replica.app import POISON_ENV
from gpufleet.router.workloads import hostile

POISON = "zz-poison-marker-zz"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FLEET = """
fleet: soak
clouds:
  local: {host: 127.0.0.1}
nodepools:
  - {name: top, cloud: local, instance_type: g6.xlarge, priority: 100, min_nodes: 3, max_nodes: 3}
  - {name: fallback, cloud: local, instance_type: g6e.xlarge, priority: 50, min_nodes: 2, max_nodes: 2}
deployments:
  - name: llama
    model: MODEL_NAME
    nodepools: [top, fallback]
    min_replicas: 5
    max_replicas: 5
    max_model_len: 8192
    max_concurrent_requests: 48
router:
  policy: cache_aware
  prediction_cache: {enabled: true, ttl_s: 300}
  health: {interval_s: 1.0, timeout_s: 1.0, backoff_initial_s: 1.0, backoff_max_s: 4.0}
  first_byte: {floor_s: 2.0, factor: 4.0}
  max_retries: 4
  stream_idle_timeout_s: 5
  server: {header_timeout_s: 10, idle_timeout_s: 30}
""".replace("MODEL_NAME", MODEL)

PHASES = [  # name, share of --seconds (of the 480 s full run)
    ("baseline", 40),
    ("poison", 60),
    ("sigkill", 40),
    ("sigstop", 40),
    ("sigstop75", 95),
    ("pool_kill", 60),
    ("bad_input", 45),
    ("idle", 100),
]
TENANTS = [
    ("Authorization", "Bearer tenant-a"),
    ("api-key", "tenant-b"),
    ("x-api-key", "tenant-c"),
    ("Authorization", "Bearer tenant-d"),
]


@dataclass
class PhaseStats:
    name: str
    requests: int = 0
    ok: int = 0
    clean_errors: int = 0
    broken_streams: int = 0
    hangs: int = 0
    lost: int = 0
    ejected: int = 0
    max_latency_s: float = 0.0
    poison_sent: int = 0
    poison_answered_4xx_5xx: int = 0
    bad_input_cases: int = 0
    bad_input_5xx: int = 0
    bad_input_wrong: int = 0
    idle_open: int = 0
    idle_closed_at_timeout: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Soak:
    def __init__(self, seconds: float, rate: float, hang_s: float, idle: int, on_line: Callable[[str], None]) -> None:
        self.seconds, self.rate, self.hang_s, self.idle = seconds, rate, hang_s, idle
        self.show = on_line
        self.scale = seconds / sum(s for _, s in PHASES)
        self.phase: PhaseStats | None = None
        self.phases: list[PhaseStats] = []
        self.cross_tenant_hits = 0
        self.seen_bodies: dict[tuple[int, str], str] = {}
        self.rt: LocalRuntime | None = None
        self.rnd = random.Random(7)

    # -- traffic -------------------------------------------------------------------------
    def _request(self, i: int) -> tuple[str, dict[str, Any], dict[str, str], str]:
        """(path, body, headers, kind) of normal request i."""
        r = self.rnd.random()
        system = "You are a helpful assistant for the soak. " * 8
        if r < 0.4:
            body = {
                "model": MODEL,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}],
            }
            return "/v1/chat/completions", {**body, "stream": True, "max_tokens": 16}, {}, "stream"
        if r < 0.6:
            sid = f"s{i % 12}"
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"session {sid} turn {i}"}],
                "stream": True,
            }
            return "/v1/chat/completions", {**body, "max_tokens": 12}, {"x-session-id": sid}, "session"
        if r < 0.8:
            t = i % len(TENANTS)
            q = f"deterministic question {i % 10}"
            body = {"model": MODEL, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}
            return (
                "/v1/chat/completions",
                body,
                {TENANTS[t][0]: TENANTS[t][1], "x-soak-tenant": str(t)},
                "deterministic",
            )
        body = {"model": MODEL, "prompt": system + f"complete {i}", "max_tokens": 12}
        return "/v1/completions", body, {}, "completion"

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        path, body, headers, kind = self._request(i)
        assert self.rt is not None
        t0 = time.monotonic()
        errors: dict[str, int] = {}
        outcome = "ok"
        try:
            async with asyncio.timeout(self.hang_s):
                async with session.post(self.rt.router_url + path, json=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        outcome = "clean_error" if _is_json_error(data) else "lost"
                        errors[str(resp.status)] = 1
                    elif body.get("stream"):
                        outcome = "ok" if data.rstrip().endswith(b"data: [DONE]") else "broken_stream"
                    if kind == "deterministic" and resp.status == 200:
                        self._check_tenant(headers, body, resp.headers.get("x-gpufleet-cache"), data)
        except TimeoutError:
            outcome = "hang"
        except (aiohttp.ClientError, OSError) as exc:
            outcome = "broken_stream" if body.get("stream") and "Payload" in type(exc).__name__ else "lost"
            errors[type(exc).__name__] = 1
        took = time.monotonic() - t0
        ph = self.phase  # counted in the phase in which it ended, where its fault is
        assert ph is not None
        ph.requests += 1
        for k, n in errors.items():
            ph.errors[k] = ph.errors.get(k, 0) + n
        ph.max_latency_s = max(ph.max_latency_s, took)
        if outcome == "ok":
            ph.ok += 1
        elif outcome == "clean_error":
            ph.clean_errors += 1
        elif outcome == "broken_stream":
            ph.broken_streams += 1
        elif outcome == "hang":
            ph.hangs += 1
        else:
            ph.lost += 1

    def _check_tenant(self, headers: dict[str, str], body: dict[str, Any], cache: str | None, data: bytes) -> None:
        t = int(headers["x-soak-tenant"])
        q = body["messages"][0]["content"]
        key = (t, q)
        if key not in self.seen_bodies:
            # a tenant's first request of this body cannot be a hit unless another tenant's answer was served
            if cache == "hit":
                self.cross_tenant_hits += 1
            self.seen_bodies[key] = cache or ""

    async def _poison(self, session: aiohttp.ClientSession, i: int) -> None:
        ph = self.phase
        assert ph is not None and self.rt is not None
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"{POISON} {'long prompt ' * 400} {i}"}]}
        ph.poison_sent += 1
        try:
            async with asyncio.timeout(self.hang_s):
                async with session.post(self.rt.router_url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        ph.poison_answered_4xx_5xx += 1
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    async def traffic(self, stop: asyncio.Event) -> None:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            next_at = time.monotonic()
            next_poison = time.monotonic()
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_at:
                    t = asyncio.create_task(self._one(session, i))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    i += 1
                    next_at += self.rnd.expovariate(self.rate)
                if self.phase is not None and self.phase.name == "poison" and now >= next_poison:
                    t = asyncio.create_task(self._poison(session, i))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    next_poison = now + 2.0
                await asyncio.sleep(
                    max(
                        0.0,
                        min(next_at, next_poison if self.phase and self.phase.name == "poison" else next_at)
                        - time.monotonic(),
                    )
                )
            if tasks:
                await asyncio.wait(tasks, timeout=self.hang_s + 5)

    # -- faults --------------------------------------------------------------------------
    def _ejections(self) -> int:
        assert self.rt is not None
        text = httpx.get(self.rt.router_url + "/metrics", timeout=5, trust_env=False).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("gpufleet_router_ejections_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def _active(self, pool: str | None = None) -> list[Any]:
        assert self.rt is not None
        return [r for r in self.rt.replicas if r.role == "active" and r.running and (pool is None or r.pool == pool)]

    async def fault(self, name: str, length: float) -> None:
        rt = self.rt
        assert rt is not None and self.phase is not None
        loop = asyncio.get_running_loop()
        if name == "sigkill":
            victim = self._active("top")[0]
            self.show(f"  SIGKILL {victim.id}")
            processes.signal_group(victim.proc, signal.SIGKILL)
        elif name in ("sigstop", "sigstop75"):
            held = (
                (20 if name == "sigstop" else 75) * self.scale if self.scale < 1 else (20 if name == "sigstop" else 75)
            )
            victim = self._active("top")[-1]
            self.show(f"  SIGSTOP {victim.id} for {held:.0f}s")
            processes.signal_group(victim.proc, signal.SIGSTOP)
            try:
                await asyncio.sleep(min(held, length))
            finally:
                processes.signal_group(victim.proc, signal.SIGCONT)
                self.show(f"  SIGCONT {victim.id}")
        elif name == "pool_kill":
            ids = [r.id for r in self._active("top")]
            self.show(f"  SIGKILL the whole top pool: {', '.join(ids)}")
            for r in self._active("top"):
                processes.signal_group(r.proc, signal.SIGKILL)
        elif name == "bad_input":
            port = int(rt.router_url.rsplit(":", 1)[1])
            corpus = hostile.cases(MODEL) * 2
            for case in corpus:
                ans = await loop.run_in_executor(None, hostile.send, "127.0.0.1", port, case.data, 15.0)
                self.phase.bad_input_cases += 1
                if ans.status >= 500:
                    self.phase.bad_input_5xx += 1
                if hostile.check(case, ans):
                    self.phase.bad_input_wrong += 1
                    self.phase.errors[f"case:{case.name}"] = ans.status
        elif name == "idle":
            await loop.run_in_executor(None, self._idle_connections, length)

    def _idle_connections(self, length: float) -> None:
        assert self.rt is not None and self.phase is not None
        port = int(self.rt.router_url.rsplit(":", 1)[1])
        socks: list[tuple[socket.socket, float]] = []
        for i in range(self.idle + 50):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                break
            if i >= self.idle:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # a slow head
            s.setblocking(False)
            socks.append((s, time.monotonic()))
        self.phase.idle_open = len(socks)
        self.show(f"  {len(socks)} idle connections open ({self.idle} silent, 50 slow heads)")
        deadline = time.monotonic() + length - 2
        closed: set[int] = set()
        while time.monotonic() < deadline and len(closed) < len(socks):
            for k, (s, opened) in enumerate(socks):
                if k in closed:
                    continue
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data or b"408" in data:
                    if time.monotonic() - opened >= 9.5:  # server.header_timeout_s is 10
                        self.phase.idle_closed_at_timeout += 1
                    closed.add(k)
            time.sleep(0.2)
        for s, _ in socks:
            s.close()

    # -- run -----------------------------------------------------------------------------
    def run(self) -> int:
        _raise_fd_limit(self.idle + 4096)
        work = Path(tempfile.mkdtemp(prefix="gpufleet-soak-"))
        fleet = work / "fleet.yaml"
        fleet.write_text(FLEET)
        import os

        os.environ[POISON_ENV] = POISON
        plan = plan_mod.compile_file(fleet)
        self.rt = rt = LocalRuntime(plan, router_port=0, workdir=work / "run")
        self.show(f"starting the fleet ({len(rt.replicas)} replicas) in {work}")
        rt.start(lambda msg: self.show(f"  {msg}"))
        stop_sup = threading.Event()

        def supervise() -> None:
            while not stop_sup.wait(0.5):
                try:
                    for ev in rt.check(load=False):
                        self.show(f"  supervisor: {ev}")
                except Exception as exc:  # the soak reports, it does not crash
                    self.show(f"  supervisor error: {exc}")

        sup = threading.Thread(target=supervise, daemon=True)
        sup.start()
        try:
            asyncio.run(self._phases())
        finally:
            stop_sup.set()
            sup.join(5)
            log = rt.workdir / "logs" / "router.log"
            self.tracebacks = log.read_text(errors="replace").count("Traceback") if log.exists() else -1
            rt.stop()
        return 0 if not self.missed() else 1

    async def _phases(self) -> None:
        stop = asyncio.Event()
        self.phase = PhaseStats("warmup")
        traffic = asyncio.create_task(self.traffic(stop))
        await asyncio.sleep(2)
        loop = asyncio.get_running_loop()
        for name, share in PHASES:
            length = max(6.0, share * self.scale)
            before = await loop.run_in_executor(None, self._ejections)
            self.phase = ph = PhaseStats(name)
            self.phases.append(ph)
            self.show(f"phase {name} ({length:.0f}s)")
            t0 = time.monotonic()
            fault = asyncio.create_task(self.fault(name, length))
            await asyncio.sleep(length)
            if not fault.done():
                await asyncio.wait_for(fault, timeout=self.hang_s)
            await asyncio.sleep(0)
            # requests still in flight are counted in the phase they started in
            after = await loop.run_in_executor(None, self._ejections)
            ph.ejected = after - before
            self.show(
                f"  {ph.requests} requests: {ph.ok} ok, {ph.clean_errors} clean errors, {ph.broken_streams} broken,"
                f" {ph.hangs} hangs, {ph.lost} lost, {ph.ejected} ejected ({time.monotonic() - t0:.0f}s)"
            )
            if name == "pool_kill":
                self.show("  waiting for the supervisor to restart the top pool")
                await loop.run_in_executor(
                    None, lambda: self.rt.wait_routable([r.id for r in self.rt.replicas if r.pool == "top"], 60)
                )  # type: ignore[union-attr]
        stop.set()
        await traffic

    def missed(self) -> list[str]:
        out = []
        by = {p.name: p for p in self.phases}
        if any(p.hangs for p in self.phases):
            out.append("hangs")
        if any(p.lost for p in self.phases):
            out.append("lost requests")
        if "poison" in by and by["poison"].ejected:
            out.append("replicas ejected by poison requests")
        if "poison" in by and (by["poison"].clean_errors or by["poison"].broken_streams):
            out.append("normal requests failed during poison")
        if "bad_input" in by and (by["bad_input"].bad_input_5xx or by["bad_input"].bad_input_wrong):
            out.append("bad input answered wrong")
        if getattr(self, "tracebacks", 0):
            out.append("tracebacks in the router log")
        if self.cross_tenant_hits:
            out.append("cached answers crossed tenants")
        return out

    def report(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "rate": self.rate,
            "phases": [asdict(p) for p in self.phases],
            "tracebacks": getattr(self, "tracebacks", -1),
            "cross_tenant_hits": self.cross_tenant_hits,
            "missed": self.missed(),
        }


def _is_json_error(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def print_table(soak: Soak) -> None:
    from rich.table import Table

    from gpufleet.infra.cli._common import report_console

    table = Table(title=f"soak: {soak.seconds:g}s at {soak.rate:g} req/s")
    for col in (
        "phase",
        "requests",
        "ok",
        "clean errors",
        "broken streams",
        "hangs",
        "lost",
        "ejected",
        "max s",
        "notes",
    ):
        table.add_column(col, justify="left" if col in ("phase", "notes") else "right")
    for p in soak.phases:
        notes = []
        if p.poison_sent:
            notes.append(f"poison {p.poison_sent} sent, {p.poison_answered_4xx_5xx} error answers")
        if p.bad_input_cases:
            notes.append(f"bad input {p.bad_input_cases} cases: {p.bad_input_5xx} 5xx, {p.bad_input_wrong} wrong")
        if p.idle_open:
            notes.append(f"{p.idle_open} idle conns, {p.idle_closed_at_timeout} closed at the header timeout")
        table.add_row(
            p.name, str(p.requests), str(p.ok), str(p.clean_errors), str(p.broken_streams), str(p.hangs),
            str(p.lost), str(p.ejected), f"{p.max_latency_s:.1f}", "; ".join(notes),
        )  # fmt: skip
    console = report_console(170)
    console.print(table)
    console.print(
        f"tracebacks in the router log: {soak.report()['tracebacks']}; cross-tenant cache hits: {soak.cross_tenant_hits}"
    )
    missed = soak.missed()
    console.print("goals: all met" if not missed else f"goals missed: {', '.join(missed)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=480.0, help="total length of the phases (default 480)")
    ap.add_argument("--rate", type=float, default=15.0, help="normal requests per second (default 15)")
    ap.add_argument("--hang-s", type=float, default=30.0, help="a request without an answer this long is a hang")
    ap.add_argument("--idle", type=int, default=2000, help="idle connections in the idle phase (default 2000)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    soak = Soak(args.seconds, args.rate, args.hang_s, args.idle, lambda m: print(m, flush=True))
    code = soak.run()
    print_table(soak)
    if args.json:
        Path(args.json).write_text(json.dumps(soak.report(), indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
