"""`gpufleet init`: a fleet that fits the model, validates, plans and previews unchanged."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.cli import app

runner = CliRunner()


def _kv_tokens(model: str, machine: catalog_mod.MachineType, gpus: int) -> float:
    """KV tokens of a replica of `gpus` GPUs, written out from the catalog facts (not the code under test)."""
    cat = catalog_mod.bundled()
    m = cat.models[model]
    gpu = cat.gpus[machine.gpu]
    weights = m.params_b * 1e9 * m.weight_bytes_per_param
    kv_per_token = 2 * m.layers * m.kv_heads * m.head_dim * m.kv_bytes_per_element
    return (gpus * gpu.memory_gib * 1024**3 * 0.9 - weights) / kv_per_token


def _init(tmp_path, *args: str):
    out = tmp_path / "x"
    res = runner.invoke(app, ["init", *args, "--out", str(out)])
    return res, out


def test_init_qwen3_8b_validates_plans_and_previews_unchanged(tmp_path):
    res, out = _init(tmp_path, "--model", "Qwen/Qwen3-8B")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"fleet.yaml", "Pulumi.yaml", "__main__.py", "requirements.txt"}
    assert "stack_config.program()" in (out / "__main__.py").read_text()
    assert yaml.safe_load((out / "Pulumi.yaml").read_text())["name"] == "gpufleet"

    val = runner.invoke(app, ["validate", str(out / "fleet.yaml")])
    assert val.exit_code == 0, val.output
    assert "0 warnings" in val.output
    plan = runner.invoke(app, ["plan", str(out / "fleet.yaml"), "-o", "json"])
    assert plan.exit_code == 0, plan.output
    prev = runner.invoke(app, ["preview", str(out)])
    assert prev.exit_code == 0, prev.output
    assert "StatefulSet" in prev.output and "WarmCapacity" in prev.output


def test_init_fleet_has_a_warm_second_priority_fallback_and_one_replica(tmp_path):
    res, out = _init(tmp_path, "--model", "Qwen/Qwen3-8B")
    assert res.exit_code == 0, res.output
    data = yaml.safe_load((out / "fleet.yaml").read_text())
    first, second = sorted(data["nodepools"], key=lambda p: -p["priority"])
    assert first["priority"] > second["priority"]
    assert (first["cloud"], first["instance_type"]) != (second["cloud"], second["instance_type"])
    assert first["warm_nodes"] + second["warm_nodes"] == 1
    (dep,) = data["deployments"]
    assert dep["min_replicas"] == 1
    assert dep["nodepools"] == [first["name"], second["name"]]


@pytest.mark.parametrize("cloud", ["aws", "gcp", "kubernetes", "local"])
def test_init_for_every_cloud_compiles_and_every_pool_holds_twice_the_context(tmp_path, cloud):
    model = "meta-llama/Llama-3.1-8B-Instruct"
    res, out = _init(tmp_path, "--model", model, "--cloud", cloud)
    assert res.exit_code == 0, res.output
    p = plan_mod.compile_file(out / "fleet.yaml")
    (dep,) = p.deployments
    cat = catalog_mod.bundled()
    for pool in p.pools:
        assert pool.cloud == cloud
        machine = next(m for m in cat.machines.values() if m.name == pool.instance_type)
        assert _kv_tokens(model, machine, dep.gpus_per_replica) >= 2 * dep.max_model_len
    assert (out / "Pulumi.yaml").exists() == (cloud != "local")
    if cloud != "local":
        prev = runner.invoke(app, ["preview", str(out)])
        assert prev.exit_code == 0, prev.output


def test_init_without_gpu_picks_the_cheapest_fitting_node_and_says_why(tmp_path):
    model = "Qwen/Qwen3-8B"
    res, out = _init(tmp_path, "--model", model, "--cloud", "aws")
    assert res.exit_code == 0, res.output
    assert "cheapest node" in res.output
    data = yaml.safe_load((out / "fleet.yaml").read_text())
    chosen = next(p for p in data["nodepools"] if p["priority"] == 100)
    cat = catalog_mod.bundled()
    price = cat.machines[("aws", chosen["instance_type"])].usd_per_hour
    context = cat.models[model].max_context
    for m in cat.machines.values():
        if m.cloud != "aws" or m.usd_per_hour >= price:
            continue
        fits = any(_kv_tokens(model, m, g) >= 2 * context for g in (1, 2, 4, 8) if g <= m.gpus and m.gpus % g == 0)
        assert not fits, f"{m.name} at ${m.usd_per_hour}/h fits and is cheaper than {chosen['instance_type']}"


def test_init_with_gpu_uses_that_gpu(tmp_path):
    res, out = _init(tmp_path, "--model", "Qwen/Qwen3-32B", "--gpu", "h100")
    assert res.exit_code == 0, res.output
    p = plan_mod.compile_file(out / "fleet.yaml")
    top = max(p.pools, key=lambda x: x.priority)
    assert top.gpu == "H100"


def test_init_model_outside_the_catalog_names_what_is_needed(tmp_path):
    res, out = _init(tmp_path, "--model", "acme/Unknown-7B")
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    for needed in ("not in the catalog", "weights", "KV bytes per token", "--catalog"):
        assert needed in res.output
    assert not (out / "fleet.yaml").exists()


def test_init_model_from_a_user_catalog_is_referenced_by_the_fleet(tmp_path):
    cat = tmp_path / "models.yaml"
    cat.write_text(
        "models:\n  acme/Tiny-1B: {params_b: 1.2, layers: 16, kv_heads: 8, head_dim: 64, max_context: 8192}\n"
    )
    res, out = _init(tmp_path, "--model", "acme/Tiny-1B", "--catalog", str(cat))
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "fleet.yaml").read_text())["catalog"] == ["../models.yaml"]
    val = runner.invoke(app, ["validate", str(out / "fleet.yaml")])
    assert val.exit_code == 0, val.output


def test_init_with_an_unknown_gpu_lists_the_gpus(tmp_path):
    res, _ = _init(tmp_path, "--model", "Qwen/Qwen3-8B", "--gpu", "B300")
    assert res.exit_code == 1
    assert "H100" in res.output and "L4" in res.output


def test_init_when_nothing_fits_says_what_a_replica_needs(tmp_path):
    res, _ = _init(tmp_path, "--model", "meta-llama/Llama-3.1-70B-Instruct", "--gpu", "L4", "--cloud", "aws")
    assert res.exit_code == 1
    assert "GiB of weights" in res.output and "KV cache" in res.output


def test_init_does_not_overwrite_without_force(tmp_path):
    res, out = _init(tmp_path, "--model", "Qwen/Qwen3-8B")
    assert res.exit_code == 0
    (out / "fleet.yaml").write_text("mine\n")
    again, _ = _init(tmp_path, "--model", "Qwen/Qwen3-8B")
    assert again.exit_code == 1 and "--force" in again.output
    assert (out / "fleet.yaml").read_text() == "mine\n"
    forced, _ = _init(tmp_path, "--model", "Qwen/Qwen3-8B", "--force")
    assert forced.exit_code == 0
    assert (out / "fleet.yaml").read_text() != "mine\n"


def test_validate_lists_each_warning(tmp_path):
    f = tmp_path / "fleet.yaml"
    f.write_text(
        "fleet: w\nclouds: {gcp: {project: p, region: us-central1, cluster: c}}\nnodepools:\n"
        "  - {name: a, cloud: gcp, instance_type: g2-standard-8, capacity_type: spot, priority: 1, "
        "min_nodes: 1, max_nodes: 3, warm_nodes: 1}\n"
        "deployments:\n  - {name: d, model: Qwen/Qwen3-0.6B, min_replicas: 1, max_replicas: 2}\n"
    )
    res = runner.invoke(app, ["validate", str(f)])
    assert res.exit_code == 0, res.output
    assert "3 warnings:" in res.output
    for code in ("warm_on_spot", "no_failover", "spot_only"):
        assert f"({code})" in res.output
    assert "reclaimed" in res.output
