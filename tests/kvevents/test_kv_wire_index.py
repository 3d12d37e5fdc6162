"""vLLM's KV-event wire format decoded by the router, the block keys, and the one index."""

from __future__ import annotations

import msgspec
import pytest

from gpufleet.router.kvevents import keys, wire
from gpufleet.router.kvevents.index import KvIndex
from tests.kvevents import vllm_structs as v

ENC = msgspec.msgpack.Encoder()
BS = 4


def _stored(hashes, parent, tokens, **kw):
    fields = {"lora_id": None, "medium": "GPU", "lora_name": None, "group_idx": 0}
    fields.update(kw)
    return v.BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS, **fields)


def test_current_layout_decodes_every_event_and_field():
    batch = v.KVEventBatch(
        ts=1757500000.25,
        events=[
            _stored([0xDEADBEEF12345678, 0xFFFFFFFFFFFFFFFF], None, list(range(8))),
            _stored([bytes(range(32))], 0xFFFFFFFFFFFFFFFF, [128000, 65536, 255, 1], medium="CPU"),
            v.BlockRemoved(block_hashes=[7], medium="GPU", group_idx=0),
            v.AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    res = wire.decode_batch(ENC.encode(batch))
    assert (res.malformed, res.unknown_tags, res.ts, res.data_parallel_rank) == (0, 0, 1757500000.25, 0)
    s0, s1, rm, cl = res.events
    assert isinstance(s0, wire.BlockStored) and s0.block_hashes == [0xDEADBEEF12345678, 0xFFFFFFFFFFFFFFFF]
    assert s0.parent_block_hash is None and s0.token_ids == list(range(8)) and s0.block_size == BS
    assert s0.medium == "GPU" and s0.group_idx == 0
    assert isinstance(s1, wire.BlockStored) and s1.block_hashes == [bytes(range(32))] and s1.medium == "CPU"
    assert isinstance(rm, wire.BlockRemoved) and rm.block_hashes == [7]
    assert isinstance(cl, wire.AllBlocksCleared)


def test_router_encoding_is_what_vllm_structs_decode():
    ev = [wire.BlockStored([1, 2], None, list(range(8)), BS, None, "GPU", "ad", [("salt",), None])]
    payload = wire.encode_batch(ev, 3.5)
    got = msgspec.msgpack.Decoder(v.KVEventBatch).decode(payload)
    assert got.ts == 3.5 and got.data_parallel_rank == 0
    (s,) = got.events
    assert (s.block_hashes, s.lora_name, s.extra_keys) == ([1, 2], "ad", [("salt",), None])
    # and byte for byte what the engine's own encoder makes of the same values
    same = v.KVEventBatch(
        ts=3.5,
        events=[v.BlockStored([1, 2], None, list(range(8)), BS, None, "GPU", "ad", [("salt",), None])],
        data_parallel_rank=0,
    )
    assert ENC.encode(same) == payload


def test_legacy_array_layout_decodes():
    batch = v.LegacyKVEventBatch(
        ts=1.0,
        events=[
            v.LegacyBlockStored([5], None, [1, 2, 3, 4], BS, None),
            v.LegacyBlockRemoved([5]),
            v.LegacyAllBlocksCleared(),
        ],
    )
    res = wire.decode_batch(ENC.encode(batch))
    assert res.malformed == 0 and len(res.events) == 3
    assert res.events[0].block_hashes == [5] and res.events[0].medium is None
    assert res.events[1].block_hashes == [5]


def test_unknown_tags_and_malformed_events_are_counted_and_the_rest_applied():
    raw = [
        2.0,
        [
            {"type": "BlockMigrated", "block_hashes": [1], "destination": "x"},
            {
                "type": "BlockStored",
                "block_hashes": "nope",
                "parent_block_hash": None,
                "token_ids": [],
                "block_size": 4,
            },
            {"type": "BlockRemoved", "block_hashes": [9], "medium": None},
            17,
        ],
        0,
    ]
    res = wire.decode_batch(msgspec.msgpack.encode(raw))
    assert (res.unknown_tags, res.malformed) == (1, 2)
    assert [type(e) for e in res.events] == [wire.BlockRemoved]


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x93\x01", msgspec.msgpack.encode({"x": 1}), b"\xff" * 40])
def test_garbage_payloads_never_raise(payload):
    res = wire.decode_batch(payload)
    assert res.events == [] and res.malformed == 1


def test_block_keys_chain_like_the_prefix_they_name():
    ids = list(range(40))
    k = keys.block_keys(ids, BS)
    assert len(k) == 10 and len(set(k)) == 10
    assert keys.block_keys(ids[:9], BS) == k[:2]  # a partial block has no key
    assert keys.block_keys(ids[8:16], BS, parent=k[1]) == k[2:4]
    other = keys.block_keys([99] + ids[1:], BS)
    assert all(a != b for a, b in zip(k, other))  # a different first block changes every later key
    assert keys.block_keys(ids[:4], BS, extras=[("salt",)]) != k[:1]


def _index(n=3, cap=100):
    idx = KvIndex(BS, pending_ttl_s=0)
    for i in range(n):
        idx.add_replica(f"r{i}", cap, exact=True)
    return idx


def test_stored_events_are_keyed_by_tokens_not_engine_hashes():
    idx = _index()
    prompt = list(range(16))
    k = keys.block_keys(prompt, BS)
    # r0's engine hashes the blocks one way, r1's another: the keys agree anyway.
    idx.apply("r0", [wire.BlockStored([11, 12], None, prompt[:8], BS, None, "GPU", None)])
    idx.apply("r0", [wire.BlockStored([13], 12, prompt[8:12], BS, None, "GPU", None)])
    idx.apply("r1", [wire.BlockStored([b"a" * 32], None, prompt[:4], BS, None, None, None)])
    assert idx.match(k, ["r0", "r1", "r2"]) == [3, 1, 0]
    idx.apply("r0", [wire.BlockRemoved([12], "GPU")])
    assert idx.match(k, ["r0", "r1"]) == [1, 1]
    assert idx.holders(k[0]) == ["r0", "r1"]


def test_unknown_blocks_parents_and_bad_sizes_are_counted_not_applied():
    idx = _index()
    idx.apply("r0", [wire.BlockRemoved([404], "GPU")])
    idx.apply("r0", [wire.BlockStored([5], 404, [1, 2, 3, 4], BS, None, "GPU", None)])
    idx.apply("r0", [wire.BlockStored([6], None, [1, 2, 3], BS, None, "GPU", None)])
    idx.apply("r0", [wire.BlockStored([7], None, [1, 2, 3, 4, 5, 6, 7, 8], 8, None, "GPU", None)])
    c = idx.replicas["r0"].counters
    assert (c.unknown_blocks, c.unknown_parent, c.skipped) == (1, 1, 2)
    assert idx.blocks("r0") == 0
    idx.apply("nobody", [wire.AllBlocksCleared()])  # an unknown replica is ignored


def test_copies_media_and_clear():
    idx = _index()
    t = [1, 2, 3, 4]
    (k,) = keys.block_keys(t, BS)
    ev = wire.BlockStored([1], None, t, BS, None, "GPU", None)
    idx.apply("r0", [ev, ev])  # a second physical copy of the same block
    idx.apply("r0", [wire.BlockStored([1], None, t, BS, None, "CPU", None)])
    idx.apply("r0", [wire.BlockRemoved([1], "GPU")])
    assert idx.match([k], ["r0"]) == [1]  # one GPU copy left
    idx.apply("r0", [wire.BlockRemoved([1], "GPU")])
    assert idx.match([k], ["r0"]) == [0]
    assert idx.holders(k, "CPU") == ["r0"] and idx.replicas["r0"].blocks("CPU") == 1
    idx.apply("r0", [wire.AllBlocksCleared()])
    assert idx.holders(k, "CPU") == [] and idx.entries() == 0


def test_memory_is_bounded_by_declared_capacity():
    idx = _index(1, cap=8)
    ids = list(range(4 * 20))
    ks = keys.block_keys(ids, BS)
    idx.stored("r0", list(range(20)), ks)
    assert idx.entries() == 8 and idx.replicas["r0"].counters.overflows == 12


def test_match_walks_once_for_all_replicas():
    idx = _index(64, cap=10_000)
    ids = list(range(BS * 100))
    ks = keys.block_keys(ids, BS)
    for i in range(64):
        idx.stored(f"r{i}", [(i, j) for j in range(i)], ks[:i])  # replica i holds i leading blocks
    names = [f"r{i}" for i in range(64)]
    assert idx.match(ks, names) == list(range(64))
    assert idx.match(ks, ["r63", "nobody"]) == [63, 0]


def test_pending_blocks_count_until_confirmed_or_expired():
    idx = KvIndex(BS, pending_ttl_s=5.0)
    idx.add_replica("r0", 100, exact=True)
    ks = keys.block_keys(list(range(16)), BS)
    idx.expect("r0", ks, now=0.0)
    assert idx.match(ks, ["r0"], now=1.0) == [4]
    assert idx.match(ks, ["r0"], now=6.0) == [0]


def test_watchdog_finds_exact_replicas_silent_after_a_request():
    idx = KvIndex(BS)
    idx.add_replica("r0", 100, exact=True)
    idx.add_replica("r1", 100, exact=True)
    idx.expect("r0", [1, 2], now=10.0)
    idx.expect("r1", [1, 2], now=10.0)
    idx.heard("r1", 11.0)
    assert idx.silent(14.0, 5.0) == [] and idx.silent(16.0, 5.0) == ["r0"]


def test_sglang_shaped_batches_decode():
    # SGLang: the same tags, `attn_dp_rank` in the batch's third slot, None fields omitted,
    # extra fields of its own (cache_salt, session_id) that the router does not need.
    raw = [
        1.5,
        [
            {"type": "BlockStored", "block_hashes": [-5], "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
             "block_size": 4, "lora_id": None, "session_id": "s1"},
            {"type": "BlockRemoved", "block_hashes": [-5]},
        ],
        None,
    ]  # fmt: skip
    res = wire.decode_batch(msgspec.msgpack.encode(raw))
    assert res.malformed == 0 and len(res.events) == 2
    assert res.events[0].medium is None and res.events[0].block_hashes == [-5]
    idx = _index()
    idx.apply("r0", res.events[:1])
    assert idx.match(keys.block_keys([1, 2, 3, 4], BS), ["r0"]) == [1]
