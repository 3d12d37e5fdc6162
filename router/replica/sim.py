"""The simulated replica's state: one `kvmodel.ReplicaEngine` on the wall clock, and vLLM's request rules.

`ReplicaSim` drives the engine from a task (`start` / `stop`), admits parsed requests
(`parse`, `submit`) and hands each request's engine events to its handler through a queue;
the text of an answer is a deterministic function of the prompt (see the package docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from gpufleet.router import kvmodel
from gpufleet.router.prefix import block_hashes, render_prompt
from gpufleet.router.replica.metrics import ReplicaMetrics
from gpufleet.router.replica.settings import FailureMode, SimSettings

__all__ = ["BadRequest", "Job", "Prompt", "ReplicaSim"]

_VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can its time only new some could these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world"
).split()
_TOKEN_ID_SPACE = 151_936  # Qwen-sized vocabulary, so ids look like a real tokenizer's


class BadRequest(Exception):
    """A request the replica refuses, with vLLM's status, message and error type."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


@dataclass
class Prompt:
    """A request's prompt as the engine sees it: text, token count, block hashes, answer seed."""

    text: str
    tokens: int
    hashes: tuple[int, ...]
    seed: int


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
        self.engine = kvmodel.ReplicaEngine(settings.engine_params())
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
        q: asyncio.Queue[kvmodel.Event] = asyncio.Queue()
        self._queues[job.request_id] = q
        if self._wake is not None:
            self._wake.set()
        return q

    def forget(self, request_id: str) -> None:
        """The handler is done with a request; cancel it in the engine if still there."""
        self._queues.pop(request_id, None)
        if self.engine.cancel(request_id, self.now()) and self._wake is not None:
            self._wake.set()

    # -- request parsing -----------------------------------------------------------------
    def prompt_of(self, body: Mapping[str, Any]) -> Prompt:
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
        return Prompt(text=text, tokens=tokens, hashes=hashes, seed=xxhash.xxh3_64_intdigest(text.encode()))

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
        if n != 1:
            raise BadRequest(400, "replica-sim supports only n=1")
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
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        return Job(kind, model, prompt, out, reason, stream, include_usage, rid)

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

    def usage(self, job: Job, cached: int, generated: int) -> dict[str, Any]:
        """The OpenAI `usage` object of a finished request."""
        return {
            "prompt_tokens": job.prompt.tokens,
            "completion_tokens": generated,
            "total_tokens": job.prompt.tokens + generated,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
