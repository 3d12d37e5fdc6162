"""A simulated serving replica: vLLM's OpenAI-compatible HTTP surface over `kvmodel` on the wall clock.

It answers the way a vLLM replica does, so the router, `gpufleet up`, tests and benchmarks can
run a whole fleet on one CPU machine:

- `POST /v1/chat/completions`, `POST /v1/completions` (SSE streaming and not), with
  `usage.prompt_tokens_details.cached_tokens` from the prefix cache;
- `GET /health`, `GET /v1/models`, `POST /tokenize`, `POST /detokenize` (vLLM's shapes),
  `GET /version`, and `GET /server_info` / `/get_server_info` / `/model_info` /
  `/get_model_info` without a `model_path` (so the SGLang router can use it as a worker without
  trying to download a tokenizer);
- `GET /metrics`: vLLM's Prometheus names (`vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total`, `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  `vllm:request_success_total`, `vllm:time_to_first_token_seconds`,
  `vllm:e2e_request_latency_seconds`, `vllm:time_per_output_token_seconds`, ...);
- admin failure injection (`POST /admin/fail`, `POST /admin/die`) and warm-standby promotion
  (`POST /admin/promote`) behind a bearer token.

Tokens. There is no tokenizer: a prompt is rendered exactly as the router renders it
(`gpufleet.router.prefix.render_prompt`), it counts `ceil(chars / chars_per_token)` tokens, and
its prefix blocks are `block_size_tokens * chars_per_token` characters hashed with the router's
`block_hashes`. With the same `chars_per_token` and block size as the router's settings, the
router's predicted prefix and the replica's real cache therefore speak about the same blocks.
`/tokenize` returns one deterministic id per `chars_per_token` characters.

Output. The text is a deterministic function of the prompt: a natural length between 8 and
128 tokens drawn from the prompt's hash (`finish_reason: stop`), cut at `max_tokens`
(`finish_reason: length`); vLLM's `ignore_eos: true` makes it exactly `max_tokens`.

A client that disconnects cancels its request at once: its batch slot and KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.router import kvmodel
from gpufleet.router.prefix import block_hashes, render_prompt

__all__ = ["FailureMode", "ReplicaSim", "RunningReplica", "SimSettings", "build_app", "serve_in_thread"]

_VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can its time only new some could these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world"
).split()
_TOKEN_ID_SPACE = 151_936  # Qwen-sized vocabulary, so ids look like a real tokenizer's
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0)
_TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_ADMIN_FAIL_MODES = ("ok", "status", "hang", "drop")


@dataclass
class SimSettings:
    """How one simulated replica behaves. The rates and capacity come from the plan."""

    model: str = "sim-model"
    replica_id: str = "replica-sim"
    kv_capacity_tokens: int = 65_536
    prefill_tokens_per_s: float = 20_000.0
    decode_tokens_per_s: float = 80.0
    max_running: int = 64
    max_batched_tokens: int = 8192
    max_model_len: int = 32_768
    block_size_tokens: int = 16
    chars_per_token: float = 4.0
    decode_batch_penalty: float = 0.01
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token for /admin/*; None disables the admin endpoints."""
    standby: bool = False
    """Start as a warm standby: loaded and listening, but /health and requests answer 503 until
    `POST /admin/promote` (how the local runtime holds warm replicas the router skips)."""
    exit_on_die: bool = False
    """`POST /admin/die` ends the process (CLI) instead of closing the listener (in-process use)."""

    def engine_params(self) -> kvmodel.EngineParams:
        """The kvmodel parameters these settings describe."""
        return kvmodel.EngineParams(
            kv_capacity_tokens=self.kv_capacity_tokens,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            block_size_tokens=self.block_size_tokens,
            max_running=self.max_running,
            max_batched_tokens=self.max_batched_tokens,
            max_model_len=self.max_model_len,
            decode_batch_penalty=self.decode_batch_penalty,
        )

    @property
    def block_chars(self) -> int:
        return max(1, int(self.block_size_tokens * self.chars_per_token))


