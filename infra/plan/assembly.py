"""Stage 4 of the plan: the pool and deployment records, and the warnings, from the placement.

A pool's baseline node count is the larger of `min_nodes` and the nodes the placement opened;
its warm nodes sit on top of that, within `max_nodes`. A deployment's capacity counts the
replicas that still fit its pools at `max_nodes` after every deployment's baseline.

Per-pool performance estimates from first principles (docs/plan.md):
- prefill tokens/s per replica = GPUs x dense bf16 FLOP/s x PREFILL_MFU / (2 x params).
- decode tokens/s of one sequence = GPUs x memory bandwidth x DECODE_BW_EFFICIENCY / weights.
"""

from __future__ import annotations

from gpufleet.infra import names, spec
from gpufleet.infra.plan.cost import usd
from gpufleet.infra.plan.model import DeploymentPlan, PlanWarning, PoolPerf, PoolPlan, ReplicaPlan
from gpufleet.infra.plan.placement import DeploymentFit, Packing
from gpufleet.infra.plan.pools import PoolMachine, pool_region
from gpufleet.infra.plan.resources import cpu_short, engine_resources
from gpufleet.infra.plan.tiers import tier_plan

__all__ = ["DECODE_BW_EFFICIENCY", "PREFILL_MFU", "deployment_plans", "pool_plans"]

PREFILL_MFU = 0.4
DECODE_BW_EFFICIENCY = 0.6


def _pool_warnings(pool: spec.Nodepool, opened: int, baseline: int, warm: int) -> list[PlanWarning]:
    out: list[PlanWarning] = []

    def warn(code: str, message: str) -> None:
        out.append(PlanWarning(code=code, subject=pool.name, message=message))

    if opened > pool.min_nodes:
        warn(
            "min_nodes_raised",
            f"baseline placement needs {opened} nodes, above min_nodes {pool.min_nodes}; the plan counts {opened}",
        )
    if warm < pool.warm_nodes:
        warn(
            "warm_reduced",
            f"only {warm} of {pool.warm_nodes} warm nodes fit under max_nodes {pool.max_nodes} above {baseline} baseline nodes",
        )
    if pool.capacity_type == "spot" and pool.warm_nodes:
        warn("warm_on_spot", "warm nodes on spot capacity can be reclaimed when they are needed most")
    if pool.cloud in ("aws", "gcp") and len(pool.zones) == 1:
        warn(
            "single_zone",
            f"all nodes in one zone ({pool.zones[0]}): a zonal outage or stock-out takes the whole pool",
        )
    return out


def pool_plans(
    fleet: spec.Fleet, machines: dict[str, PoolMachine], fits: list[DeploymentFit], packing: Packing
) -> tuple[list[PoolPlan], list[PlanWarning]]:
    """Every pool's record, and the pools' warnings."""
    pools: list[PoolPlan] = []
    warnings: list[PlanWarning] = []
    for pool in fleet.nodepools:
        machine = machines[pool.name]
        packed = packing.pools[pool.name]
        price = machine.usd_per_node_hour
        baseline = max(pool.min_nodes, packed.opened_nodes)
        warm = min(pool.warm_nodes, pool.max_nodes - baseline)
        warnings += _pool_warnings(pool, packed.opened_nodes, baseline, warm)
        gpu_kv = cpu_kv = disk_kv = 0
        tier_usd = peak_tier_usd = 0.0
        for fit in fits:
            if pool.name not in fit.failover:
                continue
            tiers = tier_plan(fit.spec, fit.model, machine)
            n = sum(p.replicas for p in packing.placements[fit.spec.name] if p.pool == pool.name)
            gpu_kv += n * fit.kv_tokens[pool.name]
            if tiers is not None:
                cpu_kv += n * tiers.cpu_kv_tokens
                disk_kv += n * tiers.disk_kv_tokens
                tier_usd += n * tiers.usd_per_hour
                per_node = machine.gpus_per_node // fit.spec.gpus_per_replica
                peak_tier_usd = max(peak_tier_usd, pool.max_nodes * per_node * tiers.usd_per_hour)
        pools.append(
            PoolPlan(
                name=pool.name,
                cloud=pool.cloud,
                region=pool_region(fleet, pool),
                zones=list(pool.zones),
                instance_type=pool.instance_type,
                gpu=machine.gpu_name,
                gpu_memory_gib=machine.gpu.memory_gib,
                gpus_per_node=machine.gpus_per_node,
                capacity_type=pool.capacity_type,
                priority=pool.priority,
                min_nodes=pool.min_nodes,
                baseline_nodes=baseline,
                warm_nodes=warm,
                max_nodes=pool.max_nodes,
                usd_per_node_hour=usd(price),
                price_source=machine.price_source,
                labels=dict(pool.labels),
                taints=list(pool.taints),
                engine_command=pool.engine_command,
                gpus_used_baseline=packed.gpus_used,
                gpu_kv_tokens_baseline=gpu_kv,
                cpu_kv_tokens_baseline=cpu_kv,
                disk_kv_tokens_baseline=disk_kv,
                kv_tier_usd_per_hour=usd(tier_usd),
                baseline_usd_per_hour=usd(baseline * price + tier_usd),
                warm_usd_per_hour=usd(warm * price),
                peak_usd_per_hour=usd(pool.max_nodes * price + max(tier_usd, peak_tier_usd)),
            )
        )
    used = {name for fit in fits for name in fit.failover}
    for pool in fleet.nodepools:
        if pool.name not in used:
            warnings.append(
                PlanWarning(code="pool_unused", subject=pool.name, message="no deployment can use this pool")
            )
    return pools, warnings


