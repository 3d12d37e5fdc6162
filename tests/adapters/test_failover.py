"""Failover above the adapters: a multi-region case on moto, and exhaustion listing every attempt."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from gpufleet.provider_adapters import aws, base, failover

ROLE = "arn:aws:iam::123456789012:role/nodes"


@pytest.fixture
def adapter() -> Iterator[aws.AwsAdapter]:
    with mock_aws():
        for region, groups in {"eu-west-1": ["h100-a", "h100-b"], "us-west-2": ["h100"]}.items():
            eks = boto3.client("eks", region_name=region)
            eks.create_cluster(name="prod", roleArn=ROLE, resourcesVpcConfig={"subnetIds": ["subnet-1"]})
            for name in groups:
                eks.create_nodegroup(
                    clusterName="prod",
                    nodegroupName=name,
                    nodeRole=ROLE,
                    subnets=["subnet-1"],
                    scalingConfig={"minSize": 0, "maxSize": 4, "desiredSize": 0},
                )
        yield aws.AwsAdapter()


def cand(adapter: aws.AwsAdapter, region: str, group: str, desired: int = 2) -> failover.Candidate:
    ref = base.PoolRef(cloud="aws", name=group, region=region, cluster="prod")
    return failover.Candidate(adapter, base.ScaleRequest(ref=ref, desired_nodes=desired), machine_type="p5.48xlarge")


def test_not_offered_region_is_skipped_and_next_region_scaled(adapter: aws.AwsAdapter) -> None:
    result, attempts = failover.scale_with_failover(
        [cand(adapter, "eu-west-1", "h100-a"), cand(adapter, "eu-west-1", "h100-b"), cand(adapter, "us-west-2", "h100")]
    )
    assert result.ref.region == "us-west-2" and result.desired_nodes == 2
    assert "NotOffered" in attempts[0].outcome
    assert attempts[1].outcome.startswith("skipped: region blocked")
    assert attempts[2].outcome == "ok"
    assert (
        boto3.client("eks", region_name="eu-west-1").describe_nodegroup(clusterName="prod", nodegroupName="h100-b")[
            "nodegroup"
        ]["scalingConfig"]["desiredSize"]
        == 0
    )
    assert adapter.pool_state(result.ref).desired_nodes == 2


def test_exhaustion_lists_every_attempt(adapter: aws.AwsAdapter) -> None:
    with pytest.raises(failover.FailoverExhausted) as info:
        failover.scale_with_failover(
            [
                cand(adapter, "eu-west-1", "h100-a"),
                cand(adapter, "us-west-2", "h100", 9),
                cand(adapter, "us-west-2", "missing"),
            ]
        )
    outcomes = [a.outcome for a in info.value.attempts]
    assert len(outcomes) == 3 and "NotOffered" in outcomes[0]
    assert "outside [0, 4]" in outcomes[1]  # a request error blocks only that request
    assert "ResourceNotFoundException" in outcomes[2]
    assert "eu-west-1" in str(info.value) and "us-west-2" in str(info.value)
