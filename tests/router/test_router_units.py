"""Prediction cache, SSE assembly, health bookkeeping, config loading and the pinned public API."""

from __future__ import annotations

import json

import pytest

from gpufleet.router import (
    app,
    errors,
    health,
    loader,
    membership,
    prediction_cache,
    prefix,
    proxy,
    replicas,
    types,
    upstream,
)
from gpufleet.router.config import HealthSettings, PredictionCacheSettings
from gpufleet.router.prediction_cache import (
    PredictionCache,
    SSEAssembler,
    cache_key,
    is_cacheable,
    replay_sse,
    tenant_of,
)
from gpufleet.router.types import ReplicaState

# -- prediction cache -------------------------------------------------------------------------


def test_cacheable_means_one_choice_and_deterministic() -> None:
    assert is_cacheable({"temperature": 0})
    assert is_cacheable({"temperature": 0.9, "seed": 1})
    assert not is_cacheable({"temperature": 0.9})
    assert not is_cacheable({})  # OpenAI's default temperature is 1
    assert not is_cacheable({"temperature": 0, "n": 3})
    assert not is_cacheable({"temperature": False})


def test_tenant_is_a_hash_of_the_key_and_anonymous_without_one() -> None:
    assert tenant_of(None) == tenant_of("") == prediction_cache.ANONYMOUS_TENANT
    t = tenant_of("Bearer sk-abc")
    assert "sk-abc" not in t and t != tenant_of("Bearer sk-abd")


def test_key_differs_by_tenant_and_model_but_not_by_stream_or_key_order() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0}
    k = cache_key("t1", "m", body)
    assert k != cache_key("t2", "m", body)
    assert k != cache_key("t1", "m2", body)
    assert k == cache_key("t1", "m", {"temperature": 0, "stream": True, "messages": body["messages"]})
    assert k != cache_key("t1", "m", {**body, "max_tokens": 5})


def test_entries_expire_after_ttl() -> None:
    now = [0.0]
    c = PredictionCache(PredictionCacheSettings(enabled=True, ttl_s=10), clock=lambda: now[0])
    c.put("k", b"answer")
    assert c.get("k") == b"answer"
    now[0] = 10.5
    assert c.get("k") is None and len(c) == 0 and c.bytes == 0


def test_entry_and_byte_bounds_evict_least_recently_used() -> None:
    c = PredictionCache(PredictionCacheSettings(enabled=True, max_entries=3, max_bytes=2048))
    for k in "abc":
        c.put(k, b"x" * 100)
    c.get("a")  # a is now the most recent
    c.put("d", b"x" * 100)
    assert c.get("b") is None and c.get("a") is not None and len(c) == 3
    c.put("big", b"y" * 1900)  # pushes the rest out to stay under 2048 bytes
    assert c.bytes <= 2048 and c.get("big") is not None
    assert not c.put("huge", b"z" * 5000) and c.get("huge") is None


def test_sse_assembler_rebuilds_a_chat_completion_and_replay_round_trips() -> None:
    events = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}],
        },
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
        },
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
    ]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    a = SSEAssembler()
    for i in range(0, len(raw), 7):  # arbitrary chunk boundaries
        a.feed(raw[i : i + 7])
    doc = json.loads(a.result())
    assert doc["choices"][0]["message"]["content"] == "Hello"
    assert doc["choices"][0]["finish_reason"] == "stop" and doc["usage"]["completion_tokens"] == 2
    replayed = b"".join(replay_sse(a.result(), include_usage=True))
    b = SSEAssembler()
    b.feed(replayed)
    assert json.loads(b.result()) == doc


def test_sse_assembler_refuses_unfinished_or_errored_streams() -> None:
    a = SSEAssembler()
    a.feed(b'data: {"object":"text_completion","choices":[{"index":0,"text":"x"}]}\n\n')
    assert a.result() is None  # no [DONE]
    b = SSEAssembler()
    b.feed(b'data: {"error":{"message":"boom"}}\n\ndata: [DONE]\n\n')
    assert b.result() is None


# -- health bookkeeping ------------------------------------------------------------------------


def test_ejection_after_threshold_backoff_doubles_and_readmission_waits_for_it() -> None:
    now = [0.0]
    r = ReplicaState(id="r", model="m")
    s = HealthSettings(eject_after_failures=2, backoff_initial_s=1, backoff_max_s=3)
    ejected: list[str] = []
    peer = ReplicaState(id="peer", model="m")
    t = health.HealthTracker(s, [r, peer], clock=lambda: now[0], on_eject=lambda x, kind, why: ejected.append(x.id))
    assert not t.failure(r) and r.healthy
    assert t.failure(r) and not r.healthy and ejected == ["r"]
    assert not t.check_passed(r)  # still inside the 1 s backoff
    now[0] = 1.5
    assert t.check_passed(r) and r.healthy
    t.failure(r)
    assert t.failure(r)  # ejected again: backoff is now 2 s
    now[0] = 3.0
    assert not t.check_passed(r)
    now[0] = 3.6
    assert t.check_passed(r)
    t.failure(r), t.failure(r)
    assert t.record("r")[2] == 3  # capped at backoff_max_s


