"""The small interfaces routing plugins implement, and what they are built with.

A *profile* (`profile.ProfilePolicy`) routes a request in three steps, each a plugin:

    Filter.filter(features, replicas) -> (replicas kept, spilled?)   # e.g. pool_priority
    Scorer.score(candidates)          -> one cost per candidate      # prefix, queued_prefill, ...
    Picker.pick(candidates, costs)    -> index of the chosen one     # min_cost

Every score is a cost, lower is better, and the scorers of one profile share one unit, so that
its weights are comparable. The default profile `cache_aware` scores in **seconds** of estimated
time to first token (`ttft`); the load and prefix scorers of `cache_aware_tokens` score in
**estimated prefill tokens** (the prefill a request would still need on that replica, or the
prefill work queued ahead of it there): weight 0.5 on `queued_prefill` says a token of someone
else's queued prefill costs this request half as much as a token of its own. A scorer at weight 0
still runs, for what it tells the others (`prefix` provides the matched blocks).

Every plugin (and every whole `Policy`) may implement the lifecycle hooks of `Hooks`; they are
called by the live server and the simulator alike, never with I/O inside:

    on_routed(features, decision)            the request was sent to decision.replica
    on_completed(features, replica, ok=..., output_tokens=...)
    on_replica_reset(replica_id)             the replica lost its cache (ejected, restarted)
    on_replica_removed(replica_id)           the replica left the set (default: on_replica_reset)
    bind(clock=..., **context)               the simulator's clock and engines, for a prebuilt policy
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

if TYPE_CHECKING:
    from gpufleet.router.config import RouterSettings

__all__ = [
    "Candidates",
    "Component",
    "Filter",
    "Hooks",
    "Picker",
    "PluginContext",
    "PluginError",
    "Scorer",
    "rendezvous",
]

_M64 = (1 << 64) - 1


def rendezvous(key: int, replica_hash: int) -> int:
    """Highest-random-weight score of a replica for a key (splitmix64 finalizer of key ^ replica)."""
    x = (key ^ replica_hash) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class PluginError(ValueError):
    """A plugin could not be registered, imported or built; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a filter, scorer or picker is built with, besides its own parameters."""

    settings: RouterSettings
    seed: int | None = None
    clock: Callable[[], float] = time.monotonic
    context: Mapping[str, Any] = field(default_factory=dict)
    """Extra context by name (the simulator's `engines`); a plugin lists what it needs in `needs`."""


class Candidates:
    """The replicas a profile scores for one request, and what its scorers share about them."""

    __slots__ = ("features", "matched_blocks", "reason", "replicas", "uncached_tokens")

    def __init__(self, features: RequestFeatures, replicas: Sequence[ReplicaState]) -> None:
        self.features = features
        self.replicas = replicas
        self.reason: str | None = None
        """Set by a picker that chose for a reason of its own (`session`): the decision's reason."""
        self.matched_blocks: list[int] | None = None
        """Per replica, the prompt's leading blocks it is predicted to hold: set by the scorer that
        `provides_matches` (the prefix scorer), read by scorers that depend on it and by the
        profile for its `Decision`."""
        self.uncached_tokens: list[float] | None = None
        """Per replica, the prefill-token equivalent of the prompt's part it does not hold on its GPU
        (a lower tier's transfer cost included): set with `matched_blocks` by the prefix scorer."""


class Hooks:
    """Lifecycle hooks; every one is optional (the default does nothing)."""

    needs: ClassVar[tuple[str, ...]] = ()
    """Context keys the plugin cannot be built without (see `PluginContext.context`)."""

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        """The request was sent to `decision.replica`: update indexes."""

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        """The request finished on `replica` (ok=False: it failed or was cancelled)."""

    def on_replica_reset(self, replica_id: str) -> None:
        """The replica lost its KV cache (ejected or restarted): forget what it held."""

    def on_replica_removed(self, replica_id: str) -> None:
        """The replica left the set (membership): drop what is kept about it. It may come back
        later under the same id as a new engine, so the default forgets its cache."""
        self.on_replica_reset(replica_id)

    def bind(self, *, clock: Callable[[], float], **context: Any) -> None:
        """Run on `clock` with `context` from now on (the simulator, for a policy built before it)."""

    def cached_blocks(self, replica_id: str) -> int:
        """Blocks the plugin believes the replica holds (0 without an index; for admin views)."""
        return 0


class Component(Hooks):
    """Base of filters, scorers and pickers: built by the registry as `cls(params, ctx)`."""

    def __init__(self, params: Any = None, ctx: PluginContext | None = None) -> None:
        """A plugin without parameters or context needs no constructor of its own."""


class Filter(Component, ABC):
    """Narrows the replicas a request may go to."""

    kind: ClassVar[str] = "filter"

    @abstractmethod
    def filter(
        self, features: RequestFeatures, replicas: Sequence[ReplicaState]
    ) -> tuple[Sequence[ReplicaState], bool]:
        """The replicas kept (in order), and whether they lie below the model's top pool (a spill)."""


class Scorer(Component, ABC):
    """Costs every candidate (in its profile's unit: seconds or prefill tokens); lower is better."""

    kind: ClassVar[str] = "scorer"
    provides_matches: ClassVar[bool] = False
    """True for a scorer that sets `Candidates.matched_blocks`: a profile runs it first."""

    @abstractmethod
    def score(self, candidates: Candidates) -> Sequence[float]:
        """One cost per `candidates.replicas`, in the same order."""


class Picker(Component, ABC):
    """Chooses one candidate from the profile's weighted costs."""

    kind: ClassVar[str] = "picker"

    @abstractmethod
    def pick(self, candidates: Candidates, costs: Sequence[float]) -> int:
        """The index (into `candidates.replicas`) of the chosen replica."""
