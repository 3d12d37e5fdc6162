"""The KV-cache and timing model of one serving replica: pure, deterministic, step-driven.

One model, two drivers: `gpufleet replica-sim` runs it on the wall clock behind a real
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

Lower tiers (after vLLM's native CPU offloading, LMCache, SGLang's hierarchical cache)
    With `cpu_capacity_tokens` (and `disk_capacity_tokens`), blocks the GPU evicts move to a
    CPU LRU (`TierCache`), and blocks the CPU tier evicts move to disk. A request whose leading
    blocks continue below the GPU loads them back instead of prefilling them, when that is
    faster: of that run it loads the prefix minimising `tier_load_latency_s + blocks x block
    size / tier rate - blocks x block size / prefill rate` (nothing when no prefix gains, so a
    short hit or a slow tier is recomputed). The load takes GPU blocks like a prefill; while it
    runs the request waits (other requests keep being scheduled) and the PCIe copy overlaps the
    batch's compute. The blocks stay in the CPU tier too. `cached_tokens` counts every tier;
    events and stats split out the CPU and disk shares.

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

Modules: `values` (parameters, requests, events, counters), `cache` (`PrefixCache`, `TierCache`), `engine`
(`ReplicaEngine`); every name is importable from `gpufleet.router.kvmodel` itself.
"""

from gpufleet.router.kvmodel.cache import PrefixCache, TierCache
from gpufleet.router.kvmodel.engine import ReplicaEngine
from gpufleet.router.kvmodel.values import (
    AdmissionError,
    EngineParams,
    EngineRequest,
    EngineStats,
    Event,
    EventKind,
    RequestView,
)

__all__ = [
    "AdmissionError",
    "EngineParams",
    "EngineRequest",
    "EngineStats",
    "Event",
    "EventKind",
    "PrefixCache",
    "TierCache",
    "ReplicaEngine",
    "RequestView",
]
