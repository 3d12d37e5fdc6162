"""Workload generators ask for sharing and popularity; the generated traffic has them."""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest

from gpufleet.router.config import RouterSettings
from gpufleet.router.prefix import features_from_body
from gpufleet.router.workloads import generators, sampling
from gpufleet.router.workloads.ceiling import ceiling_hit_ratio
from gpufleet.router.workloads.types import MODEL, SimRequest


def test_shared_prompts_sharing_ratio_is_what_was_asked() -> None:
    # fixed-length system prompts: the realised apps cannot drift from the asked mean
    wl = generators.shared_prompts(1500, seed=4, n_apps=4, system_tokens=(1500, 1500), question_tokens=(100, 300))
    asked = generators.expected_shared_fraction((1500, 1500), (100, 300))
    got = ceiling_hit_ratio(wl.requests, 16)
    # lost: one partial block per prompt and the first use of each of 4 system prompts
    assert got == pytest.approx(asked, abs=0.02)


def test_shared_prompts_app_popularity_follows_zipf() -> None:
    wl = generators.shared_prompts(3000, seed=1, n_apps=8, app_zipf_s=1.0)
    firsts = defaultdict(int)
    for r in wl.requests:
        firsts[r.features.block_hashes[0]] += 1
    counts = sorted(firsts.values(), reverse=True)
    weights = sampling.zipf_weights(8, 1.0)
    assert len(counts) == 8
    assert counts[0] / 3000 == pytest.approx(weights[0], abs=0.03)
    assert counts[-1] / 3000 == pytest.approx(weights[-1], abs=0.02)


def test_rag_document_popularity_follows_zipf() -> None:
    s = 1.1
    wl = generators.rag(3000, seed=2, n_docs=50, docs_per_query=1, doc_zipf_s=s, keep_bodies=True)
    pool = sampling.TextPool(2)
    # doc 0 is the most popular; its text identifies it in the prompt
    import random

    rng = random.Random(2)
    doc0 = pool.segment("doc0", rng.randint(300, 900))
    share = sum(doc0 in r.body["messages"][1]["content"] for r in wl.requests) / len(wl)  # type: ignore[index]
    assert share == pytest.approx(sampling.zipf_weights(50, s)[0], abs=0.03)


def test_rag_queries_share_the_system_prompt_and_popular_documents() -> None:
    wl = generators.rag(800, seed=3)
    ratio = ceiling_hit_ratio(wl.requests, 16)
    assert 0.3 < ratio < 0.9


def test_multiturn_turns_extend_the_previous_prompt_and_wait_the_think_time() -> None:
    wl = generators.multiturn(3000, seed=5, think_time_s=10.0, turns=(2, 6))
    by_session: dict[str, list[SimRequest]] = defaultdict(list)
    for r in wl.requests:
        assert r.features.session_id is not None
        by_session[r.features.session_id].append(r)
    gaps = []
    extended = 0
    pairs = 0
    for reqs in by_session.values():
        for a, b in zip(reqs, reqs[1:]):
            pairs += 1
            ha, hb = a.features.block_hashes, b.features.block_hashes
            extended += hb[: len(ha)] == ha and len(hb) > len(ha)
            gaps.append(b.arrival_s - a.arrival_s)
    assert extended == pairs
    assert statistics.mean(gaps) == pytest.approx(10.0, rel=0.08)
    complete = [len(v) for v in by_session.values()][:-50]  # the last sessions are cut by n_requests
    assert statistics.mean(complete) == pytest.approx(4.0, rel=0.1)


def test_mix_contains_a_third_of_each_kind() -> None:
    wl = generators.mix(900, seed=1)
    kinds = defaultdict(int)
    for r in wl.requests:
        kind = r.id.split("-")[0]
        kinds[kind if kind in ("sp", "rag") else "multiturn"] += 1
    assert kinds == {"sp": 300, "rag": 300, "multiturn": 300}
    assert sum(r.features.session_id is not None for r in wl.requests) == 300
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(wl.requests, wl.requests[1:]))


def test_features_are_the_live_routers_features_of_the_same_body() -> None:
    s = RouterSettings()
    wl = generators.multiturn(50, seed=9, keep_bodies=True)
    for r in wl.requests:
        live = features_from_body(
            r.body,
            model=MODEL,
            block_size_tokens=s.block_size_tokens,  # type: ignore[arg-type]
            chars_per_token=s.chars_per_token,
            session_id=r.features.session_id,
        )
        assert live == r.features


def test_unknown_workload_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="shared_prompts"):
        generators.make_workload("chatbot", 10)


def test_demo_workload_reuses_the_demo_generator() -> None:
    from gpufleet.router.workloads import mixed

    wl = generators.make_workload("demo", 80, seed=3, keep_bodies=True)
    gen = mixed.generate(mixed.demo_spec((MODEL,), 80, seed=3))
    assert [r.body["messages"] for r in wl.requests] == [g.body["messages"] for g in gen]  # type: ignore[index]
