"""The KV-event streams over real ZMQ sockets on 127.0.0.1: decoding, replay on a gap, reset, fallback."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest

from gpufleet.router.kvevents import keys, wire
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.kvevents.publisher import EventPublisher
from gpufleet.router.kvevents.subscriber import EventStreams, KvEventMetrics, StreamEndpoint
from tests.kvevents import vllm_structs as v

BS = 4
pytestmark = pytest.mark.timeout(60)


def _block(i: int) -> list[int]:
    return [i * 10 + j for j in range(BS)]


def _stored(h: int, parent: int | None) -> wire.BlockStored:
    return wire.BlockStored([h], parent, _block(h), BS, None, "GPU", None)


async def _until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, replay=True, silence_s=5.0):
        self.pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*" if replay else None)
        self.index = KvIndex(BS, pending_ttl_s=0)
        self.index.add_replica("r0", 1000)
        self.registry = CollectorRegistry()
        self.metrics = KvEventMetrics(self.registry, ["r0"])
        ep = StreamEndpoint(self.pub.endpoint, self.pub.replay_endpoint)
        self.streams = EventStreams(self.index, {"r0": ep}, self.metrics, silence_s=silence_s, replay_timeout_s=1.0)

    async def __aenter__(self):
        await self.pub.start()
        await self.streams.start()
        # PUB/SUB has no handshake: publish a probe until the subscriber has it (slow joiner).
        await self._join()
        return self

    async def _join(self):
        end = time.monotonic() + 5
        while self.streams.status["r0"].last_seq is None:
            if time.monotonic() > end:
                raise AssertionError("subscriber never joined")
            self.pub.publish([], time.time())
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc):
        await self.streams.stop()
        await self.pub.close()

    def keys_held(self, chain):
        ks = keys.block_keys([t for h in chain for t in _block(h)], BS)
        return self.index.match(ks, ["r0"])[0]

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels)


def test_events_over_zmq_build_the_index_and_mark_the_replica_exact():
    async def run():
        async with Rig() as rig:
            assert rig.index.exact("r0")
            assert rig.metric("gpufleet_router_kv_state", replica="r0", state="events") == 1
            rig.pub.publish([_stored(1, None), _stored(2, 1)], time.time())
            rig.pub.publish([_stored(3, 2)], time.time())
            await _until(lambda: rig.keys_held([1, 2, 3]) == 3)
            rig.pub.publish([wire.BlockRemoved([3], "GPU")], time.time())
            await _until(lambda: rig.keys_held([1, 2, 3]) == 2)

    asyncio.run(run())


def test_a_sequence_gap_is_filled_from_the_replay_endpoint():
    async def run():
        async with Rig() as rig:
            rig.pub.publish([_stored(1, None)], time.time())
            rig.pub.lose_next(2)  # buffered for replay, never sent live
            rig.pub.publish([_stored(2, 1)], time.time())
            rig.pub.publish([_stored(3, 2)], time.time())
            rig.pub.publish([_stored(4, 3)], time.time())
            await _until(lambda: rig.keys_held([1, 2, 3, 4]) == 4)
            st = rig.streams.status["r0"]
            assert st.resets == 0 and st.replays >= 2  # the start-up replay and the gap's
            assert rig.metric("gpufleet_router_kv_event_problems_total", replica="r0", kind="gap") == 1

    asyncio.run(run())


def test_a_gap_without_replay_resets_that_replicas_index():
    async def run():
        async with Rig(replay=False) as rig:
            rig.pub.publish([_stored(1, None)], time.time())
            await _until(lambda: rig.keys_held([1]) == 1)
            rig.pub.lose_next(1)
            rig.pub.publish([_stored(2, 1)], time.time())
            rig.pub.publish([_stored(7, None)], time.time())
            await _until(lambda: rig.keys_held([7]) == 1)
            assert rig.keys_held([1]) == 0  # forgotten: the lost batch might have removed it
            assert rig.streams.status["r0"].resets == 1
            assert rig.metric("gpufleet_router_kv_event_problems_total", replica="r0", kind="reset") == 1

    asyncio.run(run())


def test_an_engine_restarted_on_the_same_ports_resets_its_index_even_when_its_first_batches_are_missed():
    # The new engine counts from 0 again, and the SUB misses what it publishes while it
    # reconnects: a live sequence that goes back (not only one back to 0) is a restart, never a
    # run of duplicates to skip (which would keep the dead engine's blocks for as many batches).
    async def run():
        async with Rig() as rig:
            rig.pub.publish([_stored(1, None)], time.time())
            for _ in range(200):  # the old engine's sequence runs well ahead of what the new one loses
                rig.pub.publish([], time.time())
            await _until(lambda: rig.streams.status["r0"].last_seq == rig.pub.next_seq - 1)
            assert rig.keys_held([1]) == 1
            endpoint, replay = rig.pub.endpoint, rig.pub.replay_endpoint
            await rig.pub.close()
            rig.pub = EventPublisher(endpoint, replay)
            await rig.pub.start()
            while rig.keys_held([5]) == 0:  # the new engine's first batch, until one gets through
                rig.pub.publish([_stored(5, None)], time.time())
                await asyncio.sleep(0.01)
                assert rig.pub.next_seq < 150, "the router never took the new engine's batches"
            assert rig.keys_held([1]) == 0  # the dead engine's block is forgotten
            st = rig.streams.status["r0"]
            assert st.resets == 1
            assert rig.metric("gpufleet_router_kv_event_problems_total", replica="r0", kind="gap") is None

    asyncio.run(run())


def test_silence_after_a_request_falls_back_to_approximate_loudly(caplog):
    async def run():
        async with Rig(silence_s=0.2) as rig:
            rig.index.expect("r0", [1, 2, 3], rig.streams.clock())
            with caplog.at_level(logging.WARNING, logger="gpufleet.router.kvevents"):
                await _until(lambda: not rig.index.exact("r0"), timeout=3)
            assert rig.metric("gpufleet_router_kv_state", replica="r0", state="approximate") == 1
            assert rig.metric("gpufleet_router_kv_state", replica="r0", state="events") == 0
            assert rig.streams.admin_view("r0")["state"] == "approximate"
            lines = [r for r in caplog.records if "routing it approximately" in r.getMessage()]
            assert len(lines) == 1
            rig.pub.publish([_stored(1, None)], time.time())  # the stream speaks again
            await _until(lambda: rig.index.exact("r0"))
            assert rig.metric("gpufleet_router_kv_state", replica="r0", state="events") == 1
            assert b"gpufleet_router_kv_state" in generate_latest(rig.registry)

    asyncio.run(run())


def test_malformed_frames_and_payloads_are_counted_and_the_stream_goes_on():
    async def run():
        async with Rig(replay=False) as rig:
            seq = rig.pub.next_seq
            rig.pub.send_raw([b"kv-events", b"short"])
            rig.pub.send_raw([b"kv-events", b"\x00" * 3, b"x"])
            rig.pub.send_raw([b"kv-events", seq.to_bytes(8, "big"), b"\xc1garbage"])
            rig.pub._seq += 1  # that raw frame used the sequence number
            unknown = msgspec.msgpack.encode([1.0, [{"type": "BlockMigrated", "block_hashes": [1]}], 0])
            rig.pub.send_raw([b"kv-events", (seq + 1).to_bytes(8, "big"), unknown])
            rig.pub._seq += 1
            rig.pub.publish([_stored(1, None)], time.time())
            await _until(lambda: rig.keys_held([1]) == 1)
            st = rig.streams.status["r0"]
            assert st.malformed == 3 and st.unknown_tags == 1 and st.resets == 0

    asyncio.run(run())


def test_publisher_bytes_are_vllms_framing_and_structs():
    async def run():
        pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        await pub.start()
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.connect(pub.endpoint)
        try:
            frames = None
            for _ in range(100):
                pub.publish([_stored(1, None)], 5.0)
                if await sub.poll(50):
                    frames = await sub.recv_multipart()
                    break
            assert frames is not None
            topic, seq, payload = frames
            assert topic == b"kv-events" and len(seq) == 8
            batch = msgspec.msgpack.Decoder(v.KVEventBatch).decode(payload)
            assert batch.ts == 5.0 and batch.events[0].token_ids == _block(1)
            # replay as vLLM's ROUTER answers it: every buffered seq from the start, then END_SEQ
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(pub.replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            got = []
            while True:
                f = await asyncio.wait_for(dealer.recv_multipart(), 5)
                if f[1] == wire.END_SEQ:
                    assert f[2] == b""
                    break
                got.append(int.from_bytes(f[1], "big"))
            assert got == list(range(pub.next_seq))
            dealer.close(0)
        finally:
            sub.close(0)
            ctx.term()
            await pub.close()

    asyncio.run(run())


def test_a_replica_that_joins_later_is_subscribed_and_one_that_leaves_is_dropped():
    async def run():
        async with Rig() as rig:
            pub2 = EventPublisher("tcp://127.0.0.1:*")
            await pub2.start()
            try:
                rig.index.add_replica("r1", 1000)
                rig.metrics.set_state("r1", False)
                rig.streams.add("r1", StreamEndpoint(pub2.endpoint))
                end = time.monotonic() + 5
                while not rig.index.exact("r1"):
                    assert time.monotonic() < end, "the new replica's stream was never heard"
                    pub2.publish([_stored(1, None)], time.time())
                    await asyncio.sleep(0.05)
                rig.streams.remove("r1")
                rig.index.remove_replica("r1")
                assert "r1" not in rig.streams.status and rig.streams.admin_view("r1") is None
                pub2.publish([_stored(2, 1)], time.time())
                await asyncio.sleep(0.1)
                assert not rig.index.exact("r1") and rig.index.exact("r0")
            finally:
                await pub2.close()

    asyncio.run(run())
