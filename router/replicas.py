"""The replica set: the router's replicas from its config, grouped by model, with their upstream targets.

`ReplicaSet` owns the long-lived `ReplicaState` objects (policies, the health tracker and the
proxy all share them) and everything derived from the list: one `ModelReplicas` per model
(highest priority first, the model's top priority and its context length) and one parsed
`UpstreamTarget` per replica. All of it is derived in one place, `_index`, so that live
membership (Kubernetes EndpointSlices, a config reload) can later add and remove replicas by
re-indexing there, without a second copy of the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from gpufleet.router import errors
from gpufleet.router.config import ReplicaConfig
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream.request import UpstreamTarget

__all__ = ["ModelReplicas", "ReplicaSet"]


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
        prefill_tokens_per_s=config.prefill_tokens_per_s or 0.0,
        decode_tokens_per_s=config.decode_tokens_per_s or 0.0,
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


class ReplicaSet(Sequence[ReplicaState]):
    """Every replica the router proxies to, in config order, indexed by model and by id."""

    def __init__(self, configs: Iterable[ReplicaConfig]) -> None:
        """Build the states and their indexes; raises `ConfigError` for a replica URL it cannot use."""
        self._replicas = [_replica_state(c) for c in configs]
        self.by_model: dict[str, ModelReplicas] = {}
        self.targets: dict[str, UpstreamTarget] = {}
        self._index()

    def _index(self) -> None:
        """Derive the per-model groups and the per-replica targets from the replica list."""
        groups: dict[str, list[ReplicaState]] = {}
        for r in self._replicas:
            groups.setdefault(r.model, []).append(r)
        by_model = {}
        for model, group in groups.items():
            group.sort(key=lambda x: -x.priority)
            by_model[model] = ModelReplicas(
                model=model,
                replicas=group,
                top_priority=group[0].priority,
                max_model_len=min(r.max_model_len for r in group),
            )
        targets = {}
        for r in self._replicas:
            try:
                targets[r.id] = UpstreamTarget(r.url)
            except ValueError as exc:
                raise errors.ConfigError(f"replica {r.id}: {exc}") from None
        self.by_model, self.targets = by_model, targets

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
