"""The prediction cache's redis backend, against a real redis-server on loopback (skipped without one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from gpufleet.router import errors
from gpufleet.router.app import Router
from gpufleet.router.config import PredictionCacheSettings, RouterConfig, RouterSettings
from gpufleet.router.prediction_cache import make_prediction_cache
from tests.router.router_fakes import chat, replica_configs

pytestmark = pytest.mark.redis

URL_ENV = "GPUFLEET_PREDICTION_CACHE_REDIS_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH: .ci/run installs it")
        pytest.skip("redis-server is not on PATH (.ci/run installs it; locally: apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


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
    dead = f"redis://127.0.0.1:{_free_port()}/0"
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
