"""Tenant isolation in precise mode: the events index keys blocks with vLLM's `cache_salt`, so one
tenant's cached blocks never credit another tenant's request, while each tenant's own blocks hit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from gpufleet.router import app as router_app
from gpufleet.router.config import RouterConfig, RouterSettings
from gpufleet.router.kvevents import keys, wire
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.replica import SimSettings
from gpufleet.router.replica.app import listen
from gpufleet.router.replica.sim import ReplicaSim
from tests.kvevents import vllm_structs as v
from tests.kvevents.sims import chat_body, make_sim, replica_config

pytestmark = pytest.mark.timeout(90)
BS = 4
SALT = "tenant-a-salt"


def _vllm_stored(ids: list[int], extra_keys: list[Any] | None) -> bytes:
    n = len(ids) // BS
    ev = v.BlockStored(list(range(100, 100 + n)), None, ids[: n * BS], BS, None, "GPU", None, extra_keys)
    return msgspec.msgpack.encode(v.KVEventBatch(ts=1.0, events=[ev]))


def test_block_stored_extra_keys_give_the_salted_prompt_keys_and_no_other() -> None:
    ids = list(range(1, 17))  # 4 blocks
    index = KvIndex(BS, pending_ttl_s=0)
    index.add_replica("r0", 100, exact=True)
    # vLLM: one entry per block, cache_salt only in the first block's extra keys
    index.apply("r0", wire.decode_batch(_vllm_stored(ids, [(SALT,), None, None, None])).events, 1.0)
    assert index.match(keys.prompt_keys(ids, BS, SALT), ["r0"])[0] == 4
    assert index.match(keys.prompt_keys(ids, BS, "tenant-b-salt"), ["r0"])[0] == 0
    assert index.match(keys.prompt_keys(ids, BS), ["r0"])[0] == 0  # an anonymous request either


def test_an_engine_without_extra_keys_gives_salted_requests_no_credit() -> None:
    """vLLM releases before `extra_keys` (the limitation in docs/router.md): no credit, never a wrong one."""
    ids = list(range(1, 17))
    index = KvIndex(BS, pending_ttl_s=0)
    index.add_replica("r0", 100, exact=True)
    index.apply("r0", wire.decode_batch(_vllm_stored(ids, None)).events, 1.0)
    assert index.match(keys.prompt_keys(ids, BS, SALT), ["r0"])[0] == 0
    assert index.match(keys.prompt_keys(ids, BS), ["r0"])[0] == 4


def test_tenant_b_gets_no_credit_for_tenant_as_blocks_in_events_mode(tmp_path) -> None:
    tok = v.tiny_tokenizer_files(tmp_path / "tok")
    prefix = [f"w{i}" for i in range(60)]

    async def run() -> None:
        sims = [make_sim(tok, f"r{i}") for i in range(2)]
        served = [await listen(s, "127.0.0.1", 0) for s in sims]
        reps = [replica_config(f"r{i}", s, port) for i, (s, (_, port)) in enumerate(zip(sims, served))]
        # Default tenant isolation (kv); no pending credit: every hit below comes from the events.
        settings = RouterSettings(
            block_size_tokens=BS, kv_events={"enabled": True, "tokenizer": str(tok), "pending_ttl_s": 0}
        )
        assert settings.tenant_isolation == "kv"
        env = {settings.tenant.salt_key_env: "k" * 32}
        app = router_app.create_app(RouterConfig(fleet="t", settings=settings, replicas=reps), environ=env)
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        router = app[router_app.ROUTER_KEY]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        a = {"Authorization": "Bearer key-of-tenant-a"}
        b = {"Authorization": "Bearer key-of-tenant-b"}

        def salted_keys(headers: dict[str, str], words: list[str]) -> list[int]:
            tenant = router.proxy.tenants.tenant({k.lower(): x for k, x in headers.items()}, "127.0.0.1")
            ids = router.kv.tokenizer.encode_body(chat_body(words))
            return keys.prompt_keys(ids, BS, router.proxy.tenants.salt(tenant))

        def credited() -> float:
            reg = router.metrics.registry
            return sum(
                reg.get_sample_value("gpufleet_router_predicted_prefix_hit_tokens_total", {"replica": r.id}) or 0
                for r in reps
            )

        async def wait_held(ks: list[int], rid: str) -> None:
            end = time.monotonic() + 10
            while router.kv.index.match(ks, [rid])[0] < len(ks) - 1:
                assert time.monotonic() < end, "the engine's salted blocks never reached the index"
                await asyncio.sleep(0.05)

        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(url, json=chat_body(prefix), headers=a) as r:
                    assert r.status == 200
                    holder = r.headers["x-gpufleet-replica"]
                ka = salted_keys(a, prefix)
                await wait_held(ka, holder)
                assert router.kv.index.exact(holder)
                # the index holds A's blocks under A's salt only
                assert router.kv.index.match(salted_keys(b, prefix), [holder])[0] == 0
                ids = router.kv.tokenizer.encode_body(chat_body(prefix))
                assert router.kv.index.match(keys.prompt_keys(ids, BS), [holder])[0] == 0

                before = credited()
                async with http.post(url, json=chat_body([*prefix, "b1"]), headers=b) as r:
                    assert r.status == 200
                    b_holder = r.headers["x-gpufleet-replica"]
                    usage = (await r.json())["usage"]
                assert credited() == before  # no credit for A's blocks
                assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # and the engine shares none

                before = credited()
                async with http.post(url, json=chat_body([*prefix, "a2"]), headers=a) as r:
                    assert r.headers["x-gpufleet-replica"] == holder
                    assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] >= 56
                assert credited() - before >= 56  # A's own blocks still hit

                await wait_held(salted_keys(b, prefix), b_holder)
                before = credited()
                async with http.post(url, json=chat_body([*prefix, "b2"]), headers=b) as r:
                    assert r.headers["x-gpufleet-replica"] == b_holder
                    assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] >= 56
                assert credited() - before >= 56  # and so do B's
        finally:
            await runner.cleanup()
            for r, _ in served:
                await r.cleanup()

    asyncio.run(run())


def test_replica_sim_refuses_a_cache_salt_that_is_not_a_non_empty_string(tmp_path) -> None:
    from gpufleet.router.replica.sim import BadRequest

    sim = ReplicaSim(SimSettings(model="m", replica_id="r0"))
    with pytest.raises(BadRequest, match="cache_salt"):
        sim.parse({**chat_body(["w1"]), "cache_salt": ""}, "chat")
    salted = sim.parse({**chat_body(["w1"] * 80), "cache_salt": "s"}, "chat").prompt
    plain = sim.parse(chat_body(["w1"] * 80), "chat").prompt
    assert salted.hashes and not set(salted.hashes) & set(plain.hashes)
