"""CapacityBuffer (autoscaling.x-k8s.io/v1beta1) and Karpenter NodePool (karpenter.sh/v1) objects.

kubernetes-validate knows only built-in kinds, so the custom resources are checked against
schemas written here from the upstream CRDs (kubernetes/autoscaler
`cluster-autoscaler/apis/config/crd/autoscaling.x-k8s.io_capacitybuffers.yaml`,
kubernetes-sigs/karpenter `pkg/apis/crds/karpenter.sh_nodepools.yaml`), with their CEL rules as
assertions. Unknown fields are errors here (the API server would prune them silently).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from gpufleet.infra import manifests, spec
from gpufleet.infra import plan as plan_mod

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.31"
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITIES = {
    "type": "object",
    "additionalProperties": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": QUANTITY}]},
}
_NAME_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": {"type": "object"}},
}

CAPACITY_BUFFER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "autoscaling.x-k8s.io/v1beta1"},
        "kind": {"const": "CapacityBuffer"},
        "metadata": {**_METADATA, "required": ["name", "namespace"]},  # the CRD is Namespaced
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "limits": _QUANTITIES,
                "percentage": {"type": "integer", "minimum": 0},
                "podTemplateRef": _NAME_REF,
                "provisioningStrategy": {"type": "string"},
                "replicas": {"type": "integer", "minimum": 0},
                "scalableRef": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiGroup": {"type": "string"},
                        "kind": {"type": "string", "minLength": 1},
                        "name": {"type": "string", "minLength": 1},
                    },
                },
            },
        },
    },
}

_REQUIREMENT = {
    "type": "object",
    "required": ["key", "operator"],
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string", "maxLength": 316},
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]},
        "values": {"type": "array", "items": {"type": "string"}},
        "minValues": {"type": "integer", "minimum": 1, "maximum": 50},
    },
}
_TAINT = {
    "type": "object",
    "required": ["key", "effect"],
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    },
}
NODE_POOL = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "karpenter.sh/v1"},
        "kind": {"const": "NodePool"},
        "metadata": {**_METADATA, "not": {"required": ["namespace"]}},  # the CRD is cluster-scoped
        "spec": {
            "type": "object",
            "required": ["template"],
            "additionalProperties": False,
            "properties": {
                "weight": {"type": "integer", "minimum": 1, "maximum": 100},
                "limits": _QUANTITIES,
                "disruption": {
                    "type": "object",
                    "required": ["consolidateAfter"],
                    "additionalProperties": False,
                    "properties": {
                        "consolidateAfter": {"type": "string", "pattern": r"^(([0-9]+(s|m|h))+|Never)$"},
                        "consolidationPolicy": {"enum": ["WhenEmpty", "WhenEmptyOrUnderutilized"]},
                        "budgets": {"type": "array"},
                    },
                },
                "template": {
                    "type": "object",
                    "required": ["spec"],
                    "additionalProperties": False,
                    "properties": {
                        "metadata": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string", "maxLength": 63},
                                },
                                "annotations": {"type": "object"},
                            },
                        },
                        "spec": {
                            "type": "object",
                            "required": ["nodeClassRef", "requirements"],
                            "additionalProperties": False,
                            "properties": {
                                "nodeClassRef": {
                                    "type": "object",
                                    "required": ["group", "kind", "name"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "group": {"type": "string", "minLength": 1},
                                        "kind": {"type": "string", "minLength": 1},
                                        "name": {"type": "string", "minLength": 1},
                                    },
                                },
                                "requirements": {"type": "array", "maxItems": 100, "items": _REQUIREMENT},
                                "taints": {"type": "array", "items": _TAINT},
                                "startupTaints": {"type": "array", "items": _TAINT},
                                "expireAfter": {"type": "string"},
                                "terminationGracePeriod": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}
_ALLOWED_K8S_KEYS = {
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "kubernetes.io/arch",
    "kubernetes.io/os",
}


def _label_domain_ok(key: str) -> bool:
    """Karpenter's CEL rules on requirement keys and node labels (restricted domains)."""
    domain = key.split("/", 1)[0] if "/" in key else ""
    if (
        key in _ALLOWED_K8S_KEYS
        or domain.endswith("node.kubernetes.io")
        or domain.endswith("node-restriction.kubernetes.io")
    ):
        return True
    if domain.endswith("kubernetes.io") or (domain.endswith("k8s.io") and not domain.endswith("kops.k8s.io")):
        return False
    if domain.endswith("karpenter.sh"):
        return key == "karpenter.sh/capacity-type"
    return True