@dataclass
class FailureMode:
    """Injected failure: `status` answers with an HTTP status, `hang` never answers, `drop` closes."""

    mode: str = "ok"
    status: int = 503
    remaining: int | None = None
    """Requests still to fail (None: until cleared)."""

    def take(self, consume: bool = True) -> str:
        """The failure to apply to the next request; `consume` counts it down (health checks do not)."""
        if self.mode == "ok":
            return "ok"
        mode = self.mode
        if consume and self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.mode, self.remaining = "ok", None
        return mode


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def _error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    """vLLM's error body."""
    body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
    return web.json_response(body, status=status)


@dataclass
class _Prompt:
    text: str
    tokens: int
    hashes: tuple[int, ...]
    seed: int


@dataclass
class _Job:
    kind: str  # "chat" | "completion"
    model: str
    prompt: _Prompt
    output_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    request_id: str


class _StatsCollector(Collector):
    """Reads the engine's cumulative counters and gauges at scrape time."""

    def __init__(self, sim: ReplicaSim) -> None:
        self._sim = sim

    def collect(self) -> Iterator[Any]:
        sim, labels = self._sim, [self._sim.settings.model]
        eng, st = sim.engine, sim.engine.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", eng.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", eng.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage (vLLM v0 name).", eng.kv_usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in queried tokens.", st.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", st.prefix_cache_hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions (never: memory is reserved).", 0)
        ok = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, n in sorted(sim.finished_by_reason.items()):
            ok.add_metric([sim.settings.model, reason], n)
        yield ok
        yield counter("gpufleet_sim:cancelled_requests", "Requests cancelled by client disconnect.", st.cancelled)
        yield counter("gpufleet_sim:evicted_blocks", "KV blocks evicted from the prefix cache.", st.evicted_blocks)
        yield gauge(
            "gpufleet_sim:cached_blocks", "Hashed KV blocks held (pinned or evictable).", eng.cache.cached_blocks
        )


