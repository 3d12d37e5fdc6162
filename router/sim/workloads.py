"""Seeded workloads as the router sees them: chat requests rendered to text, then to features.

Every generator returns a `Workload`: requests in arrival order, each with the features the
router's policies read (`RequestFeatures`, built by the router's own `features_from_body` for chat
bodies, so prefix hashes and token estimates are exactly the live router's), the output length,
and optionally the chat body itself (for live benchmarks over HTTP).

Text is cut from one seeded pool of random letters: a *segment* (a system prompt, a document, a
user message) is a slice of the pool at an offset derived from its key, so equal keys give equal
text and distinct keys give distinct text, without generating megabytes per request.

Workloads (the issue's 1-4; trace replay lives in `gpufleet.router.sim.trace`):
    shared_prompts  several applications, each with a long system prompt; Zipf app popularity
                    (one hot prefix), many users with short questions
    rag             a knowledge base with Zipf document popularity; each query carries k retrieved
                    documents (most popular first), then the question
    multiturn       conversations with a session id; each turn re-sends the whole history plus the
                    new message after an exponential think time
    mix             the three together, a third of the traffic each
Arrivals are Poisson at `rate_rps`; `Workload.scaled(factor)` compresses time for `--load`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpufleet.router.config import RouterSettings
from gpufleet.router.prefix import features_from_body
from gpufleet.router.types import RequestFeatures, stable_hash

__all__ = [
    "MODEL",
    "WORKLOADS",
    "expected_shared_fraction",
    "SimRequest",
    "TextPool",
    "Workload",
    "demo",
    "infinite_cache_hit_ratio",
    "make_workload",
    "mix",
    "multiturn",
    "rag",
    "shared_prompts",
    "zipf_weights",
]

MODEL = "sim-model"
"""Model name the simulator's requests and replicas carry (one deployment is simulated)."""


@dataclass(slots=True)
class SimRequest:
    """One request of a workload: when it arrives, what the router sees, how much it generates."""

    id: str
    arrival_s: float
    features: RequestFeatures
    output_tokens: int
    body: dict[str, Any] | None = None
    """The chat body (kept only when asked: live benchmarks send it over HTTP)."""


@dataclass
class Workload:
    """A named, seeded list of requests in arrival order."""

    name: str
    requests: list[SimRequest]
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def span_s(self) -> float:
        """Time from the first to the last arrival (at least 1 ms, so rates stay finite)."""
        if not self.requests:
            return 0.0
        return max(1e-3, self.requests[-1].arrival_s - self.requests[0].arrival_s)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.features.prompt_tokens for r in self.requests)

    def scaled(self, factor: float) -> Workload:
        """The same requests with arrival times multiplied by `factor` (< 1: faster arrivals)."""
        if factor <= 0:
            raise ValueError("time scale factor must be positive")
        t0 = self.requests[0].arrival_s if self.requests else 0.0
        reqs = [replace(r, arrival_s=t0 + (r.arrival_s - t0) * factor) for r in self.requests]
        return Workload(self.name, reqs, {**self.params, "time_scale": factor})

    def head(self, n: int) -> Workload:
        """The first `n` requests."""
        return Workload(self.name, self.requests[:n], dict(self.params))


