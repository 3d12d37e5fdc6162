"""The local runtime (gpufleet.infra.local): the plan run as processes on this machine."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpufleet.infra import local, plan
from gpufleet.infra.local import LocalRuntime, LocalRuntimeError

from .conftest import alive, write_fleet

ROOT = Path(__file__).resolve().parents[2]


def _chat(text: str, **kw) -> dict:
    return {"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


def test_public_api_is_pinned():
    assert set(local.__all__) == {"LocalReplica", "LocalRuntime", "LocalRuntimeError", "check_local", "pid_alive"}


def _promotions(rt: LocalRuntime, rounds: int = 50) -> list[str]:
    """Run supervision rounds until one promotes a standby; its promotion events."""
    for _ in range(rounds):
        promoted = [e for e in rt.check() if "promoted" in e]
        if promoted:
            return promoted
        threading.Event().wait(0.05)
    return []


def test_a_fleet_with_cloud_pools_is_refused():
    p = plan.compile_file(str(ROOT / "stacks/multicloud/fleet.yaml"))
    with pytest.raises(LocalRuntimeError, match="aws-h100 \\(aws\\)"):
        local.check_local(p)


def test_layout_has_planned_replicas_and_one_standby_per_warm_node(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    rt = LocalRuntime(p, workdir=tmp_path / "w")
    got = [(r.id, r.pool, r.role) for r in rt.replicas]
    assert got == [
        ("qwen-top-0", "top", "active"),
        ("qwen-next-0", "next", "active"),
        ("qwen-next-warm0", "next", "warm"),
    ]


def test_router_config_lists_standbys_under_their_pool(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    rt = LocalRuntime(p, workdir=tmp_path / "w")
    for i, r in enumerate(rt.replicas):
        r.url = f"http://127.0.0.1:{9000 + i}"
    cfg = rt.router_config_for_run()
    rows = {r.id: (r.pool, r.priority, r.url, r.kv_capacity_tokens) for r in cfg.replicas}
    assert rows["qwen-next-warm0"][:3] == ("next", 5, "http://127.0.0.1:9002")
    next_kv = next(x.kv_cache_tokens_per_replica for x in p.deployment("qwen").pools if x.pool == "next")
    assert rows["qwen-next-warm0"][3] == next_kv
    assert cfg.settings.health.interval_s == 0.2  # the declared router settings are carried over


def test_unknown_engine_command_placeholder_is_a_clear_error(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path, engine=', engine_command: ["x", "--p={prot}"]')))
    rt = LocalRuntime(p, workdir=tmp_path / "w")
    with pytest.raises(LocalRuntimeError, match=r"unknown placeholder \{prot\}; allowed: \{model\}"):
        rt.start()
    assert all(not alive(pid) for pid in rt.pids())


@pytest.mark.slow
def test_run_route_lose_top_pool_promote_standby_and_stop_clean(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    rt = LocalRuntime(p, router_port=0, workdir=tmp_path / "w")
    with rt:
        pids = rt.pids()
        assert len(pids) == 5 and all(alive(x) for x in pids)  # 3 replicas, the router, its hot spare
        # the router is the hot spare spawned beside the replicas (its imports overlapped theirs), woken at start
        assert b"--standby" in Path(f"/proc/{rt.router_proc.pid}/cmdline").read_bytes()
        # standby is known to the router but not routed to
        assert rt.router_view() == {"qwen-top-0": True, "qwen-next-0": True, "qwen-next-warm0": False}
        served = {
            httpx.post(rt.endpoint + "/v1/chat/completions", json=_chat(f"q{i}"), timeout=10).headers[
                "x-gpufleet-replica"
            ]
            for i in range(6)
        }
        assert served == {"qwen-top-0"}  # the top pool takes the traffic while it is healthy
        assert rt.kill_pool("top") == ["qwen-top-0"]
        events = rt.check(load=False)
        assert any("qwen-top-0" in e and "exited" in e for e in events)
        assert any("promoted warm replica qwen-next-warm0" in e and "pool top failed" in e for e in events)
        # a lost pool stays down: its replica is not restarted, whatever the rounds
        assert any("qwen-top-0 (pool top) exited" in e and "not restarted: pool top is down" in e for e in events)
        time.sleep(0.7)  # past the first restart backoff (0.5 s)
        rt.check(load=False)
        assert rt.replicas[0].id == "qwen-top-0" and rt.replicas[0].state == "dead" and not rt.replicas[0].running
        # spill-over: the next pool serves at once (retries move off the dead replica)
        r = httpx.post(rt.endpoint + "/v1/chat/completions", json=_chat("after"), timeout=10)
        assert r.status_code == 200 and r.headers["x-gpufleet-replica"].startswith("qwen-next-")
        assert rt.wait_routable(["qwen-next-0", "qwen-next-warm0"], timeout_s=15)
        served = {
            httpx.post(rt.endpoint + "/v1/chat/completions", json=_chat(f"after {i} " * 50), timeout=10).headers[
                "x-gpufleet-replica"
            ]
            for i in range(12)
        }
        assert "qwen-next-warm0" in served
    assert not any(alive(x) for x in pids)


@pytest.mark.slow
def test_queueing_promotes_a_standby(tmp_path):
    # one request at a time per replica, so concurrent requests queue and the deployment must grow
    p = plan.compile_file(str(write_fleet(tmp_path, mcr=1)))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w", scale_up_waiting_per_replica=0.5) as rt:
        live = [r for r in rt.replicas if r.state == "active"]
        body = {"model": "Qwen/Qwen3-0.6B", "prompt": "load " * 20, "max_tokens": 100, "ignore_eos": True}
        threads = []
        for rep in live:  # straight at the replicas: the router would answer 429 when they are saturated
            for _ in range(3):
                t = threading.Thread(target=lambda u=rep.url: httpx.post(u + "/v1/completions", json=body, timeout=30))
                t.start()
                threads.append(t)
        promoted = _promotions(rt)
        assert promoted and "requests waiting" in promoted[0]
        for t in threads:
            t.join()


@pytest.mark.slow
def test_engine_command_pool_runs_the_given_command(tmp_path):
    cmd = (
        f', engine_command: ["{sys.executable}", "-m", "gpufleet.infra.cli.replica_sim", "replica-sim", '
        '"--port", "{port}", "--host", "{host}", "--model", "{model}", "--max-model-len", "{max_model_len}"]'
    )
    p = plan.compile_file(str(write_fleet(tmp_path, engine=cmd)))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w", on_event=lambda m: None) as rt:
        kinds = {r.id: r.kind for r in rt.replicas}
        assert kinds == {"qwen-top-0": "sim", "qwen-next-0": "engine"}  # no standby on an engine pool
        assert any("warm node(s) not held" in e for e in rt.events)
        rep = next(r for r in rt.replicas if r.kind == "engine")
        assert httpx.get(rep.url + "/v1/models", timeout=5).json()["data"][0]["max_model_len"] == 4096
        pids = rt.pids()
    assert not any(alive(x) for x in pids)


@pytest.mark.slow
def test_router_saturation_promotes_a_standby(tmp_path):
    # one request slot per replica: two long requests through the router fill every slot
    p = plan.compile_file(str(write_fleet(tmp_path, mcr=1)))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w") as rt:
        body = {"model": "Qwen/Qwen3-0.6B", "prompt": "busy " * 20, "max_tokens": 150, "ignore_eos": True}
        threads = [
            threading.Thread(
                target=lambda i=i: httpx.post(
                    rt.endpoint + "/v1/completions", json={**body, "prompt": f"{i} " * 30}, timeout=30
                )
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        promoted = _promotions(rt)
        assert promoted and "request slots in flight" in promoted[0]
        for t in threads:
            t.join()


def _until(rt: LocalRuntime, pred, timeout_s: float = 20.0) -> list[str]:
    """Supervision rounds until `pred()` holds; every event they produced."""
    events: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events += rt.check(load=False)
        if pred():
            return events
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout_s}s; events: {events}")


@pytest.mark.slow
def test_a_sigkilled_replica_is_restarted_on_its_port_and_serves_again(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w") as rt:
        top = rt.replicas[0]
        old_pid, url = top.pid, top.url
        assert rt.stop_replica(top, signal.SIGKILL)
        events = _until(rt, lambda: top.state == "active" and top.pid != old_pid)
        assert any("qwen-top-0 (pool top) exited with code -9" in e and "restarting in 0.5s" in e for e in events)
        assert any("qwen runs below min_replicas: 1 of 2 live" in e for e in events)
        assert any("qwen-top-0 (pool top) restarted on " + url in e for e in events)
        assert top.url == url and alive(top.pid)
        assert rt.wait_routable(["qwen-top-0"], timeout_s=10)
        r = httpx.post(rt.endpoint + "/v1/chat/completions", json=_chat("again"), timeout=10)
        assert r.status_code == 200 and r.headers["x-gpufleet-replica"] == "qwen-top-0"


@pytest.mark.slow
def test_a_crash_loop_is_reported_with_growing_backoff(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w") as rt:
        top = rt.replicas[0]
        deaths: list[str] = []
        for _ in range(3):
            pid = top.pid
            rt.stop_replica(top, signal.SIGKILL)
            events = _until(rt, lambda pid=pid: top.state == "active" and top.pid != pid)
            deaths += [e for e in events if "qwen-top-0 (pool top) exited" in e]
        assert [re.search(r"restarting in ([\d.]+)s", e).group(1) for e in deaths] == ["0.5", "1", "2"]
        assert "crash loop: 3 exits in 60s" in deaths[-1] and "crash loop" not in deaths[1]


def test_a_stale_work_directory_of_a_killed_up_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "gpufleet-up-stale"
    (stale / "logs").mkdir(parents=True)
    (stale / "owner").write_text(f"{dead.pid} 1")
    foreign = tmp_path / "gpufleet-up-noowner"  # not ours to judge: no owner file
    foreign.mkdir()
    p = plan.compile_file(str(write_fleet(tmp_path)))
    rt = LocalRuntime(p)
    try:
        assert not stale.exists() and foreign.exists()
        assert any(f"removed stale work directory {stale}" in e for e in rt.events)
        # a live run's directory is not stale
        assert local.runtime.remove_stale_workdirs(tmp_path) == [] and rt.workdir.exists()
    finally:
        rt.stop()
    assert not rt.workdir.exists()


AUTOSCALED = """\
fleet: t-auto
clouds:
  local: {host: 127.0.0.1}
