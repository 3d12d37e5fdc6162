"""Precise mode on a local fleet: `router.kv_events` with a tokenizer makes every simulated replica
publish vLLM's KV events on ports of its own, and the router subscribe to each of them."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from gpufleet.infra import plan, router_config, spec
from gpufleet.infra.local import LocalReplica, LocalRuntime, LocalRuntimeError, demo_tokenizer
from gpufleet.router.kvevents.tokenize import PromptTokenizer
from gpufleet.router.prefix import render_prompt
from gpufleet.router.workloads import mixed
from tests.kvevents.vllm_structs import tiny_tokenizer_files

from .conftest import alive, write_fleet

PRECISE = "  kv_events: {enabled: true, tokenizer: %s}\n"


def _fleet(tmp_path, tokenizer: str | None = "tok", top: int = 1):
    router = PRECISE % tokenizer if tokenizer is not None else "  kv_events: {enabled: true}\n"
    return write_fleet(tmp_path, top=top, router=router)


def _chat(i: int) -> dict:
    words = " ".join(f"w{(i * 37 + j) % 500}" for j in range(48))  # the tiny tokenizer's words: 3 blocks
    return {"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": words}], "max_tokens": 2}


def _kv_rows(rt: LocalRuntime) -> dict[str, dict]:
    return {str(r["id"]): r["kv_state"] for r in rt.router_rows()}


def _events_gauge(rt: LocalRuntime) -> dict[str, float]:
    text = httpx.get(rt.endpoint + "/metrics", timeout=5.0, trust_env=False).text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "gpufleet_router_kv_state":
            for s in fam.samples:
                if s.labels["state"] == "events":
                    out[s.labels["replica"]] = s.value
    return out


def _wait_events(rt: LocalRuntime, ids: set[str], timeout_s: float = 10.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict] = {}
    while time.monotonic() < deadline:
        rows = _kv_rows(rt)
        if all(rows.get(i, {}).get("state") == "events" and rows[i]["blocks"] > 0 for i in ids):
            break
        time.sleep(0.1)
    return rows


def test_a_relative_tokenizer_is_the_declarations_directorys(tmp_path):
    tiny_tokenizer_files(tmp_path / "tok")
    p = plan.compile_file(str(_fleet(tmp_path)))
    assert p.router.kv_events.tokenizer == str((tmp_path / "tok").resolve())


def test_a_missing_tokenizer_is_a_declaration_error_with_file_line_and_field(tmp_path):
    path = _fleet(tmp_path, tokenizer="nowhere/tokenizer.json")
    with pytest.raises(spec.FleetError) as exc:
        plan.compile_file(str(path))
    [issue] = exc.value.issues
    line = path.read_text().splitlines().index(PRECISE.rstrip("\n") % "nowhere/tokenizer.json") + 1
    assert (issue.file, issue.line, issue.field) == (str(path), line, "router.kv_events.tokenizer")
    assert str(tmp_path / "nowhere/tokenizer.json") in issue.message and "no such file" in issue.message


def test_without_a_tokenizer_one_line_says_precise_mode_is_off_and_replicas_publish_nothing(tmp_path):
    p = plan.compile_file(str(_fleet(tmp_path, tokenizer=None)))
    seen: list[str] = []
    rt = LocalRuntime(p, workdir=tmp_path / "w", on_event=seen.append)
    assert seen == [
        "router.kv_events: precise mode is off: no tokenizer configured (router.kv_events.tokenizer); "
        "routing stays approximate"
    ]
    assert not rt.precise and rt.routing_mode() == "routing: approximate (no tokenizer configured)"
    for i, r in enumerate(rt.replicas):
        r.url = f"http://127.0.0.1:{9000 + i}"
    assert all(c.kv_events_endpoint is None for c in rt.router_config_for_run().replicas)
    argv = rt._sim_argv(rt.replicas[0], p.deployment("qwen"), p.deployment("qwen").pools[0], 0)
    assert not any(a.startswith(("--kv-events", "--tokenizer")) for a in argv)


def test_a_tokenizer_given_as_settings_that_is_not_there_is_refused(tmp_path):
    p = plan.compile_file(str(write_fleet(tmp_path)))
    ke = p.router.kv_events.model_copy(update={"enabled": True, "tokenizer": str(tmp_path / "gone")})
    with pytest.raises(LocalRuntimeError, match=r"router.kv_events.tokenizer: .*gone: no such file"):
        LocalRuntime(p, settings=p.router.model_copy(update={"kv_events": ke}), workdir=tmp_path / "w")


@pytest.mark.slow
def test_every_replica_streams_kv_events_to_the_router_also_a_late_joiner(tmp_path):
    tiny_tokenizer_files(tmp_path / "tok")
    p = plan.compile_file(str(_fleet(tmp_path, top=2)))
    rt = LocalRuntime(p, router_port=0, workdir=tmp_path / "w")
    with rt:
        assert rt.routing_mode() == f"routing: precise, from each replica's KV events (tokenizer {tmp_path / 'tok'})"
        pids = rt.pids()
        cfg = {c.id: c for c in rt.router_config.replicas}
        ports = {r.id: (r.kv_events_port, r.kv_replay_port) for r in rt.replicas}
        assert len({x for pair in ports.values() for x in pair}) == 2 * len(rt.replicas)  # ports of their own
        for r in rt.replicas:
            assert cfg[r.id].kv_events_endpoint == f"tcp://127.0.0.1:{r.kv_events_port}"
            assert cfg[r.id].kv_events_replay_endpoint == f"tcp://127.0.0.1:{r.kv_replay_port}"
        for i in range(8):  # through the router: the top pool's two replicas take them
            r = httpx.post(rt.endpoint + "/v1/chat/completions", json=_chat(i), timeout=10)
            assert r.status_code == 200, r.text
        # the next pool's replica (no traffic of the router's while the top pool is up) and the standby
        # after its promotion: straight at them, their streams reach the router all the same
        assert rt.promote("qwen", "test") is not None
        assert rt.wait_routable(["qwen-next-warm0"], timeout_s=10)
        for rid in ("qwen-next-0", "qwen-next-warm0"):
            rep = next(x for x in rt.replicas if x.id == rid)
            assert httpx.post(rep.url + "/v1/chat/completions", json=_chat(50), timeout=10).status_code == 200

        # a replica added at run time (as the autoscaler adds one): it joins with its endpoints
        late = LocalReplica("qwen-next-7", "qwen", "Qwen/Qwen3-0.6B", "next", 5, "active", "sim")
        late.fresh, late.ready_by = True, time.monotonic() + 30
        rt.replicas.append(late)
        rt.start_replica(late)
        deadline = time.monotonic() + 30
        while late.fresh and time.monotonic() < deadline:
            rt.check(load=False)
            time.sleep(0.05)
        assert not late.fresh and rt.wait_routable([late.id], timeout_s=10)
        assert httpx.post(late.url + "/v1/chat/completions", json=_chat(60), timeout=10).status_code == 200

        # healing: a killed replica restarts on its ports; the router sees its sequence start again
        top = rt.replicas[0]
        for i in (80, 81):  # two batches at least, so its restart is a step back in sequence
            assert httpx.post(top.url + "/v1/chat/completions", json=_chat(i), timeout=10).status_code == 200
        before = _wait_events(rt, {top.id})[top.id]
        assert before["state"] == "events" and before["last_seq"] >= 1
        old_pid, old_ports = top.pid, (top.kv_events_port, top.kv_replay_port)
        assert rt.stop_replica(top, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (top.state == "active" and top.pid != old_pid) and time.monotonic() < deadline:
            rt.check(load=False)
            time.sleep(0.05)
        assert top.pid != old_pid and (top.kv_events_port, top.kv_replay_port) == old_ports
        assert rt.wait_routable([top.id], timeout_s=10)
        assert httpx.post(top.url + "/v1/chat/completions", json=_chat(70), timeout=10).status_code == 200
        pids.append(top.pid)

        everyone = {r.id for r in rt.replicas}
        rows = _wait_events(rt, everyone)
        assert {rid: row["state"] for rid, row in rows.items()} == dict.fromkeys(everyone, "events")
        assert all(rows[rid]["blocks"] > 0 for rid in everyone)
        assert rows[late.id]["endpoint"] == f"tcp://127.0.0.1:{late.kv_events_port}"
        assert _events_gauge(rt) == dict.fromkeys(everyone, 1.0)
        assert rows[top.id]["resets"] == before["resets"] + 1  # the old life's blocks are forgotten
        pids += [late.pid]
    assert not any(alive(x) for x in pids)


def test_the_demo_tokenizer_is_byte_level_sized_to_the_plans_chars_per_token_with_a_chat_template(tmp_path):
    reqs = mixed.generate(mixed.demo_spec(("a", "b"), 120, seed=0, max_tokens=4))
    texts = [render_prompt(r.body) for r in reqs]
    tok = demo_tokenizer.build(tmp_path / "t", texts, 4.0)
    assert (tok.path / "tokenizer.json").is_file() and 3.5 < tok.chars_per_token < 4.5
    pt = PromptTokenizer(tok.path)
    try:
        assert pt.has_template
        body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Ω ☃ zqxj"}]}
        ids = list(pt.token_ids(body))  # text it never saw still encodes: byte-level, no unknown token
        raw = Tokenizer.from_file(str(tok.path / "tokenizer.json"))
        special = {raw.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|end|>", "<|assistant|>")}
        assert None not in special and special <= set(ids)
        assert "Ω ☃ zqxj" in raw.decode(ids)
    finally:
        pt.close()


def test_a_simulated_replica_is_one_stream_whatever_the_deployments_data_parallel_size(tmp_path):
    tiny_tokenizer_files(tmp_path / "tok")
    path = _fleet(tmp_path)
    text = path.read_text().replace(
        "max_concurrent_requests: 16}", 'max_concurrent_requests: 16, engine_args: ["-dp", "2"]}'
    )
    path.write_text(text.replace("tokenizer: tok}", "tokenizer: tok, replay_port: 5567}"))
    p = plan.compile_file(str(path))
    assert router_config.data_parallel_size(p.deployment("qwen")) == 2  # what a cluster's engines would have
    rt = LocalRuntime(p, workdir=tmp_path / "w")
    for i, r in enumerate(rt.replicas):  # as `replica_ready` learns them
        r.url, r.kv_events_port, r.kv_replay_port = f"http://127.0.0.1:{9000 + i}", 7000 + 2 * i, 7001 + 2 * i
    cfg = {c.id: c for c in rt.router_config_for_run().replicas}
    assert {c.data_parallel_size for c in cfg.values()} == {1}  # a replica-sim is one engine core
    assert cfg["qwen-top-0"].kv_events_endpoint == "tcp://127.0.0.1:7000"
    assert cfg["qwen-top-0"].kv_events_replay_endpoint == "tcp://127.0.0.1:7001"
