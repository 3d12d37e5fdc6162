"""Fixtures for router tests: fake replicas and routers over real loopback HTTP (helpers in router_fakes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gpufleet.router import app as router_app
from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from tests.router.router_fakes import FakeReplica, LoopThread, RunningRouter, free_port


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def replicas(loop_thread: LoopThread) -> Iterator[Callable[..., list[FakeReplica]]]:
    """Factory: `replicas(3, ttft_s=...)` starts that many fake replicas (stopped at teardown)."""
    started: list[FakeReplica] = []

    def make(n: int, **kw: Any) -> list[FakeReplica]:
        out = []
        for _ in range(n):
            rep = FakeReplica(name=f"r{len(started)}", **kw)
            loop_thread.run(rep.start())
            started.append(rep)
            out.append(rep)
        return out

    yield make
    for rep in started:
        loop_thread.run(rep.stop())


@pytest.fixture
def make_router(loop_thread: LoopThread) -> Iterator[Callable[..., RunningRouter]]:
    """Factory: `make_router(replica_configs, settings=..., discovery=..., admin_token=...)` starts a router."""
    started: list[RunningRouter] = []

    def make(
        replicas: list[ReplicaConfig],
        settings: RouterSettings | dict | None = None,
        discovery: dict[str, Any] | None = None,
        **kw: Any,
    ) -> RunningRouter:
        if isinstance(settings, dict):
            settings = RouterSettings.model_validate(settings)
        cfg = RouterConfig.model_validate(
            {
                "fleet": "test",
                "settings": settings or RouterSettings(),
                "replicas": replicas,
                "discovery": discovery or {},
            }
        )
        app = router_app.create_app(cfg, **kw)
        runner, port = loop_thread.run(router_app.start(app, "127.0.0.1", 0))
        rr = RunningRouter(url=f"http://127.0.0.1:{port}", router=app[router_app.ROUTER_KEY], app=app, runner=runner)
        started.append(rr)
        return rr

    yield make
    for rr in started:
        loop_thread.run(rr.runner.cleanup())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port for the session (skipped without one, failed in CI)."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH: .ci/run installs it")
        pytest.skip("redis-server is not on PATH (.ci/run installs it; locally: apt-get install redis-server)")
    port = free_port()
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
