"""Data-parallel ranks: a replica with `data_parallel_size` N is subscribed on every rank's ports
(vLLM's `offset_endpoint_port`), and the ranks' events merge into the replica's one index entry."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest
from pydantic import ValidationError

from gpufleet.router import app as router_app
from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from gpufleet.router.kvevents import keys, ranks, wire
from gpufleet.router.kvevents.publisher import EventPublisher
from tests.kvevents import vllm_structs as v

pytestmark = pytest.mark.timeout(60)
BS = 4
TOKEN = "tok"


def _free_run(n: int) -> int:
    """A base port with the next n-1 ports free too (checked by binding them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        socks = []
        try:
            for p in range(base, base + n):
                x = socket.socket()
                socks.append(x)
                x.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for x in socks:
                x.close()
    raise AssertionError("no run of free ports")


def _block(i: int) -> list[int]:
    return [i * 10 + j for j in range(BS)]


def _stored(h: int, parent: int | None, first: int) -> wire.BlockStored:
    return wire.BlockStored([h], parent, _block(first), BS, None, "GPU", None)


def test_offset_endpoint_port_is_vllms_and_colliding_rank_ports_are_a_config_error() -> None:
    assert ranks.offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert ranks.offset_endpoint_port("tcp://10.0.0.1:5557", 3) == "tcp://10.0.0.1:5560"
    assert ranks.offset_endpoint_port("inproc://cache", 2) == "inproc://cache_dp2"
    with pytest.raises(ValueError, match="tcp://host:port"):
        ranks.offset_endpoint_port("ipc:///tmp/ev", 1)
    assert ranks.engine_data_parallel_size(["--data-parallel-size", "4"]) == 4
    assert ranks.engine_data_parallel_size(["-dp", "2", "--x"]) == 2
    assert ranks.engine_data_parallel_size(["--data-parallel-size=8"]) == 8
    assert ranks.engine_data_parallel_size(["--tensor-parallel-size", "2"]) == 1
    assert ranks.engine_data_parallel_size(["-dp", "2", "--data-parallel-size=3"]) == 3  # the last one wins
    assert ranks.engine_int_arg(["--max-num-batched-tokens", "x"], "--max-num-batched-tokens") is None
    rep = ReplicaConfig(
        id="r0", url="http://10.0.0.1:8000", deployment="d", model="m", pool="p", priority=0,
        kv_capacity_tokens=1000, max_model_len=4096, max_concurrent_requests=8, data_parallel_size=2,
    )  # fmt: skip
    # the defaults 5557 (events) and 5558 (replay): rank 1's events would bind rank 0's replay port
    with pytest.raises(ValidationError, match="replica r0: data_parallel_size 2: rank 1's events endpoint"):
        RouterConfig(fleet="t", settings=RouterSettings(kv_events={"enabled": True}), replicas=[rep])
    ok = RouterSettings(kv_events={"enabled": True, "port": 5557, "replay_port": 5567})
    assert RouterConfig(fleet="t", settings=ok, replicas=[rep]).replicas[0].data_parallel_size == 2


def test_every_ranks_stream_is_subscribed_and_merged_into_the_replicas_index(tmp_path) -> None:
    tok = v.tiny_tokenizer_files(tmp_path / "tok")
    pub_port = _free_run(4)
    replay_port = pub_port + 2

    async def run() -> None:
        pubs = [
            EventPublisher(f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}", data_parallel_rank=rank)
            for rank in range(2)
        ]
        assert [p.endpoint for p in pubs] == [f"tcp://127.0.0.1:{pub_port + r}" for r in range(2)]
        for p in pubs:
            await p.start()
        rep = ReplicaConfig(
            id="r0", url="http://127.0.0.1:1", deployment="d", model="m", pool="p", priority=0,
            kv_capacity_tokens=4096, max_model_len=4096, max_concurrent_requests=8, data_parallel_size=2,
            kv_events_endpoint=f"tcp://127.0.0.1:{pub_port}",
            kv_events_replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
        )  # fmt: skip
        settings = RouterSettings(
            block_size_tokens=BS,
            kv_events={"enabled": True, "tokenizer": str(tok), "pending_ttl_s": 0},
            health={"interval_s": 60},
        )
        app = router_app.create_app(RouterConfig(fleet="t", settings=settings, replicas=[rep]), admin_token=TOKEN)
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        router = app[router_app.ROUTER_KEY]
        index, streams = router.kv.index, router.kv.streams
        try:
            assert {
                k: (s.rank, s.endpoint.endpoint, s.endpoint.replay_endpoint) for k, s in streams.status.items()
            } == {
                "r0": (0, f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}"),
                "r0#dp1": (1, f"tcp://127.0.0.1:{pub_port + 1}", f"tcp://127.0.0.1:{replay_port + 1}"),
            }
            # rank 0 holds the chain 1 -> 2, rank 1 the chain 7 (engine hashes are per rank)
            end = time.monotonic() + 5
            while streams.status["r0"].last_seq is None or streams.status["r0#dp1"].last_seq is None:
                assert time.monotonic() < end, "a rank's stream was never heard"
                for p in pubs:
                    p.publish([], time.time())
                await asyncio.sleep(0.05)
            pubs[0].publish([_stored(1, None, 1), _stored(2, 1, 2)], time.time())
            pubs[1].publish([_stored(7, None, 7)], time.time())
            # rank 1 also stores rank 0's first block (same tokens: the same key), under its own hash
            pubs[1].publish([_stored(1, None, 1)], time.time())
            k12 = keys.block_keys(_block(1) + _block(2), BS)
            k7 = keys.block_keys(_block(7), BS)
            end = time.monotonic() + 5
            while not (index.match(k12, ["r0"])[0] == 2 and index.match(k7, ["r0"])[0] == 1):
                assert time.monotonic() < end, "the ranks' blocks did not merge into r0's index"
                await asyncio.sleep(0.02)
            assert index.exact("r0")
            # rank 0 evicts block 1: rank 1 still holds it, so the replica still does
            pubs[0].publish([wire.BlockRemoved([1], "GPU")], time.time())
            await asyncio.sleep(0.2)
            assert index.match(k12[:1], ["r0"])[0] == 1
            pubs[1].publish([wire.BlockRemoved([1], "GPU")], time.time())
            end = time.monotonic() + 5
            while index.match(k12[:1], ["r0"])[0] != 0:
                assert time.monotonic() < end, "a block evicted by every rank is still held"
                await asyncio.sleep(0.02)
            # a gap on rank 1 is filled from rank 1's own replay endpoint
            pubs[1].lose_next()
            pubs[1].publish([_stored(8, None, 8)], time.time())
            pubs[1].publish([_stored(9, None, 9)], time.time())
            k8, k9 = keys.block_keys(_block(8), BS), keys.block_keys(_block(9), BS)
            end = time.monotonic() + 5
            while not (index.match(k8, ["r0"])[0] == 1 and index.match(k9, ["r0"])[0] == 1):
                assert time.monotonic() < end, "rank 1's gap was not replayed"
                await asyncio.sleep(0.02)
            assert streams.status["r0#dp1"].replays >= 2 and streams.status["r0#dp1"].resets == 0
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    f"http://127.0.0.1:{port}/admin/replicas", headers={"Authorization": f"Bearer {TOKEN}"}
                ) as r:
                    row = (await r.json())["replicas"][0]["kv_state"]
            assert row["state"] == "events" and [x["rank"] for x in row["ranks"]] == [0, 1]
            assert row["batches"] == sum(x["batches"] for x in row["ranks"])
            # the replica leaves: both ranks' streams go
            router.replicas.replace([])
            assert streams.status == {} and "r0" not in index.replicas
        finally:
            await runner.cleanup()
            for p in pubs:
                await p.close()

    asyncio.run(run())


