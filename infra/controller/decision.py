"""The warm-capacity / failover controller's decision: a PURE function.

    decide(fleet, samples, state, now_s, settings) -> ControllerDecision(actions, state, notes, pressure)

Per deployment, its failover chain (pools in the order traffic uses them) is walked pair by
pair. When a pool's *pressure* reaches `high_water` (share of its GPUs busy or pending — now,
or `lead_s` ahead along the demand's smoothed rise — or the share of its replicas' request
slots in use, whichever is highest), the NEXT pool of the chain
gets extra warm nodes on top of its declared `warm_nodes` before traffic spills there: one
`step_nodes` ahead, plus room for GPU demand the source already cannot place (pending). Extra
warmth only grows while the source is hot; it decays one step per `cool_down_s` once the source
has stayed at or below `low_water` for that long (the band between the two is hysteresis: hold).

Bounds: the warm target of a pool is `warm_nodes + extra`, never below `warm_nodes`, never
above `max_nodes - baseline_nodes`; node counts move only up, only within `max_nodes`, and only
when the pool is at its current size (the placeholders would not fit on it). Scale-down of
nodes is left to the cluster autoscaler, which removes the nodes that lowered placeholders
leave empty. Stale or missing samples freeze a pool: no action touches it, and it cannot
trigger warming elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Action",
    "ControllerDecision",
    "ControllerSettings",
    "ControllerState",
    "DeploymentFacts",
    "FleetFacts",
    "PoolFacts",
    "PoolMemory",
    "PoolSample",
    "decide",
]

# Clouds whose node count the controller may set through an adapter; on `kubernetes` (an
# existing cluster) and `local` the node count is not ours to change.
NODE_SCALABLE_CLOUDS = frozenset({"aws", "gcp"})


class ControllerSettings(BaseModel):
    """Thresholds and timings of the controller. Field names carry their units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    high_water: float = Field(0.8, gt=0, le=1, description="pressure at which the next pool is warmed")
    low_water: float = Field(0.5, ge=0, lt=1, description="pressure at or below which extra warmth decays")
    cool_down_s: float = Field(300.0, ge=0, description="time below low_water before each decay step")
    stale_after_s: float = Field(90.0, gt=0, description="samples older than this are not acted on")
    step_nodes: int = Field(1, ge=1, description="extra warm nodes added on crossing high_water / removed per decay")
    max_extra_warm_nodes: int | None = Field(None, ge=0, description="cap on extra warmth per pool; None: max_nodes")
    interval_s: float = Field(15.0, gt=0, description="reconcile period of `controller run`")
    lead_s: float = Field(
        300.0,
        ge=0,
        description="look-ahead: GPU demand is extrapolated this far along its smoothed rise (about one node's "
        "provisioning time), so a fast ramp warms the next pool before it crosses high_water; 0: off",
    )

    @model_validator(mode="after")
    def _band(self) -> ControllerSettings:
        if self.low_water >= self.high_water:
            raise ValueError(f"low_water ({self.low_water}) must be below high_water ({self.high_water})")
        return self


@dataclass(frozen=True)
class PoolFacts:
    """What the plan says about one pool."""

    name: str
    cloud: str
    priority: int
    min_nodes: int
    baseline_nodes: int
    warm_nodes: int
    max_nodes: int
    gpus_per_node: int

    @property
    def scalable_nodes(self) -> bool:
        return self.cloud in NODE_SCALABLE_CLOUDS

    @property
    def warm_ceiling(self) -> int:
        """Most warm nodes the pool can hold beside its baseline."""
        return max(self.warm_nodes, self.max_nodes - self.baseline_nodes)


@dataclass(frozen=True)
class DeploymentFacts:
    name: str
    chain: tuple[str, ...]  # pools in failover order (most preferred first)


