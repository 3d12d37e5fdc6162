"""The compiled plan: a pure function from a fleet declaration (and the catalog) to data.

Every backend reads the Plan: Pulumi components, Kubernetes manifests, the router config,
the local runtime, the controller and `gpufleet plan`. None of them recomputes placement.

Placement: deployments are placed in declaration order (earlier ones get first pick of the
preferred pools). A deployment's `min_replicas` fill its pools in failover order (priority,
highest first, then declaration order), first-fit on nodes, opening nodes up to a pool's
`max_nodes`. A pool's baseline node count is the larger of `min_nodes` and the nodes the
placement opened; its warm nodes sit on top of that, within `max_nodes`.

Estimates from first principles (documented in docs/plan.md):
- KV-cache tokens per replica = (GPUs x GPU memory x gpu_memory_utilization - weights)
  / KV bytes per token.
- prefill tokens/s per replica = GPUs x dense bf16 FLOP/s x PREFILL_MFU / (2 x params).
- decode tokens/s of one sequence = GPUs x memory bandwidth x DECODE_BW_EFFICIENCY / weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import names, spec

__all__ = [
    "HOURS_PER_MONTH",
    "PLAN_SCHEMA",
    "Cost",
    "DeploymentPlan",
    "Placement",
    "Plan",
    "PoolPerf",
    "PoolPlan",
    "ReplicaPlan",
    "Warning",
    "compile",
    "compile_file",
]

PLAN_SCHEMA = "gpufleet.plan/v1"
HOURS_PER_MONTH = 730
PREFILL_MFU = 0.4
DECODE_BW_EFFICIENCY = 0.6
DEFAULT_SPOT_FRACTION = 0.4  # of on-demand, when the catalog has no spot estimate


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Warning(_Data):
    code: str
    subject: str
    message: str


class PoolPlan(_Data):
    name: str
    cloud: Literal["aws", "gcp", "kubernetes", "local"]
    region: str | None
    zones: list[str]
    instance_type: str
    gpu: str
    gpu_memory_gib: float
    gpus_per_node: int
    capacity_type: Literal["on_demand", "spot"]
    priority: int
    min_nodes: int
    baseline_nodes: int = Field(description="max(min_nodes, nodes the baseline placement needs)")
    warm_nodes: int = Field(description="warm nodes held above baseline, within max_nodes")
    max_nodes: int
    usd_per_node_hour: float
    price_source: str
    labels: dict[str, str]
    taints: list[spec.Taint]
    engine_command: list[str] | None = None
    gpus_used_baseline: int
    baseline_usd_per_hour: float
    warm_usd_per_hour: float
    peak_usd_per_hour: float


class PoolPerf(_Data):
    """What one replica of a deployment gets on one pool's machines."""

    pool: str
    priority: int
    replicas_per_node: int
    kv_cache_tokens_per_replica: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class Placement(_Data):
    pool: str
    replicas: int
    kv_cache_tokens_per_replica: int


class ReplicaPlan(_Data):
    id: str
    deployment: str
    pool: str
    priority: int
    index: int


class DeploymentPlan(_Data):
    name: str
    model: str
    engine: Literal["vllm", "sglang"]
    image: str
    gpus_per_replica: int
    min_replicas: int
    max_replicas: int
    max_model_len: int
    max_concurrent_requests: int
    gpu_memory_utilization: float
    port: int
    engine_args: list[str]
    weight_bytes: int
    kv_bytes_per_token: int
    failover: list[str] = Field(description="pools in the order replicas and traffic use them")
    placement: list[Placement]
    kv_cache_tokens_per_replica: int = Field(description="in the first pool of the failover order")
    pools: list[PoolPerf]
    replicas: list[ReplicaPlan]
    capacity_replicas: int = Field(
        description="replicas that fit all its pools at max_nodes, after the others' baseline"
    )
    replicas_if_top_pool_lost: int


class Cost(_Data):
    baseline_usd_per_hour: float
    warm_usd_per_hour: float
    peak_usd_per_hour: float
    baseline_usd_per_month: float
    warm_usd_per_month: float
    peak_usd_per_month: float
    hours_per_month: int = HOURS_PER_MONTH


