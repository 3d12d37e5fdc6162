"""The simulator's workload generators: seeded chat traffic rendered to router features.

Every generator returns a `Workload`: requests in arrival order, each with the features the
router's policies read (built by the router's own `features_from_body` for chat bodies, so prefix
hashes and token estimates are exactly the live router's), the output length, and optionally the
chat body itself (`keep_bodies=True`, for live benchmarks over HTTP). Text comes from a
`TextPool` (segments keyed by what they stand for), popularity from `zipf_weights`.

    shared_prompts  several applications, each with a long system prompt; Zipf app popularity
                    (one hot prefix), many users with short questions
    rag             a knowledge base with Zipf document popularity; each query carries k retrieved
                    documents (most popular first), then the question
    multiturn       conversations with a session id; each turn re-sends the whole history plus the
                    new message after an exponential think time
    mix             the three together, a third of the traffic each
    hot_prefix      one ~3k-token system prompt on 70 % of the requests, already cached on every
                    replica (`Workload.preload`); the rest carry prompts of their own
    demo            the traffic of `gpufleet demo` (`mixed.demo_spec`) with Poisson arrivals
Arrivals are Poisson at `rate_rps`; `Workload.scaled(factor)` compresses time for `--load`. Trace
replay lives in `gpufleet.router.sim.trace`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from gpufleet.router.config import RouterSettings
from gpufleet.router.prefix import features_from_body
from gpufleet.router.types import RequestFeatures
from gpufleet.router.workloads import mixed
from gpufleet.router.workloads.sampling import TextPool, WeightedSampler, zipf_weights
from gpufleet.router.workloads.types import MODEL, SimRequest, Workload

__all__ = [
    "WORKLOADS",
    "demo",
    "expected_shared_fraction",
    "hot_prefix",
    "make_workload",
    "mix",
    "multiturn",
    "rag",
    "shared_prompts",
]


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
    apps = WeightedSampler(zipf_weights(n_apps, app_zipf_s), rng)
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
    sampler = WeightedSampler(zipf_weights(n_docs, doc_zipf_s), rng)
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
    parts: list[Workload] = []
    third = max(1, n_requests // 3)
    gens: tuple[Callable[..., Workload], ...] = (shared_prompts, rag, multiturn)
    for k, gen in enumerate(gens):
        n = third if k < 2 else n_requests - 2 * third
        parts.append(gen(n, seed=seed * 7 + k, rate_rps=rate_rps / 3, settings=settings, keep_bodies=keep_bodies))
    reqs = sorted((r for w in parts for r in w.requests), key=lambda r: (r.arrival_s, r.id))
    return Workload("mix", reqs, {"parts": [w.name for w in parts]})


def hot_prefix(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    hot_fraction: float = 0.7,
    prefix_tokens: int = 3000,
    question_tokens: tuple[int, int] = (40, 400),
    other_tokens: tuple[int, int] = (300, 2000),
    output_tokens: tuple[int, int] = (20, 200),
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """One hot system prompt on `hot_fraction` of the requests, held by every replica from the start.

    The hot requests are the prefix plus a question; the others a prompt of their own (no sharing).
    Every replica has served the bare prefix before the first arrival (`Workload.preload`), so the
    best choice is the best load balance: a router that believes only the replicas it sent the
    prefix to hold it piles the hot traffic onto them.
    """
    s, rng, pool = _setup(seed, settings)
    system = pool.segment("hot-system", prefix_tokens)
    t = 0.0
    reqs: list[SimRequest] = []
    for i in range(n_requests):
        t += rng.expovariate(rate_rps)
        if rng.random() < hot_fraction:
            sys_text = system
            q = pool.segment(f"hq{seed}-{i}", rng.randint(*question_tokens))
        else:
            sys_text = pool.segment(f"ho{seed}-{i}", rng.randint(*other_tokens))
            q = pool.segment(f"hoq{seed}-{i}", rng.randint(*question_tokens))
        msgs = [{"role": "system", "content": sys_text}, {"role": "user", "content": q}]
        reqs.append(_request(f"hp-{i}", t, msgs, rng.randint(*output_tokens), s, keep_bodies))
    warm = _features({"model": MODEL, "messages": [{"role": "system", "content": system}]}, s)
    params = dict(hot_fraction=hot_fraction, prefix_tokens=prefix_tokens, other_tokens=other_tokens)
    return Workload("hot_prefix", reqs, params, preload=(warm,))


def demo(
    n_requests: int = 2000,
    *,
    seed: int = 0,
    rate_rps: float = 10.0,
    settings: RouterSettings | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """The traffic of `gpufleet demo` (`mixed.demo_spec`), with Poisson arrivals.

    That generator gives bodies and ordering but no arrival times; here requests arrive in its
    order at `rate_rps`, and each generates its body's `max_tokens`.
    """
    s = settings or RouterSettings()
    rng = random.Random(seed)
    spec = mixed.demo_spec((MODEL,), n_requests, seed=seed)
    t = 0.0
    reqs: list[SimRequest] = []
    for wr in mixed.generate(spec):
        t += rng.expovariate(rate_rps)
        body = dict(wr.body, model=MODEL)
        feats = _features(body, s, wr.session_id)
        out = int(body.get("max_tokens") or 16)
        reqs.append(SimRequest(f"demo-{wr.index}", t, feats, out, body if keep_bodies else None))
    return Workload("demo", reqs, {"spec": "router.workloads.mixed.demo_spec"})


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "shared_prompts": shared_prompts,
    "rag": rag,
    "multiturn": multiturn,
    "mix": mix,
    "hot_prefix": hot_prefix,
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


def expected_shared_fraction(system_tokens: tuple[int, int], question_tokens: tuple[int, int]) -> float:
    """The sharing ratio `shared_prompts` asks for: mean system prompt over mean prompt length."""
    sys_mean = sum(system_tokens) / 2
    return sys_mean / (sys_mean + sum(question_tokens) / 2)
