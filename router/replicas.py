"""The replica set: the router's live membership, grouped by model, with their upstream targets.

`ReplicaSet` owns the long-lived `ReplicaState` objects (policies, the health tracker and the
proxy all share them) and everything derived from the list: one `ModelReplicas` per model
(highest priority first, the model's top priority and its context length) and one parsed
`UpstreamTarget` per replica, derived in one place, `_index`.

Membership is live. Replicas come from *sources*, each owning its own replicas by id: `config`
(the router config file, reloaded on change or SIGHUP, and the admin API), and one source per
discovered Service (`kubernetes:<namespace>/<service>`). One call changes a source:

    change = replicas.replace(new_configs, source="config")   # the source's whole new list

It validates the whole list first (nothing half-applied: a bad URL or an id another source owns
raises `ConfigError` listing every problem), then diffs it by replica id:

- a replica whose *identity* (URL, deployment, model, KV capacity, context length, KV-event
  endpoints, data-parallel size) is unchanged
  stays: the same `ReplicaState` object, so its prefix index, sessions, health record and load
  carry over; pool, priority and `max_concurrent_requests` are updated in place;
- a replica that is gone, or whose identity changed (a new engine behind that id), leaves: its
  state is marked unhealthy, so requests already holding it finish but none is routed to it; a
  changed one joins again as new.

Listeners (`subscribe`) hear every non-empty `MembershipChange` after the indexes are rebuilt:
the router updates health records, metrics, policies (`on_replica_removed`) and idle upstream
connections there. Models can be *declared* (`declare_model`) so that a model whose replicas
have all left is still served, with 503 rather than 404 (discovery declares the plan's).
Everything here runs on the router's event loop; nothing is thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from gpufleet.router import errors
from gpufleet.router.config import ReplicaConfig
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream.request import UpstreamTarget

__all__ = ["CONFIG_SOURCE", "MembershipChange", "MembershipListener", "ModelReplicas", "ReplicaSet"]

log = logging.getLogger("gpufleet.router.membership")

CONFIG_SOURCE = "config"
"""The source of the router config file's replicas (and of the admin API's changes)."""


def _replica_state(config: ReplicaConfig) -> ReplicaState:
    """The router's live state of one configured replica (healthy, idle)."""
    return ReplicaState(
        id=config.id,
        model=config.model,
        pool=config.pool,
        priority=config.priority,
        kv_capacity_tokens=config.kv_capacity_tokens,
        max_model_len=config.max_model_len,
        max_concurrent_requests=config.max_concurrent_requests,
        url=config.url.rstrip("/"),
        prefill_tokens_per_s=config.prefill_tokens_per_s,
        decode_tokens_per_s=config.decode_tokens_per_s,
        step_tokens=config.max_batched_tokens,
        cpu_kv_capacity_tokens=config.cpu_kv_capacity_tokens,
        cpu_load_tokens_per_s=config.cpu_load_tokens_per_s,
    )


def _identity(c: ReplicaConfig) -> tuple[object, ...]:
    """What makes a replica the same engine: a change here means its cache and health are not its own."""
    return (
        c.url.rstrip("/"),
        c.deployment,
        c.model,
        c.kv_capacity_tokens,
        c.max_model_len,
        c.kv_events_endpoint,
        c.kv_events_replay_endpoint,
        c.data_parallel_size,
        c.max_batched_tokens,
    )


