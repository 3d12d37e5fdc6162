"""Routing policies: filters, scorers and a picker composed into profiles, and whole policies.

Modules
    base        the plugin interfaces (`Filter`, `Scorer`, `Picker`, lifecycle `Hooks`), `rendezvous`
    registry    the one open registry: `register(type, factory)`, `make(name, settings, ...)`
    policy      `Policy`, the one signature the server and the simulator call
    profile     `ProfilePolicy` (composition), the `cache_aware` and `cache_aware_tokens` profiles
    filters/    pool_priority
    scorers/    prefix, queued_prefill, in_flight, kv_usage (prefill tokens), ttft, added_prefill (seconds)
    pickers/    min_cost, session_affinity
    round_robin, random, least_load, session    whole policies

Importing this package registers the built-in plugins. See docs/router.md for the config side.
"""

from gpufleet.router.policies import base, least_load, profile, random, registry, round_robin, session
from gpufleet.router.policies.filters import pool_priority
from gpufleet.router.policies.pickers import min_cost, session_affinity
from gpufleet.router.policies.policy import Policy
from gpufleet.router.policies.scorers import added_prefill, in_flight, kv_usage, prefix, queued_prefill, ttft

__all__ = [
    "Policy",
    "added_prefill",
    "base",
    "in_flight",
    "kv_usage",
    "least_load",
    "min_cost",
    "pool_priority",
    "prefix",
    "profile",
    "queued_prefill",
    "random",
    "registry",
    "round_robin",
    "session",
    "session_affinity",
    "ttft",
]
