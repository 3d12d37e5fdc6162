"""The warm-capacity / failover controller.

`decide` (pure: plan facts + utilisation samples + time -> actions) and its types live in
`gpufleet.infra.controller.decision` and are re-exported here; the reconcile loop that observes
pools through the provider adapters, applies actions, logs them and exports Prometheus metrics
lives in `gpufleet.infra.controller.runtime`; the fleet simulation in `.sim`. See
docs/controller.md.
"""

from __future__ import annotations

from gpufleet.infra.controller import decision
from gpufleet.infra.controller.decision import *  # noqa: F403 - the public API, listed in decision.__all__

__all__ = list(decision.__all__)
