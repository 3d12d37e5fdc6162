"""The controller's reconcile loop: observe pools, `decide`, act, log, export metrics.

Observation goes through the provider adapters only (Kubernetes for GPU use and placeholders,
AWS/GCP for node counts) plus, optionally, every router pod's Prometheus endpoint for how full the
replicas' request slots are (`router_load.RouterLoadReader`: read once per round, and the replica
autoscaler uses that same read). A pool whose observation fails gets no sample this round, and
`decide` takes no action on it. One failed action is logged and counted; the others still run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gpufleet.infra.controller.decision import (
    Action,
    ControllerDecision,
    ControllerSettings,
    FleetFacts,
    PoolMemory,
    PoolSample,
    decide,
)
from gpufleet.infra.controller.router_load import RouterLoadReader

__all__ = ["Controller", "ControllerMetrics", "NodeBinding", "Observer", "replica_slots_from_plan"]

log = logging.getLogger("gpufleet.controller")


class _KubeLike(Protocol):
    def utilisation(self, pool: str) -> Any: ...
    def scale_placeholders(self, pool: str, replicas: int) -> int: ...


@dataclass(frozen=True)
class NodeBinding:
    """The provider adapter and pool reference that own a pool's node count."""

    adapter: Any  # base.ProviderAdapter
    ref: Any  # base.PoolRef


