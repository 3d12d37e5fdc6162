"""Routing policies: one signature, picked by name from a registry.

Every policy is an object with

    choose(features: RequestFeatures, replicas: Sequence[ReplicaState]) -> Decision
    on_routed(features, decision)                      # the request was sent to decision.replica
    on_completed(features, replica, ok=..., output_tokens=...)
    on_replica_reset(replica_id)                       # the replica lost its cache (ejected, restarted)

and does no I/O, so the live server and the discrete-event simulator run the very same
objects (the simulator passes its own clock). `replicas` are all replicas of the request's
model, in any order; the policy sees health, load and pool priority on each `ReplicaState`.

Pool priority is common to all policies (`_eligible`): only the highest-priority pool that has
an available (healthy, not saturated) replica is considered; choosing from a lower pool than the
model's top pool is a *spill*. When no replica is available the decision says why:
`Outcome.SATURATED` (429) if some replica is healthy, else `Outcome.UNAVAILABLE` (503).

`cache_aware` scores each eligible replica by estimated time to first token, in tokens:

    cost = load_weight * (queued_prefill_tokens + in_flight * in_flight_cost_tokens)
           + (prompt_tokens - matched_blocks * block_size_tokens)

i.e. prefill work saved by the replica's predicted cache against the work already queued on it
(the idea behind Dynamo's overlap-vs-load cost, with llm-d's scorers folded into one unit). A hot
prefix therefore stays on the replica that holds it until that replica's queue costs more than
prefilling elsewhere; then a second replica takes it and both hold it. The prediction per replica
comes from a `PrefixIndex` bounded by that replica's declared KV capacity, unlike SGLang's global
tree-size bound. Equal costs break by rendezvous hashing of the prompt's first block, so several
router instances make the same choice and distinct prefixes spread over replicas.
"""

from __future__ import annotations

import math
import random as _random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gpufleet.router.config import RouterSettings
from gpufleet.router.prefix import PrefixIndex
from gpufleet.router.types import Decision, Outcome, ReplicaState, RequestFeatures, stable_hash

__all__ = [
    "POLICIES",
    "CacheAwarePolicy",
    "LeastLoadPolicy",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SessionPolicy",
    "make_policy",
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


def _eligible(replicas: Sequence[ReplicaState]) -> tuple[list[ReplicaState], bool, Outcome]:
    """Available replicas of the best pool that has one; whether that is a spill; or why none."""
    top = None
    best = None
    any_healthy = False
    for r in replicas:
        p = r.priority
        if top is None or p > top:
            top = p
        if r.healthy:
            any_healthy = True
            if r.in_flight < r.max_concurrent_requests and (best is None or p > best):
                best = p
    if best is None:
        return [], False, (Outcome.SATURATED if any_healthy else Outcome.UNAVAILABLE)
    tier = [r for r in replicas if r.priority == best and r.available]
    return tier, best < top, Outcome.ROUTED  # type: ignore[operator]


def _no_replica(outcome: Outcome) -> Decision:
    return Decision(None, outcome, outcome.value)


def _least_loaded(tier: Sequence[ReplicaState], key: int) -> ReplicaState:
    """Fewest in-flight requests, then least queued prefill, then rendezvous on `key`."""
    best = tier[0]
    best_score = (best.in_flight, best.queued_prefill_tokens, -rendezvous(key, best.id_hash))
    for r in tier[1:]:
        score = (r.in_flight, r.queued_prefill_tokens, -rendezvous(key, r.id_hash))
        if score < best_score:
            best, best_score = r, score
    return best


class Policy(ABC):
    """Base of every routing policy. Subclasses set `name` and implement `_pick`."""

    name: str = ""

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.clock = clock
        self.seed = seed

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaState]) -> Decision:
        """Pick a replica for the request among `replicas` (all replicas of its model)."""
        tier, spilled, outcome = _eligible(replicas)
        if not tier:
            return _no_replica(outcome)
        decision = self._pick(features, tier, replicas)
        decision.spilled = decision.spilled or spilled
        if not decision.prefill_tokens and decision.replica is not None:
            bt = self.settings.block_size_tokens
            decision.prefill_tokens = max(0, features.prompt_tokens - decision.matched_blocks * bt)
        return decision

    @abstractmethod
    def _pick(self, features: RequestFeatures, tier: list[ReplicaState], replicas: Sequence[ReplicaState]) -> Decision:
        """Choose within `tier` (non-empty, all available, one pool priority)."""

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        """The request was sent to `decision.replica`: update indexes."""

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        """The request finished on `replica` (ok=False: it failed or was cancelled)."""

    def on_replica_reset(self, replica_id: str) -> None:
        """The replica lost its KV cache (ejected or restarted): forget what it held."""

    def cached_blocks(self, replica_id: str) -> int:
        """Blocks the policy believes the replica holds (0 for policies without an index)."""
        return 0


POLICIES: dict[str, type[Policy]] = {}


def _register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


