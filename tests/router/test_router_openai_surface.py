"""The OpenAI surface beyond chat/completions: /v1/responses and /v1/embeddings routed by model
(as vLLM serves both), over real loopback HTTP; /v1/models lists every model with its context."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from gpufleet.router.config import ReplicaConfig


@dataclass
class EngineFake:
    """A replica answering /v1/responses (JSON or SSE events) and /v1/embeddings in vLLM's shapes."""

    name: str
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.path, body))
        text = f"{self.name} says hi"
        doc = {
            "id": "resp_1",
            "object": "response",
            "model": body["model"],
            "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
        }
        if not body.get("stream"):
            return web.json_response(doc)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [
            ("response.created", {"type": "response.created", "response": {**doc, "status": "in_progress"}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": text}),
            ("response.completed", {"type": "response.completed", "response": doc}),
        ]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((request.path, body))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(i)]} for i in range(len(inputs))]
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": data,
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _fleet(loop_thread, make_router):
    chat_a, chat_b, embed = EngineFake("chat-a"), EngineFake("chat-b"), EngineFake("embed")
    for f in (chat_a, chat_b, embed):
        loop_thread.run(f.start())

    def cfg(f: EngineFake, model: str, max_len: int) -> ReplicaConfig:
        return ReplicaConfig(
            id=f.name,
            url=f"http://127.0.0.1:{f.port}",
            deployment=model,
            model=model,
            pool="p",
            priority=1,
            kv_capacity_tokens=100_000,
            max_model_len=max_len,
            max_concurrent_requests=16,
        )

    cfgs = [cfg(chat_a, "qwen", 8192), cfg(chat_b, "qwen", 8192), cfg(embed, "bge", 512)]
    return (chat_a, chat_b, embed), make_router(cfgs)


def _stop(loop_thread, fakes) -> None:
    for f in fakes:
        loop_thread.run(f.stop())


def test_responses_go_to_a_replica_of_the_model_json_and_stream(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    chat_a, chat_b, embed = fakes
    try:
        body = {"model": "qwen", "instructions": "Be brief.", "input": "Hello there"}
        r = httpx.post(rr.url + "/v1/responses", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "response"
        with httpx.stream("POST", rr.url + "/v1/responses", json={**body, "stream": True}, timeout=10) as s:
            assert s.status_code == 200
            text = "".join(s.iter_text())
        assert "event: response.output_text.delta" in text and "response.completed" in text
        seen = chat_a.seen + chat_b.seen
        assert [p for p, _ in seen] == ["/v1/responses", "/v1/responses"]
        assert not embed.seen  # another model's replica never sees them
    finally:
        _stop(loop_thread, fakes)


def test_responses_with_the_same_instructions_stick_to_one_replica(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    chat_a, chat_b, _ = fakes
    try:
        shared = "You answer questions about the fleet manual. " * 40  # a long shared prefix
        for i in range(6):
            body = {"model": "qwen", "instructions": shared, "input": [{"role": "user", "content": f"question {i}"}]}
            assert httpx.post(rr.url + "/v1/responses", json=body, timeout=10).status_code == 200
        counts = sorted([len(chat_a.seen), len(chat_b.seen)])
        assert counts == [0, 6], counts  # cache_aware keeps the shared prefix on one replica
    finally:
        _stop(loop_thread, fakes)


def test_embeddings_are_routed_by_model(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    chat_a, chat_b, embed = fakes
    try:
        r = httpx.post(rr.url + "/v1/embeddings", json={"model": "bge", "input": ["a", "b"]}, timeout=10)
        assert r.status_code == 200, r.text
        assert [d["index"] for d in r.json()["data"]] == [0, 1]
        assert [p for p, _ in embed.seen] == ["/v1/embeddings"]
        assert not chat_a.seen and not chat_b.seen
    finally:
        _stop(loop_thread, fakes)


def test_bad_bodies_get_the_openai_error_shape(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    try:
        r = httpx.post(rr.url + "/v1/embeddings", json={"model": "bge"}, timeout=10)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "input" and err["type"] == "invalid_request_error"
        r = httpx.post(rr.url + "/v1/responses", json={"model": "nope", "input": "hi"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        too_long = {"model": "bge", "input": "word " * 2000}  # far over the model's 512 tokens
        r = httpx.post(rr.url + "/v1/embeddings", json=too_long, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        assert not any(f.seen for f in fakes)
    finally:
        _stop(loop_thread, fakes)


def test_responses_output_budget_is_clamped_to_the_context(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    try:
        body = {"model": "qwen", "input": "hi", "max_output_tokens": 1_000_000}
        assert httpx.post(rr.url + "/v1/responses", json=body, timeout=10).status_code == 200
        (sent,) = [b for f in fakes for _, b in f.seen]
        assert sent["max_output_tokens"] < 8192
    finally:
        _stop(loop_thread, fakes)


def test_models_lists_every_model_with_its_max_model_len(loop_thread, make_router) -> None:
    fakes, rr = _fleet(loop_thread, make_router)
    try:
        data = httpx.get(rr.url + "/v1/models", timeout=10).json()["data"]
        assert {m["id"]: m["max_model_len"] for m in data} == {"qwen": 8192, "bge": 512}
    finally:
        _stop(loop_thread, fakes)


def test_openai_sdk_calls_both_endpoints(loop_thread, make_router) -> None:
    openai = pytest.importorskip("openai")
    fakes, rr = _fleet(loop_thread, make_router)
    try:
        client = openai.OpenAI(base_url=rr.url + "/v1", api_key="x", max_retries=0)
        emb = client.embeddings.create(model="bge", input="hello")
        assert len(emb.data[0].embedding) == 3
        resp = client.responses.create(model="qwen", input="hello")
        assert "says hi" in resp.output_text
    finally:
        _stop(loop_thread, fakes)