def test_a_request_is_pinned_to_the_rank_that_holds_its_prefix(tmp_path) -> None:
    """vLLM honours `X-data-parallel-rank`: the router names the rank whose events hold the prompt."""
    from aiohttp import web

    tok = v.tiny_tokenizer_files(tmp_path / "tok")
    pub_port = _free_run(2)
    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-data-parallel-rank"))
        await request.read()
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [], "usage": usage})

    async def ok(request: web.Request) -> web.Response:  # health checks and the engine-load scraper
        return web.Response(text="")

    async def run() -> None:
        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", chat)
        upstream.router.add_get("/health", ok)
        upstream.router.add_get("/metrics", ok)
        up_runner = web.AppRunner(upstream)
        await up_runner.setup()
        site = web.TCPSite(up_runner, "127.0.0.1", 0)
        await site.start()
        up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pubs = [EventPublisher(f"tcp://127.0.0.1:{pub_port}", data_parallel_rank=rank) for rank in range(2)]
        rep = ReplicaConfig(
            id="r0", url=f"http://127.0.0.1:{up_port}", deployment="d", model="m", pool="p", priority=0,
            kv_capacity_tokens=4096, max_model_len=4096, max_concurrent_requests=8, data_parallel_size=2,
            kv_events_endpoint=f"tcp://127.0.0.1:{pub_port}",
        )  # fmt: skip
        settings = RouterSettings(
            block_size_tokens=BS,
            kv_events={"enabled": True, "tokenizer": str(tok), "pending_ttl_s": 0, "replay_port": None},
            health={"interval_s": 60},
            prediction_cache={"enabled": False},
        )
        app = router_app.create_app(RouterConfig(fleet="t", settings=settings, replicas=[rep]), admin_token=TOKEN)
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        router = app[router_app.ROUTER_KEY]
        streams = router.kv.streams

        def body(words: list[str]) -> dict[str, object]:
            return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": " ".join(words)}]}

        prompts = {rank: [f"w{rank * 100 + i}" for i in range(40)] for rank in range(2)}
        try:
            end = time.monotonic() + 5
            while any(streams.status[k].last_seq is None for k in ("r0", "r0#dp1")):
                assert time.monotonic() < end, "a rank's stream was never heard"
                for p in pubs:
                    p.publish([], time.time())
                await asyncio.sleep(0.05)
            for rank, words in prompts.items():  # each rank stores one prompt's blocks
                ids = router.kv.tokenizer.encode_body(body(words))
                n = len(ids) // BS
                hashes = [1000 * (rank + 1) + i for i in range(n)]
                pubs[rank].publish([wire.BlockStored(hashes, None, ids[: n * BS], BS, None, "GPU", None)], time.time())
            end = time.monotonic() + 5
            while router.kv.rank_for("r0", keys.block_keys(router.kv.tokenizer.encode_body(body(prompts[1])), BS)) != 1:
                assert time.monotonic() < end, "rank 1's events never reached the rank index"
                await asyncio.sleep(0.02)
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                for words in (prompts[1], prompts[0], [f"w{400 + i}" for i in range(40)]):
                    async with http.post(url, json=body([*words, "the"])) as r:
                        assert r.status == 200
                async with http.post(url, json=body(prompts[1]), headers={"X-data-parallel-rank": "0"}) as r:
                    assert r.status == 200
            # rank 1's prefix -> 1, rank 0's -> 0, a prefix no rank holds -> vLLM balances, a client's own wins
            assert seen == ["1", "0", None, "0"]
        finally:
            await runner.cleanup()
            for p in pubs:
                await p.close()
            await up_runner.cleanup()

    asyncio.run(run())
