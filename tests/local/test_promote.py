"""Promotion has one implementation (`Supervisor.promote`): the autoscaler promotes through it, by pool."""

from __future__ import annotations

import httpx
import pytest

from gpufleet.infra import plan
from gpufleet.infra.local import LocalRuntime

TWO_WARM = """\
fleet: t-promote
clouds:
  local: {host: 127.0.0.1}
nodepools:
  - {name: top, cloud: local, instance_type: g6.xlarge, priority: 10, min_nodes: 1, max_nodes: 3, warm_nodes: 1}
  - {name: next, cloud: local, instance_type: g5.xlarge, priority: 5, min_nodes: 0, max_nodes: 3, warm_nodes: 1}
deployments:
  - name: qwen
    model: Qwen/Qwen3-0.6B
    min_replicas: 1
    max_replicas: 4
    max_model_len: 4096
    autoscaling: {signal: in_flight, target: 2, scale_up_delay_s: 0}
"""


class _Standbys:
    """The standbys' `POST /admin/promote`, as a replica-sim answers it: 200 with the run's token."""

    def __init__(self, rt: LocalRuntime) -> None:
        self.rt = rt
        self.promoted: list[str] = []

    def __call__(self, url: str, headers: dict[str, str], **_kw: object) -> httpx.Response:
        request = httpx.Request("POST", url)
        if headers.get("Authorization") != f"Bearer {self.rt.sim_admin_token}":
            return httpx.Response(401, request=request)
        self.promoted.append(url)
        return httpx.Response(200, json={"promoted": True}, request=request)


@pytest.fixture
def rt(tmp_path, monkeypatch):
    (tmp_path / "fleet.yaml").write_text(TWO_WARM)
    runtime = LocalRuntime(plan.compile_file(str(tmp_path / "fleet.yaml")), workdir=tmp_path / "w", autoscale=True)
    for k, rep in enumerate(runtime.replicas):  # as if started: the standbys are loaded and listening
        rep.state = "warm" if rep.role == "warm" else "active"
        rep.url = f"http://127.0.0.1:{40000 + k}"
    standbys = _Standbys(runtime)
    monkeypatch.setattr(httpx, "post", standbys)
    runtime.standbys = standbys  # type: ignore[attr-defined]
    yield runtime
    runtime.stop()


def _warm(rt: LocalRuntime, pool: str):
    """The standby the plan holds in `pool` (it keeps its id once promoted)."""
    return next(r for r in rt.replicas if r.id == f"qwen-{pool}-warm0")


def test_promote_without_a_pool_takes_the_failover_order_and_with_a_pool_only_that_pool(rt):
    top, nxt = _warm(rt, "top"), _warm(rt, "next")
    assert rt.promote("qwen", "test", pool="next") is nxt
    assert (nxt.state, nxt.role, top.state) == ("active", "active", "warm")
    assert rt.promote("qwen", "test", pool="next") is None  # no standby left there; top's is not taken
    assert rt.promote("qwen", "test") is top
    assert rt.standbys.promoted == [nxt.url + "/admin/promote", top.url + "/admin/promote"]
    assert "promoted warm replica qwen-next-warm0 (pool next) for qwen: test" in rt.events


def test_the_autoscaler_grows_a_pool_through_supervisor_promote_with_that_pool(rt, monkeypatch):
    calls: list[tuple[str, str, str | None]] = []
    real = rt.supervisor.promote

    def spy(dep: str, reason: str, pool: str | None = None):
        calls.append((dep, reason, pool))
        return real(dep, reason, pool=pool)

    monkeypatch.setattr(rt.supervisor, "promote", spy)
    assert rt.autoscaler is not None
    rt.autoscaler._grow("qwen", "next", 1, 0.0)
    assert calls == [("qwen", "its placeholder evicted", "next")]
    assert _warm(rt, "next").state == "active" and _warm(rt, "top").state == "warm"
    assert "promoted warm replica qwen-next-warm0 (pool next) for qwen: its placeholder evicted" in rt.events