class Plan(_Data):
    schema_: Literal["gpufleet.plan/v1"] = Field(PLAN_SCHEMA, alias="schema")
    fleet: str
    namespace: str
    source: str
    catalog_as_of: str
    clouds: spec.Clouds
    router: Any = Field(description="the router settings (gpufleet.router.config.RouterSettings)")
    pools: list[PoolPlan]
    deployments: list[DeploymentPlan]
    cost: Cost
    warnings: list[Warning]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def pool(self, name: str) -> PoolPlan:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def deployment(self, name: str) -> DeploymentPlan:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_json_dict(self) -> dict[str, Any]:
        """Stable JSON form (`gpufleet plan --format json`)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Plan:
        from gpufleet.router.config import RouterSettings

        plan = cls.model_validate(data)
        return plan.model_copy(update={"router": RouterSettings.model_validate(plan.router)})


# ---------------------------------------------------------------------------------------


@dataclass
class _PoolState:
    """Mutable packing state of one pool while placing."""

    spec: spec.Nodepool
    index: int
    gpus_per_node: int
    free: list[int]  # free GPUs on each opened node

    def fit(self, gpus: int) -> int:
        per_node = self.gpus_per_node // gpus
        return sum(f // gpus for f in self.free) + (self.spec.max_nodes - len(self.free)) * per_node

    def place(self, gpus: int, want: int) -> int:
        placed = 0
        for n, f in enumerate(self.free):
            if placed == want:
                return placed
            k = min(f // gpus, want - placed)
            self.free[n] -= k * gpus
            placed += k
        per_node = self.gpus_per_node // gpus
        while placed < want and len(self.free) < self.spec.max_nodes and per_node:
            k = min(per_node, want - placed)
            self.free.append(self.gpus_per_node - k * gpus)
            placed += k
        return placed


def _round(x: float) -> float:
    return round(x, 4)


def compile_file(path: str, extra_catalogs: Iterable[str | Path] = ()) -> Plan:
    """Load, validate and compile a declaration file."""
    fleet, smap = spec.load_file(path)
    return compile(fleet, smap, catalog_mod.load([*fleet.catalog, *extra_catalogs]))


def compile(
    fleet: spec.Fleet,
    smap: spec.SourceMap | None = None,
    catalog: catalog_mod.Catalog | None = None,
) -> Plan:
    """Compile a validated fleet into a Plan, or raise `spec.FleetError` with every problem."""
    smap = smap or spec.SourceMap("<fleet>")
    catalog = catalog or catalog_mod.load(fleet.catalog)
    issues: list[spec.FleetIssue] = []
    warnings: list[Warning] = []

    # --- pools: machine facts and prices ------------------------------------------------
    facts: dict[str, tuple[str, catalog_mod.GpuModel | None, int, float, str]] = {}
    for i, pool in enumerate(fleet.nodepools):
        loc = ("nodepools", i)
        cloud_cfg = getattr(fleet.clouds, pool.cloud, None)
        region = pool.region or getattr(cloud_cfg, "region", None)
        machine = catalog.machine(pool.cloud, pool.instance_type)
        if machine is None and pool.cloud in ("aws", "gcp", "local"):
            known = catalog.machine_names(pool.cloud)
            close = [
                n for n in known if n.split(".")[0].split("-")[0] == pool.instance_type.split(".")[0].split("-")[0]
            ]
            hint = f"; known {pool.cloud} types like it: {', '.join(close[:8])}" if close else ""
            issues.append(
                smap.issue(
                    loc + ("instance_type",),
                    f"{pool.instance_type!r} is not in the {pool.cloud} catalog{hint} (add it with a user catalog file)",
                )
            )
            continue
        if (
            machine is not None
            and pool.cloud in ("aws", "gcp")
            and region
            and machine.regions
            and region not in machine.regions
        ):
            issues.append(
                smap.issue(
                    loc + ("region" if pool.region else "instance_type",),
                    f"{pool.instance_type} is not offered in {region}; offered in: {', '.join(machine.regions)}",
                )
            )
        gpu_name = pool.gpu or (machine.gpu if machine else None)
        gpus = pool.gpus_per_node or (machine.gpus if machine else None)
        if machine is not None and pool.gpus_per_node and pool.gpus_per_node != machine.gpus:
            issues.append(
                smap.issue(
                    loc + ("gpus_per_node",),
                    f"{pool.gpus_per_node} does not match {pool.instance_type}, which has {machine.gpus} GPUs",
                )
            )
        if gpu_name is None or gpus is None:
            issues.append(
                smap.issue(
                    loc + ("instance_type",),
                    f"{pool.instance_type!r} is not in the catalog: declare `gpu` and `gpus_per_node` for this pool",
                )
            )
            continue
        gpu = catalog.gpu(gpu_name)
        if gpu is None:
            issues.append(
                smap.issue(loc + ("gpu",), f"{gpu_name!r} is not a known GPU; known: {', '.join(sorted(catalog.gpus))}")
            )
            continue
        if pool.usd_per_node_hour is not None:
            price, source = pool.usd_per_node_hour, "declared"
        elif pool.cloud == "local":
            price, source = 0.0, "local"
        elif machine is None:
            price, source = 0.0, "unknown (existing cluster; declare usd_per_node_hour)"
        elif pool.capacity_type == "spot":
            if machine.spot_usd_per_hour is not None:
                price, source = machine.spot_usd_per_hour, f"catalog {machine.cloud} spot estimate"
            else:
                price, source = (
                    machine.usd_per_hour * DEFAULT_SPOT_FRACTION,
                    f"catalog {machine.cloud} on-demand x {DEFAULT_SPOT_FRACTION}",
                )
        else:
            price, source = machine.usd_per_hour, f"catalog {machine.cloud} on-demand"
        facts[pool.name] = (gpu_name, gpu, gpus, price, source)

    pool_index = {p.name: i for i, p in enumerate(fleet.nodepools)}
    states = {p.name: _PoolState(p, i, facts[p.name][2], []) for i, p in enumerate(fleet.nodepools) if p.name in facts}

    # --- deployments: fit checks, failover order, placement ------------------------------
    dep_rows: list[tuple[int, spec.Deployment, catalog_mod.ModelInfo, list[str], int, dict[str, int]]] = []
    for i, dep in enumerate(fleet.deployments):
        loc = ("deployments", i)
        model = catalog.model(dep.model)
        if model is None:
            issues.append(
                smap.issue(
                    loc + ("model",),
                    f"{dep.model!r} is not in the model catalog; known: {', '.join(sorted(catalog.models))} (add it with a user catalog file)",
                )
            )
            continue
        if dep.max_model_len is not None and dep.max_model_len > model.max_context:
            issues.append(
                smap.issue(
                    loc + ("max_model_len",),
                    f"{dep.max_model_len} exceeds {dep.model}'s context of {model.max_context} tokens",
                )
            )
        if dep.nodepools is not None:
            candidates = [p for p in dep.nodepools if p in pool_index]
            explicit = True
        else:
            candidates = [p.name for p in fleet.nodepools]
            explicit = False
        usable: list[str] = []
        kv: dict[str, int] = {}
        for name in candidates:
            if name not in facts:
                continue  # the pool's own error is reported already
            _, gpu, gpn, _, _ = facts[name]
            assert gpu is not None
            jloc = loc + (("nodepools", dep.nodepools.index(name)) if explicit and dep.nodepools else ("model",))
            if dep.gpus_per_replica > gpn:
                if explicit:
                    issues.append(
                        smap.issue(
                            loc + ("gpus_per_replica",),
                            f"{dep.gpus_per_replica} GPUs do not fit a node of pool {name!r}, which has {gpn}",
                        )
                    )
                continue
            usable_bytes = dep.gpus_per_replica * gpu.memory_bytes * dep.gpu_memory_utilization
            kv_tokens = int((usable_bytes - model.weight_bytes) // model.kv_bytes_per_token)
            if kv_tokens <= 0:
                if explicit:
                    issues.append(
                        smap.issue(
                            jloc,
                            f"{dep.model} weights ({model.weight_bytes / 1e9:.1f} GB) do not fit {dep.gpus_per_replica} x {facts[name][0]} "
                            f"({usable_bytes / 1e9:.1f} GB usable at gpu_memory_utilization {dep.gpu_memory_utilization}) in pool {name!r}",
                        )
                    )
                continue
            need = dep.max_model_len or 16
            if kv_tokens < need:
                if explicit:
                    issues.append(
                        smap.issue(
                            loc + ("max_model_len",),
                            f"{need} tokens do not fit the KV cache of a replica in pool {name!r} ({kv_tokens} tokens)",
                        )
                    )
                continue
            usable.append(name)
            kv[name] = kv_tokens
        if not usable:
            if not explicit:
                issues.append(
                    smap.issue(
                        loc + ("model",),
                        f"no declared pool can hold a replica of {dep.model} with {dep.gpus_per_replica} GPU(s)",
                    )
                )
            continue
        usable.sort(
            key=lambda n: (
                -fleet.nodepools[pool_index[n]].priority,
                pool_index[n] if explicit is False else dep.nodepools.index(n),
            )
        )  # type: ignore[union-attr]
        max_len = dep.max_model_len or min(model.max_context, min(kv.values()))
        dep_rows.append((i, dep, model, usable, max_len, kv))

    placements: dict[str, list[tuple[str, int]]] = {}
    for i, dep, _model, usable, _max_len, _kv in dep_rows:
        remaining = dep.min_replicas
        rows = []
        for name in usable:
            if remaining == 0:
                break
            got = states[name].place(dep.gpus_per_replica, remaining)
            if got:
                rows.append((name, got))
                remaining -= got
        if remaining:
            placed = dep.min_replicas - remaining
            issues.append(
                smap.issue(
                    ("deployments", i, "min_replicas"),
                    f"{dep.min_replicas} replicas do not fit: pools {', '.join(usable)} hold {placed} at their max_nodes "
                    f"(after the deployments declared before it); raise max_nodes or add a pool",
                )
            )
        placements[dep.name] = rows

    if issues:
        raise spec.FleetError(sorted(issues, key=lambda x: (x.line or 0, x.field)))

    # --- pools: node counts and cost ---------------------------------------------------------
    pools: list[PoolPlan] = []
    for pool in fleet.nodepools:
        gpu_name, gpu, gpn, price, source = facts[pool.name]
        assert gpu is not None
        st = states[pool.name]
        opened = len(st.free)
        baseline = max(pool.min_nodes, opened)
        warm = min(pool.warm_nodes, pool.max_nodes - baseline)
        if opened > pool.min_nodes:
            warnings.append(
                Warning(
                    code="min_nodes_raised",
                    subject=pool.name,
                    message=f"baseline placement needs {opened} nodes, above min_nodes {pool.min_nodes}; the plan counts {opened}",
                )
            )
        if warm < pool.warm_nodes:
            warnings.append(
                Warning(
                    code="warm_reduced",
                    subject=pool.name,
                    message=f"only {warm} of {pool.warm_nodes} warm nodes fit under max_nodes {pool.max_nodes} above {baseline} baseline nodes",
                )
            )
        if pool.capacity_type == "spot" and pool.warm_nodes:
            warnings.append(
                Warning(
                    code="warm_on_spot",
                    subject=pool.name,
                    message="warm nodes on spot capacity can be reclaimed when they are needed most",
                )
            )
        if pool.cloud in ("aws", "gcp") and len(pool.zones) == 1:
            warnings.append(
                Warning(
                    code="single_zone",
                    subject=pool.name,
                    message=f"all nodes in one zone ({pool.zones[0]}): a zonal outage or stock-out takes the whole pool",
                )
            )
        pools.append(
            PoolPlan(
                name=pool.name,
                cloud=pool.cloud,
                region=pool.region or getattr(getattr(fleet.clouds, pool.cloud, None), "region", None),
                zones=list(pool.zones),
                instance_type=pool.instance_type,
                gpu=gpu_name,
                gpu_memory_gib=gpu.memory_gib,
                gpus_per_node=gpn,
                capacity_type=pool.capacity_type,
                priority=pool.priority,
                min_nodes=pool.min_nodes,
                baseline_nodes=baseline,
                warm_nodes=warm,
                max_nodes=pool.max_nodes,
                usd_per_node_hour=_round(price),
                price_source=source,
                labels=dict(pool.labels),
                taints=list(pool.taints),
                engine_command=pool.engine_command,
                gpus_used_baseline=opened * gpn - sum(st.free),
                baseline_usd_per_hour=_round(baseline * price),
                warm_usd_per_hour=_round(warm * price),
                peak_usd_per_hour=_round(pool.max_nodes * price),
            )
        )
    used = {name for rows in placements.values() for name, _ in rows} | {n for row in dep_rows for n in row[3]}
    for pool in fleet.nodepools:
        if pool.name not in used:
            warnings.append(Warning(code="pool_unused", subject=pool.name, message="no deployment can use this pool"))

    # --- deployments: replicas, failover capacity ------------------------------------------
    deployments: list[DeploymentPlan] = []
    for _i, dep, model, usable, max_len, kv in dep_rows:
        rows = placements[dep.name]
        own = dict(rows)
        free = {n: states[n].fit(dep.gpus_per_replica) for n in usable}
        capacity = sum(own.get(n, 0) + free[n] for n in usable)
        lost = min(dep.max_replicas, sum(own.get(n, 0) + free[n] for n in usable[1:]))
        perf = []
        for n in usable:
            gpu = facts[n][1]
            assert gpu is not None
            prefill = dep.gpus_per_replica * gpu.bf16_tflops * 1e12 * PREFILL_MFU / (2 * model.params_b * 1e9)
            decode = dep.gpus_per_replica * gpu.memory_bandwidth_gbps * 1e9 * DECODE_BW_EFFICIENCY / model.weight_bytes
            pool = fleet.nodepools[pool_index[n]]
            perf.append(
                PoolPerf(
                    pool=n,
                    priority=pool.priority,
                    replicas_per_node=facts[n][2] // dep.gpus_per_replica,
                    kv_cache_tokens_per_replica=kv[n],
                    prefill_tokens_per_s=round(prefill, 1),
                    decode_tokens_per_s=round(decode, 2),
                )
            )
        replicas = [
            ReplicaPlan(
                id=names.replica_id(dep.name, n, k),
                deployment=dep.name,
                pool=n,
                priority=fleet.nodepools[pool_index[n]].priority,
                index=k,
            )
            for n, count in rows
            for k in range(count)
        ]
        if len(usable) == 1:
            warnings.append(
                Warning(
                    code="no_failover", subject=dep.name, message=f"only pool {usable[0]} can serve it: no failover"
                )
            )
        if all(fleet.nodepools[pool_index[n]].capacity_type == "spot" for n in usable):
            warnings.append(
                Warning(code="spot_only", subject=dep.name, message="every pool it may use is spot capacity")
            )
        if rows and rows[0][0] != usable[0]:
            warnings.append(
                Warning(
                    code="baseline_spills",
                    subject=dep.name,
                    message=f"no baseline replica fits its preferred pool {usable[0]}",
                )
            )
        elif len(rows) > 1:
            warnings.append(
                Warning(
                    code="baseline_spills",
                    subject=dep.name,
                    message=f"{sum(c for _, c in rows[1:])} of {dep.min_replicas} baseline replicas spill past pool {usable[0]}",
                )
            )
        if lost < dep.min_replicas and len(usable) > 1:
            warnings.append(
                Warning(
                    code="failover_short",
                    subject=dep.name,
                    message=f"if pool {usable[0]} is lost, only {lost} of {dep.min_replicas} replicas fit the other pools",
                )
            )
        if capacity < dep.max_replicas:
            warnings.append(
                Warning(
                    code="max_replicas_unreachable",
                    subject=dep.name,
                    message=f"max_replicas {dep.max_replicas} but its pools hold {capacity} at max_nodes",
                )
            )
        deployments.append(
            DeploymentPlan(
                name=dep.name,
                model=dep.model,
                engine=dep.engine,
                image=dep.resolved_image,
                gpus_per_replica=dep.gpus_per_replica,
                min_replicas=dep.min_replicas,
                max_replicas=dep.max_replicas,
                max_model_len=max_len,
                max_concurrent_requests=dep.max_concurrent_requests,
                gpu_memory_utilization=dep.gpu_memory_utilization,
                port=dep.port,
                engine_args=list(dep.engine_args),
                weight_bytes=model.weight_bytes,
                kv_bytes_per_token=model.kv_bytes_per_token,
                failover=usable,
                placement=[Placement(pool=n, replicas=c, kv_cache_tokens_per_replica=kv[n]) for n, c in rows],
                kv_cache_tokens_per_replica=kv[usable[0]],
                pools=perf,
                replicas=replicas,
                capacity_replicas=min(capacity, dep.max_replicas),
                replicas_if_top_pool_lost=lost,
            )
        )

    base = sum(p.baseline_usd_per_hour for p in pools)
    warm = sum(p.warm_usd_per_hour for p in pools)
    peak = sum(p.peak_usd_per_hour for p in pools)
    cost = Cost(
        baseline_usd_per_hour=_round(base),
        warm_usd_per_hour=_round(warm),
        peak_usd_per_hour=_round(peak),
        baseline_usd_per_month=round(base * HOURS_PER_MONTH, 2),
        warm_usd_per_month=round(warm * HOURS_PER_MONTH, 2),
        peak_usd_per_month=round(peak * HOURS_PER_MONTH, 2),
    )
    return Plan(
        fleet=fleet.fleet,
        namespace=fleet.namespace,
        source=smap.file,
        catalog_as_of=catalog.as_of,
        clouds=fleet.clouds,
        router=fleet.router,
        pools=pools,
        deployments=deployments,
        cost=cost,
        warnings=warnings,
    )
