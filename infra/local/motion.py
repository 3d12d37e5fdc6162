"""The demo's motion phase: the fleet autoscaling under a load ramp, then a router killed mid-traffic.

From the demo's plan, the first deployment with a fallback pool becomes a fleet of its own (same
pools and machines, compiled like any declaration): `min_replicas` half its top pool's slots,
`max_replicas` the top pool's slots plus the next pool's warm ones, `max_concurrent_requests`
2 x the target (so the router spills once the top pool's replicas are full) and
`autoscaling: {signal: in_flight, target: TARGET, scale_up_delay_s: 0, scale_down_delay_s: 2}`.
A closed loop of streaming clients ramps up, holds, falls and holds; meanwhile the main thread
runs the runtime's supervision (the same `controller.autoscale.scale` as `gpufleet up`) and samples
a timeline: clients, requests in flight at the router, ready replicas per pool, requests served
per pool, TTFT p50, errors. At the end of the last hold the router is SIGKILLed; its hot spare
takes over on the same port and the clients' next requests succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.table import Table

from gpufleet.infra import plan as plan_mod
from gpufleet.infra.local.runtime import LocalRuntime
from gpufleet.infra.plan import Plan
from gpufleet.router.workloads import stats

__all__ = ["MotionResult", "Sample", "motion_plan", "run_motion", "timeline_table"]


def motion_plan(plan: Plan, target: float = 4.0) -> Plan:
    """The demo plan's first deployment with a fallback, declared to autoscale, as a plan of its own."""
    dep = next((d for d in plan.deployments if len(d.failover) > 1), None)
    if dep is None:
        raise ValueError("no deployment has a fallback pool to scale into")
    per_node = {p.pool: p.replicas_per_node for p in dep.pools}
    top, nxt = plan.pool(dep.failover[0]), plan.pool(dep.failover[1])
    top_slots = top.max_nodes * per_node[top.name]
    warm_slots = nxt.warm_nodes * per_node[nxt.name]
    min_r = max(1, top_slots // 2)
    pools = []
    for p in (top, nxt):
        pools.append(
            {
                "name": p.name,
                "cloud": "local",
                "instance_type": p.instance_type,
                "priority": p.priority,
                "min_nodes": -(-min_r // per_node[p.name]) if p is top else 0,
                "max_nodes": p.max_nodes,
                "warm_nodes": 0 if p is top else nxt.warm_nodes,
            }
        )
    data = {
        "fleet": f"{plan.fleet}-motion",
        "clouds": plan.clouds.model_dump(exclude_none=True),
        "nodepools": pools,
        "deployments": [
            {
                "name": dep.name,
                "model": dep.model,
                "nodepools": [top.name, nxt.name],
                "min_replicas": min_r,
                "max_replicas": top_slots + max(1, warm_slots),
                "max_model_len": dep.max_model_len,
                # a replica takes 2 x the target: headroom while new replicas start, and the top pool
                # saturates (traffic spills) only once it is at its limit
                "max_concurrent_requests": max(2, round(target * 2)),
                "autoscaling": {
                    "signal": "in_flight",
                    "target": target,
                    "scale_up_delay_s": 0,
                    "scale_down_delay_s": 2,
                },
            }
        ],
        "router": plan.router.model_dump(mode="json"),
    }
    return plan_mod.compile_data(data, origin="<demo motion fleet>")


@dataclass
class Sample:
    """One row of the timeline."""

    t_s: float
    clients: int
    in_flight: int
    ready: dict[str, int]
    served: dict[str, int]
    errors: int
    ttft_p50_s: float | None
    note: str = ""
    full: int = 0
    """429s: every replica at its request limit (the client tries again 0.1 s later)."""


@dataclass
class MotionResult:
    samples: list[Sample] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    peak_ready: dict[str, int] = field(default_factory=dict)
    router_killed_at_s: float | None = None
    first_ok_after_kill_s: float | None = None
    cut_by_kill: int = 0
    ok_after_kill: int = 0
    requests: int = 0
    errors: int = 0
    full: int = 0


@dataclass
class _Req:
    start: float
    end: float
    ok: bool
    ttft_s: float | None
    pool: str
    status: int = 0


RAMP_S = (8.0, 13.0, 17.0)
"""The load shape: ramp up until the first, hold until the second, fall until the third, then low."""


def _clients_at(t: float, peak: int, low: int) -> int:
    """Clients at `t` seconds on the `RAMP_S` shape."""
    up, hold, down = RAMP_S
    if t < up:
        return round(low + (peak - low) * t / up)
    if t < hold:
        return peak
    if t < down:
        return round(peak - (peak - low) * (t - hold) / (down - hold))
    return low


def _scale_note(events: list[str]) -> str:
    """The autoscaling changes among `events`, in order: `local-l40s 2->0, local-l4 4->2`."""
    out = []
    for e in events:
        m = re.match(r"autoscale \S+ on (\S+): (\d+) -> (\d+)", e)
        if m:
            out.append(f"{m.group(1)} {m.group(2)}->{m.group(3)}")
    return ", ".join(out)


async def _traffic(
    endpoint: str,
    model: str,
    pool_of: dict[str, str],
    t0: float,
    duration_s: float,
    peak: int,
    low: int,
    out: list[_Req],
    max_tokens: int,
) -> None:
    limits = httpx.Limits(max_connections=peak + 4, max_keepalive_connections=peak + 4)
    async with httpx.AsyncClient(timeout=30.0, limits=limits, trust_env=False) as client:

        async def worker(i: int) -> None:
            n = 0
            while (t := time.monotonic() - t0) < duration_s:
                if i >= _clients_at(t, peak, low):
                    await asyncio.sleep(0.1)
                    continue
                n += 1
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"client {i} request {n}: " + "tell me more. " * 40}],
                    "max_tokens": max_tokens,
                    "stream": True,
                }
                start = time.monotonic()
                ttft, ok, pool, status = None, False, "", 0
                try:
                    async with client.stream("POST", endpoint + "/v1/chat/completions", json=body) as r:
                        status = r.status_code
                        pool = pool_of.get(r.headers.get("x-gpufleet-replica", ""), "")
                        async for line in r.aiter_lines():
                            if ttft is None and line.startswith("data: ") and '"content"' in line:
                                ttft = time.monotonic() - start
                            if line == "data: [DONE]":
                                ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                out.append(_Req(start - t0, time.monotonic() - t0, ok, ttft, pool, status))
                if not ok:
                    await asyncio.sleep(0.1)  # a client that failed tries again, not in a tight loop

        await asyncio.gather(*(worker(i) for i in range(peak)))


