"""Precise mode in the manifests: engines publish KV events on a port, the router fetches the
model's tokenizer and subscribes to every replica; all valid against the Kubernetes schema."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from gpufleet.infra import manifests, spec
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.manifests import router as router_manifests

K8S_VERSION = "1.31"

FLEET = """\
fleet: precise
clouds:
  aws: {region: us-east-1, cluster: prod-eks}
nodepools:
  - name: l40s
    cloud: aws
    zones: [us-east-1a]
    instance_type: g6e.12xlarge
    priority: 10
    min_nodes: 1
    max_nodes: 4
deployments:
  - name: chat
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 2
    max_replicas: 4
    max_model_len: 16384
router:
  kv_events: {enabled: true}
"""


@pytest.fixture(scope="module")
def plan() -> plan_mod.Plan:
    fleet, smap = spec.load_text(FLEET, "fleet.yaml")
    return plan_mod.compile_fleet(fleet, smap)


def test_engines_get_vllms_kv_events_config_and_ports(plan):
    sts = manifests.model_statefulset(plan, plan.deployment("chat"), plan.pool("l40s"))
    c = sts["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    cfg = json.loads(args[args.index("--kv-events-config") + 1])
    assert cfg == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "topic": "kv-events",
        "replay_endpoint": "tcp://*:5558",
    }
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "kv-events": 5557, "kv-replay": 5558}


def test_router_fetches_the_tokenizer_and_its_config_points_at_it(plan):
    objs = {o["kind"]: o for o in router_manifests.router_objects(plan)}
    cfg = yaml.safe_load(objs["ConfigMap"]["data"]["router.yaml"])
    assert cfg["settings"]["kv_events"]["tokenizer"] == router_manifests.TOKENIZER_DIR
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "meta-llama/Llama-3.1-8B-Instruct" in init["args"] and "tokenizer.json" in init["args"][0]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert router_manifests.TOKENIZER_DIR in mounts


def test_every_object_validates_against_the_kubernetes_schema(plan):
    for group in manifests.all_objects(plan).values():
        for obj in group:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_without_precise_mode_nothing_changes():
    fleet, smap = spec.load_text(FLEET.replace("enabled: true", "enabled: false"), "fleet.yaml")
    p = plan_mod.compile_fleet(fleet, smap)
    sts = manifests.model_statefulset(p, p.deployment("chat"), p.pool("l40s"))
    assert "--kv-events-config" not in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    objs = {o["kind"]: o for o in router_manifests.router_objects(p)}
    assert "initContainers" not in objs["Deployment"]["spec"]["template"]["spec"]
