"""The plan rendered for the router: `RouterConfig` with every replica and the policy settings.

"Configured from the same declarations" is literal: the router reads only what this module
renders from the compiled Plan. Replica URLs depend on where the replicas run (loopback
ports for the local runtime, in-cluster DNS names on Kubernetes), so the caller passes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from gpufleet.infra.plan import DeploymentPlan, KvTierPlan, Plan, ReplicaPlan
from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from gpufleet.router.kvevents import ranks

__all__ = ["DEFAULT_STEP_TOKENS", "EventEndpoints", "data_parallel_size", "render", "step_tokens"]

DEFAULT_STEP_TOKENS = 8192
"""Prefill tokens per engine step when the engine args do not set it: vLLM's default for an API
server on a large-memory GPU (smaller GPUs default lower; set the flag to tell the router)."""


class EventEndpoints(NamedTuple):
    """Where one replica publishes its KV events, when not at its URL's host on the declared
    `router.kv_events` ports (the local runtime: each replica on ports of its own)."""

    endpoint: str | None
    """None: the URL's host on the declared port."""
    replay_endpoint: str | None
    data_parallel_size: int = 1


def data_parallel_size(dep: DeploymentPlan) -> int:
    """The data-parallel ranks of a vLLM deployment's engines (`--data-parallel-size` in its
    `engine_args`; the plan has no such field): each publishes KV events on its own ports."""
    return ranks.engine_data_parallel_size(dep.engine_args) if dep.engine == "vllm" else 1


def step_tokens(dep: DeploymentPlan) -> int:
    """Prefill tokens one engine step computes: vLLM's `--max-num-batched-tokens`, SGLang's
    `--chunked-prefill-size`, among the deployment's `engine_args`, else `DEFAULT_STEP_TOKENS`."""
    flag = "--max-num-batched-tokens" if dep.engine == "vllm" else "--chunked-prefill-size"
    return ranks.engine_int_arg(dep.engine_args, flag) or DEFAULT_STEP_TOKENS


def _tiers(tiers: KvTierPlan | None) -> dict[str, float]:
    """What the router's prefix scorer needs of a replica's CPU tier (nothing without one)."""
    if tiers is None:
        return {}
    return {"cpu_kv_capacity_tokens": tiers.cpu_kv_tokens, "cpu_load_tokens_per_s": tiers.cpu_hit_tokens_per_s}


def render(
    plan: Plan,
    urls: Mapping[str, str] | Callable[[ReplicaPlan], str],
    settings: RouterSettings | None = None,
    events: Mapping[str, EventEndpoints] | None = None,
) -> RouterConfig:
    """Render the router's config from the plan.

    `urls` maps a replica id to its base URL (or is a function of the replica). `settings`
    overrides the declared router settings (e.g. the demo flips the policy). `events` gives the
    KV-event endpoints of the replicas it names (the others: their URL's host, declared ports,
    and the deployment's data-parallel ranks).
    """

    def url_of(replica: ReplicaPlan) -> str:
        return urls(replica) if callable(urls) else urls[replica.id]

    replicas = []
    for dep in plan.deployments:
        kv = {p.pool: p.kv_cache_tokens_per_replica for p in dep.pools}
        perf = {p.pool: p for p in dep.pools}
        for r in dep.replicas:
            ev = (events or {}).get(r.id) or EventEndpoints(None, None, data_parallel_size(dep))
            replicas.append(
                ReplicaConfig(
                    id=r.id,
                    url=url_of(r).rstrip("/"),
                    deployment=dep.name,
                    model=dep.model,
                    pool=r.pool,
                    priority=r.priority,
                    kv_capacity_tokens=kv[r.pool],
                    max_model_len=dep.max_model_len,
                    max_concurrent_requests=dep.max_concurrent_requests,
                    prefill_tokens_per_s=perf[r.pool].prefill_tokens_per_s or None,
                    decode_tokens_per_s=perf[r.pool].decode_tokens_per_s or None,
                    kv_events_endpoint=ev.endpoint,
                    kv_events_replay_endpoint=ev.replay_endpoint,
                    data_parallel_size=ev.data_parallel_size,
                    max_batched_tokens=step_tokens(dep),
                    **_tiers(perf[r.pool].kv_tiers),
                )
            )
    return RouterConfig(fleet=plan.fleet, settings=settings or plan.router, replicas=replicas)
