"""Prefix hashing and the per-replica prefix index."""

from __future__ import annotations

import sys

import pytest

from gpufleet.router.prefix import PrefixIndex, block_hashes, features_from_body, render_prompt


def test_equal_prefixes_give_equal_chained_hashes_and_diverge_after_first_difference() -> None:
    a = block_hashes("A" * 40 + "B" * 40 + "C" * 40, 40)
    b = block_hashes("A" * 40 + "B" * 40 + "D" * 40, 40)
    assert len(a) == 3
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_hashes_are_chained_so_an_equal_block_after_a_different_prefix_differs() -> None:
    a = block_hashes("X" * 10 + "same-block", 10)
    b = block_hashes("Y" * 10 + "same-block", 10)
    assert a[1] != b[1]


def test_partial_trailing_block_is_not_hashed() -> None:
    assert len(block_hashes("x" * 99, 10)) == 9
    assert block_hashes("short", 10) == ()


def test_chat_render_keeps_roles_and_order() -> None:
    s = render_prompt({"messages": [{"role": "system", "content": "hello"}, {"role": "user", "content": "hi"}]})
    u = render_prompt({"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "hi"}]})
    swapped = render_prompt({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "hello"}]})
    assert s != u and s != swapped
    assert s.index("hello") < s.index("hi")


def test_chat_render_reads_text_parts() -> None:
    parts = render_prompt(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "text", "text": "def"}]}]}
    )
    plain = render_prompt({"messages": [{"role": "user", "content": "abcdef"}]})
    assert parts == plain


def test_features_estimate_tokens_and_share_prefix_between_turns() -> None:
    sys_prompt = "You are a careful assistant. " * 20
    first = {"messages": [{"role": "system", "content": sys_prompt}, {"role": "user", "content": "q1"}]}
    second = {
        "messages": [*first["messages"], {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    }
    f1 = features_from_body(first, model="m", block_size_tokens=16, chars_per_token=4.0)
    f2 = features_from_body(second, model="m", block_size_tokens=16, chars_per_token=4.0)
    assert f1.prompt_tokens == -(-len(render_prompt(first)) // 4)
    assert len(f1.block_hashes) >= 8
    assert f2.block_hashes[: len(f1.block_hashes)] == f1.block_hashes
    assert f1.affinity_key == f2.affinity_key == f1.block_hashes[0]


def test_longest_match_counts_leading_blocks_only() -> None:
    idx = PrefixIndex(100)
    idx.insert([1, 2, 3, 4])
    assert idx.match([1, 2, 3, 4, 5]) == 4
    assert idx.match([1, 2, 9, 4]) == 2
    assert idx.match([9, 1, 2]) == 0
    assert idx.match([]) == 0


def test_index_never_holds_more_than_its_capacity() -> None:
    idx = PrefixIndex(50)
    for start in range(0, 10_000, 7):
        idx.insert(list(range(start, start + 7)))
        assert len(idx) <= 50
    assert idx.evictions > 0


def test_memory_is_bounded_by_capacity_not_by_traffic() -> None:
    idx = PrefixIndex(64)

    def traffic(rounds: int, base: int) -> int:
        for i in range(rounds):
            idx.insert(list(range(base + i * 64, base + i * 64 + 64)))
        return sys.getsizeof(idx._blocks)

    after_200 = traffic(200, 0)
    after_2000_more = traffic(2000, 10**6)
    assert len(idx) == 64
    # the table may keep some slack for deleted slots, but it stops growing with traffic
    assert after_2000_more <= after_200


def test_eviction_is_least_recently_used_first() -> None:
    idx = PrefixIndex(6)
    idx.insert([1, 2])  # oldest
    idx.insert([3, 4])
    idx.insert([5, 6])
    idx.insert([1, 2])  # touched again: now newest
    idx.insert([7, 8])  # evicts [3, 4]
    assert idx.match([3]) == 0
    assert idx.match([1, 2]) == 2
    assert idx.match([5, 6]) == 2
    assert idx.match([7, 8]) == 2


def test_within_a_prompt_the_tail_is_evicted_before_the_head() -> None:
    idx = PrefixIndex(4)
    idx.insert([1, 2, 3, 4])
    idx.insert([9])  # one eviction: must be block 4 (the tail), keeping the prefix 1-2-3 matchable
    assert idx.match([1, 2, 3, 4]) == 3


def test_prompt_longer_than_capacity_keeps_its_head() -> None:
    idx = PrefixIndex(3)
    idx.insert([1, 2, 3, 4, 5])
    assert len(idx) == 3
    assert idx.match([1, 2, 3, 4, 5]) == 3


def test_generated_tokens_push_old_prefixes_out() -> None:
    idx = PrefixIndex(4)
    idx.insert([1, 2])
    idx.consume(3)
    assert len(idx) == 4
    assert idx.match([1, 2]) == 1  # the tail block 2 went first


def test_zero_capacity_index_stores_nothing() -> None:
    idx = PrefixIndex(0)
    idx.insert([1, 2, 3])
    assert len(idx) == 0 and idx.match([1]) == 0


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(-1)
