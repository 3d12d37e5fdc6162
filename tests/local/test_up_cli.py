"""`gpufleet up` and `gpufleet demo` end to end: real processes, real loopback HTTP, clean teardown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpufleet.infra.cli import app

from .conftest import alive, write_fleet

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from gpufleet.infra.cli import main; main()"]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_up_refuses_a_fleet_with_cloud_pools_in_one_line():
    r = CliRunner().invoke(app, ["up", str(ROOT / "stacks/multicloud/fleet.yaml")])
    assert r.exit_code == 1
    assert "all `cloud: local`" in r.output and "Traceback" not in r.output


def test_up_reports_a_bad_declaration_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_fleet(tmp_path).read_text().replace("max_nodes: 3", "max_nodes: -1"))
    r = CliRunner().invoke(app, ["up", str(bad)])
    assert r.exit_code == 1 and "bad.yaml:" in r.output and "max_nodes" in r.output


def _start_up(fleet: Path) -> tuple[subprocess.Popen[str], str]:
    """Run `gpufleet up FLEET --port 0` and read its output until it prints the router endpoint."""
    env = dict(os.environ, COLUMNS="300", NO_PROXY="127.0.0.1")
    proc = subprocess.Popen(
        [*CLI, "up", str(fleet), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise AssertionError("gpufleet up did not print its endpoint:\n" + "".join(seen))


def _reap(proc: subprocess.Popen[str], kids: list[int]) -> None:
    """Whatever a failed test left running: `up` itself and the children it had started."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for k in kids:
        if alive(k):
            os.kill(k, signal.SIGKILL)


@pytest.mark.slow
def test_gpufleet_up_serves_then_sigterm_leaves_no_process(tmp_path):
    proc, endpoint = _start_up(write_fleet(tmp_path))
    kids = _children(proc.pid)
    try:
        assert len(kids) == 5  # three replicas (one standby), the router and its hot spare
        body = {"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "hi " * 30}], "max_tokens": 3}
        for _ in range(3):
            r = httpx.post(endpoint + "/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(endpoint + "/v1/models", timeout=5).json()["data"][0]["id"] == "Qwen/Qwen3-0.6B"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopped 5 processes" in out
        assert not [k for k in kids if alive(k)]
    finally:
        _reap(proc, kids)


@pytest.mark.slow
def test_killing_up_outright_still_leaves_no_orphans(tmp_path):
    proc, _endpoint = _start_up(write_fleet(tmp_path))
    kids = _children(proc.pid)
    try:
        assert len(kids) == 5
        proc.kill()  # no chance to clean up: the children's parent-death signal must do it
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.1)
        assert not [k for k in kids if alive(k)]
    finally:
        _reap(proc, kids)


def _all_row(out: str, run: str) -> list[str]:
    """The cells of a run's `all` row in a demo table."""
    m = re.search(rf"│ {re.escape(run)}\s*│ all\s*│(.*)", out)
    assert m, f"no row for {run}:\n{out}"
    return [c.strip() for c in m.group(1).split("│")]


@pytest.mark.slow
def test_demo_compares_policies_in_precise_mode_shows_spill_over_and_tears_down(tmp_path):
    # three replicas in the preferred pool, so where a prefix lands matters; enough retries to pass all three once lost
    fleet = write_fleet(tmp_path, top=3, router="  max_retries: 3\n")
    r = CliRunner().invoke(
        app, ["demo", str(fleet), "--requests", "60", "--rate", "30", "--max-tokens", "2", "--no-motion"]
    )
    out = r.output
    assert r.exit_code == 0, out
    # precise mode on a tokenizer the demo trained, and the router's KV state after each run: the
    # top pool's replicas took the traffic and stream events, the others have not been sent any
    assert "routing: precise, from every replica's KV events" in out
    assert re.search(r"trained one on its traffic \(byte-level BPE, \d+ tokens, [\d.]+ chars/token", out)
    for run in ("round_robin", "cache_aware"):
        assert re.search(rf"{run}: router KV state: events on [34], approximate on [12] \([12] without traffic", out)
    rr, ca = _all_row(out, "round_robin"), _all_row(out, "cache_aware")
    # cells: requests, errors, prefix hits, ceiling, TTFT p50, TTFT p99, prediction-cache hits, spills
    assert rr[:2] == ["60", "0"] and ca[:2] == ["60", "0"]
    hit = {name: float(row[2].rstrip("%")) for name, row in (("rr", rr), ("ca", ca))}
    ceiling = float(ca[3].rstrip("%"))
    assert hit["rr"] < hit["ca"] <= ceiling  # three top replicas: where a prefix lands matters
    assert "killed pool(s) top: qwen-top-0, qwen-top-1, qwen-top-2" in out
    assert "promoted warm replica qwen-next-warm0" in out and "pool top failed" in out
    # what happens to the lost pool's replicas: not restarted (no "restarting in 0.5s" that never comes)
    assert "qwen-top-0 (pool top) exited with code -9" in out and "not restarted: pool top is down" in out
    assert "restarting in" not in out and "dead (pool down)" in out
    after = _all_row(out, "right after")
    assert after[1] == "0"  # the next pool serves at once: no request fails
    # the router's spill counter saw it (a request that retried past every dead top replica is
    # not counted: by then its candidates hold no higher pool, so at most all are)
    assert 0 < int(after[7]) <= int(after[0]) - int(after[6])
    assert re.search(r"tore down \d+ processes, 0 left", out)
    # where the time went, phase by phase
    assert re.search(r"demo took [\d.]+ s \(tokenizer [\d.]+, start \(round_robin\) [\d.]+, round_robin [\d.]+, ", out)


def _router_pid(kids: list[int], endpoint: str) -> int:
    """The serving router among `kids`: the one holding the endpoint's listening socket (the first
    router is a hot spare woken at start, so both router command lines may say --standby)."""
    port = int(endpoint.rsplit(":", 1)[1])
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{f[9]}]")
    router = []
    for k in kids:
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{k}/fd")
            if any(os.readlink(fd) in inodes for fd in fds.iterdir()):
                router.append(k)
    assert len(router) == 1 and b"router\x00serve" in Path(f"/proc/{router[0]}/cmdline").read_bytes()
    return router[0]