FLEET = """\
fleet: cb
clouds:
  aws: {region: us-east-1, cluster: eks, warm_capacity: capacity_buffer, karpenter: {node_class: gpu}}
  gcp: {project: p, region: us-central1, cluster: gke}
nodepools:
  - {name: h100, cloud: aws, zones: [us-east-1a, us-east-1b], instance_type: p5.48xlarge, priority: %(top)d, min_nodes: 1, max_nodes: 4, warm_nodes: 1}
  - {name: l40s-spot, cloud: aws, instance_type: g6e.12xlarge, capacity_type: spot, priority: %(mid)d, min_nodes: 0, max_nodes: 3, warm_nodes: 2}
  - {name: gcp-h100, cloud: gcp, zones: [us-central1-a, us-central1-b], instance_type: a3-highgpu-8g, priority: %(low)d, min_nodes: 0, max_nodes: 2, warm_nodes: 1}
deployments:
  - {name: llama, model: meta-llama/Llama-3.1-8B-Instruct, min_replicas: 2, max_replicas: 8, max_model_len: 8192}
"""


def _plan(top: int = 100, mid: int = 50, low: int = 10, text: str | None = None) -> plan_mod.Plan:
    fleet, smap = spec.load_text(text or FLEET % {"top": top, "mid": mid, "low": low}, "fleet.yaml")
    return plan_mod.compile_fleet(fleet, smap)


def _objs(plan: plan_mod.Plan, cluster: str) -> list[dict]:
    return manifests.all_objects(plan)[cluster]


def test_buffered_pools_get_a_capacity_buffer_valid_against_the_upstream_crd():
    objs = _objs(_plan(), "aws-eks")
    buffers = [o for o in objs if o["kind"] == "CapacityBuffer"]
    assert {b["metadata"]["name"]: b["spec"]["replicas"] for b in buffers} == {"warm-h100": 1, "warm-l40s-spot": 2}
    templates = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodTemplate"}
    for b in buffers:
        jsonschema.validate(b, CAPACITY_BUFFER)
        s = b["spec"]
        # the CRD's CEL rules: podTemplateRef needs replicas or limits; not both references
        assert "replicas" in s or "limits" in s
        assert not ("podTemplateRef" in s and "scalableRef" in s)
        # the referenced PodTemplate exists, in the same namespace, and is a valid core object
        tpl = templates[s["podTemplateRef"]["name"]]
        assert tpl["metadata"]["namespace"] == b["metadata"]["namespace"]
        kubernetes_validate.validate(tpl, K8S_VERSION, strict=True)
        gpus = tpl["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
        pool = b["metadata"]["labels"]["gpufleet.io/pool"]
        assert int(gpus) == _plan().pool(pool).gpus_per_node  # one chunk holds one whole node
        assert tpl["template"]["spec"]["nodeSelector"] == {"gpufleet.io/pool": pool}


def test_buffered_pools_run_no_pause_pods_and_the_controller_does_not_count_them_twice():
    plan = _plan()
    objs = _objs(plan, "aws-eks")
    placeholders = {
        o["metadata"]["name"]: o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("warm-")
    }
    assert placeholders["warm-h100"]["spec"]["replicas"] == 0
    for o in placeholders.values():
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and "plan.json" in o.get("data", {}))
    floors = {p["name"]: p["warm_nodes"] for p in json.loads(cm["data"]["plan.json"])["pools"]}
    assert floors == {"h100": 0, "l40s-spot": 0, "gcp-h100": 1}  # gcp holds its warmth with pause pods
    gcp = _objs(plan, "gcp-gke")
    assert not [o for o in gcp if o["kind"] in ("CapacityBuffer", "NodePool")]
    gcp_warm = next(o for o in gcp if o["kind"] == "Deployment" and o["metadata"]["name"] == "warm-gcp-h100")
    assert gcp_warm["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    ("prios", "expected"),
    [((100, 50, 10), {"h100": 100, "l40s-spot": 50}), ((1000, 500, 0), {"h100": 100, "l40s-spot": 1})],
)
def test_karpenter_nodepools_are_valid_and_weighted_by_priority(prios, expected):
    plan = _plan(*prios)
    pools = [o for o in _objs(plan, "aws-eks") if o["kind"] == "NodePool"]
    assert len(pools) == 2
    for np in pools:
        jsonschema.validate(np, NODE_POOL)
        tspec = np["spec"]["template"]["spec"]
        assert all(_label_domain_ok(r["key"]) for r in tspec["requirements"])
        assert all(_label_domain_ok(k) for k in np["spec"]["template"]["metadata"]["labels"])
        assert re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", np["metadata"]["name"])
    weights = {np["metadata"]["labels"]["gpufleet.io/pool"]: np["spec"]["weight"] for np in pools}
    assert weights == expected
    by_pool = {np["metadata"]["labels"]["gpufleet.io/pool"]: np for np in pools}
    reqs = {r["key"]: r["values"] for r in by_pool["l40s-spot"]["spec"]["template"]["spec"]["requirements"]}
    assert reqs["node.kubernetes.io/instance-type"] == ["g6e.12xlarge"]
    assert reqs["karpenter.sh/capacity-type"] == ["spot"]
    assert by_pool["h100"]["spec"]["limits"] == {"nvidia.com/gpu": "32"}  # 4 nodes x 8 GPUs
    assert {r["key"]: r["values"] for r in by_pool["h100"]["spec"]["template"]["spec"]["requirements"]}[
        "topology.kubernetes.io/zone"
    ] == ["us-east-1a", "us-east-1b"]


