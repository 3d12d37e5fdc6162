"""The engines' stack config keys under Pulumi's mocks: the HF token Secret and the model cache render
what `gpufleet render manifests --hf-token-secret/--model-cache-*` renders; bad values are one
`pulumi.RunError` naming the key, before anything is registered."""

from __future__ import annotations

import pulumi
import pytest

from gpufleet.infra import manifests
from gpufleet.infra.pulumi import Fleet, FleetArgs, preview, stack_config

STS = "kubernetes:apps/v1:StatefulSet"
SECRET = "kubernetes:core/v1:Secret"
BASE = {"gpufleet:adminToken": "t", "gpufleet:fleetFile": "unused.yaml"}


def program_for(plan):
    def program():
        args = stack_config.read()
        Fleet("f", FleetArgs(admin_token=args.admin_token, hf_token=args.hf_token, plan=plan, options=args.options))

    return program


def engine_sets(reg) -> list[dict]:
    return [r.inputs for r in reg.of_type(STS)]


def test_model_cache_storage_class_and_size_give_each_replica_a_claim(run, eks_plan):
    config = {**BASE, "gpufleet:modelCacheStorageClass": "gp3", "gpufleet:modelCacheSize": "500Gi"}
    reg = run(program_for(eks_plan), config=config, secret_keys=["gpufleet:adminToken"])
    sets = engine_sets(reg)
    assert sets
    options = manifests.ManifestOptions(model_cache_storage_class="gp3", model_cache_size="500Gi")
    for sts in sets:
        claims = {c["metadata"]["name"]: c["spec"] for c in sts["spec"]["volumeClaimTemplates"]}
        assert claims["cache"]["storageClassName"] == "gp3"
        assert claims["cache"]["resources"]["requests"]["storage"] == "500Gi"
        assert all(v["name"] != "cache" for v in sts["spec"]["template"]["spec"]["volumes"])
    # The same objects `render manifests --model-cache-storage-class gp3 --model-cache-size 500Gi` writes.
    dep = eks_plan.deployments[0]
    rendered = manifests.model_statefulset(eks_plan, dep, eks_plan.pool(dep.failover[0]), options)
    got = next(s for s in sets if s["metadata"]["name"] == rendered["metadata"]["name"])
    assert got["spec"]["volumeClaimTemplates"] == rendered["spec"]["volumeClaimTemplates"]


def test_model_cache_host_path_mounts_the_node_directory(run, eks_plan):
    config = {**BASE, "gpufleet:modelCacheHostPath": "/mnt/models"}
    reg = run(program_for(eks_plan), config=config, secret_keys=["gpufleet:adminToken"])
    for sts in engine_sets(reg):
        vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert vols["cache"] == {"name": "cache", "hostPath": {"path": "/mnt/models", "type": "DirectoryOrCreate"}}
        assert "volumeClaimTemplates" not in sts["spec"]


def test_without_model_cache_keys_the_cache_stays_an_emptydir(run, eks_plan):
    reg = run(program_for(eks_plan), config=BASE, secret_keys=["gpufleet:adminToken"])
    for sts in engine_sets(reg):
        vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert vols["cache"] == {"name": "cache", "emptyDir": {}}


def hf_env(sts: dict) -> dict | None:
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    return next((e for e in env if e["name"] == "HF_TOKEN"), None)


def test_hf_token_secret_alone_references_an_existing_secret_and_creates_none(run, eks_plan):
    config = {**BASE, "gpufleet:hfTokenSecret": "hf-gated"}
    reg = run(program_for(eks_plan), config=config, secret_keys=["gpufleet:adminToken"])
    for sts in engine_sets(reg):
        assert hf_env(sts) == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-gated", "key": "token"}}}
    assert not [r for r in reg.of_type(SECRET) if "hf" in r.inputs["metadata"]["name"]]


def test_hf_token_with_hf_token_secret_creates_the_secret_under_that_name(run, eks_plan):
    config = {**BASE, "gpufleet:hfTokenSecret": "hf-gated", "gpufleet:hfToken": "hf_xyz"}
    reg = run(program_for(eks_plan), config=config, secret_keys=["gpufleet:adminToken", "gpufleet:hfToken"])
    secret = reg.one(SECRET, "hf-gated")
    assert secret.inputs["metadata"]["name"] == "hf-gated"
    for sts in engine_sets(reg):
        assert hf_env(sts)["valueFrom"]["secretKeyRef"]["name"] == "hf-gated"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gpufleet:hfTokenSecret": "HF_Token"}, r"gpufleet:hfTokenSecret 'HF_Token': not a Kubernetes object name"),
        (
            {"gpufleet:modelCacheStorageClass": "gp3", "gpufleet:modelCacheHostPath": "/mnt/models"},
            r"gpufleet:modelCacheStorageClass and gpufleet:modelCacheHostPath: give one of them",
        ),
        ({"gpufleet:modelCacheHostPath": "models"}, r"gpufleet:modelCacheHostPath 'models': must be an absolute path"),
        ({"gpufleet:modelCacheSize": "lots"}, r"gpufleet:modelCacheSize 'lots': a Kubernetes quantity, e.g. 200Gi"),
        ({"gpufleet:modelCacheStorageClass": "Fast SSD"}, r"gpufleet:modelCacheStorageClass 'Fast SSD': not a"),
    ],
)
def test_bad_engine_options_are_a_run_error_naming_the_key_before_anything_is_registered(
    registrations, eks_plan, config, message
):
    with pytest.raises(pulumi.RunError, match=message):
        preview.run_program(program_for(eks_plan), config={**BASE, **config}, secret_keys=["gpufleet:adminToken"])
    assert registrations == [[]]
