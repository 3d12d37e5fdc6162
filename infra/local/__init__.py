"""The local runtime: the compiled plan run on this machine (`gpufleet up` on `cloud: local` pools).

Modules
    layout      which replica processes the plan asks for (active, and warm standbys)
    runtime     `LocalRuntime`: the replica processes' start and stop, the router and its wiring
    supervisor  health of the replica processes and promotion of warm standbys
    processes   spawning in own process groups, free ports, the parent-death signal, pid checks
    demo        `gpufleet demo`: round_robin against cache_aware on the same traffic, then the
                loss of the preferred pools and the spill-over
"""

from __future__ import annotations

from gpufleet.infra.local.layout import LocalReplica
from gpufleet.infra.local.processes import pid_alive
from gpufleet.infra.local.runtime import LocalRuntime, LocalRuntimeError, check_local

__all__ = ["LocalReplica", "LocalRuntime", "LocalRuntimeError", "check_local", "pid_alive"]
