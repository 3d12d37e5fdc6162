"""Stages 2 and 3 of the plan: which pools can hold each deployment, then the baseline placement.

Fit: a deployment may use the pools it lists (or every pool) whose nodes hold
`gpus_per_replica` GPUs and whose GPUs hold the weights plus a KV cache of at least
`max_model_len` tokens; they form its failover order (priority, highest first, then the order
they are listed or declared in). A pool named explicitly that does not fit is an error at that
reference; an implicit one is skipped.

Placement: deployments are placed in declaration order (earlier ones get first pick of the
preferred pools). A deployment's `min_replicas` fill its failover order first-fit on nodes,
opening nodes up to each pool's `max_nodes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import spec
from gpufleet.infra.plan.model import Placement
from gpufleet.infra.plan.pools import PoolMachine
from gpufleet.infra.plan.resources import memory_problem

__all__ = ["DeploymentFit", "Packing", "PoolPacking", "deployment_fits", "place"]

# A replica's KV cache must hold at least this many tokens when `max_model_len` is not declared.
_MIN_CONTEXT = 16


@dataclass(frozen=True)
class DeploymentFit:
    """Where one deployment can run: its failover order and the KV capacity it gets per pool."""

    index: int  # in the declaration's `deployments`
    spec: spec.Deployment
    model: catalog_mod.ModelInfo
    failover: list[str]
    max_model_len: int
    kv_tokens: dict[str, int]  # per pool of `failover`


@dataclass
class PoolPacking:
    """Mutable packing state of one pool while placing: the free GPUs of each opened node."""

    max_nodes: int
    gpus_per_node: int
    free: list[int] = field(default_factory=list)

    @property
    def opened_nodes(self) -> int:
        return len(self.free)

    @property
    def gpus_used(self) -> int:
        return self.opened_nodes * self.gpus_per_node - sum(self.free)

    def fit(self, gpus: int) -> int:
        """Replicas of `gpus` GPUs that still fit, on opened nodes and on nodes up to max_nodes."""
        per_node = self.gpus_per_node // gpus
        return sum(f // gpus for f in self.free) + (self.max_nodes - len(self.free)) * per_node

    def place(self, gpus: int, want: int) -> int:
        """Place up to `want` replicas of `gpus` GPUs, first-fit; returns how many were placed."""
        placed = 0
        for n, f in enumerate(self.free):
            if placed == want:
                return placed
            k = min(f // gpus, want - placed)
            self.free[n] -= k * gpus
            placed += k
        per_node = self.gpus_per_node // gpus
        while placed < want and len(self.free) < self.max_nodes and per_node:
            k = min(per_node, want - placed)
            self.free.append(self.gpus_per_node - k * gpus)
            placed += k
        return placed


@dataclass(frozen=True)
class Packing:
    """The baseline placement: each pool's packing state and each deployment's placement."""

    pools: dict[str, PoolPacking]
    placements: dict[str, list[Placement]]  # by deployment name, in failover order


def _kv_tokens(dep: spec.Deployment, model: catalog_mod.ModelInfo, gpu: catalog_mod.GpuModel) -> tuple[int, float]:
    """KV-cache tokens of one replica on `gpu`, and the GPU bytes the replica may use."""
    usable_bytes = dep.gpus_per_replica * gpu.memory_bytes * dep.gpu_memory_utilization
    return int((usable_bytes - model.weight_bytes) // model.kv_bytes_per_token), usable_bytes


def deployment_fits(
    fleet: spec.Fleet,
    catalog: catalog_mod.Catalog,
    machines: dict[str, PoolMachine],
    smap: spec.SourceMap,
    issues: list[spec.FleetIssue],
) -> list[DeploymentFit]:
    """The fit of every deployment that has a usable pool; the others' problems go to `issues`."""
    declared_pools = {p.name for p in fleet.nodepools}
    priority = {p.name: p.priority for p in fleet.nodepools}
    fits: list[DeploymentFit] = []
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
        explicit = dep.nodepools is not None
        # The order the pools are listed in (or declared in) breaks ties of priority.
        listed = dep.nodepools if dep.nodepools is not None else [p.name for p in fleet.nodepools]
        usable: list[str] = []
        kv: dict[str, int] = {}
        ram_short = False
        for name in (p for p in listed if p in declared_pools):
            machine = machines.get(name)
            if machine is None:
                continue  # the pool's own error is reported already
            ref = loc + (("nodepools", listed.index(name)) if explicit else ("model",))
            if dep.gpus_per_replica > machine.gpus_per_node:
                if explicit:
                    issues.append(
                        smap.issue(
                            loc + ("gpus_per_replica",),
                            f"{dep.gpus_per_replica} GPUs do not fit a node of pool {name!r}, which has {machine.gpus_per_node}",
                        )
                    )
                continue
            kv_tokens, usable_bytes = _kv_tokens(dep, model, machine.gpu)
            if kv_tokens <= 0:
                if explicit:
                    issues.append(
                        smap.issue(
                            ref,
                            f"{dep.model} weights ({model.weight_bytes / 1e9:.1f} GB) do not fit {dep.gpus_per_replica} x {machine.gpu_name} "
                            f"({usable_bytes / 1e9:.1f} GB usable at gpu_memory_utilization {dep.gpu_memory_utilization}) in pool {name!r}",
                        )
                    )
                continue
            need = dep.max_model_len or _MIN_CONTEXT
            if kv_tokens < need:
                if explicit:
                    issues.append(
                        smap.issue(
                            loc + ("max_model_len",),
                            f"{need} tokens do not fit the KV cache of a replica in pool {name!r} ({kv_tokens} tokens)",
                        )
                    )
                continue
            problem = memory_problem(dep, name, machine)
            if problem is not None and dep.kv_offload is not None:
                # A declared tier that does not fit is an error on every pool it would use.
                issues.append(smap.issue(loc + ("kv_offload", "cpu_gib"), problem))
                ram_short = True
                continue
            if problem is not None:
                if explicit:
                    issues.append(smap.issue(ref, problem))
                continue
            usable.append(name)
            kv[name] = kv_tokens
        if not usable:
            if not explicit and not ram_short:
                issues.append(
                    smap.issue(
                        loc + ("model",),
                        f"no declared pool can hold a replica of {dep.model} with {dep.gpus_per_replica} GPU(s)",
                    )
                )
            continue
        usable.sort(key=lambda n: (-priority[n], listed.index(n)))
        max_len = dep.max_model_len or min(model.max_context, min(kv.values()))
        fits.append(DeploymentFit(i, dep, model, usable, max_len, kv))
    return fits