@dataclass(frozen=True)
class FleetFacts:
    pools: Mapping[str, PoolFacts]
    deployments: tuple[DeploymentFacts, ...]

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> FleetFacts:
        """Read the facts from a `gpufleet.plan/v1` JSON document."""
        if plan.get("schema") != "gpufleet.plan/v1":
            raise ValueError(f"not a gpufleet plan (schema {plan.get('schema')!r}, expected 'gpufleet.plan/v1')")
        pools = {
            p["name"]: PoolFacts(
                name=p["name"],
                cloud=p["cloud"],
                priority=int(p["priority"]),
                min_nodes=int(p["min_nodes"]),
                baseline_nodes=int(p.get("baseline_nodes", p["min_nodes"])),
                warm_nodes=int(p["warm_nodes"]),
                max_nodes=int(p["max_nodes"]),
                gpus_per_node=int(p["gpus_per_node"]),
            )
            for p in plan["pools"]
        }
        deployments = []
        for d in plan["deployments"]:
            chain = list(d.get("failover") or [])
            for placed in d.get("placement") or []:
                if placed["pool"] not in chain:
                    chain.append(placed["pool"])
            unknown = [p for p in chain if p not in pools]
            if unknown:
                raise ValueError(f"deployment {d['name']!r} names unknown pool(s) {', '.join(unknown)}")
            deployments.append(DeploymentFacts(d["name"], tuple(chain)))
        return cls(pools, tuple(deployments))


@dataclass(frozen=True)
class PoolSample:
    """One observation of one pool (from the Kubernetes adapter, the node adapter and the router)."""

    pool: str
    observed_at_s: float
    ready_nodes: int
    gpus_allocatable: int
    gpus_busy: int  # requested by serving pods (placeholders excluded)
    pending_gpus: int = 0
    placeholders_desired: int | None = None  # None: the pool has no placeholder Deployment
    desired_nodes: int | None = None  # provider's desired size (None: unknown / not node-scalable)
    replica_load: float | None = None  # in-flight / request slots of the pool's replicas (router)

    @property
    def gpu_pressure(self) -> float:
        demand = self.gpus_busy + self.pending_gpus
        if self.gpus_allocatable <= 0:
            return 1.0 if demand > 0 else 0.0
        return demand / self.gpus_allocatable

    @property
    def pressure(self) -> float:
        return max(self.gpu_pressure, self.replica_load or 0.0)


@dataclass(frozen=True)
class PoolMemory:
    """What the controller remembers about a pool between reconciles."""

    extra_warm: int = 0
    hot_since_s: float | None = None
    cool_since_s: float | None = None
    demand_gpus: float | None = None  # busy + pending at the last fresh sample
    demand_at_s: float | None = None
    slope_gpus_per_s: float = 0.0  # exponentially smoothed rise of demand (time constant lead_s)


def _smoothed_slope(memory: PoolMemory, demand: float, now_s: float, lead_s: float) -> float:
    """EWMA of d(demand)/dt with time constant `lead_s`: one replica added moves the forecast by
    about one replica; a sustained ramp converges to its rate."""
    if memory.demand_gpus is None or memory.demand_at_s is None or now_s <= memory.demand_at_s or lead_s <= 0:
        return memory.slope_gpus_per_s
    dt = now_s - memory.demand_at_s
    raw = (demand - memory.demand_gpus) / dt
    return memory.slope_gpus_per_s + (raw - memory.slope_gpus_per_s) * (1 - math.exp(-dt / lead_s))


ControllerState = Mapping[str, PoolMemory]


@dataclass(frozen=True)
class Action:
    kind: Literal["set_placeholders", "scale_nodes"]
    pool: str
    current: int
    target: int
    reason: str


@dataclass(frozen=True)
class ControllerDecision:
    """One reconcile round's outcome: the actions to apply and the state to remember."""

    actions: tuple[Action, ...]
    state: dict[str, PoolMemory]
    notes: tuple[tuple[str, str], ...] = ()  # (pool, why nothing was done)
    pressure: dict[str, float] = field(default_factory=dict)
    warm_targets: dict[str, int] = field(default_factory=dict)


Vote = Literal["raise", "hold", "cool"]


def _vote(pressure: float, settings: ControllerSettings) -> Vote:
    if pressure >= settings.high_water:
        return "raise"
    if pressure <= settings.low_water:
        return "cool"
    return "hold"


