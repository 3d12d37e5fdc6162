"""The simulated replica's HTTP surface: vLLM's OpenAI-compatible API (and SGLang's info routes) over `ReplicaSim`.

`build_app(sim)` wires the handlers; `listen` serves it on a port, and `serve` runs one replica
until `POST /admin/die` or cancellation (the `gpufleet replica-sim` process). Errors use vLLM's
body (`{"object": "error", "message", "type", "param", "code"}`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gpufleet.router import kvmodel
from gpufleet.router.prefix import render_prompt
from gpufleet.router.replica.settings import FailureMode, SimSettings
from gpufleet.router.replica.sim import BadRequest, Job, ReplicaSim

__all__ = ["POISON_ENV", "build_app", "listen", "serve"]

_ADMIN_FAIL_MODES = ("ok", "status", "hang", "drop")
POISON_ENV = "GPUFLEET_SIM_POISON"
"""A marker: a prompt containing it is answered 500, as an engine that fails on one input."""


def _error(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> web.Response:
    """vLLM's error body."""
    body = {"object": "error", "message": message, "type": type_, "param": param, "code": status}
    return web.json_response(body, status=status)


def _check_admin(sim: ReplicaSim, request: web.Request) -> web.Response | None:
    token = sim.settings.admin_token
    if not token:
        return _error(403, "admin endpoints are disabled (no admin token configured)", "PermissionDenied")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        return _error(401, "missing or wrong admin bearer token", "Unauthorized")
    return None


async def _apply_failure(sim: ReplicaSim, request: web.Request, consume: bool = True) -> web.StreamResponse | None:
    mode = sim.failure.take(consume)
    if mode == "status":
        return _error(sim.failure.status, "injected failure", "InternalServerError")
    if mode == "hang":
        await asyncio.Event().wait()  # until the client gives up and the handler is cancelled
    if mode == "drop":
        # close the connection with no response at all, as a crashed process would
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)
    return None


