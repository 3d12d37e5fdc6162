"""Replica-sims that publish KV events on loopback, and the router's config of one (shared by the tests)."""

from __future__ import annotations

from typing import Any

from gpufleet.router.config import ReplicaConfig
from gpufleet.router.replica import SimSettings
from gpufleet.router.replica.sim import ReplicaSim

BS = 4


def make_sim(
    tok: Any,
    rid: str,
    *,
    kv_capacity_tokens: int = 4096,
    endpoint: str = "tcp://127.0.0.1:0",
    replay: str | None = "tcp://127.0.0.1:0",
) -> ReplicaSim:
    """A replica-sim with the test tokenizer `tok`, publishing on `endpoint` (port 0: any free one)."""
    return ReplicaSim(
        SimSettings(
            model="m",
            replica_id=rid,
            block_size_tokens=BS,
            kv_capacity_tokens=kv_capacity_tokens,
            prefill_tokens_per_s=200_000,
            decode_tokens_per_s=2000,
            tokenizer=str(tok),
            kv_events_endpoint=endpoint,
            kv_events_replay_endpoint=replay,
        )
    )


def replica_config(rid: str, s: ReplicaSim, port: int) -> ReplicaConfig:
    """The router's config of a started replica-sim listening on `port`, with its event endpoints."""
    assert s.publisher is not None, "start the replica-sim first (its publisher binds on start)"
    return ReplicaConfig(
        id=rid,
        url=f"http://127.0.0.1:{port}",
        deployment="d",
        model="m",
        pool="p",
        priority=0,
        kv_capacity_tokens=4096,
        max_model_len=32768,
        max_concurrent_requests=64,
        kv_events_endpoint=s.publisher.endpoint,
        kv_events_replay_endpoint=s.publisher.replay_endpoint,
    )


def chat_body(words: list[str], n: int = 2) -> dict[str, Any]:
    return {"model": "m", "max_tokens": n, "messages": [{"role": "user", "content": " ".join(words)}]}
