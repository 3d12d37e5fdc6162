"""The controller's replica scaling on Kubernetes: observe the (deployment, pool) StatefulSets, run
the pure `autoscale.scale`, apply its targets through each StatefulSet's `scale` subresource.

One round:

    observe   per (deployment, pool): spec.replicas, readyReplicas, the Pending pods (with the time
              this scaler first saw each Pending, so `pending_timeout_s` needs no pod clock); a
              StatefulSet that does not exist in this cluster is a pool that cannot take replicas
              (a capacity error: the decision moves on to the next pool)
    load      the deployment's signal from every router pod's /metrics, added up
              (`router_load`: in-flight and queued prefill tokens summed over the deployment's
              replicas and the router pods, or the p90 time to first token of their merged
              histograms over the window); no read: no sample, the decision holds the count
              (bounds still apply); a partial read (a router pod failed) never lowers it
    decide    `autoscale.scale(...)`: targets by pool priority, hysteresis, cool-down, bounds
    act       `KubernetesAdapter.scale_replica_set(name, target)` for every changed target (not in
              dry-run); a failed patch is logged, counted, and marks that pool's capacity error

Placeholders need no action here: they run at a negative PriorityClass, so the scheduler preempts
them for a new replica at once (the decision's `evict_placeholders` is what that frees).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gpufleet.infra import names
from gpufleet.infra.controller import autoscale

__all__ = ["ReplicaScaler", "facts_from_plan_json"]

log = logging.getLogger("gpufleet.controller.scaler")

Key = tuple[str, str]


class _Kube(Protocol):
    def replica_set(self, name: str) -> Any: ...
    def scale_replica_set(self, name: str, replicas: int) -> None: ...


def facts_from_plan_json(plan: Mapping[str, Any]) -> autoscale.AutoscaleFacts:
    """`AutoscaleFacts` from a plan JSON (`gpufleet plan -o json`), reading only the fields it needs.

    Raises KeyError, TypeError or ValueError when one of them is missing or malformed."""
    from gpufleet.infra import spec

    pools = {p["name"]: p for p in plan["pools"]}
    deps = []
    for d in plan.get("deployments", []):
        per_node = {pp["pool"]: int(pp.get("replicas_per_node", 0)) for pp in d.get("pools", [])}
        chain = tuple(
            autoscale.PoolSlots(
                pool=name,
                priority=int(pools[name]["priority"]),
                capacity=int(pools[name]["max_nodes"]) * per_node.get(name, 0),
                warm_placeholders=int(pools[name].get("warm_nodes", 0)),
                gpus_per_node=int(pools[name].get("gpus_per_node", 1)),
            )
            for name in d["failover"]
        )
        auto = d.get("autoscaling")
        deps.append(
            autoscale.ScalingFacts(
                d["name"],
                int(d["min_replicas"]),
                int(d["max_replicas"]),
                int(d["gpus_per_replica"]),
                chain,
                spec.Autoscaling.model_validate(auto) if auto else None,
            )
        )
    gpus = {n: int(p["max_nodes"]) * int(p.get("gpus_per_node", 1)) for n, p in pools.items()}
    return autoscale.AutoscaleFacts(tuple(deps), gpus)


class ReplicaScaler:
    """Scales the fleet's StatefulSets by pool priority (module docs)."""

    def __init__(
        self,
        facts: autoscale.AutoscaleFacts,
        kube: Mapping[str, _Kube],
        *,
        load: Callable[[float], Mapping[str, autoscale.LoadSample]] | None = None,
        settings: autoscale.AutoscaleSettings | None = None,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
        metrics: Any = None,
    ) -> None:
        """`kube` maps a pool to the adapter of the cluster holding it; `load(now)` gives the samples."""
        self.facts = facts
        self.kube = kube
        self.load = load or (lambda now: {})
        self.settings = settings or autoscale.AutoscaleSettings()
        self.dry_run = dry_run
        self.clock = clock
        self.metrics = metrics
        self.state = autoscale.AutoscaleState()
        self._pending_seen: dict[str, float] = {}
        self._capacity_error: dict[Key, float] = {}
        self.applied: list[tuple[autoscale.ScaleAction, str]] = []
        self.errors: list[tuple[Key, str]] = []

    def observe(self, now: float) -> dict[Key, autoscale.PoolObservation]:
        """Every (deployment, pool) of every chain, as the clusters report it."""
        from gpufleet.provider_adapters import errors

        out: dict[Key, autoscale.PoolObservation] = {}
        self.errors = []
        seen: set[str] = set()
        for dep in self.facts.deployments:
            for slot in dep.chain:
                key = (dep.name, slot.pool)
                kube = self.kube.get(slot.pool)
                name = names.replica_set_name(dep.name, slot.pool)
                state = None
                if kube is not None:
                    try:
                        state = kube.replica_set(name)
                    except errors.AdapterError as exc:
                        self.errors.append((key, str(exc)))
                        log.warning("%s: not observed: %s", name, exc)
                        continue  # no observation: the decision counts it as none, holds no memory
                if state is None:
                    # Not in this cluster (or no cluster holds the pool): it cannot take replicas.
                    self._capacity_error[key] = now
                    out[key] = autoscale.PoolObservation(0, 0, (), now)
                    continue
                pending = []
                for pod in state.pending_pods:
                    seen.add(pod)
                    pending.append(self._pending_seen.setdefault(pod, now))
                out[key] = autoscale.PoolObservation(
                    replicas=state.replicas,
                    ready=state.ready,
                    pending_since_s=tuple(pending),
                    capacity_error_at_s=self._capacity_error.get(key),
                )
        self._pending_seen = {p: t for p, t in self._pending_seen.items() if p in seen}
        return out

    def round(self) -> autoscale.ScaleDecision:
        """Observe, decide, act (unless dry-run); `applied` lists each action and its outcome."""
        from gpufleet.provider_adapters import errors

        now = self.clock()
        observed = self.observe(now)
        try:
            load = self.load(now)
        except Exception as exc:  # the router is down or restarting: no sample, counts hold
            log.warning("router load not read: %s", exc)
            load = {}
        decision = autoscale.scale(self.facts, observed, load, self.state, now, self.settings)
        self.applied = []
        for action in decision.actions:
            name = names.replica_set_name(action.deployment, action.pool)
            outcome = "dry_run" if self.dry_run else "applied"
            if not self.dry_run:
                kube = self.kube.get(action.pool)
                try:
                    if kube is None:
                        raise errors.NotFound(
                            f"no cluster holds pool {action.pool}", cloud="kubernetes", code="NotFound"
                        )
                    kube.scale_replica_set(name, action.target)
                except errors.AdapterError as exc:
                    outcome = "failed"
                    self._capacity_error[(action.deployment, action.pool)] = now
                    log.error("scale %s %d -> %d failed: %s", name, action.current, action.target, exc)
            self.applied.append((action, outcome))
            if self.metrics is not None:
                self.metrics.replica_actions.labels(action.deployment, action.pool, outcome).inc()
            log.info(
                "scale %s %d -> %d (%s)%s",
                name,
                action.current,
                action.target,
                action.reason,
                " [dry-run]" if self.dry_run else "",
            )
        for (dep, pool), target in decision.targets.items():
            if self.metrics is not None:
                self.metrics.replica_target.labels(dep, pool).set(target)
        for dep, why in decision.notes:
            log.info("deployment %s: %s", dep, why)
        if not self.dry_run:
            self.state = decision.state
        return decision