@pytest.mark.slow
def test_a_sigkilled_router_is_restarted_replicas_keep_running_and_requests_resume(tmp_path):
    proc, endpoint = _start_up(write_fleet(tmp_path))
    kids = _children(proc.pid)
    try:
        router = _router_pid(kids, endpoint)
        replicas = [k for k in kids if k != router]
        body = {"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "hi " * 30}], "max_tokens": 3}
        assert httpx.post(endpoint + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        os.kill(router, signal.SIGKILL)
        killed = time.monotonic()
        ok = None
        while time.monotonic() - killed < 30 and ok is None:
            try:
                r = httpx.post(endpoint + "/v1/chat/completions", json=body, timeout=10)
                if r.status_code == 200:
                    ok = time.monotonic() - killed
            except httpx.TransportError:
                time.sleep(0.05)
        assert ok is not None, "no request succeeded at the same endpoint after the router was killed"
        for _ in range(5):  # the next requests succeed too
            assert httpx.post(endpoint + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        assert all(alive(k) for k in replicas)  # the replicas kept running (and the spare took over)
        new_kids = _children(proc.pid)
        assert router not in new_kids and set(replicas) < set(new_kids) and len(new_kids) == 5  # a new spare
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "router exited with code -9; restarting in 0s" in out
        assert "router restarted on " + endpoint + " (hot spare" in out
        assert not [k for k in _children(proc.pid) if alive(k)] and not [k for k in new_kids if alive(k)]
    finally:
        _reap(proc, kids + _children(proc.pid))


def _stream(endpoint: str, max_tokens: int, out: dict, started: threading.Event) -> None:
    """One streamed completion; records the tokens received and whether [DONE] came."""
    body = {
        "model": "Qwen/Qwen3-0.6B",
        "prompt": "tell me a long story",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    tokens, done = 0, False
    try:
        with httpx.stream("POST", endpoint + "/v1/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("text"):
                        tokens += 1
                        started.set()
                    out["finish"] = choices[0].get("finish_reason") or out.get("finish")
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["tokens"], out["done"] = tokens, done


@pytest.mark.slow
def test_sigint_drains_twelve_long_streams_to_completion_then_stops(tmp_path):
    # a router that takes in-flight requests to the end: 600 tokens at ~110 tokens/s is ~5.5 s per stream
    fleet = write_fleet(tmp_path, router="  drain_timeout_s: 60\n")
    proc, endpoint = _start_up(fleet)
    kids = _children(proc.pid)
    try:
        results: list[dict] = [{} for _ in range(12)]
        firsts = [threading.Event() for _ in range(12)]
        threads = [threading.Thread(target=_stream, args=(endpoint, 600, results[i], firsts[i])) for i in range(12)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in firsts), results
        proc.send_signal(signal.SIGINT)
        # the listener stops accepting while the streams go on
        refused = False
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and not refused:
            try:
                httpx.get(endpoint + "/health", timeout=1)
                time.sleep(0.1)
            except httpx.TransportError:
                refused = True
        assert refused and any(t.is_alive() for t in threads)
        for t in threads:
            t.join(60)
        got = [(r.get("status"), r.get("tokens"), r.get("finish"), r.get("done")) for r in results]
        assert got == [(200, 600, "length", True)] * 12, results
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "draining: in-flight requests have up to 60s" in out and "stopped 5 processes" in out
        assert not [k for k in kids if alive(k)]
    finally:
        _reap(proc, kids)


@pytest.mark.slow
def test_demo_motion_scales_the_top_pool_to_its_limit_spills_scales_down_lower_first_and_survives_a_router_kill(
    tmp_path,
):
    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra.local import LocalRuntime, motion

    # the embedded demo fleet: an 8B model decodes slowly enough that a client holds its slot
    p = plan_mod.compile_file(str(ROOT / "stacks/local/fleet.yaml"))
    started: list[LocalRuntime] = []

    def factory(mplan):
        rt = LocalRuntime(mplan, router_port=0, workdir=tmp_path / "w", autoscale=True)
        started.append(rt.start())
        return rt

    shown: list[object] = []
    res = motion.run_motion(p, factory, shown.append)
    # the top pool to its 4 slots, then the next pool's 2 warm ones
    assert res.peak_ready == {"local-l4": 4, "local-l40s": 2}
    assert sum(s.served.get("local-l40s", 0) for s in res.samples) > 0  # traffic spilled there
    ev = res.events
    assert any("promoted warm replica llama-8b-local-l40s-warm0" in e for e in ev)
    first_next_down = next(i for i, e in enumerate(ev) if e.startswith("autoscale llama-8b on local-l40s: 2 ->"))
    first_top_down = next(i for i, e in enumerate(ev) if e.startswith("autoscale llama-8b on local-l4: 4 ->"))
    assert first_next_down < first_top_down  # the lower pool scales down first
    # ... and the timeline's last column says so, in that order
    notes = " | ".join(s.note for s in res.samples)
    assert notes.index("local-l40s 2->") < notes.index("local-l4 4->")
    assert res.router_killed_at_s is not None and res.ok_after_kill > 0
    assert res.first_ok_after_kill_s is not None and res.first_ok_after_kill_s < 5
    assert res.errors <= res.cut_by_kill + 30  # other failures only around the kill (clients retry every 0.1 s)
    assert not [pid for rt in started for pid in rt.pids() if alive(pid)]


def test_up_says_per_deployment_whether_it_autoscales_by_default_declared_fixed_or_not_at_all(tmp_path):
    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra.cli.up import scaling_lines

    p = plan_mod.compile_file(str(write_fleet(tmp_path)))  # min 2, max 3, max_concurrent_requests 16, no autoscaling
    assert scaling_lines(p, autoscale=True) == [
        "scaling qwen: 2-3 on in_flight, target 12 per replica (default: no autoscaling declared; "
        "80% of max_concurrent_requests 16)"
    ]
    assert scaling_lines(p, autoscale=False) == [
        "scaling qwen: autoscaling off (--no-autoscale): standbys promoted for min_replicas and by load, up to 3"
    ]
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(write_fleet(tmp_path).read_text().replace("max_replicas: 3", "max_replicas: 2"))
    assert scaling_lines(plan_mod.compile_file(str(fixed)), autoscale=True) == [
        "scaling qwen: fixed at 2 (max_replicas = min_replicas)"
    ]
