"""`gpufleet bench sim`: table, JSON, plot, goals; one clear line for every user mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.infra.cli import app

FLEET = Path(__file__).resolve().parents[2] / "bench" / "fleet.yaml"


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["bench", "sim", *args])


def test_bench_sim_prints_a_table_writes_json_and_a_plot_and_states_the_goals(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = run(
        "--fleet",
        str(FLEET),
        "--deployment",
        "qwen-32b",
        "--workload",
        "shared_prompts",
        "--requests",
        "150",
        "--load",
        "0.8",
        "--policies",
        "round_robin,least_load,sglang_cache_aware,cache_aware,oracle",
        "-o",
        "json",
        "--out",
        str(out),
        "--plot",
        str(png),
    )
    assert res.exit_code == 0, res.output
    for name in ("round_robin", "least_load", "sglang_cache_aware", "cache_aware", "oracle"):
        assert name in res.output
    assert "offered load 0.80" in res.output and "infinite-cache hit ratio" in res.output
    assert "hit >= 0.95 x oracle" in res.output and ("MET" in res.output)
    data = json.loads(out.read_text())
    run0 = data["runs"][0]
    assert run0["load"] == pytest.approx(0.8, abs=1e-3) and run0["workload"] == "shared_prompts"
    for pol in run0["policies"].values():
        for key in ("hit_ratio", "ttft_p50_s", "ttft_p99_s", "throughput_rps", "imbalance"):
            assert isinstance(pol[key], float)
    assert {g["name"] for g in run0["goals"]} >= {"hit >= 0.95 x oracle", "p99 <= least_load (+noise)"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    # Legible for a single run: room for the legend, titles and labels (was 238 x 483 px).
    width, height = Image.open(png).size
    assert width >= 640 and height >= 480, (width, height)


def test_bench_sim_replays_a_trace_file(tmp_path: Path) -> None:
    t = tmp_path / "t.jsonl"
    t.write_text(
        "".join(
            json.dumps({"timestamp": i * 100, "input_length": 900, "output_length": 8, "hash_ids": [0, i % 5 + 1]})
            + "\n"
            for i in range(40)
        )
    )
    res = run(
        "--fleet", str(FLEET), "--deployment", "llama-8b-long", "--trace", str(t), "--policies", "cache_aware,random"
    )
    assert res.exit_code == 0, res.output
    assert "t on routing-bench/llama-8b-long: 40 requests" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "rag", "--trace", "x.jsonl"], "exactly one of --workload NAME or --trace FILE"),
        ([], "exactly one of --workload NAME or --trace FILE"),
        (["--workload", "chatbot"], "unknown workload 'chatbot'"),
        (["--workload", "rag", "--policies", "fastest"], "unknown policy fastest"),
        (["--workload", "rag", "--load", "-1"], "--load must be positive"),
    ],
)
def test_bench_sim_user_mistakes_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    res = run("--fleet", str(FLEET), "--deployment", "qwen-32b", "--requests", "20", *args)
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output


def test_bench_sim_unknown_deployment_names_the_ones_there() -> None:
    res = run("--fleet", str(FLEET), "--deployment", "gpt-5", "--workload", "rag")
    assert res.exit_code == 1 and "qwen-32b" in res.output and "Traceback" not in res.output


def test_bench_sim_malformed_trace_names_the_line(tmp_path: Path) -> None:
    t = tmp_path / "bad.jsonl"
    t.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{oops\n')
    res = run("--fleet", str(FLEET), "--deployment", "qwen-32b", "--trace", str(t))
    assert res.exit_code == 1 and f"{t}:2: not valid JSON" in res.output.replace("\n", "")


def test_bench_sim_bad_fleet_file_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text("fleet: x\nnodepools: 3\n")
    res = run("--fleet", str(f), "--deployment", "d", "--workload", "rag")
    assert res.exit_code == 1 and "fleet.yaml" in res.output and "Traceback" not in res.output


def test_bench_sim_runs_a_profile_the_fleet_declares_by_its_name(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        FLEET.read_text()
        + """  profiles:
    greedy:
      scorers:
        - {type: prefix, weight: 0}
        - {type: ttft, weight: 1}
        - {type: added_prefill, weight: 0.5, params: {queue_behind: false}}
"""
    )
    out = tmp_path / "r.json"
    args = ["--fleet", str(fleet), "--deployment", "qwen-32b", "--workload", "rag", "--requests", "60"]
    res = run(*args, "--policies", "greedy,cache_aware", "-o", "json", "--out", str(out))
    assert res.exit_code == 0, res.output
    (r,) = json.loads(out.read_text())["runs"]
    assert set(r["policies"]) == {"greedy", "cache_aware"} and r["policies"]["greedy"]["finished"] == 60
    res = run(*args, "--policies", "greedyy")
    assert res.exit_code == 1 and "unknown policy greedyy" in res.output and "greedy," in res.output
