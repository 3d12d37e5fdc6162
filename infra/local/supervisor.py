"""Supervision of the local runtime: health of the replica processes, promotion of warm standbys.

A round of `Supervisor.check` marks a replica whose process exited as dead; a deployment left
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
from typing import TYPE_CHECKING, cast

import httpx

if TYPE_CHECKING:
    from gpufleet.infra.local.layout import LocalReplica
    from gpufleet.infra.local.runtime import LocalRuntime

__all__ = ["Supervisor"]


class Supervisor:
    """Keeps a running `LocalRuntime`'s deployments at strength by promoting its standbys."""

    def __init__(self, runtime: LocalRuntime, *, waiting_per_replica: float, utilization: float) -> None:
        self.rt = runtime
        self.waiting_per_replica = waiting_per_replica
        self.utilization = utilization

    def promote(self, deployment: str, reason: str) -> LocalReplica | None:
        """Promote the first live standby of `deployment`, in its failover order."""
        rt = self.rt
        with rt.lock:
            order = {p: i for i, p in enumerate(rt.plan.deployment(deployment).failover)}
            standby = sorted(
                (r for r in rt.replicas if r.deployment == deployment and r.state == "warm"),
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
            cap = sum(int(cast(int, row["max_concurrent_requests"])) for row in rows)
            return sum(int(cast(int, row["in_flight"])) for row in rows) / cap if cap else 0.0
        return 0.0

    def check(self, load: bool = True) -> list[str]:
        """One supervision round: mark dead replicas, promote standbys where a deployment is short.

        Returns the events of this round. `load` also polls replica queues for load-based growth.
        """
        rt = self.rt
        before = len(rt.events)
        with rt.lock:
            if rt.stopped:
                return []
            for rep in rt.replicas:
                if rep.proc is not None and rep.state in ("active", "warm", "starting") and rep.proc.poll() is not None:
                    rep.state = "dead"
                    rt.emit(f"replica {rep.id} (pool {rep.pool}) exited with code {rep.proc.returncode}")
            if rt.router_proc is not None and rt.router_proc.poll() is not None:
                rt.emit(f"router exited with code {rt.router_proc.returncode}")
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
        return rt.events[before:]
