"""Tenants over real loopback HTTP: configurable identity, require_tenant, the path in the cache key,
fresh ids for cached answers, and tenant_isolation (cache_salt, the prefix index, hidden cached_tokens)."""

from __future__ import annotations

import json

import httpx
import pytest

from gpufleet.router.config import TenantSettings
from gpufleet.router.prefix import features_from_body
from gpufleet.router.tenant import CachedTokensFilter, TenantResolver, hide_cached_tokens
from tests.router.router_fakes import chat, replica_configs

PC = {"enabled": True}


def post(url: str, body: dict, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("header", ["Authorization", "api-key", "x-api-key"])
def test_no_cached_answer_crosses_tenants_under_any_identity_header(replicas, make_router, header) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"prediction_cache": PC})
    body = chat("the same question", temperature=0)
    a = post(rr.url, body, **{header: "key-A"})
    b = post(rr.url, body, **{header: "key-B"})
    assert [a.headers["x-gpufleet-cache"], b.headers["x-gpufleet-cache"]] == ["miss", "miss"]
    assert post(rr.url, body, **{header: "key-A"}).headers["x-gpufleet-cache"] == "hit"
    assert len(reps[0].requests) == 2


def test_the_first_configured_header_present_names_the_tenant() -> None:
    t = TenantResolver(TenantSettings(headers=["x-api-key", "authorization"]), environ={})
    both = t.tenant({"x-api-key": "k1", "authorization": "Bearer z"}, "1.2.3.4")
    assert both == t.tenant({"x-api-key": "k1"}, None) != t.tenant({"authorization": "Bearer z"}, None)
    assert t.tenant({}, None) is None and t.tenant({"x-api-key": "  "}, None) is None
    assert "k1" not in (both or "")


def test_a_gateway_header_is_trusted_only_from_the_gateways_addresses(replicas, make_router) -> None:
    reps = replicas(1)
    body = chat("via gateway", temperature=0)
    untrusted = make_router(
        replica_configs(reps),
        settings={
            "prediction_cache": PC,
            "tenant": {"headers": [{"name": "x-tenant", "trusted_cidrs": ["10.0.0.0/8"]}]},
        },
    )
    # from 127.0.0.1 the header is ignored: the request is anonymous, so it is not cached
    assert post(untrusted.url, body, **{"x-tenant": "acme"}).headers["x-gpufleet-cache"] == "bypass"
    trusted = make_router(
        replica_configs(reps),
        settings={
            "prediction_cache": PC,
            "tenant": {"headers": [{"name": "x-tenant", "trusted_cidrs": ["127.0.0.0/8"]}]},
        },
    )
    assert post(trusted.url, body, **{"x-tenant": "acme"}).headers["x-gpufleet-cache"] == "miss"
    assert post(trusted.url, body, **{"x-tenant": "acme"}).headers["x-gpufleet-cache"] == "hit"
    assert post(trusted.url, body, **{"x-tenant": "other"}).headers["x-gpufleet-cache"] == "miss"


def test_trusted_cidrs_are_validated(replicas, make_router) -> None:
    with pytest.raises(ValueError, match="not an IP network"):
        TenantSettings.model_validate({"headers": [{"name": "x-t", "trusted_cidrs": ["gateway"]}]})


def test_anonymous_requests_are_not_cached_unless_allowed(replicas, make_router) -> None:
    reps = replicas(1)
    body = chat("anonymous", temperature=0)
    rr = make_router(replica_configs(reps), settings={"prediction_cache": PC})
    assert [post(rr.url, body).headers["x-gpufleet-cache"] for _ in range(2)] == ["bypass", "bypass"]
    shared = make_router(replica_configs(reps), settings={"prediction_cache": {**PC, "require_tenant": False}})
    assert [post(shared.url, body).headers["x-gpufleet-cache"] for _ in range(2)] == ["miss", "hit"]


def test_the_request_path_is_in_the_cache_key(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"prediction_cache": PC})
    body = {"model": "m", "prompt": "same fields", "messages": [{"role": "user", "content": "same fields"}]}
    body["temperature"] = 0
    chat_answer = post(rr.url, body, Authorization="k")
    comp = post(rr.url, body, "/v1/completions", Authorization="k")
    assert comp.headers["x-gpufleet-cache"] == "miss" and comp.json()["object"] == "text_completion"
    assert chat_answer.json()["object"] == "chat.completion"


