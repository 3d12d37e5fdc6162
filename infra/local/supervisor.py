"""Supervision of the local runtime: restarts of dead replicas, promotion of warm standbys.

A round of `Supervisor.check` marks a replica whose process exited as dead and schedules its
restart on the same port (so the router's config stays right) after a backoff: 0.5 s, doubling
up to 30 s, back to 0.5 s once it has run 60 s; three exits within that minute are reported as a
crash loop, with the last lines of its log. A replica that does not become ready within its
start timeout is killed and counts as an exit. A replica of a pool that is down
(`LocalRuntime.kill_pool`, the demo's pool failure) is not restarted: its machines are gone.
A deployment with fewer live replicas than `min_replicas` is reported when it falls below and
when it is back. A deployment left
with fewer live replicas than `min_replicas` (a replica died, or its whole top pool failed) gets
standby replicas promoted at once, in failover order. A deployment whose replicas queue more than
`waiting_per_replica` requests each (vLLM's `vllm:num_requests_waiting`), or whose request slots
are `utilization` full by the router's in-flight count, grows by one promoted standby per round,
up to `max_replicas`. Promotion is one admin call (`POST /admin/promote`): the replica turns
healthy and the router re-admits it at its next health check.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from gpufleet.infra.local.layout import LocalReplica
    from gpufleet.infra.local.runtime import LocalRuntime

__all__ = ["BACKOFF_INITIAL_S", "BACKOFF_MAX_S", "CRASH_LOOP_EXITS", "RESET_AFTER_S", "Supervisor"]

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
RESET_AFTER_S = 60.0
"""A replica that ran this long before exiting starts again with the initial backoff."""
CRASH_LOOP_EXITS = 3
"""Exits within RESET_AFTER_S that make a crash loop."""


class Supervisor:
    """Keeps a running `LocalRuntime`'s deployments at strength by promoting its standbys."""

    def __init__(self, runtime: LocalRuntime, *, waiting_per_replica: float, utilization: float) -> None:
        self.rt = runtime
        self.waiting_per_replica = waiting_per_replica
        self.utilization = utilization
        self.short_since: dict[str, float] = {}
        """Deployments below min_replicas, since when."""

    def promote(self, deployment: str, reason: str, pool: str | None = None) -> LocalReplica | None:
        """Promote the first live standby of `deployment` (of `pool` only, when given), in its failover order."""
        rt = self.rt
        with rt.lock:
            order = {p: i for i, p in enumerate(rt.plan.deployment(deployment).failover)}
            standby = sorted(
                (
                    r
                    for r in rt.replicas
                    if r.deployment == deployment and r.state == "warm" and (pool is None or r.pool == pool)
                ),
                key=lambda r: order.get(r.pool, len(order)),
            )
            for rep in standby:
                try:
                    resp = httpx.post(
                        rep.url + "/admin/promote",
                        headers={"Authorization": f"Bearer {rt.sim_admin_token}"},
                        timeout=2.0,
                        trust_env=False,
                    )
                    resp.raise_for_status()
                except httpx.HTTPError as exc:
                    rt.emit(f"could not promote {rep.id}: {exc}")
                    continue
                rep.state, rep.role, rep.promoted_at = "active", "active", time.monotonic()
                rt.emit(f"promoted warm replica {rep.id} (pool {rep.pool}) for {deployment}: {reason}")
                return rep
            return None

    @staticmethod
    def _waiting(reps: list[LocalReplica]) -> float:
        """Requests queued inside these replicas (`vllm:num_requests_waiting` on their /metrics)."""
        total = 0.0
        for rep in reps:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                text = httpx.get(rep.url + "/metrics", timeout=1.0, trust_env=False).text
                for line in text.splitlines():
                    if line.startswith("vllm:num_requests_waiting"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def _router_utilization(self, ids: set[str]) -> float:
        """In-flight requests over concurrency limits of these replicas, as the router counts them."""
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, TypeError):
            rows = [row for row in self.rt.router_rows() if row["id"] in ids]
            cap = sum(int(row["max_concurrent_requests"]) for row in rows)
            return sum(int(row["in_flight"]) for row in rows) / cap if cap else 0.0
        return 0.0

    def _died(self, rep: LocalReplica, code: int, now: float, how: str) -> None:
        """Mark `rep` dead and schedule its restart with backoff; report a crash loop. A replica of
        a pool that is down (`LocalRuntime.kill_pool`) is not restarted."""
        if now - rep.started_at >= RESET_AFTER_S:
            rep.backoff_s = 0.0
        rep.exits = [e for e in rep.exits if now - e[0] < RESET_AFTER_S] + [(now, code)]
        rep.backoff_s = BACKOFF_INITIAL_S if rep.backoff_s == 0 else min(BACKOFF_MAX_S, rep.backoff_s * 2)
        rep.state, rep.restart_at, rep.ready_by = "dead", now + rep.backoff_s, None
        if rep.role == "active" and rep.unready_since is None:
            rep.unready_since = now
        from gpufleet.infra.local import processes

        ran = now - rep.started_at
        msg = f"replica {rep.id} (pool {rep.pool}) {how} with code {code} after {ran:.1f}s"
        if rep.pool in self.rt.down_pools:
            rep.restart_at = None
            self.rt.emit(f"{msg}; not restarted: pool {rep.pool} is down")
            return
        if len(rep.exits) >= CRASH_LOOP_EXITS:
            msg += f"; crash loop: {len(rep.exits)} exits in {RESET_AFTER_S:.0f}s{processes.log_tail(rep.log_path, 3)}"
        self.rt.emit(f"{msg}; restarting in {rep.backoff_s:g}s")

    def _heal(self, now: float) -> bool:
        """Deaths, failed starts, restarts due, starts that became ready. True if a new replica
        became ready (it joins the router's membership)."""
        rt = self.rt
        joined = False
        for rep in list(rt.replicas):
            if rep.proc is None or rep.state == "stopped":
                continue
            code = rep.proc.poll()
            if rep.state in ("active", "warm", "starting") and code is not None:
                self._died(rep, code, now, "exited" if rep.state != "starting" else "exited while starting")
            elif rep.state == "starting" and rep.ready_by is not None:
                if rt.replica_ready(rep):
                    how = "ready" if rep.fresh else "restarted"
                    rt.emit(f"replica {rep.id} (pool {rep.pool}) {how} on {rep.url} ({rep.role})")
                    joined |= rep.fresh
                    rep.fresh, rep.unready_since = False, None
                elif now > rep.ready_by:
                    rt.stop_replica(rep, grace_s=1.0)
                    self._died(rep, rep.proc.returncode or -9, now, "did not become ready; killed")
            if rep.state == "dead" and rep.restart_at is not None and now >= rep.restart_at:
                rep.restart_at = None
                rep.state = "starting"
                rep.ready_by = now + rt.ready_timeout(rep)
                try:
                    rt.start_replica(rep)
                except Exception as exc:  # a start that cannot even spawn is an exit like any other
                    self._died(rep, -1, now, f"could not start ({exc})")
        return joined

    @staticmethod
    def _why_down(rep: LocalReplica, now: float) -> str:
        if rep.state == "starting":
            return "restarting"
        if rep.restart_at is None:
            return "dead (pool down)"
        return f"dead (restart in {max(0.0, rep.restart_at - now):.1f}s)"

    def _report_strength(self, now: float) -> None:
        """Say when a deployment falls below min_replicas (and why), and when it is back."""
        rt = self.rt
        for dep in rt.plan.deployments:
            mine = [r for r in rt.replicas if r.deployment == dep.name]
            live = [r for r in mine if r.state == "active" and r.running]
            if len(live) < dep.min_replicas and dep.name not in self.short_since:
                self.short_since[dep.name] = now
                down = [r for r in mine if r.role == "active" and r.state in ("dead", "starting")]
                why = ", ".join(f"{r.id} {self._why_down(r, now)}" for r in down)
                rt.emit(
                    f"{dep.name} runs below min_replicas: {len(live)} of {dep.min_replicas} live ({why or 'none started'})"
                )
            elif len(live) >= dep.min_replicas and dep.name in self.short_since:
                took = now - self.short_since.pop(dep.name)
                rt.emit(f"{dep.name} back at min_replicas: {len(live)} live after {took:.1f}s")

    def check(self, load: bool = True) -> list[str]:
        """One supervision round: restart dead replicas, promote standbys where a deployment is short.

        Returns the events of this round. `load` also polls replica queues for load-based growth.
        """
        rt = self.rt
        before = len(rt.events)
        with rt.lock:
            if rt.stopped or rt.draining:
                return []
            now = time.monotonic()
            joined = self._heal(now)
            self._report_strength(now)
            if rt.autoscaler is not None:  # the autoscaling decision replaces the promotions below
                rt.autoscaler.round()
                if joined:
                    rt.update_router_membership()
                self._report_strength(time.monotonic())
                return rt.events[before:]
            if joined:
                rt.update_router_membership()
            for dep in rt.plan.deployments:
                live = [r for r in rt.replicas if r.deployment == dep.name and r.state == "active"]
                short = dep.min_replicas - len(live)
                top = dep.failover[0] if dep.failover else None
                top_lost = (
                    bool(top)
                    and not any(r.pool == top for r in live)
                    and any(r.pool == top and r.state == "dead" for r in rt.replicas if r.deployment == dep.name)
                )
                for _ in range(max(0, short)):
                    why = f"pool {top} failed" if top_lost else f"{len(live)} of {dep.min_replicas} replicas live"
                    if self.promote(dep.name, why) is None:
                        break
                if (
                    load
                    and live
                    and len(live) < dep.max_replicas
                    and any(r.deployment == dep.name and r.state == "warm" for r in rt.replicas)
                ):
                    # Two signals: requests queued inside the replicas, and, since the router holds
                    # requests back at each replica's concurrency limit, the router's own in-flight count.
                    waiting = self._waiting([r for r in live if r.kind == "sim"])
                    busy = self._router_utilization({r.id for r in live}) if rt.router_url else 0.0
                    if waiting > self.waiting_per_replica * len(live):
                        self.promote(dep.name, f"{waiting:.0f} requests waiting on {len(live)} replicas")
                    elif busy >= self.utilization:
                        self.promote(dep.name, f"router has {busy:.0%} of its replicas' request slots in flight")
            self._report_strength(time.monotonic())
        return rt.events[before:]
