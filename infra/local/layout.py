"""The layout of the local fleet: which replica processes the plan asks for, and their roles.

Every planned replica becomes an active process; every warm node of a pool without an
`engine_command` holds standby replicas (one per replica slot of the node) for the deployments
that may use the pool, cycling over them in declaration order.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPerf

__all__ = ["LocalReplica", "layout", "pool_perf"]


@dataclass
class LocalReplica:
    """One replica process of the local fleet."""

    id: str
    deployment: str
    model: str
    pool: str
    priority: int
    role: Literal["active", "warm"]
    kind: Literal["sim", "engine"]
    port: int = 0
    url: str = ""
    kv_events_port: int = 0
    """Its KV-event PUB port in precise mode (0: none yet; kept across restarts, as `port` is)."""
    kv_replay_port: int = 0
    """Its KV-event replay port in precise mode (0: none)."""
    state: Literal["starting", "active", "warm", "dead", "retiring", "stopped"] = "starting"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    promoted_at: float | None = None
    gpus: str | None = None
    """CUDA_VISIBLE_DEVICES of an engine replica (kept across restarts)."""
    started_at: float = 0.0
    ready_by: float | None = None
    """While (re)starting: when it must be ready, else it counts as a failed start."""
    restart_at: float | None = None
    """While dead: when the supervisor starts it again (backoff)."""
    backoff_s: float = 0.0
    exits: list[tuple[float, int]] = field(default_factory=list, repr=False)
    """(time, exit code) of its recent exits: a crash loop is several in a short time."""
    fresh: bool = False
    """Added at run time (autoscaling) and not ready yet: not in the router's membership."""
    unready_since: float | None = None
    """Asked for and not ready since then (new, or dead): how long a slot has been Pending."""
    retire_by: float | None = None
    """While retiring (out of the router, finishing its requests): when it is stopped regardless."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Its process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None


def pool_perf(dep: DeploymentPlan, pool: str) -> PoolPerf:
    """The plan's performance estimate of `dep` on `pool`."""
    for p in dep.pools:
        if p.pool == pool:
            return p
    raise KeyError(f"{dep.name} has no performance estimate for pool {pool}")


def layout(plan: Plan) -> list[LocalReplica]:
    """The replicas the plan asks for, plus a standby replica per warm slot of each pool."""
    out: list[LocalReplica] = []
    engine_pools = {p.name for p in plan.pools if p.engine_command}
    for dep in plan.deployments:
        for r in dep.replicas:
            kind: Literal["sim", "engine"] = "engine" if r.pool in engine_pools else "sim"
            out.append(LocalReplica(r.id, dep.name, dep.model, r.pool, r.priority, "active", kind))
    for pool in plan.pools:
        if not pool.warm_nodes or pool.engine_command:
            continue
        users = [d for d in plan.deployments if pool.name in d.failover]
        if not users:
            continue
        k = 0
        for node in range(pool.warm_nodes):
            dep = users[node % len(users)]
            per_node = pool_perf(dep, pool.name).replicas_per_node
            for _ in range(max(1, per_node)):
                rid = f"{dep.name}-{pool.name}-warm{k}"
                out.append(LocalReplica(rid, dep.name, dep.model, pool.name, pool.priority, "warm", "sim"))
                k += 1
    return out
