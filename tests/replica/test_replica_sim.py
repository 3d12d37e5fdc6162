"""The simulated replica over real loopback HTTP (gpufleet.router.replica)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gpufleet.router import replica as replica_package
from gpufleet.router.replica import SimSettings, serve_in_thread

TOKEN = "test-admin-token"
SYSTEM = "You are a careful assistant. " * 40  # ~1,200 characters: many shared blocks


def _settings(**kw) -> SimSettings:
    base = dict(
        model="m",
        replica_id="r0",
        kv_capacity_tokens=16_384,
        prefill_tokens_per_s=50_000.0,
        decode_tokens_per_s=2_000.0,
        max_running=8,
        max_model_len=4096,
        admin_token=TOKEN,
    )
    base.update(kw)
    return SimSettings(**base)


@pytest.fixture(scope="module")
def replica():
    with serve_in_thread(_settings()) as r:
        yield r


@pytest.fixture
def client(replica):
    with httpx.Client(base_url=replica.url, timeout=10) as c:
        yield c


def _chat(user: str, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], **kw}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_public_api_is_pinned():
    assert set(replica_package.__all__) == {
        "FailureMode",
        "ReplicaSim",
        "RunningReplica",
        "SimSettings",
        "build_app",
        "serve_in_thread",
    }


def test_chat_completion_reports_cached_tokens_for_a_repeated_prefix(client):
    first = client.post("/v1/chat/completions", json=_chat("question one")).json()
    second = client.post("/v1/chat/completions", json=_chat("question two")).json()
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["message"]["role"] == "assistant"
    u1, u2 = first["usage"], second["usage"]
    assert u1["prompt_tokens_details"]["cached_tokens"] < u2["prompt_tokens_details"]["cached_tokens"]
    # the shared system prompt is cached in whole blocks of 16 tokens
    assert u2["prompt_tokens_details"]["cached_tokens"] >= (len(SYSTEM) // 4 // 16 - 1) * 16
    assert u2["prompt_tokens_details"]["cached_tokens"] % 16 == 0
    assert u2["total_tokens"] == u2["prompt_tokens"] + u2["completion_tokens"]


def test_text_is_deterministic_and_depends_on_the_prompt(client):
    a = client.post("/v1/completions", json={"model": "m", "prompt": "hello world", "max_tokens": 50}).json()
    b = client.post("/v1/completions", json={"model": "m", "prompt": "hello world", "max_tokens": 50}).json()
    c = client.post("/v1/completions", json={"model": "m", "prompt": "another prompt", "max_tokens": 50}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != c["choices"][0]["text"]
    assert a["object"] == "text_completion"


def test_max_tokens_and_ignore_eos_set_the_output_length(client):
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x" * 40, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    r = client.post(
        "/v1/completions", json={"model": "m", "prompt": "x" * 40, "max_tokens": 300, "ignore_eos": True}
    ).json()
    assert r["usage"]["completion_tokens"] == 300


def test_streaming_chat_sends_one_chunk_per_token_then_usage_and_done(client):
    body = _chat("stream me", stream=True, max_tokens=5, ignore_eos=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [
        c["choices"][0]["delta"].get("content")
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert len(content) == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    unary = client.post("/v1/chat/completions", json=_chat("stream me", max_tokens=5, ignore_eos=True)).json()
    assert "".join(content) == unary["choices"][0]["message"]["content"]


def test_streaming_completion(client):
    body = {"model": "m", "prompt": "abc " * 20, "stream": True, "max_tokens": 4, "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        data = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-1]]
    assert sum(1 for t in texts if t) == 4


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/chat/completions", b"{not json", 400),
        (
            "/v1/chat/completions",
            json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
        ),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "m", "prompt": "x" * 20_000}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 4096}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "n": 2}).encode(), 400),
    ],
)
def test_bad_requests_get_a_vllm_style_error_body(client, path, body, status):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()
    assert err["object"] == "error" and err["code"] == status and err["message"]


def test_health_models_tokenize_and_server_info(client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "m" and models["data"][0]["max_model_len"] == 4096
    tok = client.post("/tokenize", json={"model": "m", "prompt": "abcdefgh" * 4}).json()
    assert tok["count"] == 8 == len(tok["tokens"]) and tok["max_model_len"] == 4096
    again = client.post("/tokenize", json={"model": "m", "prompt": "abcdefgh" * 4 + "more"}).json()
    assert again["tokens"][:8] == tok["tokens"]  # equal text prefixes give equal id prefixes
    chat_tok = client.post("/tokenize", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] >= 1
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        info = client.get(path).json()
        assert "model_path" not in info


def test_metrics_use_vllm_names_and_count_prefix_hits(client):
    before = client.get("/metrics").text
    client.post("/v1/chat/completions", json=_chat("metrics a", max_tokens=2))
    client.post("/v1/chat/completions", json=_chat("metrics b", max_tokens=2))
    after = client.get("/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        _metric(after, name)
    assert _metric(after, "vllm:prefix_cache_queries_total") > _metric(before, "vllm:prefix_cache_queries_total")
    assert _metric(after, "vllm:prefix_cache_hits_total") > _metric(before, "vllm:prefix_cache_hits_total")
    assert (
        _metric(after, "vllm:time_to_first_token_seconds_count")
        >= _metric(before, "vllm:time_to_first_token_seconds_count") + 2
    )


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_client_disconnect_cancels_the_request_and_frees_its_slot():
    # slow decode so the request is still running when the client leaves
    with serve_in_thread(_settings(decode_tokens_per_s=20.0, max_running=1)) as r:
        body = {"model": "m", "prompt": "p" * 400, "max_tokens": 1000, "ignore_eos": True}
        with httpx.Client(base_url=r.url, timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)
        assert _wait(lambda: r.call(lambda s: s.engine.num_running) == 0)
        assert r.call(lambda s: s.engine.stats.cancelled) == 1
        assert r.call(lambda s: s.engine.kv_usage) == 0.0
        # the slot is free: a new request is served at once
        with httpx.Client(base_url=r.url, timeout=5) as c:
            assert c.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_streaming_disconnect_cancels_the_request():
    with serve_in_thread(_settings(decode_tokens_per_s=50.0)) as r:
        body = {"model": "m", "prompt": "q" * 400, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=r.url, timeout=5) as c:
            with c.stream("POST", "/v1/completions", json=body) as resp:
                it = resp.iter_lines()
                assert next(it).startswith("data: ")
        assert _wait(lambda: r.call(lambda s: s.engine.stats.cancelled) == 1)
        assert r.call(lambda s: s.engine.num_running) == 0


def test_admin_endpoints_need_the_token(client):
    assert client.post("/admin/fail", json={"mode": "status"}).status_code == 401
    wrong = client.post("/admin/fail", json={"mode": "status"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with serve_in_thread(_settings(admin_token=None)) as r:
        assert httpx.post(r.url + "/admin/die", headers={"Authorization": "Bearer x"}).status_code == 403


def test_failure_injection_returns_5xx_for_count_requests_then_recovers():
    with serve_in_thread(_settings()) as r, httpx.Client(base_url=r.url, timeout=5) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (
            c.post("/admin/fail", json={"mode": "status", "status": 503, "count": 2}, headers=auth).status_code == 200
        )
        assert c.get("/health").status_code == 503  # health checks see it without using it up
        body = {"model": "m", "prompt": "hi", "max_tokens": 1}
        assert [c.post("/v1/completions", json=body).status_code for _ in range(3)] == [503, 503, 200]
        assert c.get("/health").status_code == 200
        assert c.post("/admin/fail", json={"mode": "drop"}, headers=auth).status_code == 200
        with pytest.raises(httpx.TransportError):
            c.post("/v1/completions", json=body)
        c.post("/admin/fail", json={"mode": "ok"}, headers=auth)
        assert c.post("/v1/completions", json=body).status_code == 200


def test_admin_die_closes_the_listener():
    r = serve_in_thread(_settings())
    try:
        resp = httpx.post(r.url + "/admin/die", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200
        assert _wait(lambda: not r.alive)
        with pytest.raises(httpx.ConnectError):
            httpx.get(r.url + "/health", timeout=1)
    finally:
        r.stop()


def test_concurrent_requests_queue_beyond_max_running():
    import concurrent.futures as cf

    with serve_in_thread(_settings(max_running=2, decode_tokens_per_s=200.0)) as r:
        body = {"model": "m", "prompt": "z" * 100, "max_tokens": 20, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(httpx.post, r.url + "/v1/completions", json=body, timeout=10) for _ in range(6)]
            assert _wait(lambda: r.call(lambda s: s.engine.num_waiting) > 0)
            assert r.call(lambda s: s.engine.num_running) <= 2
            assert all(f.result().status_code == 200 for f in futs)


def test_standby_replica_refuses_work_until_promoted():
    with serve_in_thread(_settings(standby=True)) as r, httpx.Client(base_url=r.url, timeout=5) as c:
        body = {"model": "m", "prompt": "hi", "max_tokens": 1}
        assert c.get("/health").status_code == 503
        assert c.post("/v1/completions", json=body).status_code == 503
        assert c.post("/admin/promote").status_code == 401
        assert c.post("/admin/promote", headers={"Authorization": f"Bearer {TOKEN}"}).json()["promoted"] is True
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json=body).status_code == 200


def test_hang_mode_never_answers_until_cleared():
    with serve_in_thread(_settings()) as r, httpx.Client(base_url=r.url, timeout=5) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        c.post("/admin/fail", json={"mode": "hang"}, headers=auth)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1}, timeout=0.3)
        with pytest.raises(httpx.ReadTimeout):
            c.get("/health", timeout=0.3)
        c.post("/admin/fail", json={"mode": "ok"}, headers=auth)
        assert c.get("/health").status_code == 200


def test_admin_fail_rejects_bad_settings(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/admin/fail", json={"mode": "explode"}, headers=auth).status_code == 400
    assert client.post("/admin/fail", json={"mode": "status", "status": 200}, headers=auth).status_code == 400
    assert client.post("/admin/fail", json={"mode": "status", "count": 0}, headers=auth).status_code == 400


def test_token_id_prompts_count_as_given(client):
    r = client.post("/v1/completions", json={"model": "m", "prompt": list(range(100)), "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == 100