def test_karpenter_clusters_get_no_cluster_autoscaler_expander():
    names = {(o["kind"], o["metadata"]["name"]) for o in _objs(_plan(), "aws-eks")}
    assert ("ConfigMap", "cluster-autoscaler-priority-expander") not in names


def test_the_schemas_catch_a_wrong_field():
    np = next(o for o in _objs(_plan(), "aws-eks") if o["kind"] == "NodePool")
    np["spec"]["weight"] = 101
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(np, NODE_POOL)
    cb = next(o for o in _objs(_plan(), "aws-eks") if o["kind"] == "CapacityBuffer")
    cb["spec"]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cb, CAPACITY_BUFFER)


def test_default_fleets_render_neither():
    plan = plan_mod.compile_file(ROOT / "stacks" / "multicloud" / "fleet.yaml")
    kinds = {o["kind"] for group in manifests.all_objects(plan).values() for o in group}
    assert not kinds & {"CapacityBuffer", "NodePool", "PodTemplate"}


def test_unknown_warm_capacity_mode_is_a_declaration_error():
    bad = FLEET.replace("warm_capacity: capacity_buffer", "warm_capacity: balloons") % {
        "top": 100,
        "mid": 50,
        "low": 10,
    }
    with pytest.raises(spec.FleetError) as err:
        spec.load_text(bad, "fleet.yaml")
    assert "fleet.yaml:3: clouds.aws.warm_capacity" in str(err.value)


def test_the_pulumi_stack_registers_the_capacity_buffer(tmp_path):
    from gpufleet.infra.pulumi import preview

    for name in ("Pulumi.yaml", "Pulumi.multicloud.yaml", "__main__.py"):
        (tmp_path / name).write_text((ROOT / "stacks" / "multicloud" / name).read_text())
    (tmp_path / "fleet.yaml").write_text(FLEET % {"top": 100, "mid": 50, "low": 10})
    result = preview.preview_stack(tmp_path)
    buffers = [r for r in result.resources if r.type == "kubernetes:autoscaling.x-k8s.io/v1beta1:CapacityBuffer"]
    assert sorted(r.inputs["metadata"]["name"] for r in buffers) == ["warm-h100", "warm-l40s-spot"]
    assert {r.inputs["spec"]["replicas"] for r in buffers} == {1, 2}
