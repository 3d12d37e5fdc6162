"""Precise mode in the router's config: off without a tokenizer (said once), on with one."""

from __future__ import annotations

import logging

from gpufleet.router import app as router_app
from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from gpufleet.router.kvevents import keys
from gpufleet.router.types import RequestFeatures
from tests.kvevents.vllm_structs import tiny_tokenizer_files


def _cfg(kv_events: dict) -> RouterConfig:
    reps = [
        ReplicaConfig(
            id=f"r{i}",
            url=f"http://10.0.0.{i + 1}:8000",
            deployment="d",
            model="m",
            pool="p",
            priority=0,
            kv_capacity_tokens=16_000,
            max_model_len=8192,
            max_concurrent_requests=8,
        )
        for i in range(2)
    ]
    return RouterConfig(fleet="t", settings=RouterSettings(kv_events=kv_events, block_size_tokens=4), replicas=reps)


def test_without_a_tokenizer_precise_mode_is_off_with_one_clear_line(caplog):
    with caplog.at_level(logging.WARNING, logger="gpufleet.router.kvevents"):
        r = router_app.Router(_cfg({"enabled": True}), admin_token="t")
    assert r.kv is None
    msgs = [x.getMessage() for x in caplog.records]
    assert len(msgs) == 1 and "no tokenizer" in msgs[0] and "approximate" in msgs[0]


def test_a_missing_tokenizer_file_is_named(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="gpufleet.router.kvevents"):
        r = router_app.Router(_cfg({"enabled": True, "tokenizer": str(tmp_path / "nope.json")}), admin_token="t")
    assert r.kv is None and "nope.json" in caplog.records[0].getMessage()


def test_with_a_tokenizer_the_prefix_scorer_reads_the_events_index(tmp_path):
    tok_dir = tiny_tokenizer_files(tmp_path / "tok")
    r = router_app.Router(_cfg({"enabled": True, "tokenizer": str(tok_dir)}), admin_token="t")
    assert r.kv is not None
    ep = r.kv.streams.status["r1"].endpoint
    assert (ep.endpoint, ep.replay_endpoint) == ("tcp://10.0.0.2:5557", "tcp://10.0.0.2:5558")
    # the tokens and keys of a chat body, as the chat template renders it
    body = {"messages": [{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7"}]}
    ids = r.kv.tokenizer.encode_body(body)
    assert ids == r.kv.tokenizer.encode_text("<s> <|user|> w1 w2 w3 w4 w5 w6 w7 <|assistant|>")
    import asyncio

    f = asyncio.run(r.kv.refine(body, RequestFeatures(model="m", prompt_tokens=1)))
    assert f.prompt_tokens == len(ids) == 10 and f.block_hashes == tuple(keys.block_keys(ids, 4))
    # r1 holds the first block by its events: the scorer sees it only once r1's stream is exact
    r.kv.index.stored("r1", [b"x"], list(f.block_hashes[:1]))
    state = [rep for rep in r.replicas]
    assert r.policy.choose(f, state).matched_blocks == 0
    r.kv.index.set_exact("r1", True)
    d = r.policy.choose(f, state)
    assert d.replica is not None and d.replica.id == "r1" and d.matched_blocks == 1


def test_membership_changes_reach_the_events_index_and_streams(tmp_path):
    tok_dir = tiny_tokenizer_files(tmp_path / "tok")
    cfg = _cfg({"enabled": True, "tokenizer": str(tok_dir)})
    r = router_app.Router(cfg, admin_token="t")
    new = cfg.replicas[1].model_copy(
        update={"id": "r9", "url": "http://10.0.0.9:8000", "kv_events_endpoint": "tcp://10.0.0.9:6000"}
    )
    r.replicas.replace([cfg.replicas[0], new])
    assert set(r.kv.streams.status) == {"r0", "r9"} and set(r.kv.index.replicas) == {"r0", "r9"}
    assert r.kv.streams.status["r9"].endpoint.endpoint == "tcp://10.0.0.9:6000"


def test_a_tokenizer_failure_routes_on_the_estimate(tmp_path, caplog):
    import asyncio

    tok_dir = tiny_tokenizer_files(tmp_path / "tok")
    r = router_app.Router(_cfg({"enabled": True, "tokenizer": str(tok_dir)}), admin_token="t")

    def boom(body, scope=""):
        raise RuntimeError("tokenizer crashed")

    r.kv.tokenizer.prepare = boom  # type: ignore[method-assign]
    f0 = RequestFeatures(model="m", block_hashes=(1, 2), prompt_tokens=9)
    f = asyncio.run(r.kv.refine({"prompt": "w1"}, f0))
    assert f.block_hashes == (1, 2) and f.prompt_tokens == 9
