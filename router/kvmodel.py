"""The KV-cache and timing model of one serving replica: pure, deterministic, step-driven.

One module, two drivers: `gpufleet replica-sim` runs it on the wall clock behind a real
OpenAI-compatible HTTP server, and the discrete-event simulator runs the very same engine on
virtual time. Nothing here does I/O, reads a clock or draws random numbers; the caller passes
`now` in, so the same inputs always give the same events.

Prefix cache (after vLLM's paged block pool)
    A prompt is a sequence of full blocks of `block_size_tokens`, each named by a chained hash
    (equal hash at index i means equal prefix up to block i; `gpufleet.router.prefix` makes
    them). The pool holds `kv_capacity_tokens // block_size_tokens` blocks. A block used by a
    queued-then-running request is *pinned* (reference count > 0) and is never evicted; when the
    last user finishes, the block stays cached and joins an LRU list of evictable blocks, tail of
    the prompt first so that prefix heads outlive their tails. A new request reuses the longest
    cached run of its leading blocks (at least one prompt token is always computed, as in vLLM)
    and allocates the rest, evicting least recently used unpinned blocks when the pool is full.
    Blocks are registered in the cache as prefill computes them, so a request arriving while a
    shared prefix is still being prefilled reuses what is done so far.

    Memory for the whole sequence (prompt plus requested output) is reserved at admission, so the
    engine never needs preemption; a request that cannot get its blocks waits (first come, first
    served), and one that could never fit is refused by `admit`.

Continuous batching (after vLLM's v1 scheduler with chunked prefill)
    Time advances in engine steps. Each step has a token budget (`max_batched_tokens`): every
    decoding request takes one token, then requests still in prefill take chunks of their
    uncached prompt, then waiting requests are admitted (up to `max_running`) while budget and
    memory last. A step lasts `prefill_tokens / prefill_tokens_per_s` plus, when anything
    decodes, one decode step of `(1 + decode_batch_penalty * (n_decoding - 1)) /
    decode_tokens_per_s`: decode is memory-bound, so a batch costs little more than one stream,
    while prefill is compute-bound and shared. The step that finishes a prompt's prefill emits
    its first token; every later step emits one more token, until the request's output length.

Events
    `step(now)` completes every step that ends at or before `now` and returns their events in
    time order: `FIRST_TOKEN` (with `cached_tokens`), `TOKENS` (one new token) and `FINISHED`.
    `next_event_time()` says when to call again. `cancel` frees a request's slot and blocks at
    once (a disconnected client must not keep using the replica).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "AdmissionError",
    "EngineParams",
    "EngineRequest",
    "EngineStats",
    "Event",
    "EventKind",
    "PrefixCache",
    "ReplicaEngine",
    "RequestView",
]


class AdmissionError(ValueError):
    """A request the replica can never serve (longer than its KV capacity or `max_model_len`)."""


@dataclass(frozen=True, slots=True)
class EngineParams:
    """The shape of one replica. Rates come from the plan (per deployment and pool)."""

    kv_capacity_tokens: int
    """KV-cache capacity in tokens (GPU memory left after weights, divided by KV bytes per token)."""
    prefill_tokens_per_s: float
    """Prompt tokens the replica prefills per second (compute-bound, shared by the batch)."""
    decode_tokens_per_s: float
    """Tokens per second one sequence decodes when alone (memory-bound, one token per step)."""
    block_size_tokens: int = 16
    max_running: int = 64
    """Requests running at once (vLLM `--max-num-seqs`); the rest wait."""
    max_batched_tokens: int = 8192
    """Token budget of one step (vLLM `--max-num-batched-tokens`): bounds a prefill chunk."""
    max_model_len: int = 1 << 20
    decode_batch_penalty: float = 0.01
    """Relative cost of each extra decoding sequence in a step (KV reads grow with the batch)."""

    def __post_init__(self) -> None:
        if self.block_size_tokens < 1:
            raise ValueError("block_size_tokens must be >= 1")
        if self.kv_capacity_tokens < self.block_size_tokens:
            raise ValueError("kv_capacity_tokens must hold at least one block")
        if self.prefill_tokens_per_s <= 0 or self.decode_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s and decode_tokens_per_s must be positive")
        if self.max_running < 1 or self.max_batched_tokens < 1 or self.max_model_len < 1:
            raise ValueError("max_running, max_batched_tokens and max_model_len must be >= 1")
        if self.decode_batch_penalty < 0:
            raise ValueError("decode_batch_penalty must be >= 0")

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self.kv_capacity_tokens // self.block_size_tokens


@dataclass(slots=True)
class EngineRequest:
    """One request as the engine sees it: sizes and prefix block hashes, no text."""

    id: str
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()
    """Chained hashes of the prompt's full blocks (may be fewer than prompt_tokens // block size)."""


