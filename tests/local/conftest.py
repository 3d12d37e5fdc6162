"""Shared helpers for the local runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.infra.local import pid_alive as alive  # noqa: F401 - shared by the tests

SMALL_FLEET = """\
fleet: t-local
clouds:
  local: {host: 127.0.0.1}
nodepools:
  - {name: top, cloud: local, instance_type: g6.xlarge, priority: 10, min_nodes: %(top)d, max_nodes: %(top)d}
  - {name: next, cloud: local, instance_type: g5.xlarge, priority: 5, min_nodes: 1, max_nodes: 3, warm_nodes: 1%(engine)s}
deployments:
  - {name: qwen, model: Qwen/Qwen3-0.6B, min_replicas: %(minr)d, max_replicas: %(maxr)d, max_model_len: 4096, max_concurrent_requests: %(mcr)d}
router:
  health: {interval_s: 0.2, timeout_s: 1.0, backoff_initial_s: 0.2, backoff_max_s: 0.5}
%(router)s"""


def write_fleet(tmp_path: Path, engine: str = "", mcr: int = 16, top: int = 1, router: str = "") -> Path:
    """A small local fleet: `top` nodes in the preferred pool, one replica and one warm node in the next."""
    p = tmp_path / "fleet.yaml"
    p.write_text(
        SMALL_FLEET % {"engine": engine, "mcr": mcr, "top": top, "minr": top + 1, "maxr": top + 2, "router": router}
    )
    return p


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # loopback only, whatever the environment says
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
