"""The prediction cache's redis backend, against a real redis-server on loopback (skipped without one)."""

from __future__ import annotations

import httpx
import pytest

from gpufleet.router import errors
from gpufleet.router.app import Router
from gpufleet.router.config import PredictionCacheSettings, RouterConfig, RouterSettings
from gpufleet.router.prediction_cache import make_prediction_cache
from tests.router.router_fakes import chat, free_port, replica_configs

pytestmark = pytest.mark.redis

URL_ENV = "GPUFLEET_PREDICTION_CACHE_REDIS_URL"


def settings(**kw) -> dict:  # type: ignore[no-untyped-def]
    return {"prediction_cache": {"enabled": True, "backend": "redis", "require_tenant": False, **kw}}


def test_two_router_instances_share_answers_through_redis(replicas, make_router, redis_url) -> None:
    reps = replicas(1)
    env = {URL_ENV: redis_url}
    a = make_router(replica_configs(reps), settings=settings(key_prefix="t1:"), environ=env)
    b = make_router(replica_configs(reps), settings=settings(key_prefix="t1:"), environ=env)
    body = chat("shared answer", temperature=0)
    first = httpx.post(a.url + "/v1/chat/completions", json=body, timeout=10)
    second = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=10)
    assert first.headers["x-gpufleet-cache"] == "miss" and second.headers["x-gpufleet-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"] and len(reps[0].requests) == 1


def test_redis_backend_keeps_tenants_apart(replicas, make_router, redis_url) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=settings(key_prefix="t2:"), environ={URL_ENV: redis_url})
    body = chat("per tenant", temperature=0)
    for key in ("Bearer A", "Bearer B"):
        r = httpx.post(rr.url + "/v1/chat/completions", json=body, headers={"Authorization": key}, timeout=10)
        assert r.headers["x-gpufleet-cache"] == "miss"
    r = httpx.post(rr.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer B"}, timeout=10)
    assert r.headers["x-gpufleet-cache"] == "hit" and len(reps[0].requests) == 2


def test_unreachable_redis_serves_without_the_cache(replicas, make_router) -> None:
    reps = replicas(1)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    rr = make_router(replica_configs(reps), settings=settings(), environ={URL_ENV: dead})
    body = chat("still served", temperature=0)
    for _ in range(2):
        r = httpx.post(rr.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.headers["x-gpufleet-cache"] == "miss"
    assert len(reps[0].requests) == 2
    assert rr.router.cache.errors >= 2  # type: ignore[union-attr]


def test_redis_backend_without_url_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=URL_ENV):
        make_prediction_cache(PredictionCacheSettings(enabled=True, backend="redis"), environ={})
    cfg = RouterConfig(fleet="f", settings=RouterSettings.model_validate(settings()), replicas=[])
    with pytest.raises(errors.ConfigError, match="not set"):
        Router(cfg, environ={})
