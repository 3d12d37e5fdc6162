"""The simulated replica honours `stop` and refuses `n` > 1 and `logprobs` in vLLM's error shape."""

from __future__ import annotations

import json

import httpx
import pytest

from gpufleet.router.replica import SimSettings, serve_in_thread


@pytest.fixture(scope="module")
def client():
    settings = SimSettings(
        model="m",
        replica_id="r0",
        kv_capacity_tokens=16_384,
        prefill_tokens_per_s=50_000.0,
        decode_tokens_per_s=5_000.0,
        max_running=8,
        max_model_len=4096,
    )
    with serve_in_thread(settings) as r, httpx.Client(base_url=r.url, timeout=10) as c:
        yield c


def _chat(**kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "tell me about the fleet"}], **kw}


def _text(doc: dict) -> str:
    return doc["choices"][0]["message"]["content"]


def test_stop_ends_the_answer_before_the_stop_sequence(client):
    free = client.post("/v1/chat/completions", json=_chat(max_tokens=40, ignore_eos=True)).json()
    words = _text(free).split()
    assert len(words) == 40
    stop = words[5]
    # where the stop sequence first shows in the text (it may start inside an earlier word)
    acc, cut = "", None
    for i, w in enumerate(words):
        acc += w + " "
        if stop in acc:
            cut = i
            break
    got = client.post("/v1/chat/completions", json=_chat(max_tokens=40, ignore_eos=True, stop=[stop])).json()
    assert got["choices"][0]["finish_reason"] == "stop"
    assert stop not in _text(got)
    assert _text(got).split() == words[:cut]
    assert got["usage"]["completion_tokens"] == cut


def test_stop_is_honoured_when_streaming(client):
    free = _text(client.post("/v1/chat/completions", json=_chat(max_tokens=30, ignore_eos=True)).json())
    stop = free.split()[3]
    body = _chat(max_tokens=30, ignore_eos=True, stop=stop, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert stop not in text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_a_stop_that_never_appears_changes_nothing(client):
    free = client.post(
        "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 20, "ignore_eos": True}
    ).json()
    same = client.post(
        "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 20, "ignore_eos": True, "stop": ["\u2603"]}
    ).json()
    assert same["choices"][0]["text"] == free["choices"][0]["text"]
    assert same["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 7}, "stop"),
    ],
)
def test_unsupported_or_bad_sampling_params_are_refused_in_vllms_error_shape(client, extra, param):
    r = client.post("/v1/chat/completions", json=_chat(**extra))
    assert r.status_code == 400
    err = r.json()
    assert err["object"] == "error" and err["code"] == 400 and err["type"] == "BadRequestError"
    assert err["param"] == param and err["message"]


def test_null_or_default_params_are_accepted(client):
    for extra in ({"n": 1}, {"n": None}, {"logprobs": False}, {"logprobs": None}, {"stop": None}, {"stop": []}):
        assert client.post("/v1/chat/completions", json=_chat(max_tokens=4, **extra)).status_code == 200, extra
