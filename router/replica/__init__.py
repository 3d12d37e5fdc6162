"""A simulated serving replica: vLLM's OpenAI-compatible HTTP surface over `kvmodel` on the wall clock.

It answers the way a vLLM replica does, so the router, `gpufleet up`, tests and benchmarks can
run a whole fleet on one CPU machine:

- `POST /v1/chat/completions`, `POST /v1/completions` (SSE streaming and not), with
  `usage.prompt_tokens_details.cached_tokens` from the prefix cache;
- `GET /health`, `GET /v1/models`, `POST /tokenize`, `POST /detokenize` (vLLM's shapes),
  `GET /version`, and `GET /server_info` / `/get_server_info` / `/model_info` /
  `/get_model_info` without a `model_path` (so the SGLang router can use it as a worker without
  trying to download a tokenizer);
- `GET /metrics`: vLLM's Prometheus names (`vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total`, `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  `vllm:request_success_total`, `vllm:time_to_first_token_seconds`,
  `vllm:e2e_request_latency_seconds`, `vllm:time_per_output_token_seconds`, ...);
- admin failure injection (`POST /admin/fail`, `POST /admin/die`) and warm-standby promotion
  (`POST /admin/promote`) behind a bearer token.

Tokens. There is no tokenizer: a prompt is rendered exactly as the router renders it
(`gpufleet.router.prefix.render_prompt`), it counts `ceil(chars / chars_per_token)` tokens, and
its prefix blocks are `block_size_tokens * chars_per_token` characters hashed with the router's
`block_hashes`. With the same `chars_per_token` and block size as the router's settings, the
router's predicted prefix and the replica's real cache therefore speak about the same blocks.
`/tokenize` returns one deterministic id per `chars_per_token` characters.

Output. The text is a deterministic function of the prompt: a natural length between 8 and
128 tokens drawn from the prompt's hash (`finish_reason: stop`), cut at `max_tokens`
(`finish_reason: length`); vLLM's `ignore_eos: true` makes it exactly `max_tokens`.

A client that disconnects cancels its request at once: its batch slot and KV blocks are freed.

Modules: `settings` (`SimSettings`, `FailureMode`), `sim` (`ReplicaSim`: the engine on the wall
clock, request parsing, answer text), `metrics` (vLLM's Prometheus names), `app` (the aiohttp
application, `listen`, `serve`), `thread` (`RunningReplica`, `serve_in_thread`).
"""

from gpufleet.router.replica.app import build_app
from gpufleet.router.replica.settings import FailureMode, SimSettings
from gpufleet.router.replica.sim import ReplicaSim
from gpufleet.router.replica.thread import RunningReplica, serve_in_thread

__all__ = ["FailureMode", "ReplicaSim", "RunningReplica", "SimSettings", "build_app", "serve_in_thread"]