@_register
class RoundRobinPolicy(Policy):
    """Cycle through the eligible replicas, per model."""

    name = "round_robin"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._next: dict[str, int] = {}

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        i = self._next.get(features.model, 0)
        self._next[features.model] = i + 1
        return Decision(tier[i % len(tier)], reason="round_robin")


@_register
class RandomPolicy(Policy):
    """Uniformly random among the eligible replicas (seedable for simulations)."""

    name = "random"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._rng = _random.Random(self.seed)

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        return Decision(tier[self._rng.randrange(len(tier))], reason="random")


@_register
class LeastLoadPolicy(Policy):
    """Fewest in-flight requests; ties by queued prefill, then rendezvous on the prompt."""

    name = "least_load"

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        return Decision(_least_loaded(tier, features.affinity_key), reason="load")


@_register
class SessionPolicy(Policy):
    """Sticky per session id while the replica is healthy and not saturated; else move and stay.

    New sessions go to the least-loaded replica of the best pool (ties by rendezvous on the
    session id, so router instances agree). Requests without a session id are routed by load.
    Sessions are kept in a bounded LRU with a TTL.
    """

    name = "session"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        sid = features.session_id
        if sid is None:
            return Decision(_least_loaded(tier, features.affinity_key), reason="load")
        entry = self._sessions.get(sid)
        moved = False
        if entry is not None:
            rid, expires = entry
            if expires > self.clock():
                for r in replicas:
                    if r.id == rid:
                        if r.available:
                            top = max(x.priority for x in replicas)
                            return Decision(r, reason="session", spilled=r.priority < top)
                        moved = True
                        break
        chosen = _least_loaded(tier, stable_hash(sid))
        return Decision(chosen, reason="session_moved" if moved else "session_new")

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        sid = features.session_id
        if sid is None or decision.replica is None:
            return
        sessions = self._sessions
        sessions[sid] = (decision.replica.id, self.clock() + self.settings.session.ttl_s)
        sessions.move_to_end(sid)
        while len(sessions) > self.settings.session.max_sessions:
            sessions.popitem(last=False)

    def session_replica(self, session_id: str) -> str | None:
        """The replica a session is bound to, if any (for tests and admin views)."""
        entry = self._sessions.get(session_id)
        return entry[0] if entry else None


@_register
class CacheAwarePolicy(Policy):
    """Prefix-cache-aware routing bounded by each replica's declared KV capacity (module docs)."""

    name = "cache_aware"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._indexes: dict[str, PrefixIndex] = {}
        ca = self.settings.cache_aware
        self._load_weight = ca.load_weight
        self._min_match = ca.min_match_blocks
        self._in_flight_cost = ca.in_flight_cost_tokens
        self._bt = self.settings.block_size_tokens

    def index(self, replica: ReplicaState) -> PrefixIndex:
        """The replica's prefix index, sized from its declared KV capacity on first use."""
        idx = self._indexes.get(replica.id)
        if idx is None:
            idx = self._indexes[replica.id] = PrefixIndex(replica.kv_capacity_tokens // self._bt)
        return idx

    def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
        hashes = features.block_hashes
        prompt = features.prompt_tokens
        bt = self._bt
        lw = self._load_weight
        ifc = self._in_flight_cost
        key = features.affinity_key
        best = None
        best_cost = math.inf
        best_tie = -1
        best_match = 0
        for r in tier:
            m = self.index(r).match(hashes) if hashes else 0
            if m < self._min_match:
                m = 0
            cost = lw * (r.queued_prefill_tokens + r.in_flight * ifc) + max(0, prompt - m * bt)
            if cost < best_cost:
                best, best_cost, best_match = r, cost, m
                best_tie = -1  # computed lazily: only exact ties need the hash
            elif cost == best_cost:
                if best_tie < 0:
                    best_tie = rendezvous(key, best.id_hash)  # type: ignore[union-attr]
                tie = rendezvous(key, r.id_hash)
                if tie > best_tie:
                    best, best_tie, best_match = r, tie, m
        return Decision(best, reason="prefix" if best_match else "load", matched_blocks=best_match)

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        if decision.replica is not None and features.block_hashes:
            self.index(decision.replica).insert(features.block_hashes)

    def on_completed(
        self, features: RequestFeatures, replica: ReplicaState, *, ok: bool, output_tokens: int = 0
    ) -> None:
        if ok and output_tokens > 0:
            # Generated tokens occupy KV blocks too and push older prefixes out.
            self.index(replica).consume(output_tokens // self._bt)

    def on_replica_reset(self, replica_id: str) -> None:
        idx = self._indexes.get(replica_id)
        if idx is not None:
            idx.clear()

    def cached_blocks(self, replica_id: str) -> int:
        idx = self._indexes.get(replica_id)
        return len(idx) if idx is not None else 0


def make_policy(
    name: str,
    settings: RouterSettings | None = None,
    *,
    seed: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """Build the policy registered under `name` (one of `POLICIES`)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
    return cls(settings, seed=seed, clock=clock)