@dataclass(slots=True, eq=False)
class ModelReplicas:
    """The replicas of one model and what the request path reads about them, resolved once."""

    model: str
    replicas: list[ReplicaState]
    """Highest priority first (policies do not need the order; admin views read better)."""
    top_priority: int
    """Priority of the model's top pool: a request routed below it is a spill."""
    max_model_len: int
    """The smallest context length among the model's replicas: what every one of them accepts."""


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """What one `replace` did to one source."""

    source: str
    added: tuple[ReplicaState, ...] = ()
    removed: tuple[ReplicaState, ...] = ()
    updated: tuple[ReplicaState, ...] = ()
    """Stayed, with pool, priority or max_concurrent_requests changed in place."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)

    def summary(self) -> dict[str, list[str]]:
        """The ids added, removed and updated (the admin API's answer, log lines)."""
        return {
            "added": [r.id for r in self.added],
            "removed": [r.id for r in self.removed],
            "updated": [r.id for r in self.updated],
        }


MembershipListener = Callable[[MembershipChange], None]


@dataclass(frozen=True, slots=True)
class _DeclaredModel:
    top_priority: int
    max_model_len: int


class ReplicaSet(Sequence[ReplicaState]):
    """Every replica the router proxies to, by source, indexed by model and by id (module docs)."""

    def __init__(self, configs: Iterable[ReplicaConfig] = (), *, source: str = CONFIG_SOURCE) -> None:
        """Start with `configs` in `source`; raises `ConfigError` for a replica it cannot use."""
        self._sources: dict[str, dict[str, tuple[ReplicaConfig, ReplicaState]]] = {}
        self._owner: dict[str, str] = {}  # replica id -> its source
        self._declared: dict[str, _DeclaredModel] = {}
        self._listeners: list[MembershipListener] = []
        self._replicas: list[ReplicaState] = []
        self.by_model: dict[str, ModelReplicas] = {}
        self.targets: dict[str, UpstreamTarget] = {}
        self.replace(configs, source=source)

    # -- membership -----------------------------------------------------------------------
    def subscribe(self, listener: MembershipListener) -> None:
        """Call `listener(change)` after every change that added, removed or updated a replica."""
        self._listeners.append(listener)

    def declare_model(self, model: str, *, top_priority: int, max_model_len: int) -> None:
        """Keep serving `model` (503 while it has no replica) with this top pool and context length."""
        self._declared[model] = _DeclaredModel(top_priority, max_model_len)
        self._index()

    def source_of(self, replica_id: str) -> str | None:
        """The source that owns the replica, or None."""
        return self._owner.get(replica_id)

    def configs(self, source: str = CONFIG_SOURCE) -> list[ReplicaConfig]:
        """The replica configs a source holds now, in its order."""
        return [c for c, _ in self._sources.get(source, {}).values()]

    def get(self, replica_id: str) -> ReplicaState | None:
        """The live state of a member, or None."""
        src = self._owner.get(replica_id)
        return self._sources[src][replica_id][1] if src is not None else None

    def problems(self, configs: Sequence[ReplicaConfig], *, source: str = CONFIG_SOURCE) -> list[str]:
        """Why `replace(configs, source=source)` would be refused (empty when it would not)."""
        out: list[str] = []
        seen: set[str] = set()
        for i, c in enumerate(configs):
            if c.id in seen:
                out.append(f"replicas[{i}].id: duplicate replica id {c.id!r}")
            seen.add(c.id)
            owner = self._owner.get(c.id)
            if owner is not None and owner != source:
                out.append(f"replicas[{i}].id: replica {c.id!r} already comes from {owner}")
            try:
                UpstreamTarget(c.url.rstrip("/"))
            except ValueError as exc:
                out.append(f"replicas[{i}].url: replica {c.id}: {exc}")
        return out

    def replace(self, configs: Iterable[ReplicaConfig], *, source: str = CONFIG_SOURCE) -> MembershipChange:
        """Make `configs` the whole membership of `source` (module docs); all or nothing."""
        new = list(configs)
        problems = self.problems(new, source=source)
        if problems:
            raise errors.ConfigError("; ".join(problems))
        old = self._sources.get(source, {})
        kept: dict[str, tuple[ReplicaConfig, ReplicaState]] = {}
        added: list[ReplicaState] = []
        removed: list[ReplicaState] = []
        updated: list[ReplicaState] = []
        for c in new:
            prev = old.get(c.id)
            if prev is not None and _identity(prev[0]) == _identity(c):
                state = prev[1]
                if (state.pool, state.priority, state.max_concurrent_requests) != (
                    c.pool,
                    c.priority,
                    c.max_concurrent_requests,
                ):
                    state.pool, state.priority = c.pool, c.priority
                    state.max_concurrent_requests = c.max_concurrent_requests
                    updated.append(state)
                kept[c.id] = (c, state)
                continue
            if prev is not None:
                removed.append(prev[1])  # same id, another engine: it leaves and the new one joins
            state = _replica_state(c)
            kept[c.id] = (c, state)
            added.append(state)
        removed.extend(state for rid, (_, state) in old.items() if rid not in kept)
        for state in removed:
            state.healthy = False  # requests holding it finish; no new one is routed to it
            if self._owner.get(state.id) == source and state.id not in kept:
                del self._owner[state.id]
        for rid in kept:
            self._owner[rid] = source
        if kept:
            self._sources[source] = kept
        else:
            self._sources.pop(source, None)
        change = MembershipChange(source, tuple(added), tuple(removed), tuple(updated))
        if change:
            self._index()
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:  # one listener's bug must not leave the others behind
                    log.exception("membership listener failed on a change of %s", source)
        return change

    def add(self, config: ReplicaConfig, *, source: str = CONFIG_SOURCE) -> MembershipChange:
        """Add (or update) one replica of `source`."""
        rest = [c for c in self.configs(source) if c.id != config.id]
        return self.replace([*rest, config], source=source)

    def remove(self, replica_id: str, *, source: str = CONFIG_SOURCE) -> MembershipChange:
        """Remove one replica of `source` (an empty change when that source does not hold it)."""
        return self.replace([c for c in self.configs(source) if c.id != replica_id], source=source)

    # -- derived views --------------------------------------------------------------------
    def _index(self) -> None:
        """Derive the replica list, the per-model groups and the per-replica targets."""
        replicas = [state for members in self._sources.values() for _, state in members.values()]
        groups: dict[str, list[ReplicaState]] = {m: [] for m in self._declared}
        for r in replicas:
            groups.setdefault(r.model, []).append(r)
        by_model = {}
        for model, group in groups.items():
            group.sort(key=lambda x: -x.priority)
            declared = self._declared.get(model)
            top = max([r.priority for r in group] + ([declared.top_priority] if declared else []))
            lens = [r.max_model_len for r in group] or ([declared.max_model_len] if declared else [])
            by_model[model] = ModelReplicas(model=model, replicas=group, top_priority=top, max_model_len=min(lens))
        self._replicas = replicas
        self.by_model = by_model
        self.targets = {r.id: UpstreamTarget(r.url) for r in replicas}

    def models(self) -> list[str]:
        """The models served, sorted."""
        return sorted(self.by_model)

    @overload
    def __getitem__(self, index: int) -> ReplicaState: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ReplicaState]: ...

    def __getitem__(self, index: int | slice) -> ReplicaState | Sequence[ReplicaState]:
        return self._replicas[index]

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self) -> Iterator[ReplicaState]:
        return iter(self._replicas)
