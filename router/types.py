"""The small value types every routing policy speaks: request features, replica states, decisions.

They are plain `__slots__` dataclasses with no I/O and no dependency beyond the standard
library (and xxhash, for hashing only), so the live server and the discrete-event simulator build them the same way and
cheaply. A `ReplicaState` is long-lived and mutated in place (one per replica); a
`RequestFeatures` is built once per request; a `Decision` is returned by `Policy.choose`.

Load accounting is part of the state so that the server and the simulator account for work
identically: call `begin(prefill)` when a request is sent to a replica, `prefill_done(prefill)`
when its first byte comes back, and `end()` when it finishes (whatever the outcome).

Other router replicas' load reaches a state two ways: the engine's samples
(`report_engine_load`, every router's requests, without how much prefill they still queue) and,
where the routers exchange their own counts (`router.peers`, every `peer_interval_s`), each
peer's report (`report_peer_load`: its queued prefill tokens, queued and in-flight requests
here, exact as of the report). `foreign_load` is what the engine sample shows beyond this router
and the peers that reported then: the load of routers that do not report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Decision", "Outcome", "PeerLoad", "ReplicaState", "RequestFeatures", "stable_hash"]


def _needs_router_extra(data: object, seed: int = 0) -> int:
    raise ModuleNotFoundError("hashing needs xxhash, from the router extra: pip install 'gpufleet[router]'")


try:
    from xxhash import xxh3_64_intdigest as xxh3_64_intdigest
except ModuleNotFoundError:  # pragma: no cover
    # The base install validates a fleet's `router:` section, which imports the routing
    # policies (and so this module) without the router extra; only hashing needs xxhash.
    xxh3_64_intdigest = _needs_router_extra


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (unlike `hash()`), for rendezvous ties."""
    # surrogatepass: a header decoded with surrogateescape (non-UTF-8 bytes) still hashes
    return xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


@dataclass(slots=True)
class RequestFeatures:
    """What a policy may know about one request. Built once, never mutated by policies."""

    model: str
    block_hashes: tuple[int, ...] = ()
    """Chained hashes of the prompt's full blocks: equal hash at index i means equal prefix up to i."""
    prompt_tokens: int = 0
    """Estimated prompt length in tokens."""
    session_id: str | None = None
    affinity_key: int = 0
    """Deterministic key for rendezvous tie-breaks (first block hash, else a hash of the prompt)."""
    session_replica: str | None = None
    """The replica the session is bound to as the server learned it before routing (a verified
    session token, or the shared Redis binding); None: the policy's own memory decides."""


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """One peer router's own counts on a replica, as it reported them at `at` (this router's clock)."""

    at: float
    queued_prefill_tokens: int
    queued_requests: int
    in_flight: int


