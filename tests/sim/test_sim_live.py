"""`bench live`: real loopback HTTP through gpufleet's router (and the peers when installed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.infra.cli import app
from gpufleet.router.sim import fleet, live, metrics
from gpufleet.router.workloads import generators
from gpufleet.router.workloads.types import Workload

FLEET = Path(__file__).resolve().parents[2] / "bench" / "fleet.yaml"
PEERS = os.environ.get("GPUFLEET_PEERS_VENV")


def _workload(n: int) -> tuple[Workload, fleet.SimFleet]:
    f = fleet.fleet_from_file(FLEET, "qwen-32b").with_replicas(2)
    wl = generators.shared_prompts(n, seed=2, n_apps=3, settings=f.settings, keep_bodies=True)
    return wl.scaled(metrics.offered_load(wl, f) / 0.5), f


@pytest.mark.slow
def test_gpufleet_events_routes_from_the_replicas_kv_events_over_http() -> None:
    wl, f = _workload(30)
    (res,) = live.run_live(wl, f, ("gpufleet-events",), speedup=8.0)
    assert res.skipped is None and res.ok == 30 and res.errors == 0
    assert res.hit_ratio > 0.3  # the replicas' events tell the router where the 3 system prompts are


def test_the_offered_load_of_a_run_with_a_tokenizer_counts_the_replicas_tokens() -> None:
    wl, f = _workload(20)
    with live.workload_tokenizer(wl, ("gpufleet",)) as none:
        assert none is None  # no gpufleet-events: the replicas count the router's estimate
    assert live.offered_load(wl, f, None) == metrics.offered_load(wl, f)
    with live.workload_tokenizer(wl, ("gpufleet", "gpufleet-events")) as tok:
        assert tok is not None and (tok / "tokenizer.json").is_file()
        from gpufleet.router.kvevents.tokenize import PromptTokenizer

        pt = PromptTokenizer(tok)
        counted = sum(len(pt.encode_body(w.body)) for w in wl.work_requests())
        pt.close()
        assert counted != wl.prompt_tokens  # the trained tokenizer does not split like the estimate
        expected = metrics.offered_load(wl, f) * counted / wl.prompt_tokens
        assert live.offered_load(wl, f, tok) == pytest.approx(expected)
    assert not tok.exists()  # the temporary tokenizer is removed after the run


def test_at_load_scales_the_workload_to_the_load_the_replicas_count() -> None:
    wl, f = _workload(20)
    with live.at_load(wl, f, ("gpufleet-events",), 1.5) as (scaled, tok):
        assert tok is not None
        assert live.offered_load(scaled, f, tok) == pytest.approx(1.5)
        assert metrics.offered_load(scaled, f) < 1.5  # the router's estimate counts fewer tokens


@pytest.mark.slow
def test_gpufleet_router_serves_the_workload_over_http_and_reuses_prefixes() -> None:
    wl, f = _workload(30)
    done: list[int] = []
    (res,) = live.run_live(wl, f, ("gpufleet",), speedup=8.0, progress=lambda r, n: done.append(n))
    assert res.skipped is None and res.ok == 30 and res.errors == 0
    assert res.hit_ratio > 0.3  # 3 system prompts over 2 replicas: most prompt tokens are reused
    assert 0 < res.ttft_p50_s <= res.ttft_p99_s
    assert done[-1] == 30


def test_missing_peers_are_skipped_with_the_reason(tmp_path: Path) -> None:
    wl, f = _workload(3)
    res = live.run_live(wl, f, ("sglang", "vllm"), peers_venv=tmp_path)
    assert [r.router for r in res] == ["sglang", "vllm"]
    assert all(r.skipped and "not installed" in r.skipped for r in res)
    assert live.run_live(wl, f, ("vllm",))[0].skipped == "no --peers-venv given"


def test_live_needs_request_bodies() -> None:
    f = fleet.uniform_fleet(1)
    with pytest.raises(ValueError, match="keep_bodies"):
        live.run_live(generators.rag(3), f, ("gpufleet",))


@pytest.mark.slow
@pytest.mark.skipif(not PEERS, reason="set GPUFLEET_PEERS_VENV to a virtualenv with sglang-router and vllm-router")
def test_peer_routers_serve_the_same_workload() -> None:
    wl, f = _workload(30)
    res = live.run_live(wl, f, ("sglang", "vllm"), speedup=8.0, peers_venv=Path(PEERS))  # type: ignore[arg-type]
    for r in res:
        assert r.skipped is None, r.skipped
        assert r.ok == 30 and r.hit_ratio > 0.3


def test_bench_live_cli_rejects_unknown_routers() -> None:
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "live",
            "--fleet",
            str(FLEET),
            "--deployment",
            "qwen-32b",
            "--workload",
            "rag",
            "--routers",
            "gpufleet,envoy",
        ],
    )
    assert res.exit_code == 1 and "unknown router envoy" in res.output and "Traceback" not in res.output


SIGTERM_SCRIPT = """
import sys
from pathlib import Path
from gpufleet.router.sim import fleet, live, metrics
from gpufleet.router.workloads import generators

out = Path(sys.argv[1])
start = live._Procs.start

def recorded(self, cmd, log, env=None):
    p = start(self, cmd, log, env)
    with out.open("a") as fh:
        fh.write(f"{p.pid}\\n")
    return p

live._Procs.start = recorded
f = fleet.fleet_from_file(sys.argv[2], "qwen-32b").with_replicas(2)
wl = generators.shared_prompts(400, seed=2, n_apps=3, settings=f.settings, keep_bodies=True)
wl = wl.scaled(metrics.offered_load(wl, f) / 0.5)
live.run_live(wl, f, ("gpufleet",), speedup=1.0, progress=lambda r, n: n and Path(sys.argv[3]).touch())
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_terminated_live_run_stops_the_replicas_and_router_it_started(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    pids, sending = tmp_path / "pids", tmp_path / "sending"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(pids), str(FLEET), str(sending)])
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not sending.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert sending.exists(), "the run never started sending requests"
        children = [int(x) for x in pids.read_text().split()]
        assert len(children) == 3 and all(_alive(p) for p in children)  # 2 replicas and the router
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert [p for p in children if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # what a failed run left behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
