"""`replica-sim` publishes vLLM KV events from its real block bookkeeping; the router routes from them."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from gpufleet.router import app as router_app
from gpufleet.router.config import RouterConfig, RouterSettings
from gpufleet.router.kvevents import keys
from gpufleet.router.replica.app import listen
from tests.kvevents import vllm_structs as v
from tests.kvevents.sims import chat_body, make_sim, replica_config

pytestmark = pytest.mark.timeout(90)
BS = 4


def test_replica_sim_events_decode_with_vllms_structs_and_name_its_blocks(tmp_path):
    tok = v.tiny_tokenizer_files(tmp_path / "tok")

    async def run():
        sim = make_sim(tok, "r0", kv_capacity_tokens=64)  # 16 blocks: the second prompt evicts
        runner, port = await listen(sim, "127.0.0.1", 0)
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.connect(sim.publisher.endpoint)
        await asyncio.sleep(0.3)  # PUB/SUB slow joiner
        try:
            async with aiohttp.ClientSession() as http:
                for words in ([f"w{i}" for i in range(30)], [f"w{i}" for i in range(100, 140)]):
                    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body(words)) as r:
                        assert r.status == 200
            dec = msgspec.msgpack.Decoder(v.KVEventBatch)
            stored, removed, seqs = [], [], []
            while await sub.poll(500):
                topic, seq, payload = await sub.recv_multipart()
                assert topic == b"kv-events"
                seqs.append(int.from_bytes(seq, "big"))
                for ev in dec.decode(payload).events:
                    (stored if isinstance(ev, v.BlockStored) else removed).append(ev)
            assert seqs == list(range(len(seqs))) and seqs
            assert removed, "the second prompt must evict blocks of the first"
            # The first BlockStored names the first prompt's leading blocks with its real tokens.
            ids = sim.tokenizer.encode_body(chat_body([f"w{i}" for i in range(30)]))
            first = stored[0]
            assert first.parent_block_hash is None and first.block_size == BS and first.medium == "GPU"
            assert first.token_ids == ids[: len(first.block_hashes) * BS]
            chained = [e for e in stored if e.parent_block_hash is not None]
            assert all(len(e.token_ids) == len(e.block_hashes) * BS for e in stored) and chained is not None
        finally:
            sub.close(0)
            ctx.term()
            await runner.cleanup()

    asyncio.run(run())


def test_router_routes_a_shared_prefix_from_replica_sim_events(tmp_path):
    tok = v.tiny_tokenizer_files(tmp_path / "tok")

    async def run():
        sims = [make_sim(tok, f"r{i}") for i in range(3)]
        served = [await listen(s, "127.0.0.1", 0) for s in sims]
        reps = [replica_config(f"r{i}", s, port) for i, (s, (_, port)) in enumerate(zip(sims, served))]
        settings = RouterSettings(block_size_tokens=BS, kv_events={"enabled": True, "tokenizer": str(tok)})
        app = router_app.create_app(RouterConfig(fleet="t", settings=settings, replicas=reps), admin_token="tok")
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        router = app[router_app.ROUTER_KEY]
        try:
            prefix = [f"w{i}" for i in range(60)]
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                async with http.post(url, json=chat_body(prefix)) as r:
                    assert r.status == 200
                # the engine's events reach the router and make the replica exact
                end = time.monotonic() + 10
                holder = None
                while holder is None and time.monotonic() < end:
                    for s in sims:
                        if s.engine.cache.cached_blocks and router.kv.index.exact(s.settings.replica_id):
                            holder = s.settings.replica_id
                    await asyncio.sleep(0.05)
                assert holder is not None
                ids = router.kv.tokenizer.encode_body(chat_body(prefix))
                ks = keys.block_keys(ids, BS)
                assert router.kv.index.match(ks, [holder])[0] >= len(ks) - 1
                # later turns that extend the prefix go where its blocks are, with cache hits
                for turn in range(4):
                    async with http.post(url, json=chat_body([*prefix, f"w{200 + turn}", "the"])) as r:
                        assert r.status == 200
                        usage = (await r.json())["usage"]
                        assert usage["prompt_tokens_details"]["cached_tokens"] >= 56
                async with http.get(
                    f"http://127.0.0.1:{port}/admin/replicas", headers={"Authorization": "Bearer tok"}
                ) as r:
                    rows = {row["id"]: row for row in (await r.json())["replicas"]}
                assert rows[holder]["kv_state"]["state"] == "events" and rows[holder]["kv_state"]["blocks"] > 0
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    text = await r.text()
                assert f'gpufleet_router_kv_state{{replica="{holder}",state="events"}} 1.0' in text
        finally:
            await runner.cleanup()
            for r, _ in served:
                await r.cleanup()

    asyncio.run(run())


def test_replica_sim_cli_refuses_events_without_a_tokenizer():
    from typer.testing import CliRunner

    from gpufleet.infra.cli import app

    r = CliRunner().invoke(app, ["replica-sim", "--port", "0", "--kv-events-port", "0"])
    assert r.exit_code == 1 and "--kv-events-port needs --tokenizer" in r.output


def test_replica_sim_cli_names_a_missing_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from gpufleet.infra.cli import app

    r = CliRunner().invoke(app, ["replica-sim", "--port", "0", "--tokenizer", str(tmp_path / "none.json")])
    assert r.exit_code == 1 and "none.json" in r.output