@dataclass(slots=True, eq=False)
class ReplicaState:
    """The router's live view of one replica. Policies read it; the server or simulator updates it."""

    id: str
    model: str
    pool: str = "default"
    priority: int = 0
    kv_capacity_tokens: int = 0
    max_model_len: int = 1 << 30
    max_concurrent_requests: int = 1 << 30
    url: str = ""
    healthy: bool = True
    in_flight: int = 0
    queued_prefill_tokens: int = 0
    """Uncached prompt tokens of in-flight requests that have not produced their first token yet."""
    kv_usage: float | None = None
    """Fraction (0..1) of the replica's KV blocks in use by requests, as last reported by the replica
    (vLLM `vllm:kv_cache_usage_perc`), sampled by the health checker: stale by up to one interval.
    None until a sample arrives (or when the replica does not export it)."""
    kv_usage_samples: int = 0
    """Number of KV-usage samples taken so far: a policy applies each new sample once."""
    prefill_tokens_per_s: float | None = None
    """The plan's prefill rate for this replica's machine (None when unknown)."""
    decode_tokens_per_s: float | None = None
    """The plan's per-request decode rate for this replica's machine (None when unknown)."""
    cpu_kv_capacity_tokens: int = 0
    """KV tokens of the replica's CPU tier (the plan's kv_offload; 0: GPU only)."""
    cpu_load_tokens_per_s: float | None = None
    """The plan's rate a CPU-tier hit moves back to the GPU (None: no tier)."""
    step_tokens: int = 8192
    """Prefill tokens the engine computes per step (vLLM `--max-num-batched-tokens`, SGLang
    `--chunked-prefill-size`): a longer uncached prompt takes several steps."""
    suspect: bool = False
    """A replica failure was seen and no success since: routed to only when nothing else is available."""
    queued_requests: int = 0
    """This router's requests sent here that have not produced their first token yet."""
    engine_waiting: int = 0
    """Requests waiting in the engine's queue at the last engine-load sample (every router's)."""
    engine_running: int = 0
    """Requests running in the engine's batch at the last engine-load sample (every router's)."""
    engine_kv_usage: float | None = None
    """KV-cache usage (0..1) at the last engine-load sample; None without one."""
    engine_sampled_at: float = float("-inf")
    """When the last engine-load sample was taken (the policy's clock); -inf: never."""
    sampled_in_flight: int = 0
    """This router's `in_flight` when the last engine-load sample was taken."""
    sampled_queued: int = 0
    """This router's `queued_requests` when the last engine-load sample was taken."""
    routed: int = 0
    """Requests this router has sent here, ever (`begin` counts them)."""
    sampled_routed: int = 0
    """`routed` when the last engine-load sample was taken."""
    engine_full_running: int = 0
    """The engine's running limit as its samples show it: the most requests it ran at a sample
    that also reported waiting ones while this router's own queued prefill fitted in one step or
    the reported KV usage left no room for a mean queued request (so the wait was for a slot or
    memory, not for the step's token budget), raised by any later sample that ran more; 0 until
    such a sample."""
    peers: dict[str, PeerLoad] = field(default_factory=dict)
    """The last report of each peer router that reported this replica (`report_peer_load`)."""
    peer_routed: int = 0
    """`routed` when the last peer report arrived."""
    peer_own_in_flight: int = 0
    """This router's `in_flight` when the last peer report arrived."""
    sampled_peer_in_flight: int = 0
    """The peers' reported in-flight requests here when the last engine-load sample was taken."""
    sampled_peer_queued: int = 0
    """The peers' reported queued requests here when the last engine-load sample was taken."""
    id_hash: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.id_hash:
            self.id_hash = stable_hash(self.id)

    @property
    def saturated(self) -> bool:
        """True when the replica already runs as many requests as it declared it can."""
        return self.in_flight >= self.max_concurrent_requests

    @property
    def available(self) -> bool:
        """Healthy and not saturated: a request may be sent here now."""
        return self.healthy and self.in_flight < self.max_concurrent_requests

    def begin(self, prefill_tokens: int) -> None:
        """A request was sent here with `prefill_tokens` of (estimated) uncached prompt."""
        self.in_flight += 1
        self.routed += 1
        self.queued_requests += 1
        self.queued_prefill_tokens += prefill_tokens

    def prefill_done(self, prefill_tokens: int) -> None:
        """The request's first token was computed: its prefill no longer queues ahead of others.
        Called once per request: at its first byte when streamed, when its prefill is expected to
        end for an answer that arrives whole (the server), or when it ends without either."""
        self.queued_prefill_tokens = max(0, self.queued_prefill_tokens - prefill_tokens)
        self.queued_requests = max(0, self.queued_requests - 1)

    def report_engine_load(self, waiting: int, running: int, kv_usage: float | None, now: float) -> None:
        """Record an engine-load sample (the engine's /metrics, every router's requests) taken at
        `now`, together with this router's own counts at that moment, so that a policy can tell
        the requests of other routers (sample minus own-at-sample) from its own (exact, now)."""
        self.engine_waiting = max(0, waiting)
        self.engine_running = max(0, running)
        self.engine_kv_usage = None if kv_usage is None else min(1.0, max(0.0, kv_usage))
        # Requests also wait when the step's token budget is spent on prefill (long prompts fill a
        # step with a few requests running): a running count seen then is not the engine's limit,
        # and learning it would price a slot wait on an engine with room. A wait shows a limit
        # while this router's own queued prefill fits in one step (slots), or while the KV memory
        # the sample reports leaves no room for a mean queued request (memory).
        if (self.engine_waiting and (self.queued_prefill_tokens < self.step_tokens or self._memory_full())) or (
            self.engine_full_running
        ):
            self.engine_full_running = max(self.engine_full_running, self.engine_running)
        self.engine_sampled_at = now
        self.sampled_in_flight = self.in_flight
        self.sampled_queued = self.queued_requests
        self.sampled_routed = self.routed
        peers = self.peers.values()
        self.sampled_peer_in_flight = sum(p.in_flight for p in peers)
        self.sampled_peer_queued = sum(p.queued_requests for p in peers)

    def _memory_full(self) -> bool:
        """The last sample's KV usage leaves no room for a mean queued request of this router's:
        requests wait for memory (the engine's limit at this prompt mix), not for the step budget."""
        cap, usage, n = self.kv_capacity_tokens, self.engine_kv_usage, self.queued_requests
        if not cap or usage is None or not n:
            return False
        return usage * cap + self.queued_prefill_tokens / n > cap

    def foreign_load(self, beyond_peers: bool = False) -> tuple[int, int]:
        """(waiting, running) requests of *other* routers at the last engine-load sample: what the
        engine reported beyond this router's own requests then (0, 0 without a sample); with
        `beyond_peers`, also beyond the peers' reported requests (the more of their counts at the
        sample and now): the routers that do not report."""
        own, queued = self.sampled_in_flight, self.sampled_queued
        if beyond_peers:
            # Requests a peer sent after its report and before the sample are in the sample and
            # in the peer's next report: the larger of its counts then and now is its share.
            peers = self.peers.values()
            own += max(self.sampled_peer_in_flight, sum(p.in_flight for p in peers))
            queued += max(self.sampled_peer_queued, sum(p.queued_requests for p in peers))
        foreign = max(0, self.engine_waiting + self.engine_running - own)
        waiting = min(foreign, max(0, self.engine_waiting - queued))
        return waiting, foreign - waiting

    def report_peer_load(
        self, peer: str, queued_prefill_tokens: int, queued_requests: int, in_flight: int, now: float
    ) -> None:
        """Record peer router `peer`'s own counts here (its `queued_prefill_tokens`,
        `queued_requests` and `in_flight`), received at `now`; negative values count as 0."""
        in_flight = max(0, in_flight)
        queued = min(in_flight, max(0, queued_requests))
        self.peers[peer] = PeerLoad(now, max(0, queued_prefill_tokens), queued, in_flight)
        self.peer_routed = self.routed
        self.peer_own_in_flight = self.in_flight

    def forget_peer(self, peer: str) -> None:
        """Drop `peer`'s report (it left, or could not be read): the engine samples cover it again."""
        self.peers.pop(peer, None)

    def peer_load(self, now: float, max_age_s: float) -> tuple[int, int, int] | None:
        """(queued prefill tokens, queued requests, in-flight requests) of the peers whose report is
        at most `max_age_s` old, summed; None when no peer report is that fresh."""
        tokens = queued = in_flight = 0
        fresh = False
        for p in self.peers.values():
            if now - p.at <= max_age_s:
                fresh = True
                tokens += p.queued_prefill_tokens
                queued += p.queued_requests
                in_flight += p.in_flight
        return (tokens, queued, in_flight) if fresh else None

    def report_kv_usage(self, usage: float) -> None:
        """Record a KV-usage sample from the replica (clamped to 0..1)."""
        self.kv_usage = min(1.0, max(0.0, usage))
        self.kv_usage_samples += 1

    def end(self) -> None:
        """The request finished (success, failure or cancellation)."""
        self.in_flight = max(0, self.in_flight - 1)


class Outcome(str, Enum):
    """Why a `Decision` has no replica, or that it has one."""

    ROUTED = "routed"
    SATURATED = "saturated"
    """Every healthy replica of the model is at max_concurrent_requests (HTTP 429)."""
    UNAVAILABLE = "unavailable"
    """No healthy replica of the model (HTTP 503)."""


@dataclass(slots=True)
class Decision:
    """A policy's answer. `replica` is None unless `outcome` is ROUTED."""

    replica: ReplicaState | None
    outcome: Outcome = Outcome.ROUTED
    reason: str = ""
    """Short label for metrics: e.g. prefix, load, session, new_session, round_robin."""
    matched_blocks: int = 0
    """Blocks of the prompt the chosen replica is predicted to hold."""
    prefill_tokens: int = 0
    """Estimated uncached prompt tokens the chosen replica must prefill."""
    spilled: bool = False
    """True when the chosen replica is not in the highest-priority pool that serves the model."""
