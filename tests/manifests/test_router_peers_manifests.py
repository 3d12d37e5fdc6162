"""Several router pods read each other's queue state: the config finds them from the router
Service's EndpointSlices, and the pods may list those slices."""

from __future__ import annotations

import pytest

from gpufleet.infra import manifests
from tests.manifests.test_manifests import PLANS


@pytest.mark.parametrize("name", sorted(PLANS))
def test_two_router_pods_discover_each_other_through_their_service(name: str) -> None:
    plan = PLANS[name]()
    objs = {o["kind"]: o for o in manifests.router_objects(plan)}  # two router pods by default
    cfg = manifests.router_config(plan)
    peers = cfg.discovery.peers.kubernetes
    svc = objs["Service"]
    assert peers is not None and peers.namespace == plan.namespace
    assert peers.service == svc["metadata"]["name"]
    assert peers.port in {p["name"] for p in svc["spec"]["ports"]}
    # The rendered config mounted in the pods says the same.
    assert "peers" in objs["ConfigMap"]["data"][manifests.ROUTER_CONFIG_KEY]
    # The pods list EndpointSlices in the namespace: the token is mounted and the Role allows it.
    assert objs["ServiceAccount"]["automountServiceAccountToken"] is True
    assert objs["Deployment"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    rule = objs["Role"]["rules"][0]
    assert rule["resources"] == ["endpointslices"] and "list" in rule["verbs"]
    assert objs["RoleBinding"]["roleRef"]["name"] == objs["Role"]["metadata"]["name"]


def test_one_router_pod_has_no_peers() -> None:
    plan = PLANS["multicloud"]()
    one = manifests.ManifestOptions(router_replicas=1)
    assert manifests.router_config(plan, one).discovery.peers.kubernetes is None
