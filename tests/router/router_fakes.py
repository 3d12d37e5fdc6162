"""Test helpers for the router: a fake OpenAI-compatible replica, a background loop, body builders.

Servers run on one asyncio loop in a background thread, so tests are plain synchronous
functions that talk HTTP with httpx. Every server binds 127.0.0.1 on a free port and is
stopped at fixture teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gpufleet.router import app as router_app
from gpufleet.router.config import ReplicaConfig


class LoopThread:
    """An asyncio loop running in a daemon thread; `run(coro)` blocks until the coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the loop thread (to read or change state safely)."""

        async def _c() -> Any:
            return fn()

        return self.run(_c())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class FakeReplica:
    """A small OpenAI-compatible server with knobs for timing and failure injection.

    mode: "ok"; "500" / "503" (answers that status); "drop" (closes the connection without answering);
    "hang" (never answers); "drop_mid_stream" (sends one chunk, then drops the connection).
    """

    name: str
    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    n_tokens: int = 4
    mode: str = "ok"
    health_status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    port: int = 0
    _seen_prompts: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prompt(self, body: dict[str, Any]) -> str:
        if "messages" in body:
            return "".join(f"{m.get('role')}:{m.get('content')}|" for m in body["messages"])
        return str(body.get("prompt", ""))

    def _cached_tokens(self, prompt: str) -> int:
        best = 0
        for p in self._seen_prompts:
            n = 0
            for a, b in zip(p, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self._seen_prompts.append(prompt)
        return (best // 64) * 16  # whole 16-token blocks of 4 characters

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.mode in ("500", "503"):
            # vLLM's error body: the router passes it on in the OpenAI shape
            doc = {"object": "error", "message": "boom", "type": "InternalServerError", "param": None, "code": 500}
            return web.json_response(doc, status=int(self.mode))
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0)
            return web.Response()
        chat = request.path.endswith("chat/completions")
        prompt = self._prompt(body)
        cached = self._cached_tokens(prompt)
        n = min(self.n_tokens, int(body.get("max_tokens") or self.n_tokens))
        usage = {
            "prompt_tokens": len(prompt) // 4,
            "completion_tokens": n,
            "total_tokens": len(prompt) // 4 + n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        words = [f"{self.name}-w{i} " for i in range(n)]
        try:
            if self.mode == "hang":
                await asyncio.sleep(3600)
            await asyncio.sleep(self.ttft_s)
            if not body.get("stream"):
                await asyncio.sleep(self.token_delay_s * n)
                text = "".join(words)
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    doc = {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"]}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": "stop"}
                    doc = {"id": "c1", "object": "text_completion", "created": 1, "model": body["model"]}
                doc.update(choices=[choice], usage=usage)
                self.completed += 1
                return web.json_response(doc, headers={"x-replica-name": self.name})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-replica-name": self.name})
            await resp.prepare(request)
            for i, w in enumerate(words):
                if chat:
                    ev = {
                        "object": "chat.completion.chunk",
                        "id": "c1",
                        "model": body["model"],
                        "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
                    }
                else:
                    ev = {
                        "object": "text_completion",
                        "id": "c1",
                        "model": body["model"],
                        "choices": [{"index": 0, "text": w, "finish_reason": None}],
                    }
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                if self.mode == "drop_mid_stream" and i == 0:
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await asyncio.sleep(self.token_delay_s)
            fin = {
                "object": "chat.completion.chunk" if chat else "text_completion",
                "id": "c1",
                "model": body["model"],
                "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop"}
                    if chat
                    else {"index": 0, "text": "", "finish_reason": "stop"}
                ],
            }
            await resp.write(b"data: " + json.dumps(fin).encode() + b"\n\n")
            opts = body.get("stream_options") or {}
            if opts.get("include_usage"):
                await resp.write(
                    b"data: "
                    + json.dumps({"object": "chat.completion.chunk", "choices": [], "usage": usage}).encode()
                    + b"\n\n"
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.completed += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=self.health_status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/health", self._health)
        runner, self.port = await router_app.start(app, "127.0.0.1", self.port)
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class RunningRouter:
    url: str
    router: router_app.Router
    app: web.Application
    runner: web.AppRunner


def replica_configs(
    reps: list[FakeReplica],
    *,
    model: str = "m",
    pools: list[tuple[str, int]] | None = None,
    kv_capacity_tokens: int = 100_000,
    max_model_len: int = 4096,
    max_concurrent_requests: int = 64,
) -> list[ReplicaConfig]:
    """ReplicaConfigs for fake replicas; `pools` gives (pool, priority) per replica."""
    out = []
    for i, rep in enumerate(reps):
        pool, prio = pools[i] if pools else ("p", 0)
        out.append(
            ReplicaConfig(
                id=rep.name,
                url=rep.url,
                deployment="d",
                model=model,
                pool=pool,
                priority=prio,
                kv_capacity_tokens=kv_capacity_tokens,
                max_model_len=max_model_len,
                max_concurrent_requests=max_concurrent_requests,
            )
        )
    return out


@contextlib.contextmanager
def serve_process(config: Path, port: int = 0, **env: str) -> Iterator[tuple[str, str]]:
    """`gpufleet router serve -c config --port <port>` (0: a free one) in a child process: yields
    (its start line, its URL), then interrupts it and checks it exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gpufleet.infra.cli import main; main()", "router", "serve", "-c", str(config)]
        + ["--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    try:
        line = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "listening on" not in line:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line and proc.poll() is not None:
                break
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        yield line, m.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `pred` until true (for effects that happen on the server's side after a response)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def chat(content: str, *, system: str = "You are helpful.", **extra: Any) -> dict[str, Any]:
    """A chat completion body for model `m`."""
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        **extra,
    }