def _perf(fit: DeploymentFit, pool: spec.Nodepool, machine: PoolMachine) -> PoolPerf:
    dep, model, gpu = fit.spec, fit.model, machine.gpu
    prefill = dep.gpus_per_replica * gpu.bf16_tflops * 1e12 * PREFILL_MFU / (2 * model.params_b * 1e9)
    decode = dep.gpus_per_replica * gpu.memory_bandwidth_gbps * 1e9 * DECODE_BW_EFFICIENCY / model.weight_bytes
    return PoolPerf(
        pool=pool.name,
        priority=pool.priority,
        replicas_per_node=machine.gpus_per_node // dep.gpus_per_replica,
        kv_cache_tokens_per_replica=fit.kv_tokens[pool.name],
        prefill_tokens_per_s=round(prefill, 1),
        decode_tokens_per_s=round(decode, 2),
        kv_tiers=tier_plan(dep, model, machine),
        resources=engine_resources(dep, machine),
    )


def _deployment_warnings(
    fit: DeploymentFit, spots: list[bool], rows: list[tuple[str, int]], lost: int, capacity: int
) -> list[PlanWarning]:
    dep, top = fit.spec, fit.failover[0]
    out: list[PlanWarning] = []

    def warn(code: str, message: str) -> None:
        out.append(PlanWarning(code=code, subject=dep.name, message=message))

    if len(fit.failover) == 1:
        warn("no_failover", f"only pool {top} can serve it: no failover")
    if all(spots):
        warn("spot_only", "every pool it may use is spot capacity")
    if rows and rows[0][0] != top:
        warn("baseline_spills", f"no baseline replica fits its preferred pool {top}")
    elif len(rows) > 1:
        warn(
            "baseline_spills",
            f"{sum(c for _, c in rows[1:])} of {dep.min_replicas} baseline {'replica' if dep.min_replicas == 1 else 'replicas'} spill past pool {top}",
        )
    if lost < dep.min_replicas and len(fit.failover) > 1:
        warn(
            "failover_short",
            f"if pool {top} is lost, only {lost} of {dep.min_replicas} {'replica' if dep.min_replicas == 1 else 'replicas'} fit the other pools",
        )
    if capacity < dep.max_replicas:
        warn("max_replicas_unreachable", f"max_replicas {dep.max_replicas} but its pools hold {capacity} at max_nodes")
    return out


def deployment_plans(
    fleet: spec.Fleet, machines: dict[str, PoolMachine], fits: list[DeploymentFit], packing: Packing
) -> tuple[list[DeploymentPlan], list[PlanWarning]]:
    """Every placed deployment's record (replicas, failover capacity, perf), and its warnings."""
    by_name = {p.name: p for p in fleet.nodepools}
    deployments: list[DeploymentPlan] = []
    warnings: list[PlanWarning] = []
    for fit in fits:
        dep, usable = fit.spec, fit.failover
        placement = packing.placements[dep.name]
        rows = [(p.pool, p.replicas) for p in placement]
        own = dict(rows)
        free = {n: packing.pools[n].fit(dep.gpus_per_replica) for n in usable}
        capacity = sum(own.get(n, 0) + free[n] for n in usable)
        lost = min(dep.max_replicas, sum(own.get(n, 0) + free[n] for n in usable[1:]))
        replicas = [
            ReplicaPlan(
                id=names.replica_id(dep.name, n, k), deployment=dep.name, pool=n, priority=by_name[n].priority, index=k
            )
            for n, count in rows
            for k in range(count)
        ]
        spots = [by_name[n].capacity_type == "spot" for n in usable]
        warnings += _deployment_warnings(fit, spots, rows, lost, capacity)
        for n in usable:
            short = cpu_short(dep, n, machines[n]) if by_name[n].cloud != "local" else None
            if short is not None:
                warnings.append(PlanWarning(code="engine_cpu_short", subject=dep.name, message=short))
        deployments.append(
            DeploymentPlan(
                name=dep.name,
                model=dep.model,
                engine=dep.engine,
                image=dep.resolved_image,
                gpus_per_replica=dep.gpus_per_replica,
                min_replicas=dep.min_replicas,
                max_replicas=dep.max_replicas,
                max_model_len=fit.max_model_len,
                max_concurrent_requests=dep.max_concurrent_requests,
                gpu_memory_utilization=dep.gpu_memory_utilization,
                port=dep.port,
                engine_args=list(dep.engine_args),
                weight_bytes=fit.model.weight_bytes,
                kv_bytes_per_token=fit.model.kv_bytes_per_token,
                kv_offload=dep.kv_offload,
                failover=usable,
                placement=placement,
                kv_cache_tokens_per_replica=fit.kv_tokens[usable[0]],
                pools=[_perf(fit, by_name[n], machines[n]) for n in usable],
                replicas=replicas,
                capacity_replicas=min(capacity, dep.max_replicas),
                replicas_if_top_pool_lost=lost,
                autoscaling=dep.resolved_autoscaling,
                autoscaling_default=dep.autoscaling is None and dep.resolved_autoscaling is not None,
            )
        )
    return deployments, warnings