def run_motion(
    plan: Plan, rt_factory: Any, show: Any, *, peak_clients: int = 36, low_clients: int = 3, duration_s: float = 26.0
) -> MotionResult:
    """Run the phase on `rt_factory(plan) -> started LocalRuntime` (autoscaling on); `show` prints."""
    mplan = motion_plan(plan)
    dep = mplan.deployments[0]
    top, nxt = dep.failover[0], dep.failover[1]
    # about 2 s of decoding per request on the top pool: a client holds a slot long enough to count
    decode = next(p.decode_tokens_per_s for p in dep.pools if p.pool == top)
    max_tokens = max(8, min(64, round(decode * 2)))
    rt: LocalRuntime = rt_factory(mplan)
    result = MotionResult()
    try:
        reqs: list[_Req] = []
        pool_of: dict[str, str] = {}
        t0 = time.monotonic()
        traffic = threading.Thread(
            target=lambda: asyncio.run(
                _traffic(rt.endpoint, dep.model, pool_of, t0, duration_s, peak_clients, low_clients, reqs, max_tokens)
            ),
            daemon=True,
        )
        traffic.start()
        kill_at = duration_s - 5.0  # after the fall and the scale-down; 5 s to show requests resume
        last_sample, seen, seen_events = 0.0, 0, len(rt.events)
        while traffic.is_alive():
            for r in rt.replicas:
                pool_of[r.id] = r.pool
            rt.check()
            now = time.monotonic() - t0
            note = ""
            if result.router_killed_at_s is None and now >= kill_at and rt.router_proc is not None:
                os.kill(rt.router_proc.pid, signal.SIGKILL)
                result.router_killed_at_s = now
                note = "router SIGKILLed"
            if now - last_sample >= 2.0 or note:
                last_sample = now
                scaled = _scale_note(rt.events[seen_events:])
                seen_events = len(rt.events)
                note = ", ".join(x for x in (scaled, note) if x)
                done = reqs[seen:]
                seen += len(done)
                try:
                    in_flight = sum(int(row["in_flight"]) for row in rt.router_rows())
                except (httpx.HTTPError, KeyError, ValueError, json.JSONDecodeError):
                    in_flight = -1
                ready = {p: 0 for p in (top, nxt)}
                for r in rt.replicas:
                    if r.role == "active" and r.state == "active" and not r.fresh:
                        ready[r.pool] = ready.get(r.pool, 0) + 1
                served = {p: sum(1 for q in done if q.ok and q.pool == p) for p in (top, nxt)}
                ttfts = [q.ttft_s for q in done if q.ok and q.ttft_s is not None]
                result.samples.append(
                    Sample(
                        round(now, 1),
                        _clients_at(now, peak_clients, low_clients),
                        in_flight,
                        ready,
                        served,
                        sum(1 for q in done if not q.ok and q.status != 429),
                        stats.percentile(ttfts, 50) if ttfts else None,
                        note,
                        sum(1 for q in done if q.status == 429),
                    )
                )
            time.sleep(0.25)
        traffic.join()
        result.events = [
            e for e in rt.events if e.startswith(("autoscale", "promoted", "starting", "retiring", "router", "replica"))
        ]
        result.requests = len(reqs)
        result.errors = sum(1 for q in reqs if not q.ok and q.status != 429)
        result.full = sum(1 for q in reqs if q.status == 429)
        for s in result.samples:
            for p, n in s.ready.items():
                result.peak_ready[p] = max(result.peak_ready.get(p, 0), n)
        k = result.router_killed_at_s
        if k is not None:
            result.cut_by_kill = sum(1 for q in reqs if not q.ok and q.start <= k <= q.end + 0.5)
            after = [q for q in reqs if q.start > k]
            result.ok_after_kill = sum(1 for q in after if q.ok)
            firsts = [q.start for q in after if q.ok]  # the first request sent after the kill that succeeded
            result.first_ok_after_kill_s = round(min(firsts) - k, 2) if firsts else None
    finally:
        rt.stop()
    show(timeline_table(result, top, nxt, dep.name))
    if result.router_killed_at_s is not None:
        show(
            f"router SIGKILLed at {result.router_killed_at_s:.0f}s: {result.cut_by_kill} request(s) cut; requests "
            f"resumed {result.first_ok_after_kill_s if result.first_ok_after_kill_s is not None else '-'}s after "
            f"(the hot spare took over on the same port); {result.ok_after_kill} succeeded after it"
        )
    show(
        f"motion: {result.requests} requests, {result.full} answered 429 while new replicas started (tried again), "
        f"{result.errors} other errors; peak ready replicas "
        + ", ".join(f"{p} {n}" for p, n in result.peak_ready.items())
    )
    return result


