"""Seeded LLM-serving workloads and a driver that replays them against an OpenAI-compatible endpoint.

Generators (pure, deterministic for a seed) build the traffic patterns where prefix-aware
routing matters:

- *system*: a handful of long shared system prompts (chosen with Zipf popularity), each
  followed by a short user question; a small question pool makes some requests exact repeats,
  which deterministic ones (`temperature: 0`) let the prediction cache answer;
- *rag*: retrieval-augmented questions over a small document set: each request quotes
  `docs_per_request` documents drawn by Zipf popularity (popular documents recur);
- *chat*: multi-turn conversations with a session id (`x-session-id`); every turn resends the
  whole history, so each turn's prompt extends the previous one. Turns of one conversation
  run in order (`chain`), interleaved with everything else.

`drive` replays a list of `WorkRequest` over streaming requests, either as a closed loop (a fixed
number in flight) or open loop (Poisson arrivals at `rate_per_s`, the way users arrive, with the
concurrency as a cap only), and records, per request, the replica that served it (`x-gpufleet-replica`), the prediction-cache
outcome (`x-gpufleet-cache`), the prompt and cached tokens the replica reported
(`usage.prompt_tokens_details.cached_tokens`), time to first token and latency. `summarize`
turns results into the numbers the demo and benchmarks print (`summarize_by_model` per
deployment). `ceiling_hit_ratio` is the prefix-hit ratio an infinite cache per model would reach
on the same requests, counted with the router's own block hashing: the best any policy can do.
`demo_spec` is the shape `gpufleet demo` replays. Used by `gpufleet demo` and the benchmarks, so
every number is about the same traffic.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Result",
    "Summary",
    "WorkRequest",
    "WorkloadSpec",
    "arrival_times",
    "ceiling_hit_ratio",
    "demo_spec",
    "drive",
    "generate",
    "percentile",
    "summarize",
    "summarize_by_model",
]

_WORDS = (
    "system data model cache router replica token prefix block memory latency request batch stream "
    "cluster node pool priority failover region zone price budget tenant session policy document "
    "question answer context summary detail report metric signal queue worker engine kernel tensor "
    "layer weight vector search index score rank query result value table field record schema "
    "network storage compute service client server config plan deploy update release version"
).split()


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Every field has a default that gives a small, mixed, cache-friendly load."""

    models: tuple[str, ...]
    n_requests: int = 200
    seed: int = 0
    mix: tuple[float, float, float] = (0.4, 0.35, 0.25)
    """Fractions of system-prompt, RAG and multi-turn chat requests."""
    model_weights: tuple[float, ...] | None = None
    """Relative traffic per model (default: equal)."""
    n_system_prompts: int = 5
    system_prompt_chars: int = 2000
    questions_per_prompt: int = 12
    """Question pool per system prompt: small pools make exact repeats (prediction-cache hits)."""
    n_docs: int = 40
    doc_chars: int = 1200
    docs_per_request: int = 2
    zipf_s: float = 1.1
    turns_per_conversation: int = 4
    turn_chars: int = 300
    max_tokens: int = 16
    deterministic_fraction: float = 0.5
    """Share of requests sent with temperature 0 (cacheable by the prediction cache)."""
    chat_system_prompts: str = "top"
    """System prompt of each conversation: "top" (every conversation uses the most popular one, as
    for a single chat app) or "zipf" (drawn like the system-prompt requests: several apps' chats)."""
    conversation_span: float | None = None
    """Spread each conversation's turns over this fraction of the request order (users come back
    after a while, and conversations overlap); None keeps the compact round-by-round interleave."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model")
        if self.n_requests < 0 or any(x < 0 for x in self.mix) or sum(self.mix) <= 0:
            raise ValueError("n_requests and mix must be non-negative, mix not all zero")
        if self.model_weights is not None and len(self.model_weights) != len(self.models):
            raise ValueError("model_weights needs one weight per model")
        if self.chat_system_prompts not in ("top", "zipf"):
            raise ValueError('chat_system_prompts must be "top" or "zipf"')
        if self.conversation_span is not None and not 0 < self.conversation_span <= 1:
            raise ValueError("conversation_span must be in (0, 1]")


@dataclass(frozen=True)
class WorkRequest:
    """One request to send: the path, the JSON body and how it must be ordered."""

    index: int
    kind: str
    """system | rag | chat"""
    model: str
    body: dict[str, Any]
    path: str = "/v1/chat/completions"
    session_id: str | None = None
    chain: str | None = None
    """Requests with the same chain are sent one after the other, in index order."""


@dataclass
class Result:
    """What happened to one request."""

    index: int
    kind: str
    model: str
    status: int = 0
    replica: str | None = None
    cache: str | None = None
    """The router's prediction-cache outcome: hit, miss, bypass (None when not reported)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None
    sent_s: float = 0.0
    """When it was sent, in seconds since `drive` started (the order replicas can have seen prompts)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None


@dataclass
class Summary:
    """Aggregate numbers over results (replica-served requests only for prefix hits and TTFT)."""

    requests: int
    ok: int
    errors: int
    prefix_hit_ratio: float
    """Cached prompt tokens / prompt tokens, over requests a replica served."""
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    per_replica: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    wall_s: float = 0.0
    status_counts: dict[int, int] = field(default_factory=dict)


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def _text(rng: random.Random, chars: int, title: str) -> str:
    """Deterministic filler prose of about `chars` characters."""
    words = [title + ":"]
    length = len(title) + 1
    while length < chars:
        w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    return " ".join(words)


def generate(spec: WorkloadSpec) -> list[WorkRequest]:
    """The workload for `spec`: same spec, same list."""
    rng = random.Random(spec.seed)
    prompts = {
        m: [
            _text(random.Random(f"{spec.seed}:sys:{m}:{i}"), spec.system_prompt_chars, f"System prompt {i} for {m}")
            for i in range(spec.n_system_prompts)
        ]
        for m in spec.models
    }
    docs = [_text(random.Random(f"{spec.seed}:doc:{i}"), spec.doc_chars, f"Document {i}") for i in range(spec.n_docs)]
    questions = [
        [_text(random.Random(f"{spec.seed}:q:{p}:{j}"), 80, f"Question {j}") for j in range(spec.questions_per_prompt)]
        for p in range(spec.n_system_prompts)
    ]
    prompt_w = _zipf_weights(spec.n_system_prompts, spec.zipf_s)
    doc_w = _zipf_weights(spec.n_docs, spec.zipf_s)
    model_w = list(spec.model_weights or [1.0] * len(spec.models))
    total = sum(spec.mix)
    n_sys = round(spec.n_requests * spec.mix[0] / total)
    n_rag = round(spec.n_requests * spec.mix[1] / total)
    n_chat = max(0, spec.n_requests - n_sys - n_rag)

    def sampling(body: dict[str, Any]) -> dict[str, Any]:
        body["max_tokens"] = spec.max_tokens
        if rng.random() < spec.deterministic_fraction:
            body["temperature"] = 0
        else:
            body["temperature"] = 0.7
        return body

    # Build the independent requests and the conversations, then interleave them by a seeded shuffle
    # that keeps each conversation's turns in order.
    units: list[list[tuple[str, str, dict[str, Any], str | None]]] = []
    for _ in range(n_sys):
        m = rng.choices(spec.models, model_w)[0]
        p = rng.choices(range(spec.n_system_prompts), prompt_w)[0]
        q = rng.randrange(spec.questions_per_prompt)
        body = {
            "model": m,
            "messages": [
                {"role": "system", "content": prompts[m][p]},
                {"role": "user", "content": questions[p][q]},
            ],
        }
        units.append([("system", m, sampling(body), None)])
    for _ in range(n_rag):
        m = rng.choices(spec.models, model_w)[0]
        k = min(spec.docs_per_request, spec.n_docs)
        picked: list[int] = []
        while len(picked) < k:
            d = rng.choices(range(spec.n_docs), doc_w)[0]
            if d not in picked:
                picked.append(d)
        # most popular first, so requests sharing the top document share a prefix
        context = "\n\n".join(docs[d] for d in sorted(picked))
        q = _text(rng, 100, "Question")
        body = {
            "model": m,
            "messages": [
                {"role": "system", "content": "Answer from the context only."},
                {"role": "user", "content": f"Context:\n{context}\n\n{q}"},
            ],
        }
        units.append([("rag", m, sampling(body), None)])
    turns = max(1, spec.turns_per_conversation)
    n_conv = math.ceil(n_chat / turns) if n_chat else 0
    left = n_chat
    for c in range(n_conv):
        m = rng.choices(spec.models, model_w)[0]
        sid = f"conv-{spec.seed}-{c}"
        p = 0 if spec.chat_system_prompts == "top" else rng.choices(range(spec.n_system_prompts), prompt_w)[0]
        history: list[dict[str, str]] = [{"role": "system", "content": prompts[m][p]}]
        chain = []
        for t in range(min(turns, left)):
            history = [*history, {"role": "user", "content": _text(rng, spec.turn_chars, f"Turn {t}")}]
            body = {"model": m, "messages": list(history), "user": sid}
            chain.append(("chat", m, sampling(body), sid))
            # a stand-in for the assistant's answer keeps later turns extending this prompt
            history = [*history, {"role": "assistant", "content": _text(rng, spec.turn_chars // 2, "Answer")}]
        left -= len(chain)
        units.append(chain)
    rng.shuffle(units)
    if spec.conversation_span is not None:
        return _spread(units, spec.conversation_span, random.Random(f"{spec.seed}:order"))
    # interleave: take units round-robin-ish so chains spread over the run
    out: list[WorkRequest] = []
    cursors = [0] * len(units)
    active = list(range(len(units)))
    while active:
        nxt = []
        for u in active:
            kind, m, body, sid = units[u][cursors[u]]
            chain_id = f"chain-{u}" if len(units[u]) > 1 or kind == "chat" else None
            out.append(WorkRequest(index=len(out), kind=kind, model=m, body=body, session_id=sid, chain=chain_id))
            cursors[u] += 1
            if cursors[u] < len(units[u]):
                nxt.append(u)
        active = nxt
    return out


def _spread(
    units: list[list[tuple[str, str, dict[str, Any], str | None]]], span: float, rng: random.Random
) -> list[WorkRequest]:
    """Order units by seeded positions in [0, 1): a single request anywhere, a conversation's turns
    evenly over `span` from a random start (so conversations overlap and turns come back later)."""
    keyed: list[tuple[float, int, int]] = []
    for u, unit in enumerate(units):
        if len(unit) == 1 and unit[0][0] != "chat":
            keyed.append((rng.random(), u, 0))
            continue
        start = rng.random() * (1.0 - span)
        step = span / max(1, len(unit) - 1)
        keyed.extend((start + k * step, u, k) for k in range(len(unit)))
    out: list[WorkRequest] = []
    for _pos, u, k in sorted(keyed):
        kind, m, body, sid = units[u][k]
        out.append(
            WorkRequest(
                index=len(out),
                kind=kind,
                model=m,
                body=body,
                session_id=sid,
                chain=f"chain-{u}" if kind == "chat" else None,
            )
        )
    return out


def demo_spec(
    models: Sequence[str],
    n_requests: int,
    *,
    seed: int = 0,
    max_tokens: int = 16,
    model_weights: Sequence[float] | None = None,
) -> WorkloadSpec:
    """The mixed workload `gpufleet demo` replays (docs/local.md describes it).

    About 30 % shared system prompts (12 prompts of ~1,000 tokens, Zipf popularity), 35 % RAG
    (3 passages of ~500 tokens each from 120, Zipf popularity, most popular first, then a
    question), 35 % multi-turn chat (6 turns with a session id, each conversation under one of
    the system prompts drawn by the same Zipf popularity; every turn resends the history, which
    grows to ~2,000 tokens; turns of one conversation spread over half the run). Half the requests are
    deterministic (`temperature: 0`). Prompts average ~1,700 tokens, so a replica's KV cache of
    tens of thousands of tokens holds a fraction of what round-robin sends it.
    """
    return WorkloadSpec(
        models=tuple(models),
        n_requests=n_requests,
        seed=seed,
        mix=(0.3, 0.35, 0.35),
        model_weights=tuple(model_weights) if model_weights is not None else None,
        n_system_prompts=12,
        system_prompt_chars=4000,
        questions_per_prompt=20,
        n_docs=120,
        doc_chars=2000,
        docs_per_request=3,
        zipf_s=1.1,
        turns_per_conversation=6,
        turn_chars=600,
        max_tokens=max_tokens,
        deterministic_fraction=0.5,
        chat_system_prompts="zipf",
        conversation_span=0.5,
    )


def ceiling_hit_ratio(
    requests: Sequence[WorkRequest],
    *,
    block_size_tokens: int = 16,
    chars_per_token: float = 4.0,
    model: str | None = None,
) -> float:
    """Prefix-hit ratio of an infinite KV cache per model over `requests` in the order given: the ceiling.

    Uses the router's block hashing (`gpufleet.router.prefix`) and counts the way the engine does:
    the longest run of leading full blocks seen in an earlier prompt of the same model, at most all
    but the last prompt token (one token is always computed). `model` limits it to one model.
    """
    from gpufleet.router.prefix import block_hashes, render_prompt

    block_chars = max(1, int(block_size_tokens * chars_per_token))
    seen: dict[str, set[int]] = {}
    hit = total = 0
    for r in requests:
        if model is not None and r.model != model:
            continue
        text = render_prompt(r.body)
        tokens = math.ceil(len(text) / chars_per_token)
        hashes = block_hashes(text, block_chars)[: tokens // block_size_tokens]
        known = seen.setdefault(r.model, set())
        n = 0
        for h in hashes:
            if h not in known:
                break
            n += 1
        if tokens > 0:
            hit += min(n, (tokens - 1) // block_size_tokens) * block_size_tokens
        total += tokens
        known.update(hashes)
    return hit / total if total else 0.0


def arrival_times(n: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which `n` Poisson arrivals at `rate_per_s` happen (seeded)."""
    if rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