class ReplicaSim:
    """The simulated replica's state: one `kvmodel.ReplicaEngine` driven by the wall clock.

    Owns no server: `build_app` wires it into an aiohttp application whose startup starts the
    driver task and whose cleanup stops it.
    """

    def __init__(self, settings: SimSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.engine = kvmodel.ReplicaEngine(settings.engine_params())
        self.failure = FailureMode()
        self.standby = settings.standby
        self.finished_by_reason: dict[str, int] = {}
        self._clock = clock
        self._t0 = clock()
        self._queues: dict[str, asyncio.Queue[kvmodel.Event]] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(self))
        model = settings.model

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            # one child per replica: the model label is fixed, so bind it once
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model)

        self._h_ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS)
        self._h_e2e = hist(
            "vllm:e2e_request_latency_seconds", "End to end request latency in seconds.", _LATENCY_BUCKETS
        )
        self._h_tpot = hist("vllm:time_per_output_token_seconds", "Time per output token in seconds.", _TTFT_BUCKETS)
        self._h_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKENS_BUCKETS)
        self._h_gen = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKENS_BUCKETS)

    # -- clock and driver ----------------------------------------------------------------
    def now(self) -> float:
        """Seconds since this replica started (the engine's time axis)."""
        return self._clock() - self._t0

    async def start(self) -> None:
        """Start the driver task (call inside the serving event loop)."""
        self._wake = asyncio.Event()
        self._driver = asyncio.create_task(self._drive(), name=f"replica-sim-driver:{self.settings.replica_id}")

    async def stop(self) -> None:
        """Stop the driver task."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None

    async def _drive(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            t = self.engine.next_event_time()
            wake.clear()
            delay = None if t is None else t - self.now()
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
            for ev in self.engine.step(self.now()):
                q = self._queues.get(ev.request_id)
                if q is not None:
                    q.put_nowait(ev)

    def _submit(self, job: _Job) -> asyncio.Queue[kvmodel.Event]:
        req = kvmodel.EngineRequest(
            id=job.request_id,
            prompt_tokens=job.prompt.tokens,
            output_tokens=job.output_tokens,
            block_hashes=job.prompt.hashes,
        )
        try:
            self.engine.admit(req, self.now())
        except kvmodel.AdmissionError as exc:
            raise _BadRequest(400, str(exc)) from None
        q: asyncio.Queue[kvmodel.Event] = asyncio.Queue()
        self._queues[job.request_id] = q
        if self._wake is not None:
            self._wake.set()
        return q

    def _forget(self, request_id: str) -> None:
        """The handler is done with a request; cancel it in the engine if still there."""
        self._queues.pop(request_id, None)
        if self.engine.cancel(request_id, self.now()) and self._wake is not None:
            self._wake.set()

    # -- request parsing -----------------------------------------------------------------
    def prompt_of(self, body: Mapping[str, Any]) -> _Prompt:
        """Render, count and hash a request's prompt the way the router does."""
        s = self.settings
        text = render_prompt(body)
        prompt = body.get("prompt")
        if "messages" not in body and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = len(prompt)  # token ids are counted as given
        else:
            tokens = math.ceil(len(text) / s.chars_per_token)
        tokens = max(1, tokens)
        hashes = block_hashes(text, s.block_chars)
        return _Prompt(text=text, tokens=tokens, hashes=hashes, seed=xxhash.xxh3_64_intdigest(text.encode()))

    def _parse(self, body: Any, kind: str) -> _Job:
        s = self.settings
        if not isinstance(body, dict):
            raise _BadRequest(400, "request body must be a JSON object")
        model = body.get("model", s.model)
        if model != s.model:
            raise _BadRequest(404, f"The model `{model}` does not exist.", "NotFoundError")
        if kind == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise _BadRequest(400, "`messages` must be a non-empty list of message objects")
        else:
            p = body.get("prompt")
            ok = isinstance(p, str) or (
                isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(isinstance(x, int) for x in p))
            )
            if not ok:
                raise _BadRequest(400, "`prompt` must be a string, a list of strings or a list of token ids")
            if isinstance(p, list) and isinstance(p[0], str) and len(p) > 1:
                raise _BadRequest(400, "replica-sim serves one prompt per request")
        n = body.get("n", 1)
        if n != 1:
            raise _BadRequest(400, "replica-sim supports only n=1")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest(400, "`stream` must be a boolean")
        prompt = self.prompt_of(body)
        room = s.max_model_len - prompt.tokens
        if room < 1:
            raise _BadRequest(
                400,
                f"This model's maximum context length is {s.max_model_len} tokens. However, your request has "
                f"{prompt.tokens} input tokens. Please reduce the length of the input messages.",
            )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = room
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _BadRequest(400, "`max_tokens` must be an integer >= 1")
        if prompt.tokens + max_tokens > s.max_model_len:
            raise _BadRequest(
                400,
                f"This model's maximum context length is {s.max_model_len} tokens. However, you requested "
                f"{prompt.tokens + max_tokens} tokens ({prompt.tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        natural = 8 + prompt.seed % 121
        if body.get("ignore_eos") is True or natural >= max_tokens:
            out, reason = max_tokens, "length"
        else:
            out, reason = natural, "stop"
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        return _Job(kind, model, prompt, out, reason, stream, include_usage, rid)

    # -- output --------------------------------------------------------------------------
    @staticmethod
    def token_text(seed: int, i: int) -> str:
        """The i-th generated token of the answer to a prompt with hash `seed`."""
        return _VOCAB[xxhash.xxh32_intdigest(i.to_bytes(4, "little"), seed=seed & 0xFFFFFFFF) % len(_VOCAB)] + " "

    def answer_text(self, seed: int, n: int) -> str:
        """The full deterministic answer of `n` tokens."""
        return "".join(self.token_text(seed, i) for i in range(n))

    def tokenize_text(self, text: str) -> list[int]:
        """One deterministic id per `chars_per_token` characters (see the module docstring)."""
        cpt = self.settings.chars_per_token
        n = math.ceil(len(text) / cpt)
        return [
            xxhash.xxh32_intdigest(text[int(i * cpt) : int((i + 1) * cpt)].encode()) % _TOKEN_ID_SPACE for i in range(n)
        ]

    def _record(self, job: _Job, arrival: float, first: float | None, end: float, generated: int) -> None:
        self.finished_by_reason[job.finish_reason] = self.finished_by_reason.get(job.finish_reason, 0) + 1
        self._h_e2e.observe(end - arrival)
        self._h_prompt.observe(job.prompt.tokens)
        self._h_gen.observe(generated)
        if first is not None:
            self._h_ttft.observe(first - arrival)
            if generated > 1:
                self._h_tpot.observe((end - first) / (generated - 1))

    def usage(self, job: _Job, cached: int, generated: int) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt.tokens,
            "completion_tokens": generated,
            "total_tokens": job.prompt.tokens + generated,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


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
        try:
            job = sim._parse(body, kind)
            arrival = sim.now()
            queue = sim._submit(job)
        except _BadRequest as exc:
            return _error(exc.status, exc.message, exc.type)
        try:
            if job.stream:
                return await _stream(request, job, queue, arrival)
            return await _unary(job, queue, arrival)
        except ConnectionResetError:
            # the client went away mid-stream: nothing to answer, the engine request is dropped below
            return web.Response(status=499)
        finally:
            sim._forget(job.request_id)

    async def _unary(job: _Job, queue: asyncio.Queue[kvmodel.Event], arrival: float) -> web.Response:
        first: float | None = None
        while True:
            ev = await queue.get()
            if ev.kind is kvmodel.EventKind.FIRST_TOKEN:
                first = ev.time
            if ev.kind is kvmodel.EventKind.FINISHED:
                break
        sim._record(job, arrival, first, ev.time, ev.output_tokens)
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
            "usage": sim.usage(job, ev.cached_tokens, ev.output_tokens),
        }
        return web.json_response(out, headers={"x-request-id": job.request_id})

    async def _stream(
        request: web.Request, job: _Job, queue: asyncio.Queue[kvmodel.Event], arrival: float
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
                "usage": sim.usage(job, ev.cached_tokens, ev.output_tokens),
            }
            await resp.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        sim._record(job, arrival, first, ev.time, ev.output_tokens)
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
        return web.json_response({"prompt": "".join(_VOCAB[t % len(_VOCAB)] + " " for t in toks)})

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
            }
        )

    async def model_info(_: web.Request) -> web.Response:
        return web.json_response({"served_model_name": s.model, "is_generation": True})

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "gpufleet-replica-sim"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(sim.registry), content_type="text/plain", charset="utf-8")

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


