"""The engine's value types: its parameters, a request, the events it emits, its counters, a request's progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AdmissionError", "EngineParams", "EngineRequest", "EngineStats", "Event", "EventKind", "RequestView"]


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
    cpu_capacity_tokens: int = 0
    """KV tokens of the CPU tier (0: none): blocks the GPU evicts move there."""
    cpu_load_tokens_per_s: float = 0.0
    """Rate a CPU hit moves back to the GPU (host link), tokens per second."""
    disk_capacity_tokens: int = 0
    """KV tokens of the disk tier below the CPU (0: none): blocks the CPU tier evicts move there."""
    disk_load_tokens_per_s: float = 0.0
    tier_load_latency_s: float = 0.002
    """Fixed cost of one load from a lower tier (a scheduler round, the DMA set-up)."""

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
        if self.cpu_capacity_tokens < 0 or self.disk_capacity_tokens < 0 or self.tier_load_latency_s < 0:
            raise ValueError("tier capacities and tier_load_latency_s must be >= 0")
        if self.cpu_capacity_tokens and self.cpu_load_tokens_per_s <= 0:
            raise ValueError("a CPU tier needs cpu_load_tokens_per_s > 0")
        if self.disk_capacity_tokens and (self.disk_load_tokens_per_s <= 0 or not self.cpu_capacity_tokens):
            raise ValueError("a disk tier needs disk_load_tokens_per_s > 0 and a CPU tier above it")

    def load_time_s(self, cpu_tokens: int, disk_tokens: int) -> float:
        """Time to bring `cpu_tokens` from the CPU tier and `disk_tokens` from disk to the GPU."""
        if not cpu_tokens and not disk_tokens:
            return 0.0
        t = self.tier_load_latency_s
        if cpu_tokens:
            t += cpu_tokens / self.cpu_load_tokens_per_s
        if disk_tokens:
            t += disk_tokens / self.disk_load_tokens_per_s
        return t

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
    """What happened to a request in a step."""

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
    """Prompt tokens served from the prefix cache, every tier (set on FIRST_TOKEN and FINISHED)."""
    cpu_cached_tokens: int = 0
    """Of `cached_tokens`, those loaded from the CPU tier."""
    disk_cached_tokens: int = 0
    """Of `cached_tokens`, those loaded from the disk tier."""


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters in vLLM's terms (prefix-cache queries and hits are in tokens)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    """GPU hits (vLLM's `prefix_cache_hits`); lower tiers below (vLLM's `external_prefix_cache_hits`)."""
    cpu_cache_hits: int = 0
    disk_cache_hits: int = 0
    tier_load_s: float = 0.0
    """Seconds requests spent waiting for lower-tier loads."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    steps: int = 0
    evicted_blocks: int = 0


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
