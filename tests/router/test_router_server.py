"""The router over real loopback HTTP, in front of fake OpenAI-compatible replicas."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.router.router_fakes import chat, replica_configs, wait_for

FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 0.5, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
SLOW_HEALTH = {"interval_s": 60, "timeout_s": 0.5, "backoff_initial_s": 60, "backoff_max_s": 60}


def post(url: str, body: dict, **kw):  # type: ignore[no-untyped-def]
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10, **kw)


def error_of(resp: httpx.Response) -> dict:
    doc = resp.json()
    assert set(doc["error"]) >= {"message", "type", "code"}
    return doc["error"]


# -- proxying -------------------------------------------------------------------------------


def test_non_streaming_answer_is_proxied_with_replica_header(replicas, make_router) -> None:
    reps = replicas(2)
    rr = make_router(replica_configs(reps))
    r = post(rr.url, chat("hello"))
    assert r.status_code == 200
    assert r.headers["x-gpufleet-replica"] in {"r0", "r1"}
    assert r.json()["choices"][0]["message"]["content"].startswith(r.headers["x-gpufleet-replica"])
    assert "x-gpufleet-cache" not in r.headers  # not deterministic, so not cacheable


def test_completions_endpoint_is_proxied(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps))
    r = httpx.post(rr.url + "/v1/completions", json={"model": "m", "prompt": "once upon"}, timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert reps[0].requests[-1]["path"] == "/v1/completions"


def test_streaming_is_passed_through_chunk_by_chunk(replicas, make_router) -> None:
    reps = replicas(1, token_delay_s=0.15, n_tokens=4)
    rr = make_router(replica_configs(reps))
    arrivals: list[float] = []
    events: list[bytes] = []
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=chat("hi", stream=True), timeout=10) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["x-gpufleet-replica"] == "r0"
        for line in s.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
                events.append(line.encode())
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 6  # 4 tokens, finish, DONE
    # the first token reached us long before the last was produced: no buffering in between
    assert arrivals[-1] - arrivals[0] > 0.3


def test_authorization_is_forwarded_and_hop_by_hop_headers_are_not(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps))
    post(
        rr.url,
        chat("x"),
        headers={
            "Authorization": "Bearer sk-user",
            "Proxy-Authorization": "Basic abc",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
        },
    )
    got = {k.lower(): v for k, v in reps[0].requests[-1]["headers"].items()}
    assert got["authorization"] == "Bearer sk-user"
    assert got["x-custom"] == "kept"
    assert "proxy-authorization" not in got and "keep-alive" not in got


def test_models_health_and_ready(replicas, make_router) -> None:
    reps = replicas(2)
    cfgs = replica_configs(reps[:1], model="alpha") + replica_configs(reps[1:], model="beta")
    rr = make_router(cfgs)
    models = httpx.get(rr.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
    assert httpx.get(rr.url + "/health").status_code == 200
    assert httpx.get(rr.url + "/ready").status_code == 200


def test_a_draining_router_is_not_ready_and_its_drain_timeout_bounds_shutdown(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), {"drain_timeout_s": 7})
    rr.router.draining = True
    r = httpx.get(rr.url + "/ready")
    assert r.status_code == 503 and r.json() == {"status": "draining"}
    assert httpx.get(rr.url + "/health").status_code == 200  # alive, only not taking new traffic
    assert rr.runner._shutdown_timeout == 7  # aiohttp's wait for running handlers once the sites close


# -- errors ---------------------------------------------------------------------------------


def test_malformed_json_is_400(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)))
    r = httpx.post(rr.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(rr.url + "/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    r = httpx.post(rr.url + "/v1/chat/completions", json={"model": "m", "messages": "hi"})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"


def test_unknown_model_is_404(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)))
    r = post(rr.url, {**chat("x"), "model": "nope"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_body_over_limit_is_413(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"max_body_bytes": 2048})
    r = post(rr.url, chat("x" * 5000))
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    assert reps[0].requests == []


def test_every_replica_saturated_is_429_with_retry_after(replicas, make_router, loop_thread) -> None:
    reps = replicas(2, ttft_s=1.0)
    rr = make_router(replica_configs(reps, max_concurrent_requests=1))
    threads = [threading.Thread(target=post, args=(rr.url, chat(f"busy {i}"))) for i in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: loop_thread.call(lambda: sum(r.in_flight for r in rr.router.replicas)) == 2)
    r = post(rr.url, chat("one more"))
    assert r.status_code == 429 and "retry-after" in r.headers
    assert error_of(r)["type"] == "rate_limit_error"
    for t in threads:
        t.join()


def test_no_healthy_replica_is_503(replicas, make_router) -> None:
    reps = replicas(1, health_status=500)
    rr = make_router(replica_configs(reps), settings={"health": FAST_HEALTH})
    assert wait_for(lambda: not rr.router.replicas[0].healthy)
    r = post(rr.url, chat("x"))
    assert r.status_code == 503 and error_of(r)["code"] == "no_healthy_replica"
    assert httpx.get(rr.url + "/ready").status_code == 503


def test_upstream_timeout_is_504(replicas, make_router) -> None:
    reps = replicas(1, mode="hang")
    rr = make_router(replica_configs(reps), settings={"request_timeout_s": 0.3, "health": SLOW_HEALTH})
    r = post(rr.url, chat("x"))
    assert r.status_code == 504 and error_of(r)["code"] == "upstream_timeout"


def test_unknown_path_is_json_404(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)))
    r = httpx.get(rr.url + "/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


# -- clamp ----------------------------------------------------------------------------------


def test_max_tokens_is_clamped_to_fit_max_model_len(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps, max_model_len=1000))
    prompt = "x" * 2000  # about 500 tokens with the system prompt
    r = post(rr.url, chat(prompt, max_tokens=5000))
    assert r.status_code == 200
    sent = reps[0].requests[-1]["body"]["max_tokens"]
    assert 0 < sent <= 1000 - 500
    post(rr.url, chat(prompt, max_tokens=10))
    assert reps[0].requests[-1]["body"]["max_tokens"] == 10


def test_prompt_that_alone_exceeds_max_model_len_is_400(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps, max_model_len=100))
    r = post(rr.url, chat("y" * 1000))
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    assert reps[0].requests == []


def test_bad_max_tokens_is_400(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)))
    r = post(rr.url, chat("x", max_tokens="lots"))
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


# -- retries, ejection, health ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_failure_before_first_byte_is_retried_on_another_replica_and_ejects(replicas, make_router, mode) -> None:
    bad, good = replicas(1, mode=mode)[0], replicas(1)[0]
    health = {**SLOW_HEALTH, "eject_after_failures": 1}
    rr = make_router(replica_configs([bad, good]), settings={"policy": "round_robin", "health": health})
    r = post(rr.url, chat("x"))
    assert r.status_code == 200 and r.headers["x-gpufleet-replica"] == good.name
    assert len(bad.requests) == 1
    assert not rr.router.replicas[0].healthy
    for i in range(5):  # ejected: no more traffic to it
        assert post(rr.url, chat(f"y{i}")).headers["x-gpufleet-replica"] == good.name
    assert len(bad.requests) == 1


def test_an_engine_error_for_the_input_is_passed_on_not_retried_and_not_held_against_the_replica(
    replicas, make_router
) -> None:
    bad, good = replicas(1, mode="500")[0], replicas(1)[0]
    health = {**SLOW_HEALTH, "eject_after_failures": 1}
    rr = make_router(replica_configs([bad, good]), settings={"policy": "round_robin", "health": health})
    got = [post(rr.url, chat(f"x{i}")) for i in range(6)]
    failed = [g for g in got if g.status_code != 200]
    assert len(failed) == 3 and len(bad.requests) == 3 and len(good.requests) == 3  # no retries
    for g in failed:
        assert g.status_code == 500 and g.headers["x-gpufleet-replica"] == "r0"
        assert error_of(g) == {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}
    assert all(r.healthy for r in rr.router.replicas)
    assert 'gpufleet_router_ejections_total{replica="r0"} 0.0' in httpx.get(rr.url + "/metrics").text


def test_retries_are_bounded_and_then_502(replicas, make_router) -> None:
    reps = replicas(4, mode="503")
    rr = make_router(replica_configs(reps), settings={"max_retries": 1, "health": SLOW_HEALTH})
    r = post(rr.url, chat("x"))
    assert r.status_code == 502 and error_of(r)["code"] == "upstream_failed"
    assert sum(len(x.requests) for x in reps) == 2


def test_replica_dying_mid_run_is_ejected_and_readmitted_after_recovery(replicas, make_router, loop_thread) -> None:
    a, b = replicas(2)
    rr = make_router(replica_configs([a, b]), settings={"policy": "round_robin", "health": FAST_HEALTH})
    assert {post(rr.url, chat(f"q{i}")).headers["x-gpufleet-replica"] for i in range(4)} == {"r0", "r1"}
    loop_thread.run(a.stop())  # r0 dies
    got = [post(rr.url, chat(f"z{i}")) for i in range(6)]
    assert all(g.status_code == 200 and g.headers["x-gpufleet-replica"] == "r1" for g in got)
    assert not rr.router.replicas[0].healthy
    loop_thread.run(a.start())  # same port, back again
    assert wait_for(lambda: rr.router.replicas[0].healthy, timeout=5)
    assert "r0" in {post(rr.url, chat(f"w{i}")).headers["x-gpufleet-replica"] for i in range(4)}
    metrics = httpx.get(rr.url + "/metrics").text
    assert 'gpufleet_router_ejections_total{replica="r0"} 1.0' in metrics
    assert 'gpufleet_router_readmissions_total{replica="r0"} 1.0' in metrics


def test_stream_failing_mid_way_is_not_retried_and_ends_with_an_error_event(replicas, make_router) -> None:
    bad, good = replicas(1, mode="drop_mid_stream")[0], replicas(1)[0]
    rr = make_router(replica_configs([bad, good]), settings={"policy": "round_robin", "health": SLOW_HEALTH})
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=chat("s", stream=True), timeout=10) as s:
        body = b"".join(s.iter_raw())
    assert s.headers["x-gpufleet-replica"] == bad.name
    assert b"bad-w0" not in body and b"r0-w0" in body
    assert b"upstream_failed" in body and b"[DONE]" not in body
    assert good.requests == []


# -- cancellation -----------------------------------------------------------------------------


def test_client_disconnect_cancels_the_upstream_request(replicas, make_router, loop_thread) -> None:
    reps = replicas(1, ttft_s=0.0, token_delay_s=0.2, n_tokens=50)
    rr = make_router(replica_configs(reps))
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=chat("long", stream=True), timeout=10) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                break  # got the first token; hang up
    assert wait_for(lambda: reps[0].cancelled == 1)
    assert reps[0].completed == 0
    assert wait_for(lambda: loop_thread.call(lambda: rr.router.replicas[0].in_flight) == 0)


def test_client_disconnect_before_first_byte_cancels_the_upstream_request(replicas, make_router, loop_thread) -> None:
    reps = replicas(1, ttft_s=5.0)
    rr = make_router(replica_configs(reps))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(rr.url + "/v1/chat/completions", json=chat("slow"), timeout=0.3)
    assert wait_for(lambda: reps[0].cancelled == 1)
    assert wait_for(lambda: loop_thread.call(lambda: rr.router.replicas[0].in_flight) == 0)


# -- prediction cache -------------------------------------------------------------------------

PC = {"prediction_cache": {"enabled": True, "require_tenant": False}}  # the mechanics; tenants: test_router_tenants


def test_identical_deterministic_request_is_answered_from_the_cache(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=PC)
    body = chat("what is 2+2", temperature=0)
    first = post(rr.url, body)
    second = post(rr.url, body)
    assert first.headers["x-gpufleet-cache"] == "miss" and second.headers["x-gpufleet-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"] and second.json()["id"].startswith("c1") is False
    assert second.headers["x-request-id"]
    assert len(reps[0].requests) == 1


def test_seeded_request_is_cacheable_but_sampled_or_multi_choice_is_not(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=PC)
    post(rr.url, chat("a", temperature=0.7, seed=5))
    assert post(rr.url, chat("a", temperature=0.7, seed=5)).headers["x-gpufleet-cache"] == "hit"
    for body in (chat("b", temperature=0.7), chat("c", temperature=0, n=2)):
        post(rr.url, body)
        assert "x-gpufleet-cache" not in post(rr.url, body).headers
    assert len(reps[0].requests) == 1 + 2 + 2


def test_a_tenant_never_gets_another_tenants_cached_answer(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"prediction_cache": {"enabled": True}})
    body = chat("secret question", temperature=0)
    a = post(rr.url, body, headers={"Authorization": "Bearer key-A"})
    b = post(rr.url, body, headers={"Authorization": "Bearer key-B"})
    anon = post(rr.url, body)
    assert [x.headers["x-gpufleet-cache"] for x in (a, b, anon)] == ["miss", "miss", "bypass"]
    assert len(reps[0].requests) == 3
    assert post(rr.url, body, headers={"Authorization": "Bearer key-A"}).headers["x-gpufleet-cache"] == "hit"


def test_no_cache_header_bypasses_the_cache(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=PC)
    body = chat("q", temperature=0)
    post(rr.url, body)
    r = post(rr.url, body, headers={"Cache-Control": "no-cache"})
    assert r.headers["x-gpufleet-cache"] == "bypass"
    assert len(reps[0].requests) == 2


def test_streaming_request_gets_the_cached_answer_replayed_as_sse(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=PC)
    body = chat("stream me", temperature=0)
    plain = post(rr.url, body).json()
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10) as s:
        assert s.headers["x-gpufleet-cache"] == "hit"
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        (json.loads(ln[5:])["choices"][0]["delta"].get("content") or "")
        for ln in lines[:-1]
        if json.loads(ln[5:])["choices"]
    )
    assert text == plain["choices"][0]["message"]["content"]
    assert len(reps[0].requests) == 1


def test_streamed_miss_is_stored_and_serves_a_later_plain_request(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=PC)
    body = chat("stream first", temperature=0)
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10) as s:
        assert s.headers["x-gpufleet-cache"] == "miss"
        s.read()
    r = post(rr.url, body)
    assert r.headers["x-gpufleet-cache"] == "hit"
    assert r.json()["choices"][0]["message"]["content"] == "".join(f"r0-w{i} " for i in range(4))


# -- sessions, spill-over, cache-aware routing over HTTP ---------------------------------------


def test_session_header_keeps_a_conversation_on_one_replica_and_rehomes_on_failure(
    replicas, make_router, loop_thread
) -> None:
    reps = replicas(3)
    rr = make_router(replica_configs(reps), settings={"policy": "session", "health": SLOW_HEALTH})
    homes = {
        post(rr.url, chat(f"turn {i}"), headers={"x-session-id": "conv-1"}).headers["x-gpufleet-replica"]
        for i in range(5)
    }
    assert len(homes) == 1
    home = homes.pop()
    victim = next(r for r in reps if r.name == home)
    loop_thread.run(victim.stop())
    after = [post(rr.url, chat(f"later {i}"), headers={"x-session-id": "conv-1"}) for i in range(4)]
    assert all(a.status_code == 200 for a in after)
    new_homes = {a.headers["x-gpufleet-replica"] for a in after}
    assert len(new_homes) == 1 and home not in new_homes


def test_body_user_is_a_session_id(replicas, make_router) -> None:
    reps = replicas(3)
    rr = make_router(replica_configs(reps), settings={"policy": "session"})
    homes = {post(rr.url, chat(f"t{i}", user="u-42")).headers["x-gpufleet-replica"] for i in range(5)}
    assert len(homes) == 1


def test_spill_to_lower_pool_only_when_top_pool_saturated_and_counted(replicas, make_router, loop_thread) -> None:
    top = replicas(1, ttft_s=1.0)
    low = replicas(1)
    cfgs = replica_configs(top + low, pools=[("top", 10), ("low", 1)], max_concurrent_requests=1)
    rr = make_router(cfgs, settings={"policy": "cache_aware"})
    assert post(rr.url, chat("a")).headers["x-gpufleet-replica"] == top[0].name  # idle top pool first
    t = threading.Thread(target=post, args=(rr.url, chat("hold the top replica")))
    t.start()
    assert wait_for(lambda: loop_thread.call(lambda: rr.router.replicas[0].in_flight) == 1)
    r = post(rr.url, chat("b"))
    assert r.headers["x-gpufleet-replica"] == low[0].name
    t.join()
    assert 'gpufleet_router_spills_total{model="m",pool="low"} 1.0' in httpx.get(rr.url + "/metrics").text


def test_cache_aware_routes_shared_prefixes_to_the_replica_that_holds_them(replicas, make_router) -> None:
    reps = replicas(4)
    rr = make_router(replica_configs(reps), settings={"policy": "cache_aware"})
    systems = [f"System prompt number {k}. " * 40 for k in range(4)]
    placed: dict[int, set[str]] = {k: set() for k in range(4)}
    for i in range(40):
        k = i % 4
        placed[k].add(post(rr.url, chat(f"question {i}", system=systems[k])).headers["x-gpufleet-replica"])
    assert all(len(v) == 1 for v in placed.values())  # sequential traffic: each prefix stays home
    used = sum(1 for r in reps if r.requests)
    assert used >= 2  # and distinct prefixes were spread out
    metrics = httpx.get(rr.url + "/metrics").text
    assert "gpufleet_router_predicted_prefix_hit_tokens_total" in metrics
    assert 'gpufleet_router_policy_decisions_total{policy="cache_aware",reason="prefix"} 36.0' in metrics


# -- metrics and admin ------------------------------------------------------------------------


def test_metrics_expose_requests_replica_reported_hits_and_in_flight(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps))
    system = "shared " * 100
    post(rr.url, chat("one", system=system))
    post(rr.url, chat("two", system=system))
    text = httpx.get(rr.url + "/metrics").text
    assert 'gpufleet_router_requests_total{replica="r0",status="200"} 2.0' in text
    reported = [
        ln for ln in text.splitlines() if ln.startswith('gpufleet_router_replica_cached_tokens_total{replica="r0"}')
    ]
    assert reported and float(reported[0].split()[-1]) > 0
    assert 'gpufleet_router_in_flight{replica="r0"} 0.0' in text
    assert "gpufleet_router_request_duration_seconds_bucket" in text


def test_admin_endpoint_requires_the_configured_bearer_token(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(2)), admin_token="s3cret-token")
    assert httpx.get(rr.url + "/admin/replicas").status_code == 401
    wrong = httpx.get(rr.url + "/admin/replicas", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "s3cret" not in wrong.text
    ok = httpx.get(rr.url + "/admin/replicas", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200
    rows = ok.json()["replicas"]
    assert [r["id"] for r in rows] == ["r0", "r1"]
    assert {"healthy", "in_flight", "estimated_cached_blocks", "pool", "priority"} <= set(rows[0])


def test_admin_endpoint_is_disabled_without_a_token(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), environ={})
    r = httpx.get(rr.url + "/admin/replicas", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "disabled" in error_of(r)["message"]


def test_admin_token_is_read_from_the_named_env_var_and_file(replicas, make_router, tmp_path) -> None:
    reps = replicas(1)
    rr = make_router(
        replica_configs(reps), settings={"admin_token": {"env": "MY_TOKEN"}}, environ={"MY_TOKEN": "from-env"}
    )
    assert httpx.get(rr.url + "/admin/replicas", headers={"Authorization": "Bearer from-env"}).status_code == 200
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    rr2 = make_router(replica_configs(reps), settings={"admin_token": {"file": str(f)}})
    assert httpx.get(rr2.url + "/admin/replicas", headers={"Authorization": "Bearer from-file"}).status_code == 200


def test_large_body_arriving_in_many_segments_is_read_whole(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps, max_model_len=1_000_000))
    big = "word " * 200_000  # 1 MB: many TCP segments

    def chunks():  # type: ignore[no-untyped-def]
        data = json.dumps(chat(big)).encode()
        for i in range(0, len(data), 65_536):
            yield data[i : i + 65_536]

    r = httpx.post(
        rr.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 200
    assert reps[0].requests[-1]["body"]["messages"][1]["content"] == big


def test_chunked_body_over_limit_is_413(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), settings={"max_body_bytes": 4096})

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(rr.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_an_internal_bug_answers_500_in_the_api_shape_without_details(replicas, make_router) -> None:
    from gpufleet.router.policies.least_load import LeastLoadPolicy

    class Broken(LeastLoadPolicy):
        name = "least_load"

        def _pick(self, features, tier, replicas):  # type: ignore[no-untyped-def]
            raise RuntimeError("secret internal detail")

    rr = make_router(replica_configs(replicas(1)), policy=Broken())
    r = post(rr.url, chat("x"))
    assert r.status_code == 500
    assert error_of(r)["type"] == "server_error" and "secret" not in r.text


def test_wrong_method_on_a_known_path_is_json_405_with_allow(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)))
    r = httpx.get(rr.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert error_of(r)["code"] == "method_not_allowed"


def test_retry_past_a_dead_top_pool_counts_as_a_spill(replicas, make_router) -> None:
    top = replicas(2, mode="drop")  # still marked healthy: the failures happen on the request path
    low = replicas(1)
    cfgs = replica_configs(top + low, pools=[("top", 10), ("top", 10), ("low", 1)])
    rr = make_router(cfgs, settings={"policy": "round_robin", "max_retries": 2, "health": {"eject_after_failures": 5}})
    r = post(rr.url, chat("after the top pool died"))
    assert r.status_code == 200 and r.headers["x-gpufleet-replica"] == low[0].name
    assert 'gpufleet_router_spills_total{model="m",pool="low"} 1.0' in httpx.get(rr.url + "/metrics").text


# -- first-byte deadline, retry budget ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_hung_replica_holds_a_request_for_one_first_byte_deadline_then_it_is_retried(
    replicas, make_router, stream
) -> None:
    hung, good = replicas(1, mode="hang")[0], replicas(1)[0]
    settings = {
        "policy": "round_robin",
        "health": SLOW_HEALTH,
        "first_byte": {"floor_s": 0.4, "factor": 1.0},
        "request_timeout_s": 60,
    }
    rr = make_router(replica_configs([hung, good]), settings=settings)
    t0 = time.monotonic()
    r = post(rr.url, chat("x", stream=stream, max_tokens=4))  # unstreamed: 4 tokens at 20/s fit the floor
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-gpufleet-replica"] == good.name
    assert len(hung.requests) == 1 and 0.4 <= took < 2.0
    assert 'gpufleet_router_retries_total{replica="r0"} 1.0' in httpx.get(rr.url + "/metrics").text


def test_a_suspect_replica_is_checked_at_once_and_ejected_when_the_check_fails(replicas, make_router) -> None:
    hung, good = replicas(1, mode="hang", health_status=503)[0], replicas(1)[0]
    settings = {"policy": "round_robin", "health": SLOW_HEALTH, "first_byte": {"floor_s": 0.3, "factor": 1.0}}
    rr = make_router(replica_configs([hung, good]), settings=settings)
    assert post(rr.url, chat("x", stream=True)).headers["x-gpufleet-replica"] == good.name
    # the regular check is 60 s away: the failed attempt itself asked for this one
    assert wait_for(lambda: not rr.router.replicas[0].healthy, timeout=2)
    assert 'gpufleet_router_ejection_reasons_total{reason="active_check"} 1.0' in httpx.get(rr.url + "/metrics").text


def test_first_byte_deadline_follows_the_plans_rates_and_the_queue(replicas, make_router) -> None:
    from gpufleet.router.proxy import ProxyRequest
    from gpufleet.router.types import RequestFeatures

    rr = make_router(replica_configs(replicas(1)), settings={"first_byte": {"floor_s": 1, "factor": 2}})
    r = rr.router.replicas[0]
    r.prefill_tokens_per_s, r.decode_tokens_per_s = 1000.0, 50.0
    group = rr.router.replicas.by_model["m"]

    def req(tokens: int, stream: bool, budget: int) -> ProxyRequest:
        f = RequestFeatures(model="m", prompt_tokens=tokens)
        return ProxyRequest(None, "/v1/chat/completions", f, group, b"", b"", stream, None, None, budget)  # type: ignore[arg-type]

    p = rr.router.proxy
    assert p.first_byte_deadline_s(req(100, True, 10), r) == 1  # the floor
    assert p.first_byte_deadline_s(req(4000, True, 10), r) == pytest.approx(8)  # 2 x 4000/1000
    r.queued_prefill_tokens = 6000
    assert p.first_byte_deadline_s(req(4000, True, 10), r) == pytest.approx(20)  # the queue ahead counts
    assert p.first_byte_deadline_s(req(4000, False, 500), r) == pytest.approx(40)  # + 500/50 decode, x 2
    assert p.first_byte_deadline_s(req(10**9, False, 500), r) == rr.router.settings.request_timeout_s


def test_retries_stop_when_the_retry_budget_is_spent(replicas, make_router) -> None:
    bad, good = replicas(1, mode="drop")[0], replicas(1)[0]
    settings = {
        "policy": "round_robin",
        "health": {**SLOW_HEALTH, "eject_after_failures": 10},
        "retry": {"budget_percent": 0, "min_retry_concurrency": 0},
    }
    rr = make_router(replica_configs([bad, good]), settings=settings)
    got = [post(rr.url, chat(f"x{i}")) for i in range(2)]
    failed = [g for g in got if g.status_code != 200]
    assert len(failed) == 1 and "retry budget" in error_of(failed[0])["message"]
    assert good.requests and len(bad.requests) == 1
    assert "gpufleet_router_retry_budget_exhausted_total 1.0" in httpx.get(rr.url + "/metrics").text


def test_a_stream_that_stalls_after_its_first_byte_is_ended_at_the_idle_timeout(replicas, make_router) -> None:
    reps = replicas(1, token_delay_s=5.0, n_tokens=3)
    rr = make_router(replica_configs(reps), settings={"stream_idle_timeout_s": 0.4, "health": SLOW_HEALTH})
    t0 = time.monotonic()
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=chat("s", stream=True), timeout=10) as s:
        body = b"".join(s.iter_raw())
    assert time.monotonic() - t0 < 3
    assert b"r0-w0" in body and b"upstream_failed" in body and b"[DONE]" not in body
