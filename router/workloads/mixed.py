"""The demo's traffic: shared system prompts, RAG and multi-turn chat as HTTP request bodies.

`generate(spec)` (pure, deterministic for a seed) builds the patterns where prefix-aware routing
matters, as `WorkRequest`s in send order:

- *system*: a handful of long shared system prompts (chosen with Zipf popularity), each
  followed by a short user question; a small question pool makes some requests exact repeats,
  which deterministic ones (`temperature: 0`) let the prediction cache answer;
- *rag*: retrieval-augmented questions over a small document set: each request quotes
  `docs_per_request` documents drawn by Zipf popularity (popular documents recur);
- *chat*: multi-turn conversations with a session id (`x-session-id`); every turn resends the
  whole history, so each turn's prompt extends the previous one. Turns of one conversation
  run in order (`chain`), interleaved with everything else.

`demo_spec` is the shape `gpufleet demo` replays, and `generators.demo` the same traffic for the
simulator, so every number is about the same requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.router.workloads.sampling import WeightedSampler, prose, zipf_weights
from gpufleet.router.workloads.types import WorkRequest

__all__ = ["WorkloadSpec", "demo_spec", "generate"]


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


_Unit = tuple[str, str, dict[str, Any], str | None]
"""(kind, model, body, session id) of one request before it is ordered."""


def generate(spec: WorkloadSpec) -> list[WorkRequest]:
    """The workload for `spec`: same spec, same list."""
    rng = random.Random(spec.seed)
    prompts = {
        m: [
            prose(random.Random(f"{spec.seed}:sys:{m}:{i}"), spec.system_prompt_chars, f"System prompt {i} for {m}")
            for i in range(spec.n_system_prompts)
        ]
        for m in spec.models
    }
    docs = [prose(random.Random(f"{spec.seed}:doc:{i}"), spec.doc_chars, f"Document {i}") for i in range(spec.n_docs)]
    questions = [
        [prose(random.Random(f"{spec.seed}:q:{p}:{j}"), 80, f"Question {j}") for j in range(spec.questions_per_prompt)]
        for p in range(spec.n_system_prompts)
    ]
    # one RNG for every draw, in the order of the pinned sequences
    prompt_pick = WeightedSampler(zipf_weights(spec.n_system_prompts, spec.zipf_s), rng)
    doc_pick = WeightedSampler(zipf_weights(spec.n_docs, spec.zipf_s), rng)
    model_pick = WeightedSampler(list(spec.model_weights or [1.0] * len(spec.models)), rng)
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
    units: list[list[_Unit]] = []
    for _ in range(n_sys):
        m = spec.models[model_pick.draw()]
        p = prompt_pick.draw()
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
        m = spec.models[model_pick.draw()]
        k = min(spec.docs_per_request, spec.n_docs)
        picked: list[int] = []
        while len(picked) < k:
            d = doc_pick.draw()
            if d not in picked:
                picked.append(d)
        # most popular first, so requests sharing the top document share a prefix
        context = "\n\n".join(docs[d] for d in sorted(picked))
        question = prose(rng, 100, "Question")
        body = {
            "model": m,
            "messages": [
                {"role": "system", "content": "Answer from the context only."},
                {"role": "user", "content": f"Context:\n{context}\n\n{question}"},
            ],
        }
        units.append([("rag", m, sampling(body), None)])
    turns = max(1, spec.turns_per_conversation)
    n_conv = math.ceil(n_chat / turns) if n_chat else 0
    left = n_chat
    for c in range(n_conv):
        m = spec.models[model_pick.draw()]
        sid = f"conv-{spec.seed}-{c}"
        p = 0 if spec.chat_system_prompts == "top" else prompt_pick.draw()
        history: list[dict[str, str]] = [{"role": "system", "content": prompts[m][p]}]
        chain: list[_Unit] = []
        for t in range(min(turns, left)):
            history = [*history, {"role": "user", "content": prose(rng, spec.turn_chars, f"Turn {t}")}]
            body = {"model": m, "messages": list(history), "user": sid}
            chain.append(("chat", m, sampling(body), sid))
            # a stand-in for the assistant's answer keeps later turns extending this prompt
            history = [*history, {"role": "assistant", "content": prose(rng, spec.turn_chars // 2, "Answer")}]
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
            kind, m, body, session = units[u][cursors[u]]
            chain_id = f"chain-{u}" if len(units[u]) > 1 or kind == "chat" else None
            out.append(WorkRequest(index=len(out), kind=kind, model=m, body=body, session_id=session, chain=chain_id))
            cursors[u] += 1
            if cursors[u] < len(units[u]):
                nxt.append(u)
        active = nxt
    return out


def _spread(units: list[list[_Unit]], span: float, rng: random.Random) -> list[WorkRequest]:
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
