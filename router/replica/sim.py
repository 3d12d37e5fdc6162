"""The simulated replica's state: one `kvmodel.ReplicaEngine` on the wall clock, and vLLM's request rules.

`ReplicaSim` drives the engine from a task (`start` / `stop`), admits parsed requests
(`parse`, `submit`) and hands each request's engine events to its handler through a queue;
the text of an answer is a deterministic function of the prompt (see the package docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from gpufleet.router import kvmodel
from gpufleet.router.kvevents import wire
from gpufleet.router.kvevents.publisher import EventPublisher
from gpufleet.router.kvevents.tokenize import PromptTokenizer
from gpufleet.router.prefix import block_hashes, render_prompt
from gpufleet.router.replica.metrics import ReplicaMetrics
from gpufleet.router.replica.settings import FailureMode, SimSettings
from gpufleet.router.types import stable_hash

__all__ = ["BadRequest", "Job", "Prompt", "ReplicaSim"]

_VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can its time only new some could these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world"
).split()
_TOKEN_ID_SPACE = 151_936  # Qwen-sized vocabulary, so ids look like a real tokenizer's


def _any_port(endpoint: str) -> str:
    """Port 0 means any free port, which ZMQ spells `*`."""
    return endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint


class BadRequest(Exception):
    """A request the replica refuses, with vLLM's status, message and error type."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


@dataclass
class Prompt:
    """A request's prompt as the engine sees it: text, token count, block hashes, answer seed."""

    text: str
    tokens: int
    hashes: tuple[int, ...]
    seed: int
    token_ids: tuple[int, ...] | None = None
    """The prompt's token ids when the replica has a tokenizer (KV events carry them)."""
    cache_salt: str | None = None
    """vLLM's per-request `cache_salt`: in the first block's hash, so only equal salts share blocks."""