def replica_slots_from_plan(plan: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """replica id -> (pool, request slots), from a plan JSON: what the router's in-flight gauge divides by."""
    out: dict[str, tuple[str, int]] = {}
    for dep in plan.get("deployments", []):
        for replica in dep.get("replicas", []):
            out[replica["id"]] = (replica["pool"], int(dep.get("max_concurrent_requests") or 1))
    return out


class Observer:
    """Builds one `PoolSample` per pool from the adapters (and the router, when configured)."""

    def __init__(
        self,
        facts: FleetFacts,
        kube: Mapping[str, _KubeLike],
        nodes: Mapping[str, NodeBinding] | None = None,
        *,
        router_load: RouterLoadReader | None = None,
        replica_slots: Mapping[str, tuple[str, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`kube` maps a pool name to the Kubernetes adapter of the cluster it lives in."""
        self.facts = facts
        self.kube = dict(kube)
        self.nodes = dict(nodes or {})
        self.router_load = router_load
        self.replica_slots = dict(replica_slots or {})
        self.clock = clock
        self.errors: list[tuple[str, str]] = []

    def _replica_load(self) -> dict[str, float]:
        if self.router_load is None:
            return {}
        load = self.router_load.read()
        self.errors.extend(self.router_load.errors)
        if load is None:
            # Without the routers' view GPU pressure still works; the reader said why (logged).
            return {}
        used: dict[str, float] = {}
        slots: dict[str, int] = {}
        for replica, (pool, n) in self.replica_slots.items():
            slots[pool] = slots.get(pool, 0) + n
            used[pool] = used.get(pool, 0.0) + load.in_flight.get(replica, 0.0)
        return {pool: used[pool] / slots[pool] for pool in slots if slots[pool] > 0}

    def observe(self) -> dict[str, PoolSample]:
        from gpufleet.provider_adapters import errors

        self.errors = []
        load = self._replica_load()
        samples: dict[str, PoolSample] = {}
        # One read per cluster for all its pools, where the adapter offers it.
        by_cluster: dict[int, list[str]] = {}
        for name in self.facts.pools:
            if name in self.kube:
                by_cluster.setdefault(id(self.kube[name]), []).append(name)
        seen: dict[str, Any] = {}
        for names in by_cluster.values():
            cluster = self.kube[names[0]]
            if hasattr(cluster, "utilisations"):
                try:
                    seen.update(cluster.utilisations(names))
                except errors.AdapterError as exc:
                    self.errors.extend((n, str(exc)) for n in names)
                    log.warning("pools %s: not observed this round: %s", ", ".join(names), exc)
        for name in self.facts.pools:
            kube = self.kube.get(name)
            if kube is None:
                self.errors.append((name, "no Kubernetes adapter for this pool"))
                continue
            if name not in seen and hasattr(kube, "utilisations"):
                continue  # its cluster read failed above
            try:
                u = seen[name] if name in seen else kube.utilisation(name)
                desired = None
                binding = self.nodes.get(name)
                if binding is not None:
                    desired = binding.adapter.pool_state(binding.ref).desired_nodes
            except errors.AdapterError as exc:
                self.errors.append((name, str(exc)))
                log.warning("pool %s: not observed this round: %s", name, exc)
                continue
            samples[name] = PoolSample(
                pool=name,
                observed_at_s=u.observed_at_s,
                ready_nodes=u.ready_nodes,
                gpus_allocatable=u.gpus_allocatable,
                gpus_busy=u.gpus_requested,
                pending_gpus=u.pending_gpus,
                placeholders_desired=u.placeholders_desired,
                desired_nodes=desired,
                replica_load=load.get(name),
            )
        return samples


class ControllerMetrics:
    """Prometheus metrics of the controller, on a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "gpufleet_controller_"
        self.actions = Counter(
            p + "actions",
            "Actions decided, by pool, kind and outcome (applied, dry_run, failed)",
            ["pool", "kind", "outcome"],
            registry=r,
        )
        self.skipped = Counter(
            p + "skipped", "Pools left alone in a reconcile, by reason", ["pool", "reason"], registry=r
        )
        self.reconciles = Counter(p + "reconciles", "Reconcile rounds", registry=r)
        self.errors = Counter(
            p + "reconcile_errors", "Rounds that failed unexpectedly (logged with traceback)", registry=r
        )
        self.pressure = Gauge(p + "pool_pressure", "Busy share of a pool's GPUs or request slots", ["pool"], registry=r)
        self.warm_target = Gauge(p + "warm_target_nodes", "Warm nodes the controller wants held", ["pool"], registry=r)
        self.extra_warm = Gauge(
            p + "extra_warm_nodes", "Warm nodes above the declared warm_nodes", ["pool"], registry=r
        )
        self.last_reconcile = Gauge(
            p + "last_reconcile_timestamp_seconds", "Unix time of the last reconcile", registry=r
        )
        self.replica_actions = Counter(
            p + "replica_actions",
            "StatefulSet scale changes, by deployment, pool and outcome (applied, dry_run, failed)",
            ["deployment", "pool", "outcome"],
            registry=r,
        )
        self.replica_target = Gauge(
            p + "replica_target",
            "Replicas the autoscaler wants per deployment and pool",
            ["deployment", "pool"],
            registry=r,
        )

        self.router_scrapes = Counter(
            p + "router_scrapes",
            "Reads of a router pod's /metrics, by pod and result (ok, failed: left out of that round)",
            ["router", "result"],
            registry=r,
        )
        self.routers = Gauge(
            p + "routers", "Router pods in the last read, by state (answered, failed)", ["state"], registry=r
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Controller:
    """Reconciles a fleet: observe, decide (pure), act unless dry-run, log and count everything."""

    def __init__(
        self,
        facts: FleetFacts,
        settings: ControllerSettings,
        observer: Observer,
        *,
        dry_run: bool = False,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        scaler: Any = None,
    ) -> None:
        """`scaler`: an `infra.controller.scaler.ReplicaScaler` run after the warm-capacity round."""
        self.facts = facts
        self.scaler = scaler
        self.settings = settings
        self.observer = observer
        self.dry_run = dry_run
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.state: dict[str, PoolMemory] = {}
        self.applied: list[tuple[Action, str]] = []  # (action, outcome) of the last reconcile

    def _apply(self, action: Action) -> None:
        from gpufleet.provider_adapters import base

        if action.kind == "set_placeholders":
            self.observer.kube[action.pool].scale_placeholders(action.pool, action.target)
        else:
            binding = self.observer.nodes[action.pool]
            pool = self.facts.pools[action.pool]
            binding.adapter.scale_pool(
                base.ScaleRequest(
                    ref=binding.ref,
                    desired_nodes=action.target,
                    max_nodes=pool.max_nodes if pool.cloud == "aws" else None,
                )
            )

    def reconcile(self) -> ControllerDecision:
        """One round. Returns the decision; `applied` lists each action with its outcome."""
        from gpufleet.provider_adapters import errors

        samples = self.observer.observe()
        now = self.clock()
        decision = decide(self.facts, samples, self.state, now, self.settings)
        m = self.metrics
        m.reconciles.inc()
        m.last_reconcile.set(now)
        for pool, pressure in decision.pressure.items():
            m.pressure.labels(pool).set(pressure)
        for pool, target in decision.warm_targets.items():
            m.warm_target.labels(pool).set(target)
            m.extra_warm.labels(pool).set(decision.state[pool].extra_warm)
        for pool, why in decision.notes:
            m.skipped.labels(pool, why.split(" (")[0]).inc()
            log.info("pool %s: no action: %s", pool, why)
        self.applied = []
        for action in decision.actions:
            outcome = "dry_run" if self.dry_run else "applied"
            if not self.dry_run:
                try:
                    self._apply(action)
                except errors.AdapterError as exc:
                    outcome = "failed"
                    log.error(
                        "%s pool=%s %d -> %d failed: %s", action.kind, action.pool, action.current, action.target, exc
                    )
            m.actions.labels(action.pool, action.kind, outcome).inc()
            self.applied.append((action, outcome))
            log.info(
                "%s pool=%s %d -> %d (%s)%s",
                action.kind,
                action.pool,
                action.current,
                action.target,
                action.reason,
                " [dry-run]" if self.dry_run else "",
            )
        # Only remember what happened: in dry-run nothing changed, so the next round starts afresh.
        if not self.dry_run:
            self.state = decision.state
        if self.scaler is not None:
            self.scaler.round()  # replicas per (deployment, pool): StatefulSets through their scale
        return decision

    def run(
        self, stop: threading.Event, *, once: bool = False, on_round: Callable[[ControllerDecision], None] | None = None
    ) -> None:
        """Reconcile every `interval_s` until `stop` is set (or once)."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                decision = self.reconcile()
            except Exception:
                # A long-running controller must survive a bad round (an SDK bug, a malformed
                # answer): log it loudly, count it, try again next round. `--once` re-raises.
                self.metrics.errors.inc()
                log.exception("reconcile failed")
                if once:
                    raise
            else:
                if on_round is not None:
                    on_round(decision)
            if once:
                return
            stop.wait(max(0.0, self.settings.interval_s - (time.monotonic() - started)))
