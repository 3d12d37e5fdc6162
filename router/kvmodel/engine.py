"""The replica engine: continuous batching with chunked prefill over a `PrefixCache`, advanced by the caller."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.router.kvmodel.cache import PrefixCache, TierCache
from gpufleet.router.kvmodel.values import (
    AdmissionError,
    EngineParams,
    EngineRequest,
    EngineStats,
    Event,
    EventKind,
    RequestView,
)

__all__ = ["ReplicaEngine"]


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
    cpu_tokens: int = 0  # of cached_tokens, loaded from the CPU tier
    disk_tokens: int = 0  # of cached_tokens, loaded from disk
    ready_at: float = 0.0  # lower-tier loads done; no prefill before


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

    def __init__(self, params: EngineParams, *, record_kv_events: bool = False) -> None:
        self.params = params
        self.cache = PrefixCache(params.num_blocks)
        bs = params.block_size_tokens
        disk = TierCache(params.disk_capacity_tokens // bs, "DISK") if params.disk_capacity_tokens >= bs else None
        self.cpu: TierCache | None = (
            TierCache(params.cpu_capacity_tokens // bs, "CPU", disk) if params.cpu_capacity_tokens >= bs else None
        )
        self.disk = disk if self.cpu is not None else None
        self.cache.spill = self.cpu
        # What vLLM would publish as KV events, in order: ("stored", hash, request id, block
        # index) when a block becomes shareable, ("removed", hash, "", -1) when it is evicted.
        self._kv_log: list[tuple[str, int, str, int]] | None = [] if record_kv_events else None
        self.cache.log = self._kv_log
        for tier in (self.cpu, self.disk):
            if tier is not None:
                # ("stored:CPU", hash, "", -1) and ("removed:CPU", ...), as vLLM's offloading connector reports.
                tier.log = self._kv_log
        self.stats = EngineStats()
        self._waiting: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}  # insertion order = admission order
        self._step: _Step | None = None
        self._now = 0.0

    # -- introspection -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Requests in the batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot or memory."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use by requests (0..1)."""
        return self.cache.pinned_blocks / self.cache.num_blocks

    def drain_kv_events(self) -> list[tuple[str, int, str, int]]:
        """The KV events since the last call, in order (empty unless built with `record_kv_events`)."""
        log = self._kv_log
        if not log:
            return []
        out = log.copy()
        log.clear()
        return out

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
        """Whether the engine holds this request, running or waiting."""
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
        step = self._step
        if step is None or (not step.prefill and not step.decode):
            # Idle, or only waiting for a lower-tier load: the newcomer need not wait for it.
            self._step = None
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

    def _lower_hits(self, hashes: Sequence[int]) -> list[tuple[bool, float]]:
        """Per leading block of `hashes` found below the GPU: (in the CPU tier, else disk; load seconds)."""
        p = self.params
        cpu, disk = self.cpu, self.disk
        out: list[tuple[bool, float]] = []
        if cpu is None:
            return out
        bs = p.block_size_tokens
        for h in hashes:
            if h in cpu:
                out.append((True, bs / p.cpu_load_tokens_per_s))
            elif disk is not None and h in disk:
                out.append((False, bs / p.disk_load_tokens_per_s))
            else:
                break
        return out

    def _try_start(self, run: _Running, start: float) -> bool:
        """Pin the cached prefix and reserve the rest of the sequence's blocks, if they fit.

        Blocks found below the GPU are loaded back when that is faster than prefilling them:
        of the leading run found in the CPU and disk tiers, the engine loads the prefix that
        minimises `tier_load_latency_s + load time - prefill time` (none when no prefix gains).
        """
        p = self.params
        req = run.req
        bs = p.block_size_tokens
        hashes = req.block_hashes[: req.prompt_tokens // bs]
        hit_blocks = self.cache.match(hashes)
        # vLLM always computes at least the last prompt token, so a full hit drops a block.
        max_cached_blocks = (req.prompt_tokens - 1) // bs
        hit_blocks = min(hit_blocks, max_cached_blocks)
        lower = self._lower_hits(hashes[hit_blocks:max_cached_blocks])
        load_blocks, best, gain = 0, 0.0, p.tier_load_latency_s
        recompute = bs / p.prefill_tokens_per_s
        for j, (_, t) in enumerate(lower):
            gain += t - recompute
            if gain < best:
                best, load_blocks = gain, j + 1
        hit = list(hashes[:hit_blocks])
        new_blocks = self._blocks_needed(req) - hit_blocks
        if not self.cache.can_allocate(hit, new_blocks):
            return False
        # The blocks to load are touched first: the GPU's evictions below spill into the CPU
        # tier and must not push out what this request is about to read.
        loads = hashes[hit_blocks : hit_blocks + load_blocks]
        cpu_blocks = sum(1 for in_cpu, _ in lower[:load_blocks] if in_cpu)
        disk_blocks = load_blocks - cpu_blocks
        for h, (in_cpu, _) in zip(loads, lower):
            tier = self.cpu if in_cpu else self.disk
            if tier is not None:
                tier.touch(h)
        self.cache.acquire(hit, new_blocks)
        run.pinned = hit
        run.private = new_blocks
        run.registered = hit_blocks
        run.cpu_tokens, run.disk_tokens = cpu_blocks * bs, disk_blocks * bs
        load_s = p.load_time_s(run.cpu_tokens, run.disk_tokens)
        run.ready_at = start + load_s
        run.cached_tokens = (hit_blocks + load_blocks) * bs
        run.computed = run.cached_tokens
        self.stats.prefix_cache_queries += req.prompt_tokens
        self.stats.prefix_cache_hits += hit_blocks * bs
        self.stats.cpu_cache_hits += run.cpu_tokens
        self.stats.disk_cache_hits += run.disk_tokens
        self.stats.tier_load_s += load_s
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
        loading = False
        for rid, run in self._running.items():
            left = run.req.prompt_tokens - run.computed
            if left > 0 and run.ready_at > start:
                loading = True  # its blocks are still on their way from a lower tier
                continue
            if left > 0 and budget > 0:
                chunk = min(left, budget)
                prefill[rid] = chunk
                budget -= chunk
        while self._waiting and budget > 0 and len(self._running) < p.max_running:
            head = self._waiting[0]
            if not self._try_start(head, start):
                break  # first come, first served: the head waits for memory
            self._waiting.popleft()
            self._running[head.req.id] = head
            if head.ready_at > start:
                loading = True
                continue
            chunk = min(head.req.prompt_tokens - head.computed, budget)
            prefill[head.req.id] = chunk
            budget -= chunk
        if not decode and not prefill:
            if loading:
                # Nothing to compute until a load lands: an empty step up to the first one.
                ready = min(r.ready_at for r in self._running.values() if r.ready_at > start)
                self._step = _Step(end=ready, prefill={}, decode=[])
            return
        prefill_tokens = sum(prefill.values())
        duration = prefill_tokens / p.prefill_tokens_per_s
        if decode:
            duration += (1.0 + p.decode_batch_penalty * (len(decode) - 1)) / p.decode_tokens_per_s
        end = start + duration
        if loading:
            # A load landing mid-step is picked up when the step ends, or sooner if it was idle.
            end = end if duration > 0 else min(r.ready_at for r in self._running.values() if r.ready_at > start)
        self.stats.steps += 1
        self._step = _Step(end=end, prefill=prefill, decode=decode)

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
                    if self._kv_log is not None:
                        self._kv_log.append(("stored", h, rid, run.registered))
                run.registered += 1
            if run.computed >= run.req.prompt_tokens:
                run.generated = 1
                self.stats.generation_tokens += 1
                events.append(
                    Event(EventKind.FIRST_TOKEN, rid, t, 1, run.cached_tokens, run.cpu_tokens, run.disk_tokens)
                )
                if run.generated >= run.req.output_tokens:
                    self._finish(run, t, events)
        self.stats.evicted_blocks = self.cache.evicted

    def _finish(self, run: _Running, t: float, events: list[Event]) -> None:
        del self._running[run.req.id]
        self.cache.release(run.pinned, run.private)
        self.stats.finished += 1
        events.append(
            Event(EventKind.FINISHED, run.req.id, t, run.generated, run.cached_tokens, run.cpu_tokens, run.disk_tokens)
        )