def engine_block_hashes(token_ids: tuple[int, ...], block_size: int, cache_salt: str | None = None) -> tuple[int, ...]:
    """Chained block hashes the way vLLM makes them (sha256 of the parent hash, the block's tokens
    and its extra keys, low 64 bits as an int; `cache_salt` is the first block's extra key):
    deliberately not the router's function, so that the router must key blocks by their tokens, as
    it has to with a real engine."""
    out: list[int] = []
    parent = b"\0" * 8
    for i in range(len(token_ids) // block_size):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        extra = b"\0salt\0" + cache_salt.encode() if cache_salt and i == 0 else b""
        digest = hashlib.sha256(parent + b"".join(t.to_bytes(8, "little") for t in chunk) + extra).digest()
        parent = digest[-8:]
        out.append(int.from_bytes(parent, "big"))
    return tuple(out)


@dataclass
class Job:
    """One parsed completion request, ready for the engine."""

    kind: str  # "chat" | "completion"
    model: str
    prompt: Prompt
    output_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    request_id: str


class ReplicaSim:
    """The simulated replica's state: one `kvmodel.ReplicaEngine` driven by the wall clock.

    Owns no server: `build_app` wires it into an aiohttp application whose startup starts the
    driver task and whose cleanup stops it.
    """

    def __init__(self, settings: SimSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        publish = settings.kv_events_endpoint is not None
        if publish and settings.tokenizer is None:
            raise ValueError("publishing KV events needs a tokenizer (their token_ids are the engine's tokens)")
        self.engine = kvmodel.ReplicaEngine(settings.engine_params(), record_kv_events=publish)
        self.tokenizer = (
            PromptTokenizer(settings.tokenizer, chat_template=settings.chat_template) if settings.tokenizer else None
        )
        self.publisher: EventPublisher | None = None
        self._tokens: dict[str, tuple[int, ...]] = {}
        self._hashes: dict[str, tuple[int, ...]] = {}
        self._salts: dict[str, str] = {}
        self.failure = FailureMode()
        self.standby = settings.standby
        self._clock = clock
        self._t0 = clock()
        self._queues: dict[str, asyncio.Queue[kvmodel.Event]] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self.metrics = ReplicaMetrics(self.engine, settings.model)

    # -- clock and driver ----------------------------------------------------------------
    def now(self) -> float:
        """Seconds since this replica started (the engine's time axis)."""
        return self._clock() - self._t0

    async def start(self) -> None:
        """Start the driver task (call inside the serving event loop)."""
        self._wake = asyncio.Event()
        s = self.settings
        if s.kv_events_endpoint is not None and self.publisher is None:
            self.publisher = EventPublisher(
                _any_port(s.kv_events_endpoint),
                _any_port(s.kv_events_replay_endpoint) if s.kv_events_replay_endpoint else None,
                topic=s.kv_events_topic,
            )
            await self.publisher.start()
        self._driver = asyncio.create_task(self._drive(), name=f"replica-sim-driver:{self.settings.replica_id}")

    async def stop(self) -> None:
        """Stop the driver task."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if self.tokenizer is not None:
            self.tokenizer.close()

    def _publish(self) -> None:
        """Publish what the engine stored and evicted since the last call, as one vLLM batch."""
        if self.publisher is None:
            return
        log = self.engine.drain_kv_events()
        if not log:
            return
        bs = self.settings.block_size_tokens
        events: list[wire.BlockStored | wire.BlockRemoved | wire.AllBlocksCleared] = []
        run: list[tuple[str, int, str, int]] = []

        def flush() -> None:
            if not run:
                return
            kind = run[0][0]
            if kind == "removed":
                events.append(wire.BlockRemoved([h for _, h, _, _ in run], wire.MEDIUM_GPU))
            elif ":" in kind:
                # A lower tier (kv_offload), as vLLM's offloading connector reports it: hashes and
                # the medium only (no parent, no tokens, block size 0).
                what, medium = kind.split(":", 1)
                tier_hashes: list[int | bytes] = [h for _, h, _, _ in run]
                if what == "removed":
                    events.append(wire.BlockRemoved(tier_hashes, medium))
                else:
                    events.append(wire.BlockStored(tier_hashes, None, [], 0, None, medium, None))
            else:
                rid, first = run[0][2], run[0][3]
                ids = self._tokens.get(rid)
                hashes = self._hashes.get(rid)
                if ids is not None and hashes is not None:
                    parent = hashes[first - 1] if first > 0 else None
                    tokens = list(ids[first * bs : (first + len(run)) * bs])
                    # As vLLM: one entry per block, the salt in block 0's, None elsewhere.
                    salt = self._salts.get(rid)
                    extra: list[tuple[Any, ...] | None] = [
                        (salt,) if salt and first + i == 0 else None for i in range(len(run))
                    ]
                    events.append(
                        wire.BlockStored(
                            [h for _, h, _, _ in run], parent, tokens, bs, None, wire.MEDIUM_GPU, None, extra
                        )
                    )
            run.clear()

        for item in log:
            if run and (
                item[0] != run[-1][0] or (item[0] == "stored" and (item[2] != run[-1][2] or item[3] != run[-1][3] + 1))
            ):
                flush()
            run.append(item)
        flush()
        if events:
            self.publisher.publish(events, time.time())

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
            events = self.engine.step(self.now())
            self._publish()
            for ev in events:
                q = self._queues.get(ev.request_id)
                if q is not None:
                    q.put_nowait(ev)

    def submit(self, job: Job) -> asyncio.Queue[kvmodel.Event]:
        """Admit a parsed request into the engine; its events arrive on the returned queue."""
        req = kvmodel.EngineRequest(
            id=job.request_id,
            prompt_tokens=job.prompt.tokens,
            output_tokens=job.output_tokens,
            block_hashes=job.prompt.hashes,
        )
        try:
            self.engine.admit(req, self.now())
        except kvmodel.AdmissionError as exc:
            raise BadRequest(400, str(exc)) from None
        if job.prompt.token_ids is not None:
            self._tokens[job.request_id] = job.prompt.token_ids
            self._hashes[job.request_id] = job.prompt.hashes
            if job.prompt.cache_salt:
                self._salts[job.request_id] = job.prompt.cache_salt
        self._publish()
        q: asyncio.Queue[kvmodel.Event] = asyncio.Queue()
        self._queues[job.request_id] = q
        if self._wake is not None:
            self._wake.set()
        return q

    def forget(self, request_id: str) -> None:
        """The handler is done with a request; cancel it in the engine if still there."""
        self._queues.pop(request_id, None)
        self._tokens.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._salts.pop(request_id, None)
        if self.engine.cancel(request_id, self.now()) and self._wake is not None:
            self._wake.set()

    # -- request parsing -----------------------------------------------------------------
    def prompt_of(self, body: Mapping[str, Any]) -> Prompt:
        """Render, count and hash a request's prompt the way the router does."""
        s = self.settings
        text = render_prompt(body)
        salt = body.get("cache_salt") or None  # `parse` checked it is a non-empty string
        if self.tokenizer is not None:
            ids = tuple(self.tokenizer.encode_body(body))
            hashes = engine_block_hashes(ids, s.block_size_tokens, salt)
            seed = xxhash.xxh3_64_intdigest(text.encode())
            return Prompt(text, max(1, len(ids)), hashes, seed, token_ids=ids, cache_salt=salt)
        prompt = body.get("prompt")
        if "messages" not in body and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = len(prompt)  # token ids are counted as given
        else:
            tokens = math.ceil(len(text) / s.chars_per_token)
        tokens = max(1, tokens)
        hashes = block_hashes(text, s.block_chars, stable_hash(salt) if salt else 0)
        return Prompt(text, tokens, hashes, xxhash.xxh3_64_intdigest(text.encode()), cache_salt=salt)

    def parse(self, body: Any, kind: str) -> Job:
        """Validate a completion request the way vLLM does; raises `BadRequest` with vLLM's wording."""
        s = self.settings
        if not isinstance(body, dict):
            raise BadRequest(400, "request body must be a JSON object")
        model = body.get("model", s.model)
        if model != s.model:
            raise BadRequest(404, f"The model `{model}` does not exist.", "NotFoundError")
        if kind == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise BadRequest(400, "`messages` must be a non-empty list of message objects")
        else:
            p = body.get("prompt")
            ok = isinstance(p, str) or (
                isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(isinstance(x, int) for x in p))
            )
            if not ok:
                raise BadRequest(400, "`prompt` must be a string, a list of strings or a list of token ids")
            if isinstance(p, list) and isinstance(p[0], str) and len(p) > 1:
                raise BadRequest(400, "replica-sim serves one prompt per request")
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise BadRequest(400, "replica-sim supports only n=1", param="n")
        # No log-probabilities are simulated: asking for them is refused, not answered with nulls.
        lp = body.get("logprobs")
        if (lp is not None and lp is not False) or body.get("top_logprobs") is not None:
            param = "logprobs" if lp is not None and lp is not False else "top_logprobs"
            raise BadRequest(400, "replica-sim does not compute logprobs; leave `logprobs` unset", param=param)
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise BadRequest(400, "Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
        stops = self._stops(body.get("stop"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(400, "`stream` must be a boolean")
        prompt = self.prompt_of(body)
        room = s.max_model_len - prompt.tokens
        if room < 1:
            raise BadRequest(
                400,
                f"This model's maximum context length is {s.max_model_len} tokens. However, your request has "
                f"{prompt.tokens} input tokens. Please reduce the length of the input messages.",
            )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = room
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(400, "`max_tokens` must be an integer >= 1")
        if prompt.tokens + max_tokens > s.max_model_len:
            raise BadRequest(
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
        if stops:
            cut = self._stop_at(prompt.seed, out, stops)
            if cut is not None:
                out, reason = cut, "stop"
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        return Job(kind, model, prompt, out, reason, stream, include_usage, rid)

    @staticmethod
    def _stops(stop: Any) -> list[str]:
        """The `stop` sequences (a string or a list of up to 4 non-empty strings; null or [] for none)."""
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or len(items) > 4 or not all(isinstance(x, str) and x for x in items):
            raise BadRequest(400, "`stop` must be a string or a list of at most 4 non-empty strings", param="stop")
        return items

    def _stop_at(self, seed: int, out: int, stops: list[str]) -> int | None:
        """Tokens generated before the first stop sequence appears in the answer (None: it never does).

        As an engine does, the answer ends before the stop sequence, which is not returned; the
        token in which it begins is dropped whole.
        """
        text = ""
        for i in range(out):
            text += self.token_text(seed, i)
            if any(stop in text for stop in stops):
                return i
        return None

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

    def detokenize_text(self, tokens: list[int]) -> str:
        """A stable placeholder word per token id (ids are hashes, so they cannot be inverted)."""
        return "".join(_VOCAB[t % len(_VOCAB)] + " " for t in tokens)

    def record(self, job: Job, arrival: float, first: float | None, end: float, generated: int) -> None:
        """Count a finished request in the metrics."""
        self.metrics.record(job.finish_reason, job.prompt.tokens, arrival, first, end, generated)

    def usage(self, job: Job, cached: int, generated: int, cpu: int = 0, disk: int = 0) -> dict[str, Any]:
        """The OpenAI `usage` object of a finished request.

        `cached_tokens` counts every tier (as vLLM's counts local and connector hits); with a
        lower tier, `gpufleet_cached_tokens_by_tier` splits it into gpu, cpu and disk.
        """
        details: dict[str, Any] = {"cached_tokens": cached}
        if self.engine.cpu is not None:
            details["gpufleet_cached_tokens_by_tier"] = {"gpu": cached - cpu - disk, "cpu": cpu, "disk": disk}
        return {
            "prompt_tokens": job.prompt.tokens,
            "completion_tokens": generated,
            "total_tokens": job.prompt.tokens + generated,
            "prompt_tokens_details": details,
        }
