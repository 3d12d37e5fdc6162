"""Mooncake trace replay: parsing, clear errors with line numbers, exact hashes, rate multiplier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.router.prefix import block_hashes
from gpufleet.router.sim import trace
from gpufleet.router.workloads.ceiling import ceiling_hit_ratio
from gpufleet.router.workloads.sampling import TextPool

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake"


def _line(ts: float, inp: int, out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids})


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    lines = [
        _line(0, 1200, 10, [0, 1, 2]),
        _line(0, 700, 5, [0, 3]),
        "",
        _line(1500, 1500, 20, [0, 1, 2]),
        _line(3000, 512, 1, [7]),
        _line(4000, 1030, 3, [0, 1, 9]),
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_a_valid_trace_parses_with_blank_lines_skipped(small_trace: Path) -> None:
    recs = trace.load_trace(small_trace)
    assert len(recs) == 5
    assert recs[0].hash_ids == (0, 1, 2) and recs[2].timestamp_ms == 1500 and recs[3].input_length == 512


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_line(10, 0, 5, []), "`input_length` must be an integer >= 1"),
        (_line(10, 600, 0, [1, 2]), "`output_length` must be an integer >= 1"),
        (_line(10, 600, 5, [1]), "expected ceil(600/512) = 2"),
        (_line(10, 600, 5, [1, "x"]), "`hash_ids` must be a list of integers"),
        ('{"input_length": 5, "output_length": 5, "hash_ids": [1]}', "`timestamp` must be a number"),
        (_line(-1, 5, 5, [1]), "`timestamp` must be a number"),
        (_line(1, 5, 5, [1]), "goes back in time"),
    ],
)
def test_a_malformed_line_is_reported_with_its_number(tmp_path: Path, bad: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(_line(0, 100, 5, [0]) + "\n" + _line(5, 100, 5, [0]) + "\n" + bad + "\n")
    with pytest.raises(trace.TraceError) as err:
        trace.load_trace(p)
    assert f"{p}:3:" in str(err.value) and message in str(err.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(trace.TraceError, match="cannot read trace"):
        trace.load_trace(tmp_path / "nope.jsonl")


def test_hashes_are_the_routers_hashes_of_the_replayed_text(small_trace: Path) -> None:
    recs = trace.load_trace(small_trace)
    wl = trace.trace_workload(recs, seed=3)
    pool = TextPool(3)
    for rec, req in zip(recs, wl.requests):
        text = trace.trace_text(rec, pool)
        assert len(text) == rec.input_length * 4
        assert req.features.block_hashes == block_hashes(text, 64)
        assert req.features.prompt_tokens == rec.input_length
        assert req.output_tokens == rec.output_length
    # equal hash ids share their prefix, a different first id shares nothing
    h = [r.features.block_hashes for r in wl.requests]
    assert h[2][: len(h[0])] == h[0] and h[1][:32] == h[0][:32] and h[1][32] != h[0][32]
    assert h[3][0] != h[0][0]


def test_rate_multiplier_divides_arrival_times(small_trace: Path) -> None:
    recs = trace.load_trace(small_trace)
    one = trace.trace_workload(recs)
    three = trace.trace_workload(recs, rate_multiplier=3.0)
    assert [r.arrival_s for r in one.requests] == [0.0, 0.0, 1.5, 3.0, 4.0]
    assert [r.arrival_s for r in three.requests] == pytest.approx([0.0, 0.0, 0.5, 1.0, 4.0 / 3])
    with pytest.raises(ValueError):
        trace.trace_workload(recs, rate_multiplier=0)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces is not present (only in the team checkout and CI)")
def test_shipped_conversation_trace_has_its_documented_reuse() -> None:
    recs = trace.load_trace(SHARED / "conversation_trace.jsonl")[:3000]
    wl = trace.trace_workload(recs)
    # The README gives 36.6 % repeated block references over the whole trace.
    assert 0.2 < ceiling_hit_ratio(wl.requests, 16) < 0.5
    assert all(r.features.block_hashes[:32] == wl.requests[0].features.block_hashes[:32] for r in wl.requests)