class EventKind(enum.Enum):
    FIRST_TOKEN = "first_token"
    TOKENS = "tokens"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Event:
    """Something a request experienced at `time` (end of the step that produced it)."""

    kind: EventKind
    request_id: str
    time: float
    output_tokens: int
    """Tokens generated so far by this request (1 at FIRST_TOKEN)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (set on FIRST_TOKEN and FINISHED)."""


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters in vLLM's terms (prefix-cache queries and hits are in tokens)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    steps: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """A paged KV block pool with hashed (shareable) blocks, reference counts and LRU eviction.

    Invariant: `used_blocks <= num_blocks` always; a block with references is never evicted.
    """

    __slots__ = ("_private", "_ref", "_lru", "evicted", "num_blocks")

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self._ref: dict[int, int] = {}  # hashed block -> users
        self._lru: OrderedDict[int, None] = OrderedDict()  # hashed blocks with no user, oldest first
        self._private = 0  # blocks held by requests and not (yet) shareable
        self.evicted = 0

    @property
    def used_blocks(self) -> int:
        """Blocks allocated: cached (pinned or not) plus private."""
        return len(self._ref) + self._private

    @property
    def pinned_blocks(self) -> int:
        """Blocks in use by requests (vLLM's `kv_cache_usage_perc` numerator)."""
        return len(self._ref) - len(self._lru) + self._private

    @property
    def cached_blocks(self) -> int:
        """Hashed blocks held, pinned or evictable."""
        return len(self._ref)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._ref

    def lru_order(self) -> list[int]:
        """Evictable blocks, next to be evicted first."""
        return list(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` that are cached."""
        n = 0
        for h in hashes:
            if h not in self._ref:
                break
            n += 1
        return n

    def can_allocate(self, hit: Sequence[int], new_blocks: int) -> bool:
        """Whether pinning `hit` and allocating `new_blocks` fresh blocks fits now."""
        evictable = len(self._lru) - sum(1 for h in hit if h in self._lru)
        return new_blocks <= self.num_blocks - self.used_blocks + evictable

    def acquire(self, hit: Sequence[int], new_blocks: int) -> None:
        """Pin the cached blocks `hit` and allocate `new_blocks` private blocks, evicting LRU ones."""
        if not self.can_allocate(hit, new_blocks):
            raise RuntimeError("acquire without room: call can_allocate first")
        for h in hit:
            self._pin(h)
        self._make_room(new_blocks)
        self._private += new_blocks

    def register(self, block_hash: int) -> bool:
        """Turn one private block of a request into the shareable cached block `block_hash`.

        Returns False (block stays private) when another request already cached that hash.
        """
        if block_hash in self._ref:
            return False
        if self._private < 1:
            raise RuntimeError("register without a private block")
        self._private -= 1
        self._ref[block_hash] = 1
        return True

    def release(self, pinned: Sequence[int], private: int) -> None:
        """Drop a request's references; its cached blocks become evictable, tail first."""
        for h in reversed(pinned):
            n = self._ref[h] - 1
            self._ref[h] = n
            if n == 0:
                self._lru[h] = None
        self._private -= private
        if self._private < 0:
            raise RuntimeError("released more private blocks than held")

    def _pin(self, h: int) -> None:
        if self._ref[h] == 0:
            del self._lru[h]
        self._ref[h] += 1

    def _make_room(self, n: int) -> None:
        over = self.used_blocks + n - self.num_blocks
        for _ in range(max(0, over)):
            h, _ = self._lru.popitem(last=False)
            del self._ref[h]
            self.evicted += 1


@dataclass(frozen=True, slots=True)
class RequestView:
    """Read-only progress of one request inside the engine (for schedulers and oracles)."""

    request: EngineRequest
    arrival: float
    running: bool
    cached_tokens: int
    computed_tokens: int
    """Prompt tokens whose KV exists (cached + prefilled so far); 0 while waiting."""
    generated_tokens: int

    @property
    def prefill_left(self) -> int:
        """Prompt tokens still to prefill; for a waiting request the whole prompt (its reuse is decided at start)."""
        return self.request.prompt_tokens - self.computed_tokens


@dataclass(slots=True)
class _Running:
    req: EngineRequest
    arrival: float
    cached_tokens: int = 0
    computed: int = 0  # prompt tokens whose KV exists (cached + prefilled)
    generated: int = 0
    pinned: list[int] = field(default_factory=list)
    private: int = 0
    registered: int = 0  # leading hashed blocks pinned or registered by this request


@dataclass(slots=True)
class _Step:
    end: float
    prefill: dict[str, int]  # request id -> prompt tokens computed in this step
    decode: list[str]


class ReplicaEngine:
    """One replica's scheduler, prefix cache and clock, advanced by the caller.

    Call `admit(req, now)` when a request arrives, `step(now)` whenever `now` reaches
    `next_event_time()` (or later; the engine catches up in its own time), and `cancel` when a
    client goes away. Times are floats in seconds on any monotonic origin.
    """

    def __init__(self, params: EngineParams) -> None:
        self.params = params
        self.cache = PrefixCache(params.num_blocks)
        self.stats = EngineStats()
        self._waiting: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}  # insertion order = admission order
        self._step: _Step | None = None
        self._now = 0.0

    # -- introspection -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use by requests (0..1)."""
        return self.cache.pinned_blocks / self.cache.num_blocks

    def next_event_time(self) -> float | None:
        """When the step in progress ends, or None when the engine is idle."""
        return self._step.end if self._step else None

    def requests(self) -> list[RequestView]:
        """Every request the engine holds: running ones in admission order, then the waiting queue."""
        out = [
            RequestView(r.req, r.arrival, True, r.cached_tokens, r.computed, r.generated)
            for r in self._running.values()
        ]
        out.extend(RequestView(w.req, w.arrival, False, 0, 0, 0) for w in self._waiting)
        return out

    def has_request(self, request_id: str) -> bool:
        return request_id in self._running or any(r.req.id == request_id for r in self._waiting)

    # -- driving -------------------------------------------------------------------------
    def admit(self, req: EngineRequest, now: float) -> None:
        """Queue a request; if the engine is idle, a step starts at `now`.

        Raises `AdmissionError` for a request that could never run on this replica.
        """
        p = self.params
        if req.prompt_tokens < 1 or req.output_tokens < 1:
            raise AdmissionError("prompt_tokens and output_tokens must be >= 1")
        total = req.prompt_tokens + req.output_tokens
        if total > p.max_model_len:
            raise AdmissionError(f"prompt + output = {total} tokens exceeds max_model_len {p.max_model_len}")
        if self._blocks_needed(req) > self.cache.num_blocks:
            raise AdmissionError(
                f"prompt + output = {total} tokens exceeds the KV capacity of {p.kv_capacity_tokens} tokens"
            )
        if self.has_request(req.id):
            raise AdmissionError(f"duplicate request id {req.id!r}")
        self._now = max(self._now, now)
        self._waiting.append(_Running(req=req, arrival=now))
        if self._step is None:
            self._schedule(self._now)

    def cancel(self, request_id: str, now: float) -> bool:
        """Drop a request wherever it is, freeing its slot and blocks. True if it was there."""
        self._now = max(self._now, now)
        run = self._running.pop(request_id, None)
        if run is not None:
            self.cache.release(run.pinned, run.private)
            self.stats.cancelled += 1
            return True
        for i, w in enumerate(self._waiting):
            if w.req.id == request_id:
                del self._waiting[i]
                self.stats.cancelled += 1
                return True
        return False

    def step(self, now: float) -> list[Event]:
        """Complete every step ending at or before `now`; return their events in time order."""
        events: list[Event] = []
        while self._step is not None and self._step.end <= now:
            step = self._step
            self._step = None
            self._now = max(self._now, step.end)
            self._complete(step, events)
            self._schedule(step.end)
        self._now = max(self._now, now)
        return events

    def run_until_idle(self, now: float = 0.0, limit_s: float = 1e9) -> list[Event]:
        """Drive on virtual time until nothing is left (tests and offline estimates)."""
        events: list[Event] = []
        t = self.next_event_time()
        while t is not None and t - now <= limit_s:
            events.extend(self.step(t))
            t = self.next_event_time()
        return events

    # -- internals -----------------------------------------------------------------------
    def _blocks_needed(self, req: EngineRequest) -> int:
        return math.ceil((req.prompt_tokens + req.output_tokens) / self.params.block_size_tokens)

    def _try_start(self, run: _Running) -> bool:
        """Pin the cached prefix and reserve the rest of the sequence's blocks, if they fit."""
        p = self.params
        req = run.req
        hashes = req.block_hashes[: req.prompt_tokens // p.block_size_tokens]
        hit_blocks = self.cache.match(hashes)
        # vLLM always computes at least the last prompt token, so a full hit drops a block.
        max_cached_blocks = (req.prompt_tokens - 1) // p.block_size_tokens
        hit_blocks = min(hit_blocks, max_cached_blocks)
        hit = list(hashes[:hit_blocks])
        new_blocks = self._blocks_needed(req) - hit_blocks
        if not self.cache.can_allocate(hit, new_blocks):
            return False
        self.cache.acquire(hit, new_blocks)
        run.pinned = hit
        run.private = new_blocks
        run.registered = hit_blocks
        run.cached_tokens = hit_blocks * p.block_size_tokens
        run.computed = run.cached_tokens
        self.stats.prefix_cache_queries += req.prompt_tokens
        self.stats.prefix_cache_hits += run.cached_tokens
        self.stats.prompt_tokens += req.prompt_tokens
        return True

    def _schedule(self, start: float) -> None:
        """Plan the next step at `start` from running and waiting requests (if any work)."""
        p = self.params
        budget = p.max_batched_tokens
        decode: list[str] = []
        prefill: dict[str, int] = {}
        for rid, run in self._running.items():
            if run.computed >= run.req.prompt_tokens:
                if budget < 1:
                    break
                decode.append(rid)
                budget -= 1
        for rid, run in self._running.items():
            left = run.req.prompt_tokens - run.computed
            if left > 0 and budget > 0:
                chunk = min(left, budget)
                prefill[rid] = chunk
                budget -= chunk
        while self._waiting and budget > 0 and len(self._running) < p.max_running:
            head = self._waiting[0]
            if not self._try_start(head):
                break  # first come, first served: the head waits for memory
            self._waiting.popleft()
            self._running[head.req.id] = head
            chunk = min(head.req.prompt_tokens - head.computed, budget)
            prefill[head.req.id] = chunk
            budget -= chunk
        if not decode and not prefill:
            return
        prefill_tokens = sum(prefill.values())
        duration = prefill_tokens / p.prefill_tokens_per_s
        if decode:
            duration += (1.0 + p.decode_batch_penalty * (len(decode) - 1)) / p.decode_tokens_per_s
        self.stats.steps += 1
        self._step = _Step(end=start + duration, prefill=prefill, decode=decode)

    def _complete(self, step: _Step, events: list[Event]) -> None:
        p = self.params
        t = step.end
        for rid in step.decode:
            run = self._running.get(rid)
            if run is None:  # cancelled during the step
                continue
            run.generated += 1
            self.stats.generation_tokens += 1
            events.append(Event(EventKind.TOKENS, rid, t, run.generated, run.cached_tokens))
            if run.generated >= run.req.output_tokens:
                self._finish(run, t, events)
        for rid, chunk in step.prefill.items():
            run = self._running.get(rid)
            if run is None:
                continue
            run.computed += chunk
            # Blocks computed so far become shareable for requests scheduled from now on.
            hashes = run.req.block_hashes
            full = min(run.computed // p.block_size_tokens, len(hashes))
            while run.registered < full:
                h = hashes[run.registered]
                if self.cache.register(h):
                    run.pinned.append(h)
                    run.private -= 1
                run.registered += 1
            if run.computed >= run.req.prompt_tokens:
                run.generated = 1
                self.stats.generation_tokens += 1
                events.append(Event(EventKind.FIRST_TOKEN, rid, t, 1, run.cached_tokens))
                if run.generated >= run.req.output_tokens:
                    self._finish(run, t, events)
        self.stats.evicted_blocks = self.cache.evicted

    def _finish(self, run: _Running, t: float, events: list[Event]) -> None:
        del self._running[run.req.id]
        self.cache.release(run.pinned, run.private)
        self.stats.finished += 1
        events.append(Event(EventKind.FINISHED, run.req.id, t, run.generated, run.cached_tokens))