def decide(
    fleet: FleetFacts,
    samples: Mapping[str, PoolSample],
    state: ControllerState,
    now_s: float,
    settings: ControllerSettings,
) -> ControllerDecision:
    """Actions that prepare the next pools for spill-over, and the state to remember."""
    notes: list[tuple[str, str]] = []
    fresh: dict[str, PoolSample] = {}
    for name in fleet.pools:
        sample = samples.get(name)
        if sample is None:
            notes.append((name, "no sample"))
        elif now_s - sample.observed_at_s > settings.stale_after_s:
            notes.append((name, f"stale sample ({now_s - sample.observed_at_s:.0f}s old)"))
        else:
            fresh[name] = sample
    # Demand trend per fresh pool: pressure looks `lead_s` ahead along the smoothed rise.
    new_state: dict[str, PoolMemory] = dict(state)
    forecast: dict[str, float] = {}
    pressure: dict[str, float] = {}
    for name, s in fresh.items():
        memory = state.get(name, PoolMemory())
        demand = float(s.gpus_busy + s.pending_gpus)
        slope = _smoothed_slope(memory, demand, now_s, settings.lead_s)
        new_state[name] = replace(memory, demand_gpus=demand, demand_at_s=now_s, slope_gpus_per_s=slope)
        forecast[name] = demand + max(0.0, slope) * settings.lead_s
        ahead = forecast[name] / s.gpus_allocatable if s.gpus_allocatable > 0 else (1.0 if forecast[name] > 0 else 0.0)
        pressure[name] = max(s.pressure, ahead)

    # Votes on each pool that is the next hop of some deployment's chain.
    votes: dict[str, list[Vote]] = {}
    wanted_extra: dict[str, int] = {}
    frozen: set[str] = set(fleet.pools) - set(fresh)
    for dep in fleet.deployments:
        for src, dst in zip(dep.chain, dep.chain[1:]):
            if src not in fresh or dst not in fresh:
                # A stale source may be hot or cold: changing the next pool either way is a guess.
                frozen.add(dst)
                continue
            vote = _vote(pressure[src], settings)
            votes.setdefault(dst, []).append(vote)
            if vote == "raise":
                s, d = fresh[src], fleet.pools[dst]
                # One step ahead of the spill, plus room for the (forecast) demand the source cannot place.
                unmet_gpus = max(0.0, forecast[src] - s.gpus_allocatable)
                want = settings.step_nodes + math.ceil(unmet_gpus / max(1, d.gpus_per_node))
                wanted_extra[dst] = max(wanted_extra.get(dst, 0), want)

    actions: list[Action] = []
    targets: dict[str, int] = {}
    for name, pool in fleet.pools.items():
        memory = new_state.get(name, PoolMemory())
        if name in frozen:
            continue
        cap = pool.warm_ceiling - pool.warm_nodes
        if settings.max_extra_warm_nodes is not None:
            cap = min(cap, settings.max_extra_warm_nodes)
        pool_votes = votes.get(name, [])
        reason = ""
        if "raise" in pool_votes:
            extra = min(cap, max(memory.extra_warm, wanted_extra.get(name, settings.step_nodes)))
            memory = replace(memory, extra_warm=extra, hot_since_s=memory.hot_since_s or now_s, cool_since_s=None)
            reason = "previous pool above high water"
        elif "hold" in pool_votes or not pool_votes:
            memory = replace(memory, cool_since_s=None, extra_warm=min(memory.extra_warm, cap))
        else:  # every source is cool
            cool_since = memory.cool_since_s if memory.cool_since_s is not None else now_s
            extra = memory.extra_warm
            if extra > 0 and now_s - cool_since >= settings.cool_down_s:
                extra = max(0, extra - settings.step_nodes)
                cool_since = now_s  # the next step waits another cool-down
                reason = f"previous pool at or below low water for {settings.cool_down_s:.0f}s"
            memory = replace(memory, extra_warm=extra, hot_since_s=None, cool_since_s=cool_since)
        new_state[name] = memory
        target = pool.warm_nodes + memory.extra_warm
        targets[name] = target
        sample = fresh[name]
        if sample.placeholders_desired is None:
            if target > 0:  # warmth is wanted but nothing holds it: say so (manifests render it)
                notes.append((name, f"no placeholder Deployment to hold {target} warm node(s)"))
        elif sample.placeholders_desired != target:
            why = reason or ("restore declared warm_nodes" if memory.extra_warm == 0 else "hold extra warmth")
            actions.append(Action("set_placeholders", name, sample.placeholders_desired, target, why))
        if pool.scalable_nodes and sample.desired_nodes is not None:
            serving_nodes = math.ceil((sample.gpus_busy + sample.pending_gpus) / max(1, pool.gpus_per_node))
            needed = min(pool.max_nodes, max(pool.min_nodes, serving_nodes + target))
            # Only grow, and only when the pool is at its current size: if nodes are already on
            # their way (desired above needed), the placeholders will find room.
            if needed > sample.desired_nodes:
                actions.append(
                    Action(
                        "scale_nodes",
                        name,
                        sample.desired_nodes,
                        needed,
                        f"room for {target} warm node(s) beside {serving_nodes} serving",
                    )
                )
    return ControllerDecision(tuple(actions), new_state, tuple(notes), pressure, targets)
