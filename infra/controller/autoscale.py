"""Autoscaling by pool priority: a PURE function from load and pool state to replica targets.

    scale(facts, observed, load, state, now_s, settings) -> ScaleDecision

Per deployment, one round:

1. **Full pools.** A pool where a replica has been Pending longer than the deployment's
   `pending_timeout_s`, or where the adapters reported a capacity error (a stock-out, a quota, a
   start that failed) within `full_retry_s`, is *full*: its target drops to the replicas that are
   ready there (the Pending ones will not land) and scale-up moves on to the next pool. A full
   mark expires after `full_retry_s` without new evidence, so the pool is tried again.
2. **Desired replicas** (HPA's rule): with `ready` replicas and the signal's value per replica
   `v`, `ratio = v / target`; within `1 +- tolerance` nothing changes, otherwise
   `desired = ceil(ready x ratio)`. For `in_flight` and `queued_prefill_tokens` the sample is the
   deployment's total, so `desired = ceil(total / target)`; for `ttft_p90_s` it is the p90 itself.
   Clamped to `[min_replicas, max_replicas]`. The plan's `autoscaling` is the declared one or,
   for a deployment that declares none but may grow (max_replicas > min_replicas), the default
   (`spec.default_autoscaling`: `in_flight`, 80 % of `max_concurrent_requests` per replica);
   none only when max_replicas = min_replicas: `desired = min_replicas`.
   A missing or stale load sample holds the current count (bounds still apply); a *partial* one
   (a router pod did not answer) may raise the count, never lower it.
3. **Hysteresis and cool-down.** Growth waits until `desired` has stayed above the current count
   for `scale_up_delay_s`; shrinking until it has stayed below for `scale_down_delay_s` *and* that
   long has passed since the last change of either direction. Being below `min_replicas` or above
   `max_replicas` is corrected at once.
4. **Placement.** New replicas go to the highest-priority pool of the failover chain with room
   (room = replicas of this deployment that fit at `max_nodes`, less the GPUs other deployments'
   replicas use there), then the next; a pool's warm placeholders are evicted at once for them
   (`evict_placeholders`). Replicas are removed from the lowest-priority pool first.

Every (deployment, pool) of a chain is expected in `observed`; a missing one counts as no
replicas. Nothing here does I/O or reads a clock: the Kubernetes controller (StatefulSets through
the scale subresource), the local runtime (replica-sim processes in pool slots) and
`bench/autoscale_sim.py` (virtual time) all call this one function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.infra import spec

if TYPE_CHECKING:
    from gpufleet.infra.plan import Plan

__all__ = [
    "AutoscaleFacts",
    "AutoscaleSettings",
    "AutoscaleState",
    "DeploymentMemory",
    "LoadSample",
    "PoolObservation",
    "PoolSlots",
    "ScaleAction",
    "ScaleDecision",
    "ScalingFacts",
    "desired_replicas",
    "scale",
]

Key = tuple[str, str]  # (deployment, pool)


class AutoscaleSettings(BaseModel):
    """Fleet-wide knobs of the autoscaler (per-deployment ones are in `autoscaling:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stale_after_s: float = Field(60.0, gt=0, description="a load sample older than this holds the count")
    full_retry_s: float = Field(600.0, gt=0, description="a pool marked full is tried again after this long")
    pending_timeout_s: float = Field(
        300.0, gt=0, description="for deployments without autoscaling: Pending this long marks a pool full"
    )
    ttft_window_s: float = Field(60.0, gt=0, description="ttft_p90_s: the p90 is over the last this many seconds")


@dataclass(frozen=True)
class PoolSlots:
    """One pool of a deployment's failover chain, as the plan sizes it."""

    pool: str
    priority: int
    capacity: int
    """Replicas of this deployment that fit the pool at `max_nodes` (max_nodes x replicas per node)."""
    warm_placeholders: int = 0
    """Warm nodes the pool holds with placeholders."""
    gpus_per_node: int = 1


@dataclass(frozen=True)
class ScalingFacts:
    """What the plan says about one deployment's scaling."""

    name: str
    min_replicas: int
    max_replicas: int
    gpus_per_replica: int
    chain: tuple[PoolSlots, ...]
    """Pools in failover order (most preferred first)."""
    autoscaling: spec.Autoscaling | None = None


@dataclass(frozen=True)
class AutoscaleFacts:
    """The plan's facts the decision needs: every deployment, and each pool's GPUs at max_nodes."""

    deployments: tuple[ScalingFacts, ...]
    pool_gpus: Mapping[str, int]

    @classmethod
    def from_plan(cls, plan: Plan) -> AutoscaleFacts:
        """Read the facts from a compiled plan."""
        pools = {p.name: p for p in plan.pools}
        deps = []
        for d in plan.deployments:
            per_node = {perf.pool: perf.replicas_per_node for perf in d.pools}
            chain = tuple(
                PoolSlots(
                    pool=name,
                    priority=pools[name].priority,
                    capacity=pools[name].max_nodes * per_node.get(name, 0),
                    warm_placeholders=pools[name].warm_nodes,
                    gpus_per_node=pools[name].gpus_per_node,
                )
                for name in d.failover
            )
            deps.append(ScalingFacts(d.name, d.min_replicas, d.max_replicas, d.gpus_per_replica, chain, d.autoscaling))
        return cls(tuple(deps), {p.name: p.max_nodes * p.gpus_per_node for p in plan.pools})


@dataclass(frozen=True)
class PoolObservation:
    """One (deployment, pool) now: replicas asked for, ready, and why some are not."""

    replicas: int
    """Replicas asked for (a StatefulSet's spec.replicas; the local runtime's processes)."""
    ready: int
    pending_since_s: tuple[float, ...] = ()
    """When each replica that is not ready yet was asked for."""
    capacity_error_at_s: float | None = None
    """Last capacity error of this pool (adapter stock-out or quota, a replica that could not start)."""


@dataclass(frozen=True)
class LoadSample:
    """A deployment's load signal at one time.

    `value` is the deployment's total for `in_flight` and `queued_prefill_tokens`, and its p90
    time to first token in seconds over the window for `ttft_p90_s` (None: no request in it).
    """

    observed_at_s: float
    value: float | None
    partial: bool = False
    """Some router pods could not be read: `value` may understate the load, so it may hold or
    raise the count but never lower it."""


@dataclass(frozen=True)
class DeploymentMemory:
    """What the autoscaler remembers about a deployment between rounds."""

    up_since_s: float | None = None
    down_since_s: float | None = None
    last_change_s: float | None = None


@dataclass(frozen=True)
class AutoscaleState:
    """The autoscaler's memory: per deployment, and the pools marked full (since when, why)."""

    deployments: Mapping[str, DeploymentMemory] = field(default_factory=dict)
    full: Mapping[str, tuple[float, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScaleAction:
    """One change of a (deployment, pool) target."""

    deployment: str
    pool: str
    current: int
    target: int
    reason: str


@dataclass(frozen=True)
class ScaleDecision:
    """One round's outcome."""

    targets: dict[Key, int]
    """Replicas per (deployment, pool), every pool of every chain."""
    actions: tuple[ScaleAction, ...]
    evict_placeholders: dict[str, int]
    """Warm placeholders per pool whose capacity this round's new replicas take (evict them now)."""
    desired: dict[str, int]
    """Replicas per deployment the signal asks for (after bounds, before delays and capacity)."""
    state: AutoscaleState
    notes: tuple[tuple[str, str], ...] = ()
    """(deployment, what it waits for or lacks): below min_replicas, no room, a delay running."""


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def desired_replicas(facts: ScalingFacts, ready: int, current: int, sample: LoadSample | None) -> int | None:
    """Replicas the signal asks for, clamped to min/max; None when the sample says nothing (hold)."""
    auto = facts.autoscaling
    if auto is None:
        return facts.min_replicas
    if sample is None:
        return None
    base = ready if ready > 0 else current
    if auto.signal == "ttft_p90_s":
        ratio = (sample.value or 0.0) / auto.target
        if base == 0:
            want = 1 if ratio > 0 else 0
        else:
            want = current if abs(ratio - 1) <= auto.tolerance else _ceil(base * ratio)
    else:
        total = max(0.0, sample.value or 0.0)
        if base == 0:
            want = _ceil(total / auto.target)
        else:
            ratio = total / base / auto.target
            want = current if abs(ratio - 1) <= auto.tolerance else _ceil(total / auto.target)
    if sample.partial:
        want = max(want, current)  # a partial read can prove load, never its absence
    return max(facts.min_replicas, min(facts.max_replicas, want))


def _mark_full(
    facts: AutoscaleFacts,
    observed: Mapping[Key, PoolObservation],
    state: AutoscaleState,
    now_s: float,
    settings: AutoscaleSettings,
) -> dict[str, tuple[float, str]]:
    full = {p: v for p, v in state.full.items() if now_s - v[0] < settings.full_retry_s}
    for dep in facts.deployments:
        timeout = dep.autoscaling.pending_timeout_s if dep.autoscaling else settings.pending_timeout_s
        for slot in dep.chain:
            obs = observed.get((dep.name, slot.pool))
            if obs is None:
                continue
            waited = max((now_s - t for t in obs.pending_since_s), default=0.0)
            if waited > timeout:
                full[slot.pool] = (now_s, f"a replica of {dep.name} Pending for {waited:.0f}s")
            err = obs.capacity_error_at_s
            if err is not None and now_s - err < settings.full_retry_s and slot.pool not in full:
                full[slot.pool] = (err, "capacity error")
    return full


def scale(
    facts: AutoscaleFacts,
    observed: Mapping[Key, PoolObservation],
    load: Mapping[str, LoadSample],
    state: AutoscaleState,
    now_s: float,
    settings: AutoscaleSettings | None = None,
) -> ScaleDecision:
    """Targets per (deployment, pool) by pool priority, and the memory for the next round."""
    settings = settings or AutoscaleSettings()
    full = _mark_full(facts, observed, state, now_s, settings)
    notes: list[tuple[str, str]] = []
    memory = dict(state.deployments)
    current: dict[Key, int] = {}
    targets: dict[Key, int] = {}
    reasons: dict[Key, str] = {}
    used_gpus: dict[str, int] = dict.fromkeys(facts.pool_gpus, 0)
    for dep in facts.deployments:
        for slot in dep.chain:
            obs = observed.get((dep.name, slot.pool))
            n = obs.replicas if obs is not None else 0
            current[(dep.name, slot.pool)] = n
            used_gpus[slot.pool] = used_gpus.get(slot.pool, 0) + n * dep.gpus_per_replica

    totals: dict[str, int] = {}
    desired_out: dict[str, int] = {}
    for dep in facts.deployments:
        keys = [(dep.name, s.pool) for s in dep.chain]
        cur_total = sum(current[k] for k in keys)
        ready = sum(o.ready for k in keys if (o := observed.get(k)) is not None)
        for k in keys:  # a full pool keeps what is ready there; its Pending replicas go elsewhere
            targets[k] = current[k]
            obs = observed.get(k)
            if k[1] in full and obs is not None and current[k] > obs.ready:
                targets[k] = obs.ready
                reasons[k] = f"pool full ({full[k[1]][1]})"
                used_gpus[k[1]] -= (current[k] - obs.ready) * dep.gpus_per_replica
        sample = load.get(dep.name)
        if sample is not None and now_s - sample.observed_at_s > settings.stale_after_s:
            notes.append((dep.name, f"load sample {now_s - sample.observed_at_s:.0f}s old: holding"))
            sample = None
        elif sample is None and dep.autoscaling is not None:
            notes.append((dep.name, "no load sample: holding"))
        want = desired_replicas(dep, ready, cur_total, sample)
        bounded = max(dep.min_replicas, min(dep.max_replicas, cur_total))
        desired = bounded if want is None else want
        desired_out[dep.name] = desired
        mem = memory.get(dep.name, DeploymentMemory())
        total = bounded  # outside min/max: back inside at once; the signal then moves it on
        auto = dep.autoscaling
        if bounded != cur_total:
            mem = replace(mem, last_change_s=now_s)
        if desired > total:
            since = mem.up_since_s if mem.up_since_s is not None else now_s
            mem = replace(mem, up_since_s=since, down_since_s=None)
            delay = auto.scale_up_delay_s if auto else 0.0
            if now_s - since >= delay:
                total = desired
                mem = replace(mem, up_since_s=None, last_change_s=now_s)
            else:
                notes.append((dep.name, f"scale up to {desired} in {delay - (now_s - since):.0f}s"))
        elif desired < total:
            since = mem.down_since_s if mem.down_since_s is not None else now_s
            mem = replace(mem, down_since_s=since, up_since_s=None)
            delay = auto.scale_down_delay_s if auto else 0.0
            ready_at = max(since, mem.last_change_s if mem.last_change_s is not None else since) + delay
            if now_s >= ready_at:
                total = desired
                mem = replace(mem, down_since_s=None, last_change_s=now_s)
            else:
                notes.append((dep.name, f"scale down to {desired} in {ready_at - now_s:.0f}s"))
        else:
            mem = replace(mem, up_since_s=None, down_since_s=None)
        memory[dep.name] = mem
        totals[dep.name] = total

    # Removals first (lowest priority first), so the GPUs they free are room for additions.
    for dep in facts.deployments:
        extra = sum(targets[(dep.name, s.pool)] for s in dep.chain) - totals[dep.name]
        for slot in reversed(dep.chain):
            if extra <= 0:
                break
            k = (dep.name, slot.pool)
            take = min(extra, targets[k])
            if take:
                targets[k] -= take
                used_gpus[slot.pool] -= take * dep.gpus_per_replica
                reasons.setdefault(k, f"scale down to {totals[dep.name]} (lowest priority first)")
                extra -= take
    evict: dict[str, int] = {}
    for dep in facts.deployments:
        need = totals[dep.name] - sum(targets[(dep.name, s.pool)] for s in dep.chain)
        reason = (
            f"below min_replicas {dep.min_replicas}"
            if totals[dep.name] <= dep.min_replicas
            else f"scale up to {totals[dep.name]}"
        )
        for slot in dep.chain:
            if need <= 0:
                break
            k = (dep.name, slot.pool)
            if slot.pool in full:
                continue
            gpu_room = (facts.pool_gpus.get(slot.pool, 0) - used_gpus.get(slot.pool, 0)) // dep.gpus_per_replica
            add = max(0, min(need, slot.capacity - targets[k], gpu_room))
            if add:
                targets[k] += add
                used_gpus[slot.pool] = used_gpus.get(slot.pool, 0) + add * dep.gpus_per_replica
                need -= add
                reasons[k] = reason + (f" (replaces Pending in {reasons[k]})" if k in reasons else "")
                if slot.warm_placeholders:
                    nodes = _ceil(add * dep.gpus_per_replica / max(1, slot.gpus_per_node))
                    evict[slot.pool] = min(slot.warm_placeholders, evict.get(slot.pool, 0) + nodes)
        if need > 0:
            blocked = [
                f"{s.pool} full ({full[s.pool][1]})" if s.pool in full else f"{s.pool} at capacity" for s in dep.chain
            ]
            notes.append((dep.name, f"{need} replica(s) without room: {', '.join(blocked) or 'no pools'}"))
        placed = sum(targets[(dep.name, s.pool)] for s in dep.chain)
        if placed < dep.min_replicas:
            notes.append((dep.name, f"below min_replicas: {placed} of {dep.min_replicas} placed"))

    # Removals first, lowest priority first; then additions, highest priority first.
    prio = {(d.name, s.pool): s.priority for d in facts.deployments for s in d.chain}
    changed = [k for k in targets if targets[k] != current[k]]
    changed.sort(key=lambda k: (targets[k] > current[k], prio[k] if targets[k] < current[k] else -prio[k]))
    actions = tuple(ScaleAction(k[0], k[1], current[k], targets[k], reasons.get(k, "rebalance")) for k in changed)
    return ScaleDecision(
        targets=targets,
        actions=actions,
        evict_placeholders=evict,
        desired=desired_out,
        state=AutoscaleState(memory, full),
        notes=tuple(notes),
    )
