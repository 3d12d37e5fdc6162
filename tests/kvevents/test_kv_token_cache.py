"""Precise mode's token cache: the cached path gives the ids of encoding the whole prompt, per tenant, bounded."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from gpufleet.router.kvevents import keys, runtime
from gpufleet.router.kvevents.tokencache import Lookup, TokenCache
from gpufleet.router.kvevents.tokenize import PromptTokenizer
from gpufleet.router.types import RequestFeatures

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<s>"]
ALPHABET = "abcdefgh ijk lmn\n\t  .,!?'é日本語0123"
CORPUS = ["hello world it's a test " * 3, "abc def ghi jkl mno\n\n", "日本語 é 123 4567 ,.!?", "  x  y\tz "]


def _save(tok: Tokenizer, d: Path, template: str = CHATML) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    return d


def byte_level_bpe(d: Path) -> Path:
    """GPT-2/Qwen-style: byte-level BPE, regex pre-tokenizer, ChatML markers as special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL))
    return _save(tok, d)


def metaspace_bpe(d: Path) -> Path:
    """Llama-2/SentencePiece-style: NFKC, a `▁` prepended to the first piece only, BOS added to completions."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=[*SPECIAL, "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _save(tok, d)


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    make = byte_level_bpe if request.param == "byte_level" else metaspace_bpe
    return make(tmp_path_factory.mktemp(request.param))


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(ALPHABET, max_size=400)}
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=messages, turns=st.integers(1, 4))
def test_the_cached_path_gives_the_ids_of_encoding_the_whole_prompt(tokenizer_dir, conversation, turns):
    cached = PromptTokenizer(tokenizer_dir, cache_tokens=100_000)
    cached._chunked.min_chunk_chars = 0  # cut at every marker: the most cuts, the hardest case
    whole = PromptTokenizer(tokenizer_dir, cache_tokens=0)
    # the conversation grows turn by turn, as a multi-turn client sends it: later turns hit the cache
    for n in range(1, turns + 1):
        body = {"messages": conversation[: max(1, len(conversation) * n // turns)]}
        text = whole.render_chat(body)
        expected = whole.encode_text(text)
        assert cached.encode_body(body, "t") == expected
        assert whole.encode_body(body) == expected
        assert keys.block_keys(cached.token_ids(body, "t"), 4) == keys.block_keys(expected, 4)
    cached.close()
    whole.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(ALPHABET + "<|im_start|><|im_end|>", max_size=300))
def test_a_completion_prompt_gets_the_post_processors_special_tokens_around_its_cached_ids(tokenizer_dir, prompt):
    cached = PromptTokenizer(tokenizer_dir, cache_tokens=100_000)
    cached._chunked.min_chunk_chars = 0
    expected = cached.encode_text(prompt, add_special_tokens=True)
    assert cached.encode_body({"prompt": prompt}, "t") == expected
    assert cached.encode_body({"prompt": prompt}, "t") == expected  # again, from the cache
    cached.close()


def _conversation(turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "you are a helpful test. " * 40}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question {i}: " + "abc def ghi " * 30})
        msgs.append({"role": "assistant", "content": f"answer {i}: " + "jkl mno " * 30})
    return msgs


def test_a_next_turn_encodes_only_its_new_messages(tmp_path):
    tok = PromptTokenizer(byte_level_bpe(tmp_path), cache_tokens=100_000)
    assert tok.cache is not None
    conv = _conversation(3)
    first = tok.token_ids({"messages": conv}, "t")
    assert tok.cache.misses == len(first) and tok.cache.hits == 0
    nxt = conv + [{"role": "user", "content": "one more: " + "pq rs " * 30}]
    new_part = tok.encode_text("<|im_start|>user\none more: " + "pq rs " * 30 + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.token_ids({"messages": nxt}, "t")
    assert list(ids) == tok.encode_text(tok.render_chat({"messages": nxt}))
    # the old turns came from the cache; what was encoded is the new message, the generation
    # prompt and the short chunk the last turn's generation prompt was merged into
    encoded = tok.cache.misses - len(first)
    assert len(new_part) <= encoded < len(new_part) + 40 and tok.cache.hits == len(ids) - encoded


def test_token_caches_never_cross_tenants(tmp_path):
    tok = PromptTokenizer(byte_level_bpe(tmp_path), cache_tokens=100_000)
    assert tok.cache is not None
    body = {"messages": _conversation(2)}
    a = tok.token_ids(body, "tenant-a")
    b = tok.token_ids(body, "tenant-b")
    assert list(a) == list(b)
    assert tok.cache.hits == 0 and tok.cache.misses == 2 * len(a)  # b encoded all of it again
    tok.token_ids(body, "tenant-a")
    assert tok.cache.hits == len(a)


def test_the_cache_is_bounded_in_tokens_and_drops_the_least_recently_used():
    from array import array

    c = TokenCache(max_tokens=10)
    c.put("t", b"a", array("I", range(4)))
    c.put("t", b"b", array("I", range(4)))
    assert c.get("t", b"a") is not None  # a is now the most recent
    c.put("t", b"c", array("I", range(4)))
    assert c.tokens == 8 and c.get("t", b"b") is None and c.get("t", b"a") is not None
    c.put("t", b"huge", array("I", range(11)))  # larger than the cache: not kept
    assert c.get("t", b"huge") is None and c.tokens == 8


def test_a_tokenizer_json_truncation_does_not_cut_the_prompt(tmp_path):
    d = byte_level_bpe(tmp_path)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length=8)
    tok.save(str(d / "tokenizer.json"))
    pt = PromptTokenizer(d, cache_tokens=0)
    assert len(pt.encode_body({"prompt": "hello world it's a test " * 10})) > 8


# -- the deadline ---------------------------------------------------------------------------------


def kv_config(tok_dir: Path, **kv_events: object) -> RouterConfig:
    rep = ReplicaConfig(
        id="r0",
        url="http://10.0.0.1:8000",
        deployment="d",
        model="m",
        pool="p",
        priority=0,
        kv_capacity_tokens=16_000,
        max_model_len=8192,
        max_concurrent_requests=8,
    )
    s = RouterSettings(block_size_tokens=4, kv_events={"enabled": True, "tokenizer": str(tok_dir), **kv_events})
    return RouterConfig(fleet="t", settings=s, replicas=[rep])


def _kv(tok_dir: Path, deadline_s: float, registry: CollectorRegistry | None = None) -> runtime.KvEvents:
    kv = runtime.build(kv_config(tok_dir, tokenize_deadline_s=deadline_s), registry or CollectorRegistry())
    assert kv is not None
    return kv


def test_a_slow_tokenization_is_routed_on_the_estimate_past_the_deadline_and_counted(tmp_path):
    kv = _kv(byte_level_bpe(tmp_path), deadline_s=0.05)
    tok = kv.tokenizer
    release = threading.Event()
    real = tok._chunked.encode_many

    def slow(texts, *, special=False):
        if threading.current_thread() is not threading.main_thread():
            release.wait(5)  # only the pool's encodes are slow
        return real(texts, special=special)

    tok._chunked.encode_many = slow  # type: ignore[method-assign]
    body = {"messages": _conversation(2)}
    f0 = RequestFeatures(model="m", block_hashes=(1, 2), prompt_tokens=9)

    async def go() -> tuple[RequestFeatures, RequestFeatures]:
        f = await kv.refine(body, f0)
        # the other requests are not held: a short body is tokenized inline meanwhile
        g = await kv.refine({"prompt": "hello"}, RequestFeatures(model="m", prompt_tokens=1))
        release.set()
        return f, g

    tok.inline_chars = 100  # the conversation's text goes to the pool, "hello" does not
    f, g = asyncio.run(go())
    assert f.block_hashes == (1, 2) and f.prompt_tokens == 9
    assert g.prompt_tokens == len(tok.encode_body({"prompt": "hello"}))
    assert kv.fallbacks.labels("deadline")._value.get() == 1
    # the thread finished after the deadline: the next turn finds the conversation in the cache
    tok._pool.shutdown(wait=True)
    assert tok.cache is not None
    hits = tok.cache.hits
    n = len(tok.token_ids(body))
    assert tok.cache.hits - hits == n
    tok.close()


def test_with_every_tokenizer_thread_busy_a_long_body_is_not_queued(tmp_path):
    kv = _kv(byte_level_bpe(tmp_path), deadline_s=5)
    kv.tokenizer.inline_chars = 0
    kv.tokenizer.in_flight = 2 * kv.tokenizer.threads
    f0 = RequestFeatures(model="m", block_hashes=(7,), prompt_tokens=3)
    f = asyncio.run(kv.refine({"prompt": "hello"}, f0))
    assert f.block_hashes == (7,) and kv.fallbacks.labels("busy")._value.get() == 1
    kv.tokenizer.close()


def test_a_cached_history_is_not_sent_to_the_thread_pool(tmp_path):
    kv = _kv(byte_level_bpe(tmp_path), deadline_s=5)
    tok = kv.tokenizer
    conv = _conversation(4)
    tok.token_ids({"messages": conv}, "t")
    tok.inline_chars = 1_000  # the whole body is longer, its new message shorter
    nxt = {"messages": [*conv, {"role": "user", "content": "and then?"}]}
    job = tok.prepare(nxt, "t")
    assert isinstance(job, Lookup) and 0 < job.pending_chars <= 1_000
    tok.in_flight = 2 * tok.threads  # a pool hop would be refused as busy
    f = asyncio.run(kv.refine(nxt, RequestFeatures(model="m", prompt_tokens=1), tenant="t"))
    assert f.prompt_tokens == len(tok.encode_text(tok.render_chat(nxt)))
    assert kv.fallbacks.labels("busy")._value.get() == 0
    tok.in_flight = 0
    tok.close()


def test_the_token_cache_is_on_the_metrics_page(tmp_path):
    from prometheus_client import generate_latest

    reg = CollectorRegistry()
    kv = _kv(byte_level_bpe(tmp_path), deadline_s=1, registry=reg)
    body = {"messages": _conversation(1)}
    assert asyncio.run(kv.refine(body, RequestFeatures(model="m", prompt_tokens=1))).block_hashes
    asyncio.run(kv.refine(body, RequestFeatures(model="m", prompt_tokens=1)))
    page = generate_latest(reg).decode()
    assert 'gpufleet_router_kv_token_cache_tokens_total{result="hit"}' in page
    assert "gpufleet_router_kv_token_cache_size_tokens" in page
    assert 'gpufleet_router_kv_tokenize_fallbacks_total{reason="deadline"} 0.0' in page
    kv.tokenizer.close()