def test_a_cached_answer_gets_its_own_id_and_request_id(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"prediction_cache": PC})
    body = chat("ids", temperature=0)
    first = post(rr.url, body, Authorization="k")
    hits = [post(rr.url, body, Authorization="k") for _ in range(2)]
    ids = {first.json()["id"], *(h.json()["id"] for h in hits)}
    assert len(ids) == 3
    assert len({h.headers["x-request-id"] for h in hits}) == 2
    mine = post(rr.url, body, Authorization="k", **{"x-request-id": "client-42"})
    assert mine.headers["x-request-id"] == "client-42"


def _salts(rep) -> list[object]:  # type: ignore[no-untyped-def]
    return [r["body"].get("cache_salt") for r in rep.requests]


def test_kv_isolation_salts_each_tenants_requests_and_replaces_a_clients_salt(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(
        replica_configs(reps), settings={"tenant_isolation": "kv"}, environ={"GPUFLEET_CACHE_SALT_KEY": "k"}
    )
    post(rr.url, chat("a"), Authorization="key-A")
    post(rr.url, chat("b"), Authorization="key-A")
    post(rr.url, chat("c", cache_salt="chosen-by-client"), Authorization="key-B")
    post(rr.url, chat("d", max_tokens=10**6), Authorization="key-B")  # clamped: re-encoded body
    post(rr.url, chat("e"))  # anonymous: no salt
    a1, a2, b1, b2, anon = _salts(reps[0])
    assert isinstance(a1, str) and len(a1) == 43 and a1 == a2
    assert b1 == b2 != a1 and b1 != "chosen-by-client"
    assert anon is None
    # a second router with the same key salts a tenant the same way
    other = make_router(
        replica_configs(reps), settings={"tenant_isolation": "kv"}, environ={"GPUFLEET_CACHE_SALT_KEY": "k"}
    )
    post(other.url, chat("f"), Authorization="key-A")
    assert _salts(reps[0])[-1] == a1


def test_without_kv_isolation_no_salt_is_added_and_a_clients_own_passes(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"tenant_isolation": "prediction_cache"})
    post(rr.url, chat("a"), Authorization="key-A")
    post(rr.url, chat("b", cache_salt="mine"), Authorization="key-A")
    assert _salts(reps[0]) == [None, "mine"]


def test_kv_isolation_keys_the_routers_prefix_index_per_tenant() -> None:
    body = chat("a long shared system prompt " * 20)
    kw = {"model": "m", "block_size_tokens": 4, "chars_per_token": 4.0}
    plain = features_from_body(body, **kw).block_hashes
    a, b = (features_from_body(body, salt=s, **kw).block_hashes for s in ("salt-a", "salt-b"))
    assert len(plain) == len(a) == len(b) > 10
    assert not set(a) & set(b) and not set(a) & set(plain)
    assert features_from_body(body, salt="salt-a", **kw).block_hashes == a


def test_cached_tokens_can_be_hidden_from_clients(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings={"hide_cached_tokens": True, "prediction_cache": PC})
    doc = post(rr.url, chat("hidden", temperature=0), Authorization="k").json()
    assert "cached_tokens" not in doc["usage"].get("prompt_tokens_details", {})
    assert doc["usage"]["prompt_tokens"] > 0
    hit = post(rr.url, chat("hidden", temperature=0), Authorization="k")
    assert hit.headers["x-gpufleet-cache"] == "hit" and b"cached_tokens" not in hit.content
    body = chat("hidden stream", stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=body, timeout=10) as s:
        raw = b"".join(s.iter_raw())
    assert b'"usage"' in raw and b"cached_tokens" not in raw and raw.rstrip().endswith(b"data: [DONE]")
    metrics = httpx.get(rr.url + "/metrics").text  # the router itself still reads them
    assert 'gpufleet_router_replica_cached_tokens_total{replica="r0"}' in metrics


def test_the_cached_tokens_filter_works_across_any_chunking() -> None:
    ev = {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}}
    stream = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n' + b"data: " + json.dumps(ev).encode()
    stream += b"\n\ndata: [DONE]\n\n"
    for size in (1, 3, 7, 64, len(stream)):
        f = CachedTokensFilter()
        out = b"".join(f.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + f.flush()
        assert b"cached_tokens" not in out and out.count(b"data:") == 3 and b'"prompt_tokens":9' in out
    assert hide_cached_tokens(b'{"usage":{"prompt_tokens_details":{"cached_tokens":3}}}') == (
        b'{"usage":{"prompt_tokens_details":{}}}'
    )
