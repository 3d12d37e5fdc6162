"""The simulated fleet of one deployment, read from a compiled Plan (never from fleet.yaml directly).

Each replica of the deployment's baseline placement becomes one kvmodel engine with the KV
capacity and prefill/decode rates the plan gives for its pool, and one `ReplicaState` carrying the
pool, priority, KV capacity and concurrency limit the live router would get from its config.
Prices per GPU-second come from the pool's node price over its GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpufleet.router import kvmodel
from gpufleet.router.config import RouterSettings
from gpufleet.router.types import ReplicaState
from gpufleet.router.workloads.types import MODEL

__all__ = ["ReplicaSpec", "SimFleet", "fleet_from_file", "fleet_from_plan", "uniform_fleet"]


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica: engine shape, routing identity and price."""

    id: str
    pool: str
    priority: int
    engine: kvmodel.EngineParams
    max_concurrent_requests: int
    gpus: int = 1
    usd_per_gpu_hour: float = 0.0

    def state(self) -> ReplicaState:
        """A fresh router-side view of this replica."""
        return ReplicaState(
            id=self.id,
            model=MODEL,
            pool=self.pool,
            priority=self.priority,
            kv_capacity_tokens=self.engine.kv_capacity_tokens,
            max_model_len=self.engine.max_model_len,
            max_concurrent_requests=self.max_concurrent_requests,
            prefill_tokens_per_s=self.engine.prefill_tokens_per_s,
            decode_tokens_per_s=self.engine.decode_tokens_per_s,
            step_tokens=self.engine.max_batched_tokens,
            cpu_kv_capacity_tokens=self.engine.cpu_capacity_tokens,
            cpu_load_tokens_per_s=self.engine.cpu_load_tokens_per_s,
        )


@dataclass(frozen=True)
class SimFleet:
    """The replicas of one deployment plus the router settings they are routed with."""

    name: str
    replicas: tuple[ReplicaSpec, ...]
    settings: RouterSettings = field(default_factory=RouterSettings)

    @property
    def prefill_capacity_tokens_per_s(self) -> float:
        """Prompt tokens per second the whole fleet can prefill (the denominator of load)."""
        return sum(r.engine.prefill_tokens_per_s for r in self.replicas)

    @property
    def usd_per_hour(self) -> float:
        return sum(r.gpus * r.usd_per_gpu_hour for r in self.replicas)

    def with_kv_tiers(
        self,
        cpu_capacity_tokens: int,
        cpu_load_tokens_per_s: float,
        disk_capacity_tokens: int = 0,
        disk_load_tokens_per_s: float = 0.0,
    ) -> SimFleet:
        """The same fleet with (or, given 0, without) lower KV tiers on every replica."""
        reps = tuple(
            replace(
                r,
                engine=replace(
                    r.engine,
                    cpu_capacity_tokens=cpu_capacity_tokens,
                    cpu_load_tokens_per_s=cpu_load_tokens_per_s if cpu_capacity_tokens else 0.0,
                    disk_capacity_tokens=disk_capacity_tokens,
                    disk_load_tokens_per_s=disk_load_tokens_per_s if disk_capacity_tokens else 0.0,
                ),
            )
            for r in self.replicas
        )
        return SimFleet(self.name, reps, self.settings)

    def with_replicas(self, n: int) -> SimFleet:
        """The same fleet resized to `n` replicas (copies of the first pool's replica shape)."""
        if n < 1:
            raise ValueError("a fleet needs at least one replica")
        base = self.replicas[0]
        reps = tuple(
            self.replicas[i] if i < len(self.replicas) else replace(base, id=f"{base.id.rsplit('-', 1)[0]}-x{i}")
            for i in range(n)
        )
        return SimFleet(self.name, reps, self.settings)


def fleet_from_plan(plan: Any, deployment: str, *, replicas: int | None = None, max_running: int = 64) -> SimFleet:
    """Replicas of `deployment` as the plan places them (or `replicas` copies of its top pool)."""
    try:
        dep = plan.deployment(deployment)
    except KeyError:
        names = ", ".join(d.name for d in plan.deployments) or "none"
        raise ValueError(f"deployment {deployment!r} is not in fleet {plan.fleet!r}; it has: {names}") from None
    settings: RouterSettings = plan.router
    perf = {p.pool: p for p in dep.pools}
    specs: list[ReplicaSpec] = []
    for rp in dep.replicas:
        pp = perf[rp.pool]
        pool = plan.pool(rp.pool)
        engine = kvmodel.EngineParams(
            kv_capacity_tokens=pp.kv_cache_tokens_per_replica,
            prefill_tokens_per_s=pp.prefill_tokens_per_s,
            decode_tokens_per_s=pp.decode_tokens_per_s,
            block_size_tokens=settings.block_size_tokens,
            max_running=min(max_running, dep.max_concurrent_requests),
            max_model_len=dep.max_model_len,
        )
        tiers = pp.kv_tiers
        if tiers is not None:
            engine = replace(
                engine,
                cpu_capacity_tokens=tiers.cpu_kv_tokens,
                cpu_load_tokens_per_s=tiers.cpu_hit_tokens_per_s,
                disk_capacity_tokens=tiers.disk_kv_tokens,
                disk_load_tokens_per_s=tiers.disk_hit_tokens_per_s if tiers.disk_kv_tokens else 0.0,
                tier_load_latency_s=tiers.load_latency_s,
            )
        specs.append(
            ReplicaSpec(
                id=rp.id,
                pool=rp.pool,
                priority=rp.priority,
                engine=engine,
                max_concurrent_requests=dep.max_concurrent_requests,
                gpus=dep.gpus_per_replica,
                usd_per_gpu_hour=pool.usd_per_node_hour / max(1, pool.gpus_per_node),
            )
        )
    if not specs:
        raise ValueError(f"deployment {deployment!r} has no replicas in the plan")
    fleet = SimFleet(f"{plan.fleet}/{deployment}", tuple(specs), settings)
    return fleet.with_replicas(replicas) if replicas else fleet


def fleet_from_file(path: str | Path, deployment: str, *, replicas: int | None = None) -> SimFleet:
    """Compile a fleet file and take one deployment's replicas."""
    from gpufleet.infra import plan as plan_mod

    return fleet_from_plan(plan_mod.compile_file(str(path)), deployment, replicas=replicas)


def uniform_fleet(
    n: int,
    *,
    kv_capacity_tokens: int = 200_000,
    prefill_tokens_per_s: float = 20_000.0,
    decode_tokens_per_s: float = 100.0,
    max_concurrent_requests: int = 256,
    max_model_len: int = 131_072,
    usd_per_gpu_hour: float = 4.0,
    settings: RouterSettings | None = None,
) -> SimFleet:
    """`n` identical replicas in one pool (tests and quick experiments without a fleet file)."""
    s = settings or RouterSettings()
    engine = kvmodel.EngineParams(
        kv_capacity_tokens=kv_capacity_tokens,
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_tokens_per_s=decode_tokens_per_s,
        block_size_tokens=s.block_size_tokens,
        max_model_len=max_model_len,
    )
    reps = tuple(ReplicaSpec(f"r{i}", "sim", 0, engine, max_concurrent_requests, 1, usd_per_gpu_hour) for i in range(n))
    return SimFleet("uniform", reps, s)