def build_app(sim: ReplicaSim, on_die: Callable[[], None] | None = None) -> web.Application:
    """The aiohttp application serving `sim`. `on_die` is what `POST /admin/die` does in-process."""
    s = sim.settings
    poison = os.environ.get(POISON_ENV, "")
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def _startup(_: web.Application) -> None:
        await sim.start()

    async def _cleanup(_: web.Application) -> None:
        await sim.stop()

    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)

    def standby_response() -> web.Response:
        return _error(503, "replica is a warm standby (not promoted)", "ServiceUnavailable")

    async def completions(request: web.Request, kind: str) -> web.StreamResponse:
        if sim.standby:
            return standby_response()
        failed = await _apply_failure(sim, request)
        if failed is not None:
            return failed
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if poison and poison in render_prompt(body if isinstance(body, dict) else {}):
            # An engine bug on one input (as a lone surrogate crashed vLLM's tokenizer): a 500
            # for this request only; the replica stays well (fault injection for bench/soak.py).
            return _error(500, "engine failed on this input", "InternalServerError")
        try:
            job = sim.parse(body, kind)
            arrival = sim.now()
            queue = sim.submit(job)
        except BadRequest as exc:
            return _error(exc.status, exc.message, exc.type, exc.param)
        try:
            if job.stream:
                return await _stream(request, job, queue, arrival)
            return await _unary(job, queue, arrival)
        except ConnectionResetError:
            # the client went away mid-stream: nothing to answer, the engine request is dropped below
            return web.Response(status=499)
        finally:
            sim.forget(job.request_id)

    async def _unary(job: Job, queue: asyncio.Queue[kvmodel.Event], arrival: float) -> web.Response:
        first: float | None = None
        while True:
            ev = await queue.get()
            if ev.kind is kvmodel.EventKind.FIRST_TOKEN:
                first = ev.time
            if ev.kind is kvmodel.EventKind.FINISHED:
                break
        sim.record(job, arrival, first, ev.time, ev.output_tokens)
        text = sim.answer_text(job.prompt.seed, ev.output_tokens)
        created = int(time.time())
        if job.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": job.finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
            obj = "text_completion"
        out = {
            "id": job.request_id,
            "object": obj,
            "created": created,
            "model": job.model,
            "choices": [choice],
            "usage": sim.usage(job, ev.cached_tokens, ev.output_tokens, ev.cpu_cached_tokens, ev.disk_cached_tokens),
        }
        return web.json_response(out, headers={"x-request-id": job.request_id})

    async def _stream(
        request: web.Request, job: Job, queue: asyncio.Queue[kvmodel.Event], arrival: float
    ) -> web.StreamResponse:
        created = int(time.time())
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> bytes:
            if job.kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": delta_text}
                if finish is not None:
                    delta = {}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": job.request_id, "object": obj, "created": created, "model": job.model, "choices": [choice]}
            if job.include_usage:
                data["usage"] = None
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": job.request_id}
        )
        first: float | None = None
        sent = 0
        while True:
            ev = await queue.get()
            if resp.prepared is False:
                # headers go out with the first token, as a real engine's first byte does
                await resp.prepare(request)
                if job.kind == "chat":
                    await resp.write(chunk(None, None, role=True))
            if ev.kind is kvmodel.EventKind.FIRST_TOKEN:
                first = ev.time
            while sent < ev.output_tokens:
                await resp.write(chunk(sim.token_text(job.prompt.seed, sent), None))
                sent += 1
            if ev.kind is kvmodel.EventKind.FINISHED:
                break
        await resp.write(chunk("", job.finish_reason))
        if job.include_usage:
            data = {
                "id": job.request_id,
                "object": obj,
                "created": created,
                "model": job.model,
                "choices": [],
                "usage": sim.usage(
                    job, ev.cached_tokens, ev.output_tokens, ev.cpu_cached_tokens, ev.disk_cached_tokens
                ),
            }
            await resp.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        sim.record(job, arrival, first, ev.time, ev.output_tokens)
        await resp.write_eof()
        return resp

    async def chat(request: web.Request) -> web.StreamResponse:
        return await completions(request, "chat")

    async def completion(request: web.Request) -> web.StreamResponse:
        return await completions(request, "completion")

    async def health(request: web.Request) -> web.StreamResponse:
        if sim.standby:
            return standby_response()
        failed = await _apply_failure(sim, request, consume=False)
        return failed if failed is not None else web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": s.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "gpufleet-replica-sim",
                        "root": s.model,
                        "parent": None,
                        "max_model_len": s.max_model_len,
                    }
                ],
            }
        )

    async def tokenize(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
            return _error(400, "give `prompt` or `messages`")
        if body.get("model", s.model) != s.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        tokens = sim.tokenize_text(render_prompt(body))
        return web.json_response(
            {"count": len(tokens), "max_model_len": s.max_model_len, "tokens": tokens, "token_strs": None}
        )

    async def detokenize(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        toks = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            return _error(400, "`tokens` must be a list of token ids")
        # ids are hashes, so they cannot be inverted: give a stable placeholder per id
        return web.json_response({"prompt": sim.detokenize_text(toks)})

    async def server_info(_: web.Request) -> web.Response:
        # No model_path on purpose: the SGLang router would try to fetch that tokenizer.
        return web.json_response(
            {
                "served_model_name": s.model,
                "max_total_num_tokens": s.kv_capacity_tokens,
                "max_running_requests": s.max_running,
                "context_length": s.max_model_len,
                "page_size": s.block_size_tokens,
                "version": "gpufleet-replica-sim",
                "kv_events_endpoint": sim.publisher.endpoint if sim.publisher else None,
                "kv_events_replay_endpoint": sim.publisher.replay_endpoint if sim.publisher else None,
            }
        )

    async def model_info(_: web.Request) -> web.Response:
        return web.json_response({"served_model_name": s.model, "is_generation": True})

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "gpufleet-replica-sim"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=sim.metrics.render(), content_type="text/plain", charset="utf-8")

    async def admin_fail(request: web.Request) -> web.Response:
        denied = _check_admin(sim, request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        mode = body.get("mode", "status") if isinstance(body, dict) else None
        status = body.get("status", 503) if isinstance(body, dict) else None
        count = body.get("count") if isinstance(body, dict) else None
        if mode not in _ADMIN_FAIL_MODES:
            return _error(400, f"`mode` must be one of {', '.join(_ADMIN_FAIL_MODES)}")
        if not isinstance(status, int) or not 400 <= status <= 599:
            return _error(400, "`status` must be an HTTP error status (400-599)")
        if count is not None and (not isinstance(count, int) or count < 1):
            return _error(400, "`count` must be an integer >= 1")
        sim.failure = FailureMode(mode=mode, status=status, remaining=count)
        return web.json_response({"mode": mode, "status": status, "count": count})

    async def admin_promote(request: web.Request) -> web.Response:
        denied = _check_admin(sim, request)
        if denied is not None:
            return denied
        was, sim.standby = sim.standby, False
        return web.json_response({"promoted": was, "standby": False})

    async def admin_die(request: web.Request) -> web.Response:
        denied = _check_admin(sim, request)
        if denied is not None:
            return denied
        loop = asyncio.get_running_loop()
        if s.exit_on_die:
            loop.call_later(0.05, os._exit, 3)
        elif on_die is not None:
            loop.call_soon(on_die)
        else:
            return _error(501, "this replica cannot die in-process", "NotImplemented")
        return web.json_response({"dying": True})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completion)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/fail", admin_fail)
    app.router.add_post("/admin/die", admin_die)
    app.router.add_post("/admin/promote", admin_promote)
    return app


async def listen(
    sim: ReplicaSim, host: str, port: int, on_die: Callable[[], None] | None = None
) -> tuple[web.AppRunner, int]:
    """Serve `sim` on host:port (0 = a free port); returns the runner (call `cleanup()`) and the port."""
    app = build_app(sim, on_die=on_die)
    # handler_cancellation: a client that goes away cancels its handler, which frees the slot
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def serve(
    settings: SimSettings,
    host: str,
    port: int,
    ready: Callable[[int, ReplicaSim], None] | None = None,
) -> None:
    """Serve one replica until cancelled (or `POST /admin/die`). `ready(port, sim)` is called once it
    listens (its KV-event sockets, if any, are bound by then: `sim.publisher`)."""
    stop = asyncio.Event()
    sim = ReplicaSim(settings)
    runner, bound = await listen(sim, host, port, on_die=stop.set)
    if ready is not None:
        ready(bound, sim)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