nodepools:
  - {name: top, cloud: local, instance_type: g6.xlarge, priority: 10, min_nodes: 1, max_nodes: 2}
  - {name: next, cloud: local, instance_type: g5.xlarge, priority: 5, min_nodes: 0, max_nodes: 3, warm_nodes: 1}
deployments:
  - name: qwen
    model: Qwen/Qwen3-0.6B
    min_replicas: 1
    max_replicas: 4
    max_model_len: 4096
    max_concurrent_requests: 16
    autoscaling: {signal: in_flight, target: 2, scale_up_delay_s: 0, scale_down_delay_s: 1}
router:
  health: {interval_s: 0.2, timeout_s: 1.0, backoff_initial_s: 0.2, backoff_max_s: 0.5}
"""


def _active(rt: LocalRuntime) -> dict[str, int]:
    out = {"top": 0, "next": 0}
    for r in rt.replicas:
        if r.role == "active" and r.state == "active":
            out[r.pool] += 1
    return out


@pytest.mark.slow
def test_autoscaling_fills_the_top_pool_then_the_next_and_scales_down_lowest_first(tmp_path):
    (tmp_path / "fleet.yaml").write_text(AUTOSCALED)
    p = plan.compile_file(str(tmp_path / "fleet.yaml"))
    with LocalRuntime(p, router_port=0, workdir=tmp_path / "w", autoscale=True) as rt:
        assert _active(rt) == {"top": 1, "next": 0}
        body = {"model": "Qwen/Qwen3-0.6B", "prompt": "a long one", "max_tokens": 1500, "ignore_eos": True}
        done: list[int] = []

        def call() -> None:
            r = httpx.post(rt.endpoint + "/v1/completions", json=body, timeout=120)
            done.append(r.status_code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        # 8 in flight at 2 per replica: 4 replicas, the top pool's 2 first, then 2 in the next pool
        events = _until(rt, lambda: _active(rt) == {"top": 2, "next": 2}, timeout_s=60)
        assert any("promoted warm replica qwen-next-warm0 (pool next)" in e for e in events)
        assert any("starting replica qwen-top-1 (pool top)" in e for e in events)
        new_next = [r.id for r in rt.replicas if r.pool == "next" and r.role == "active" and r.id != "qwen-next-warm0"]
        assert len(new_next) == 1
        assert rt.wait_routable(["qwen-top-1", "qwen-next-warm0", *new_next], timeout_s=15)
        for t in threads:
            t.join(120)
        assert done == [200] * 8
        # idle: back to min_replicas, the next pool emptied first, its warm standby given back
        events = _until(
            rt,
            lambda: (
                _active(rt) == {"top": 1, "next": 0}
                and any(r.pool == "next" and r.role == "warm" and r.state == "warm" for r in rt.replicas)
            ),
            timeout_s=60,
        )
        downs = [e for e in events if e.startswith("autoscale qwen on")]
        assert downs and "next" in downs[0]
        assert rt.router_view().get(new_next[0]) is None  # it left the router
        r = httpx.post(rt.endpoint + "/v1/completions", json={**body, "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