class TextPool:
    """Deterministic filler text: slices of one seeded pool of lowercase letters and spaces.

    `segment(key, tokens)` is `tokens * chars_per_token` characters; equal keys give equal text.
    """

    def __init__(self, seed: int, size_chars: int = 1 << 22, chars_per_token: float = 4.0) -> None:
        alphabet = b"abcdefghijklmnopqrstuvwxyz      "  # 32 symbols: one in four is a space
        table = bytes(alphabet[i % len(alphabet)] for i in range(256))
        raw = random.Random(seed).randbytes(size_chars)
        self.text = raw.translate(table).decode("ascii")
        self.chars_per_token = chars_per_token

    def chars(self, tokens: int) -> int:
        """Characters standing for `tokens` tokens."""
        return max(1, int(round(tokens * self.chars_per_token)))

    def segment(self, key: str, tokens: int) -> str:
        """The text of segment `key`, `tokens` tokens long."""
        n = self.chars(tokens)
        if n >= len(self.text):
            raise ValueError(f"segment of {tokens} tokens exceeds the text pool; use a larger pool")
        off = stable_hash(key) % (len(self.text) - n)
        return self.text[off : off + n]


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights 1/k^s for ranks 1..n."""
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


class _Sampler:
    """Draw ranks from fixed weights in O(log n) with one seeded RNG."""

    def __init__(self, weights: Sequence[float], rng: random.Random) -> None:
        self._cum: list[float] = []
        acc = 0.0
        for w in weights:
            acc += w
            self._cum.append(acc)
        self._rng = rng

    def draw(self) -> int:
        return min(bisect.bisect_left(self._cum, self._rng.random() * self._cum[-1]), len(self._cum) - 1)


def _setup(seed: int, settings: RouterSettings | None) -> tuple[RouterSettings, random.Random, TextPool]:
    """The settings, RNG and text pool every generator starts from."""
    s = settings or RouterSettings()
    return s, random.Random(seed), TextPool(seed, chars_per_token=s.chars_per_token)


def _features(body: dict[str, Any], settings: RouterSettings, session_id: str | None = None) -> RequestFeatures:
    return features_from_body(
        body,
        model=MODEL,
        block_size_tokens=settings.block_size_tokens,
        chars_per_token=settings.chars_per_token,
        session_id=session_id,
    )


def _request(
    rid: str,
    t: float,
    messages: list[dict[str, str]],
    out: int,
    settings: RouterSettings,
    keep: bool,
    sid: str | None = None,
) -> SimRequest:
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": out}
    feats = _features(body, settings, sid)
    return SimRequest(rid, t, feats, out, body if keep else None)


def shared_prompts(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    n_apps: int = 32,
    system_tokens: tuple[int, int] = (1500, 3000),
    question_tokens: tuple[int, int] = (40, 400),
    output_tokens: tuple[int, int] = (20, 200),
    app_zipf_s: float = 1.0,
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """Several applications, each with its own long system prompt, many users (Zipf app popularity)."""
    s, rng, pool = _setup(seed, settings)
    system = [pool.segment(f"app{a}", rng.randint(*system_tokens)) for a in range(n_apps)]
    apps = _Sampler(zipf_weights(n_apps, app_zipf_s), rng)
    t = 0.0
    reqs: list[SimRequest] = []
    for i in range(n_requests):
        t += rng.expovariate(rate_rps)
        a = apps.draw()
        q = pool.segment(f"q{seed}-{i}", rng.randint(*question_tokens))
        msgs = [{"role": "system", "content": system[a]}, {"role": "user", "content": q}]
        reqs.append(_request(f"sp-{i}", t, msgs, rng.randint(*output_tokens), s, keep_bodies))
    params = dict(n_apps=n_apps, system_tokens=system_tokens, question_tokens=question_tokens, app_zipf_s=app_zipf_s)
    return Workload("shared_prompts", reqs, params)


def rag(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    n_docs: int = 400,
    docs_per_query: int = 3,
    doc_tokens: tuple[int, int] = (300, 900),
    doc_zipf_s: float = 1.1,
    system_tokens: int = 300,
    question_tokens: tuple[int, int] = (20, 120),
    output_tokens: tuple[int, int] = (30, 200),
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """Queries carrying `docs_per_query` retrieved documents (Zipf popularity, most popular first)."""
    s, rng, pool = _setup(seed, settings)
    system = pool.segment("rag-system", system_tokens)
    docs = [pool.segment(f"doc{d}", rng.randint(*doc_tokens)) for d in range(n_docs)]
    sampler = _Sampler(zipf_weights(n_docs, doc_zipf_s), rng)
    t = 0.0
    reqs: list[SimRequest] = []
    for i in range(n_requests):
        t += rng.expovariate(rate_rps)
        chosen: set[int] = set()
        while len(chosen) < min(docs_per_query, n_docs):
            chosen.add(sampler.draw())
        # Retrievers return a stable order for the same hits: rank order keeps shared heads shared.
        context = "\n\n".join(docs[d] for d in sorted(chosen))
        q = pool.segment(f"rq{seed}-{i}", rng.randint(*question_tokens))
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": context + "\n\nQuestion: " + q}]
        reqs.append(_request(f"rag-{i}", t, msgs, rng.randint(*output_tokens), s, keep_bodies))
    params = dict(n_docs=n_docs, docs_per_query=docs_per_query, doc_tokens=doc_tokens, doc_zipf_s=doc_zipf_s)
    return Workload("rag", reqs, params)


def multiturn(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    turns: tuple[int, int] = (2, 10),
    think_time_s: float = 10.0,
    n_system: int = 4,
    system_tokens: int = 600,
    user_tokens: tuple[int, int] = (20, 300),
    output_tokens: tuple[int, int] = (30, 200),
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """Conversations: each turn re-sends the history plus a new message, after a think time.

    Sessions start as a Poisson process at `rate_rps / mean turns`, so requests arrive at about
    `rate_rps`; turn k+1 arrives `think_time_s` (exponential mean) after turn k. The assistant's
    reply in the history is the text the model generated (its output length).
    """
    s, rng, pool = _setup(seed, settings)
    systems = [pool.segment(f"mt-system{k}", system_tokens) for k in range(n_system)]
    mean_turns = (turns[0] + turns[1]) / 2
    pending: list[tuple[float, str, dict[str, Any], int, str]] = []
    t = 0.0
    sid_n = 0
    while len(pending) < n_requests:
        t += rng.expovariate(rate_rps / mean_turns)
        sid = f"s{seed}-{sid_n}"
        sid_n += 1
        history = [{"role": "system", "content": systems[rng.randrange(n_system)]}]
        at = t
        for k in range(rng.randint(*turns)):
            history.append({"role": "user", "content": pool.segment(f"{sid}-u{k}", rng.randint(*user_tokens))})
            out = rng.randint(*output_tokens)
            pending.append((at, sid, {"messages": list(history)}, out, f"{sid}-t{k}"))
            history.append({"role": "assistant", "content": pool.segment(f"{sid}-a{k}", out)})
            at += rng.expovariate(1.0 / think_time_s) if think_time_s > 0 else 0.0
    pending.sort(key=lambda p: (p[0], p[4]))
    reqs = [
        _request(rid, at, body["messages"], out, s, keep_bodies, sid)
        for at, sid, body, out, rid in pending[:n_requests]
    ]
    params = dict(turns=turns, think_time_s=think_time_s, n_system=n_system, system_tokens=system_tokens)
    return Workload("multiturn", reqs, params)


def mix(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """Shared prompts, RAG and multi-turn together, a third of the requests and rate each."""
    parts = []
    third = max(1, n_requests // 3)
    for k, gen in enumerate((shared_prompts, rag, multiturn)):
        n = third if k < 2 else n_requests - 2 * third
        parts.append(gen(n, seed=seed * 7 + k, rate_rps=rate_rps / 3, settings=settings, keep_bodies=keep_bodies))
    reqs = sorted((r for w in parts for r in w.requests), key=lambda r: (r.arrival_s, r.id))
    return Workload("mix", reqs, {"parts": [w.name for w in parts]})


def demo(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """The traffic of `gpufleet demo` (`gpufleet.router.workload.demo_spec`), with Poisson arrivals.

    That generator gives bodies and ordering but no arrival times; here requests arrive in its
    order at `rate_rps`, and each generates its body's `max_tokens`.
    """
    from gpufleet.router import workload as demo_workload

    s = settings or RouterSettings()
    rng = random.Random(seed)
    spec = demo_workload.demo_spec((MODEL,), n_requests, seed=seed)
    t = 0.0
    reqs: list[SimRequest] = []
    for wr in demo_workload.generate(spec):
        t += rng.expovariate(rate_rps)
        body = dict(wr.body, model=MODEL)
        feats = _features(body, s, wr.session_id)
        out = int(body.get("max_tokens") or 16)
        reqs.append(SimRequest(f"demo-{wr.index}", t, feats, out, body if keep_bodies else None))
    return Workload("demo", reqs, {"spec": "router.workload.demo_spec"})


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "shared_prompts": shared_prompts,
    "rag": rag,
    "multiturn": multiturn,
    "mix": mix,
    "demo": demo,
}


def make_workload(
    name: str, n_requests: int, *, seed: int = 0, settings: RouterSettings | None = None, **kw: Any
) -> Workload:
    """Build the workload registered under `name` (one of `WORKLOADS`)."""
    try:
        gen = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(sorted(WORKLOADS))}") from None
    return gen(n_requests, seed=seed, settings=settings, **kw)


def infinite_cache_hit_ratio(requests: Sequence[SimRequest], block_size_tokens: int) -> float:
    """Prompt tokens an infinite, shared cache would serve (the ceiling of every policy).

    Counted like the engine counts: the longest run of leading blocks seen in any earlier prompt,
    at most all but the last prompt token (one token is always computed).
    """
    seen: set[int] = set()
    hit = total = 0
    for r in requests:
        f = r.features
        hashes = f.block_hashes[: f.prompt_tokens // block_size_tokens]
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        n = min(n, (f.prompt_tokens - 1) // block_size_tokens) if f.prompt_tokens > 0 else 0
        hit += n * block_size_tokens
        total += f.prompt_tokens
        seen.update(hashes)
    return hit / total if total else 0.0


def expected_shared_fraction(system_tokens: tuple[int, int], question_tokens: tuple[int, int]) -> float:
    """The sharing ratio `shared_prompts` asks for: mean system prompt over mean prompt length."""
    sys_mean = sum(system_tokens) / 2
    return sys_mean / (sys_mean + sum(question_tokens) / 2)
