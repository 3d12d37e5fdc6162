"""KV events of a lower tier, as vLLM's offloading connector publishes them (`medium="CPU"`, hashes
only): replica-sim sends them over real ZMQ in vLLM's wire format, the index keys them through the
GPU blocks they were copied from, and the prefix scorer credits the tier from them."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from gpufleet.router.kvevents import wire
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.replica import SimSettings
from gpufleet.router.replica.app import listen
from gpufleet.router.replica.sim import ReplicaSim
from gpufleet.router.sim import engine, fleet, metrics
from gpufleet.router.workloads import generators
from tests.kvevents import vllm_structs as v

pytestmark = pytest.mark.timeout(90)
BS = 4


def test_replica_sim_publishes_cpu_tier_stores_and_removals_like_vllms_offloading_connector(tmp_path):
    tok = v.tiny_tokenizer_files(tmp_path / "tok")

    async def run():
        sim = ReplicaSim(
            SimSettings(
                model="m",
                replica_id="r0",
                block_size_tokens=BS,
                kv_capacity_tokens=64,  # 16 blocks: the second prompt evicts the first's
                cpu_kv_capacity_tokens=16,  # 4 blocks: the CPU tier evicts too
                cpu_load_tokens_per_s=1e6,
                prefill_tokens_per_s=200_000,
                decode_tokens_per_s=2000,
                tokenizer=str(tok),
                kv_events_endpoint="tcp://127.0.0.1:0",
            )
        )
        runner, port = await listen(sim, "127.0.0.1", 0)
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.connect(sim.publisher.endpoint)
        await asyncio.sleep(0.3)
        try:
            async with aiohttp.ClientSession() as http:
                for words in (
                    [f"w{i}" for i in range(30)],
                    [f"w{i}" for i in range(100, 140)],
                    [f"w{i}" for i in range(200, 240)],
                ):
                    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": " ".join(words)}]}
                    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                        assert r.status == 200
            dec = msgspec.msgpack.Decoder(v.KVEventBatch)
            events, router_events = [], []
            while await sub.poll(500):
                _, _, payload = await sub.recv_multipart()
                events.extend(dec.decode(payload).events)  # vLLM's own structs
                router_events.extend(wire.decode_batch(payload).events)  # the router's decoder
            gpu_stored = {
                h for e in events if isinstance(e, v.BlockStored) and e.medium == "GPU" for h in e.block_hashes
            }
            cpu_stored = [e for e in events if isinstance(e, v.BlockStored) and e.medium == "CPU"]
            cpu_removed = [e for e in events if isinstance(e, v.BlockRemoved) and e.medium == "CPU"]
            assert cpu_stored and cpu_removed
            for e in cpu_stored:  # vLLM's offloading connector: no parent, no tokens, block size 0
                assert e.parent_block_hash is None and e.token_ids == [] and e.block_size == 0
                assert set(e.block_hashes) <= gpu_stored  # copies of blocks first stored on the GPU
            # The router's index keys them through the GPU blocks: it then holds the CPU tier.
            kv = KvIndex(BS)
            kv.add_replica("r0", 16, exact=True, tier_capacity_blocks=4)
            kv.apply("r0", router_events)
            assert 0 < kv.blocks("r0", "CPU") <= 4
            assert kv.replicas["r0"].counters.unknown_blocks == 0
        finally:
            sub.close(0)
            ctx.term()
            await runner.cleanup()
            await sim.stop()

    asyncio.run(run())


def test_a_tokenless_cpu_store_of_an_unknown_hash_is_counted_not_guessed():
    kv = KvIndex(16)
    kv.add_replica("r0", 10, exact=True, tier_capacity_blocks=100)
    kv.apply("r0", [wire.BlockStored([123], None, [], 0, None, "CPU", None)])
    assert kv.blocks("r0", "CPU") == 0 and kv.replicas["r0"].counters.unknown_blocks == 1


def test_events_mode_simulation_credits_the_cpu_tier_from_its_events():
    work = generators.mix(240, seed=3, rate_rps=40.0)
    tiered = fleet.uniform_fleet(3, kv_capacity_tokens=12_000, prefill_tokens_per_s=20_000, decode_tokens_per_s=200)
    tiered = tiered.with_kv_tiers(200_000, 400_000.0)
    s = metrics.summarize(engine.simulate(work, tiered, "cache_aware", seed=1, kv_state="events"))
    assert s.finished == len(work) and s.tier_hit_ratio > 0