async def _one(session: Any, base_url: str, req: WorkRequest, headers: Mapping[str, str], timeout_s: float) -> Result:
    import aiohttp

    res = Result(index=req.index, kind=req.kind, model=req.model)
    body = dict(req.body, stream=True, stream_options={"include_usage": True})
    hdrs = dict(headers)
    if req.session_id:
        hdrs["x-session-id"] = req.session_id
    t0 = time.perf_counter()
    try:
        async with session.post(
            base_url + req.path, json=body, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            res.status = resp.status
            res.replica = resp.headers.get("x-gpufleet-replica")
            res.cache = resp.headers.get("x-gpufleet-cache")
            if resp.status >= 400:
                raw = await resp.read()
                res.error = raw[:200].decode(errors="replace")
            else:
                async for raw_line in resp.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    try:
                        chunk = json.loads(line[6:])
                    except json.JSONDecodeError:
                        continue
                    if res.ttft_s is None and _has_content(chunk):
                        res.ttft_s = time.perf_counter() - t0
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = int(details.get("cached_tokens") or 0)
    except (TimeoutError, aiohttp.ClientError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.perf_counter() - t0
    return res


def _has_content(chunk: Mapping[str, Any]) -> bool:
    for ch in chunk.get("choices") or ():
        delta = ch.get("delta") or {}
        if delta.get("content") or ch.get("text"):
            return True
    return False


async def drive(
    base_url: str,
    requests: Sequence[WorkRequest],
    *,
    concurrency: int = 16,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    on_result: Callable[[Result], None] | None = None,
    rate_per_s: float | None = None,
    arrival_seed: int = 0,
) -> list[Result]:
    """Send `requests` (streaming) with at most `concurrency` in flight; chains run in order.

    Without `rate_per_s` it is a closed loop: the next request goes as soon as one finishes. With
    it, an open loop: request i is due at the i-th arrival of a Poisson process of that rate
    (seeded by `arrival_seed`), as users arrive whether or not the fleet keeps up; a chain's next
    turn goes at its due time or when the previous turn finished, whichever is later (a user
    reads the answer before replying). `concurrency` then only caps what is in flight.
    """
    import aiohttp

    due: dict[int, float] = {}
    if rate_per_s is not None:
        ordered_idx = sorted(r.index for r in requests)
        due = dict(zip(ordered_idx, arrival_times(len(ordered_idx), rate_per_s, arrival_seed)))
    base_url = base_url.rstrip("/")
    sem = asyncio.Semaphore(max(1, concurrency))
    hdrs = dict(headers or {})
    units: dict[str, list[WorkRequest]] = {}
    singles: list[WorkRequest] = []
    for r in requests:
        if r.chain:
            units.setdefault(r.chain, []).append(r)
        else:
            singles.append(r)
    results: list[Result] = []
    # aiohttp rather than httpx: the driver must not be the bottleneck of what it measures
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def run(chain: Sequence[WorkRequest]) -> None:
            for r in chain:
                if due:
                    wait = t0 + due[r.index] - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                async with sem:
                    sent = loop.time() - t0
                    res = await _one(client, base_url, r, hdrs, timeout_s)
                    res.sent_s = sent
                results.append(res)
                if on_result is not None:
                    on_result(res)

        # start units in the order of their first request, so the replay follows the generated order
        ordered = sorted([[r] for r in singles] + list(units.values()), key=lambda u: u[0].index)
        await asyncio.gather(*(run(u) for u in ordered))
    results.sort(key=lambda r: r.index)
    return results


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
    return xs[k]


def summarize_by_model(results: Sequence[Result], wall_s: float = 0.0) -> dict[str, Summary]:
    """`summarize` per model (one deployment serves each model), in first-seen order."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.model, []).append(r)
    return {m: summarize(rs, wall_s) for m, rs in groups.items()}


def summarize(results: Sequence[Result], wall_s: float = 0.0) -> Summary:
    """Aggregate results. Prediction-cache hits are counted apart: no replica served them."""
    served = [r for r in results if r.ok and r.cache != "hit"]
    prompt = sum(r.prompt_tokens for r in served)
    cached = sum(r.cached_tokens for r in served)
    ttfts = [r.ttft_s for r in served if r.ttft_s is not None]
    return Summary(
        requests=len(results),
        ok=sum(r.ok for r in results),
        errors=sum(not r.ok for r in results),
        prefix_hit_ratio=cached / prompt if prompt else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        per_replica=dict(sorted(Counter(r.replica for r in served if r.replica).items())),
        cache_hits=sum(1 for r in results if r.ok and r.cache == "hit"),
        wall_s=wall_s,
        status_counts=dict(sorted(Counter(r.status for r in results).items())),
    )
