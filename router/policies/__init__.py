"""Routing policies: filters, scorers and a picker composed into profiles, and whole policies.

Modules
    base        the plugin interfaces (`Filter`, `Scorer`, `Picker`, lifecycle `Hooks`), `rendezvous`
    registry    the one open registry: `register(type, factory)`, `make(name, settings, ...)`
    policy      `Policy`, the one signature the server and the simulator call
    profile     `ProfilePolicy` (composition) and the `cache_aware` profile
    filters/    pool_priority
    scorers/    prefix, queued_prefill, in_flight, kv_usage (every score in prefill tokens)
    pickers/    min_cost
    round_robin, random, least_load, session    whole policies

Importing this package registers the built-in plugins. See docs/router.md for the config side.
"""

from gpufleet.router.policies import base, least_load, profile, random, registry, round_robin, session
from gpufleet.router.policies.filters import pool_priority
from gpufleet.router.policies.pickers import min_cost
from gpufleet.router.policies.policy import Policy
from gpufleet.router.policies.scorers import in_flight, kv_usage, prefix, queued_prefill

__all__ = [
    "Policy",
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
]