def timeline_table(result: MotionResult, top: str, nxt: str, deployment: str) -> Table:
    """The timeline: load, in flight, ready replicas and requests served per pool, TTFT, errors."""
    t = Table(
        title=f"motion: {deployment} autoscaling from its top pool {top} into {nxt} (in flight target 4 per "
        "replica); served: requests finished since the previous row; last column: the autoscaler's changes "
        "(lowest priority first on the way down) and the router kill",
        title_justify="left",
    )
    for col in (
        "t",
        "clients",
        "in flight",
        f"ready {top}",
        f"ready {nxt}",
        f"served {top}",
        f"served {nxt}",
        "TTFT p50",
        "429",
        "errors",
        "",
    ):
        t.add_column(col, justify="right" if col not in ("",) else "left")
    for s in result.samples:
        t.add_row(
            f"{s.t_s:.0f}s",
            str(s.clients),
            "-" if s.in_flight < 0 else str(s.in_flight),
            str(s.ready.get(top, 0)),
            str(s.ready.get(nxt, 0)),
            str(s.served.get(top, 0)),
            str(s.served.get(nxt, 0)),
            "-" if s.ttft_p50_s is None else f"{s.ttft_p50_s * 1000:.0f} ms",
            str(s.full),
            str(s.errors),
            s.note,
        )
    return t


def plot(result: MotionResult, path: str) -> None:
    """The timeline as a PNG: clients and ready replicas per pool, requests served per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s.t_s for s in result.samples]
    pools = list(result.peak_ready)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    ax1.plot(xs, [s.clients for s in result.samples], "k--", label="clients")
    for p in pools:
        ax1.step(xs, [s.ready.get(p, 0) * 4 for s in result.samples], where="post", label=f"ready {p} x4")
        ax2.plot(xs, [s.served.get(p, 0) for s in result.samples], label=f"served by {p}")
    if result.router_killed_at_s is not None:
        for ax in (ax1, ax2):
            ax.axvline(result.router_killed_at_s, color="red", lw=0.8)
        ax2.text(result.router_killed_at_s, 0, " router killed", color="red", fontsize=8)
    ax1.set_ylabel("clients / replica slots")
    ax2.set_ylabel("requests per sample")
    ax2.set_xlabel("seconds")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
