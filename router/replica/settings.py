"""The simulated replica's typed settings, and the failure injected into it through `/admin/fail`."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.router import kvmodel

__all__ = ["FailureMode", "SimSettings"]


@dataclass
class SimSettings:
    """How one simulated replica behaves. The rates and capacity come from the plan."""

    model: str = "sim-model"
    replica_id: str = "replica-sim"
    kv_capacity_tokens: int = 65_536
    prefill_tokens_per_s: float = 20_000.0
    decode_tokens_per_s: float = 80.0
    max_running: int = 64
    max_batched_tokens: int = 8192
    max_model_len: int = 32_768
    block_size_tokens: int = 16
    chars_per_token: float = 4.0
    decode_batch_penalty: float = 0.01
    cpu_kv_capacity_tokens: int = 0
    """KV tokens of the CPU tier (kv_offload; 0: GPU only)."""
    cpu_load_tokens_per_s: float = 0.0
    disk_kv_capacity_tokens: int = 0
    disk_load_tokens_per_s: float = 0.0
    tier_load_latency_s: float = 0.002
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token for /admin/*; None disables the admin endpoints."""
    standby: bool = False
    """Start as a warm standby: loaded and listening, but /health and requests answer 503 until
    `POST /admin/promote` (how the local runtime holds warm replicas the router skips)."""
    tokenizer: str | None = None
    """The model's tokenizer.json (or its directory): prompts are tokenized as vLLM does (chat
    template included) and blocks hashed from token ids; needed to publish KV events."""
    chat_template: str | None = None
    kv_events_endpoint: str | None = None
    """Publish vLLM KV events on this ZMQ PUB endpoint (e.g. tcp://127.0.0.1:5557; port 0 or * for any)."""
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = "kv-events"
    exit_on_die: bool = False
    """`POST /admin/die` ends the process (CLI) instead of closing the listener (in-process use)."""

    def engine_params(self) -> kvmodel.EngineParams:
        """The kvmodel parameters these settings describe."""
        return kvmodel.EngineParams(
            kv_capacity_tokens=self.kv_capacity_tokens,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            block_size_tokens=self.block_size_tokens,
            max_running=self.max_running,
            max_batched_tokens=self.max_batched_tokens,
            max_model_len=self.max_model_len,
            decode_batch_penalty=self.decode_batch_penalty,
            cpu_capacity_tokens=self.cpu_kv_capacity_tokens,
            cpu_load_tokens_per_s=self.cpu_load_tokens_per_s,
            disk_capacity_tokens=self.disk_kv_capacity_tokens,
            disk_load_tokens_per_s=self.disk_load_tokens_per_s,
            tier_load_latency_s=self.tier_load_latency_s,
        )

    @property
    def block_chars(self) -> int:
        """Characters per hashed prefix block (as the router computes them)."""
        return max(1, int(self.block_size_tokens * self.chars_per_token))


@dataclass
class FailureMode:
    """Injected failure: `status` answers with an HTTP status, `hang` never answers, `drop` closes."""

    mode: str = "ok"
    status: int = 503
    remaining: int | None = None
    """Requests still to fail (None: until cleared)."""

    def take(self, consume: bool = True) -> str:
        """The failure to apply to the next request; `consume` counts it down (health checks do not)."""
        if self.mode == "ok":
            return "ok"
        mode = self.mode
        if consume and self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.mode, self.remaining = "ok", None
        return mode