def test_success_resets_failures() -> None:
    r = ReplicaState(id="r", model="m")
    t = health.HealthTracker(HealthSettings(eject_after_failures=2), [r, ReplicaState(id="peer", model="m")])
    t.failure(r)
    t.success(r)
    assert not t.failure(r) and r.healthy


# -- config file --------------------------------------------------------------------------------

CONFIG = """\
fleet: demo
settings:
  policy: cache_aware
replicas:
  - id: a
    url: http://127.0.0.1:9001
    deployment: d
    model: m
    pool: p
    priority: 1
    kv_capacity_tokens: 1000
    max_model_len: 4096
    max_concurrent_requests: 8
"""


def test_loader_reads_a_valid_config(tmp_path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(CONFIG)
    cfg = loader.load_router_config(f)
    assert cfg.replicas[0].id == "a" and cfg.settings.policy == "cache_aware"


def test_loader_errors_name_file_line_field_and_allowed_values(tmp_path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(
        CONFIG.replace("policy: cache_aware", "policy: fastest").replace(
            "max_concurrent_requests: 8", "max_concurrent_requests: 0"
        )
    )
    with pytest.raises(errors.ConfigError) as ei:
        loader.load_router_config(f)
    msg = str(ei.value)
    assert f"{f}:3: settings.policy: must be one of" in msg and "round_robin" in msg
    assert f"{f}:13: replicas[0].max_concurrent_requests:" in msg and "greater than or equal to 1" in msg


def test_loader_reports_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(errors.ConfigError, match="cannot read"):
        loader.load_router_config(tmp_path / "absent.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("fleet: [unclosed\n")
    with pytest.raises(errors.ConfigError, match="not valid YAML"):
        loader.load_router_config(f)


# -- public API pinned --------------------------------------------------------------------------


def test_public_api_is_pinned() -> None:
    assert sorted(app.__all__) == ["ROUTER_KEY", "Router", "create_app", "resolve_admin_token", "start"]
    assert sorted(proxy.__all__) == ["JSON", "Proxy", "ProxyRequest", "error_response"]
    assert sorted(replicas.__all__) == [
        "CONFIG_SOURCE",
        "MembershipChange",
        "MembershipListener",
        "ModelReplicas",
        "ReplicaSet",
    ]
    assert sorted(membership.__all__) == [
        "ConfigReloader",
        "ReloadResult",
        "admin_routes",
        "parse_replica",
        "parse_replicas",
    ]
    # The policies' API is pinned in test_router_plugins.py.
    assert sorted(types.__all__) == [
        "Decision",
        "Outcome",
        "PeerLoad",
        "ReplicaState",
        "RequestFeatures",
        "stable_hash",
    ]
    assert sorted(prefix.__all__) == ["PrefixIndex", "block_hashes", "features_from_body", "render_prompt"]
    assert sorted(prediction_cache.__all__) == sorted(
        [
            "ANONYMOUS_TENANT",
            "PredictionCache",
            "RedisPredictionCache",
            "SSEAssembler",
            "is_cacheable",
            "make_prediction_cache",
            "replay_sse",
            "tenant_of",
        ]
    )
    assert sorted(errors.__all__) == sorted(
        [
            "AllSaturated",
            "BodyTooLarge",
            "ConfigError",
            "Forbidden",
            "MalformedRequest",
            "MembershipConflict",
            "NoHealthyReplica",
            "NoReplicaAvailable",
            "PromptTooLong",
            "RequestError",
            "RequestTimeout",
            "RouterError",
            "Unauthorized",
            "UnknownModel",
            "UpstreamError",
            "UpstreamFailed",
            "UpstreamTimeout",
            "replica_error_body",
        ]
    )
    assert sorted(upstream.__all__) == sorted(
        [
            "UpstreamClientError",
            "UpstreamConnectError",
            "UpstreamDisconnected",
            "UpstreamPool",
            "UpstreamProtocolError",
            "UpstreamResponse",
        ]
    )
    for mod in (app, proxy, replicas, types, prefix, prediction_cache, errors, health, loader, upstream):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"


def test_every_error_in_the_tree_is_drawn_in_the_errors_docstring_with_its_status() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert name in doc
        if not isinstance(cls, type):
            continue  # a function (replica_error_body)
        if cls.__subclasses__() == [] and cls is not errors.ConfigError:
            assert f"{name}" in doc and str(cls.status) in doc.split(name, 1)[1].split("\n", 1)[0]


def test_error_bodies_are_openai_shaped_and_never_echo_secrets() -> None:
    body = json.loads(errors.AllSaturated("busy", headers={"Retry-After": "1"}).to_body())
    assert body == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "replicas_saturated"}
    }


def test_every_router_setting_is_documented() -> None:
    from pathlib import Path

    from gpufleet.router.config import RouterSettings

    doc = Path(__file__).resolve().parents[2] / "docs" / "router.md"
    if not doc.exists():
        pytest.skip("docs/router.md not present in this checkout")
    text = doc.read_text()

    def fields(model, prefix: str = ""):  # type: ignore[no-untyped-def]
        for name, f in model.model_fields.items():
            if hasattr(f.annotation, "model_fields"):
                yield from fields(f.annotation, prefix + name + ".")
            else:
                yield prefix + name

    missing = [f for f in fields(RouterSettings) if f"`{f}`" not in text]
    assert not missing, f"undocumented settings: {missing}"