def place(
    fleet: spec.Fleet,
    machines: dict[str, PoolMachine],
    fits: list[DeploymentFit],
    smap: spec.SourceMap,
    issues: list[spec.FleetIssue],
) -> Packing:
    """Place every deployment's `min_replicas`, in declaration order; shortfalls go to `issues`."""
    pools = {
        p.name: PoolPacking(p.max_nodes, machines[p.name].gpus_per_node) for p in fleet.nodepools if p.name in machines
    }
    placements: dict[str, list[Placement]] = {}
    for fit in fits:
        dep = fit.spec
        remaining = dep.min_replicas
        rows: list[Placement] = []
        for name in fit.failover:
            if remaining == 0:
                break
            got = pools[name].place(dep.gpus_per_replica, remaining)
            if got:
                rows.append(Placement(pool=name, replicas=got, kv_cache_tokens_per_replica=fit.kv_tokens[name]))
                remaining -= got
        if remaining:
            placed = dep.min_replicas - remaining
            issues.append(
                smap.issue(
                    ("deployments", fit.index, "min_replicas"),
                    f"{dep.min_replicas} {'replica does' if dep.min_replicas == 1 else 'replicas do'} not fit: pools {', '.join(fit.failover)} hold {placed} at their max_nodes "
                    f"(after the deployments declared before it); raise max_nodes or add a pool",
                )
            )
        placements[dep.name] = rows
    return Packing(pools, placements)