async def serve(settings: SimSettings, host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
    """Serve one replica until cancelled. `ready(port)` is called once it listens."""
    sim = ReplicaSim(settings)
    stop = asyncio.Event()
    app = build_app(sim, on_die=stop.set)
    # handler_cancellation: a client that goes away cancels its handler, which frees the slot
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if ready is not None:
        ready(bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class RunningReplica:
    """A replica-sim served from a background thread (for tests and benchmarks in sync code)."""

    def __init__(self, settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.host = host
        self._port = port
        self.port = 0
        self.sim: ReplicaSim | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def start(self) -> RunningReplica:
        """Start serving (idempotent); returns once the port is bound."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"replica-sim:{self.settings.replica_id}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        if not self._started.is_set():
            raise RuntimeError("replica-sim did not start within 10 s")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._started.set()
        finally:
            loop.close()
            self._stopped.set()

    async def _serve(self) -> None:
        self.sim = ReplicaSim(self.settings)
        self._die = asyncio.Event()
        app = build_app(self.sim, on_die=self._die.set)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        try:
            await self._die.wait()
        finally:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Close the listener and every connection; wait for the thread to end."""
        if self._loop is not None and not self._stopped.is_set():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._die.set)
        if self._thread is not None:
            self._thread.join(10)

    def call(self, fn: Callable[[ReplicaSim], Any]) -> Any:
        """Run `fn(sim)` on the replica's loop thread and return its result (safe state access)."""
        assert self._loop is not None and self.sim is not None
        sim = self.sim

        async def _call() -> Any:
            return fn(sim)

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(10)

    def __enter__(self) -> RunningReplica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> RunningReplica:
    """Start a replica-sim on a background thread; `.url` to call it, `.stop()` to end it."""
    return RunningReplica(settings, host, port).start()
