"""A small discrete-time model of a fleet under a ramping workload, with and without the controller.

It answers one question: how many requests wait for a cold node? Both runs share the same
cluster-autoscaler model (pending pods ask for nodes of the highest-priority pool with room;
a node is ready `provision_delay_s` after it is asked for; nodes left empty for
`scale_down_after_s` go away) and the same declared placeholders. The controller run adds
`decide` — the very function `gpufleet controller run` uses — every `interval_s`, fed with
samples built from the simulated state, its actions applied to that state.

Simplifications, stated: replicas are packed perfectly onto nodes; a replica on a ready node
serves at once (model load time is the same in both runs and left out); the router spills a
request to any ready replica; demand is in replicas (request rate / per-replica rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet.infra.controller.decision import ControllerSettings, FleetFacts, PoolFacts, PoolMemory, PoolSample, decide

__all__ = ["PoolState", "SimResult", "ramp", "simulate"]


@dataclass
class PoolState:
    facts: PoolFacts
    ready: int
    provisioning: list[float] = field(default_factory=list)  # ready-at times
    placeholders: int = 0
    empty_since_s: float | None = None
    replicas: int = 0
    placeholders_running: int = 0

    @property
    def desired(self) -> int:
        return self.ready + len(self.provisioning)


@dataclass(frozen=True)
class SimResult:
    requests: float
    waited: float  # requests that found no ready replica (waiting for a cold node)
    short_replica_minutes: float
    max_short_replicas: int
    node_hours: float
    usd: float
    actions: int


def ramp(
    base: float, peak: float, *, warm_s: float = 1800, up_s: float = 3600, hold_s: float = 1800, down_s: float = 3600
) -> Callable[[float], float]:
    """Demand in replicas: `base`, a linear ramp to `peak`, a plateau, a ramp back down."""

    def demand(t: float) -> float:
        if t < warm_s:
            return base
        t -= warm_s
        if t < up_s:
            return base + (peak - base) * t / up_s
        t -= up_s
        if t < hold_s:
            return peak
        t -= hold_s
        return max(base, peak - (peak - base) * t / down_s) if t < down_s else base

    return demand


def simulate(
    fleet: FleetFacts,
    chain: tuple[str, ...],
    gpus_per_replica: int,
    demand: Callable[[float], float],
    *,
    duration_s: float,
    provision_delay_s: float,
    usd_per_node_hour: dict[str, float],
    controller: ControllerSettings | None,
    requests_per_replica_s: float = 1.0,
    step_s: float = 15.0,
    scale_down_after_s: float = 600.0,
) -> SimResult:
    """Run the model; `controller=None` is the baseline (autoscaler and static placeholders only)."""
    pools = {
        name: PoolState(
            fleet.pools[name], ready=fleet.pools[name].baseline_nodes, placeholders=fleet.pools[name].warm_nodes
        )
        for name in chain
    }
    for p in pools.values():  # declared warm nodes exist from the start, as after `gpufleet up`
        p.ready = min(p.facts.max_nodes, p.ready + p.facts.warm_nodes)
    memory: dict[str, PoolMemory] = {}
    requests = waited = short_minutes = node_hours = usd = 0.0
    max_short = actions = 0
    next_control = 0.0
    t = 0.0
    while t < duration_s:
        for p in pools.values():
            arrived = [r for r in p.provisioning if r <= t]
            p.ready += len(arrived)
            p.provisioning = [r for r in p.provisioning if r > t]
        want = math.ceil(demand(t))
        # Scheduling: replicas first (placeholders are preempted), in failover order.
        left = want
        for name in chain:
            p = pools[name]
            per_node = max(1, p.facts.gpus_per_node // gpus_per_replica)
            p.replicas = min(left, p.ready * per_node)
            left -= p.replicas
            used_nodes = math.ceil(p.replicas / per_node)
            p.placeholders_running = min(p.placeholders, p.ready - used_nodes)
        short = left
        requests += want * requests_per_replica_s * step_s
        waited += short * requests_per_replica_s * step_s  # the missing replicas' share of requests
        short_minutes += short * step_s / 60
        max_short = max(max_short, short)

        if controller is not None and t >= next_control:
            next_control = t + controller.interval_s
            samples = {}
            for name, p in pools.items():
                pending = short * gpus_per_replica if name == chain[0] else 0  # replicas are planned on the top pool
                samples[name] = PoolSample(
                    pool=name,
                    observed_at_s=t,
                    ready_nodes=p.ready,
                    gpus_allocatable=p.ready * p.facts.gpus_per_node,
                    gpus_busy=p.replicas * gpus_per_replica,
                    pending_gpus=pending,
                    placeholders_desired=p.placeholders,
                    desired_nodes=p.desired if p.facts.scalable_nodes else None,
                )
            decision = decide(fleet, samples, memory, t, controller)
            memory = decision.state
            for action in decision.actions:
                actions += 1
                p = pools[action.pool]
                if action.kind == "set_placeholders":
                    p.placeholders = action.target
                else:
                    p.provisioning += [t + provision_delay_s] * max(0, action.target - p.desired)

        # Cluster autoscaler: nodes for pending placeholders in their pool, then for pending
        # replicas in the highest-priority pool with room (the priority expander).
        spare_in_flight = {}
        for name, p in pools.items():
            pending_ph = p.placeholders - p.placeholders_running
            room = p.facts.max_nodes - p.desired
            add = max(0, min(room, pending_ph - len(p.provisioning)))
            p.provisioning += [t + provision_delay_s] * add
            spare_in_flight[name] = max(0, len(p.provisioning) - pending_ph)
        need_nodes = 0
        if short:
            per_node0 = max(1, pools[chain[0]].facts.gpus_per_node // gpus_per_replica)
            need_nodes = math.ceil(short / per_node0) - sum(spare_in_flight.values())
        for name in chain:
            if need_nodes <= 0:
                break
            p = pools[name]
            add = max(0, min(p.facts.max_nodes - p.desired, need_nodes))
            p.provisioning += [t + provision_delay_s] * add
            need_nodes -= add
        # Scale-down of nodes that hold neither a replica nor a placeholder.
        for p in pools.values():
            per_node = max(1, p.facts.gpus_per_node // gpus_per_replica)
            empty = p.ready - math.ceil(p.replicas / per_node) - p.placeholders_running
            floor = p.facts.min_nodes
            if empty > 0 and p.ready > floor:
                p.empty_since_s = p.empty_since_s if p.empty_since_s is not None else t
                if t - p.empty_since_s >= scale_down_after_s:
                    p.ready -= min(empty, p.ready - floor)
                    p.empty_since_s = None
            else:
                p.empty_since_s = None
            hours = p.desired * step_s / 3600
            node_hours += hours
            usd += hours * usd_per_node_hour.get(p.facts.name, 0.0)
        t += step_s
    return SimResult(requests, waited, short_minutes, max_short, node_hours, usd, actions)
