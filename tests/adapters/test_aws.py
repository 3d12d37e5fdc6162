"""AWS adapter against moto: offerings, spot prices, quotas, EKS node groups, warm pools."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from gpufleet.provider_adapters import aws, base, errors
from tests.fakes.aws_quotas import ec2_gpu_quotas

ROLE = "arn:aws:iam::123456789012:role/nodes"


@pytest.fixture
def adapter() -> Iterator[aws.AwsAdapter]:
    with mock_aws():
        yield aws.AwsAdapter()


def make_nodegroup(
    region: str, cluster: str, name: str, *, desired: int, max_size: int, in_service: int | None = None
) -> dict[str, Any]:
    """An EKS cluster + node group, and the Auto Scaling group EKS would create behind it."""
    eks = boto3.client("eks", region_name=region)
    if cluster not in eks.list_clusters()["clusters"]:
        eks.create_cluster(name=cluster, roleArn=ROLE, resourcesVpcConfig={"subnetIds": ["subnet-1"]})
    ng = eks.create_nodegroup(
        clusterName=cluster,
        nodegroupName=name,
        nodeRole=ROLE,
        subnets=["subnet-1"],
        instanceTypes=["p5.48xlarge"],
        scalingConfig={"minSize": 0, "maxSize": max_size, "desiredSize": desired},
    )["nodegroup"]
    asg_name = ng["resources"]["autoScalingGroups"][0]["name"]
    ec2 = boto3.client("ec2", region_name=region)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"lt-{name}", LaunchTemplateData={"ImageId": ami, "InstanceType": "p5.48xlarge"}
    )
    n = desired if in_service is None else in_service
    boto3.client("autoscaling", region_name=region).create_auto_scaling_group(
        AutoScalingGroupName=asg_name,
        MinSize=0,
        MaxSize=max_size,
        DesiredCapacity=n,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplate"]["LaunchTemplateId"]},
        AvailabilityZones=[f"{region}a"],
    )
    return ng


def test_offerings_report_gpu_facts_and_zones(adapter: aws.AwsAdapter) -> None:
    seen: list[str] = []
    offers = {o.machine_type: o for o in adapter.offerings("us-east-1", progress=seen.append)}
    p5 = offers["p5.48xlarge"]
    assert (p5.gpu_model, p5.gpu_count, p5.gpu_memory_gib, p5.vcpus) == ("H100", 8, 80.0, 192)
    assert "us-east-1a" in p5.zones and all(z.startswith("us-east-1") for z in p5.zones)
    assert "m5.large" not in offers  # no GPU, not an offering
    assert seen == ["us-east-1"]


def test_offerings_filter_by_gpu_model(adapter: aws.AwsAdapter) -> None:
    offers = adapter.offerings("us-east-1", gpu="h100")
    assert offers and {o.gpu_model for o in offers} == {"H100"}


def test_offerings_differ_by_region(adapter: aws.AwsAdapter) -> None:
    east = {o.machine_type for o in adapter.offerings("us-east-1", gpu="H100")}
    ireland = {o.machine_type for o in adapter.offerings("eu-west-1", gpu="H100")}
    assert "p5.48xlarge" in east and "p5.48xlarge" not in ireland


def test_spot_prices_per_zone(adapter: aws.AwsAdapter) -> None:
    quotes = adapter.prices("us-west-2", ["p5.48xlarge"])
    assert {q.zone for q in quotes} >= {"us-west-2a", "us-west-2b"}
    assert all(q.spot_usd_per_h is not None and q.on_demand_usd_per_h is None for q in quotes)


def test_quotas_count_running_gpu_vcpus(adapter: aws.AwsAdapter) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.run_instances(ImageId=ami, InstanceType="p5.48xlarge", MinCount=1, MaxCount=1)
    with ec2_gpu_quotas({"us-east-1": {"L-417A185B": 384, "L-DB2E81BA": 64, "L-7212CCBC": 0, "L-3819A6DF": 8}}):
        quotas = {q.name: q for q in adapter.quotas("us-east-1")}
    p = quotas["L-417A185B"]
    assert (p.unit, p.limit, p.usage, p.headroom, p.spot) == ("vcpu", 384.0, 192.0, 192.0, False)
    assert quotas["L-7212CCBC"].spot and quotas["L-7212CCBC"].headroom == 0
    assert aws.gpu_quota_code("g6e.12xlarge") == "L-DB2E81BA"
    assert aws.gpu_quota_code("p5.48xlarge", spot=True) == "L-7212CCBC"
    assert aws.gpu_quota_code("m5.large") is None


def test_quotas_unavailable_maps_to_not_found(adapter: aws.AwsAdapter) -> None:
    # moto's Service Quotas knows only VPC: the NoSuchResourceException must surface typed.
    with pytest.raises(errors.NotFound) as info:
        adapter.quotas("us-east-1")
    assert info.value.code == "NoSuchResourceException" and info.value.cloud == "aws"


def test_pool_state_reads_nodegroup_and_asg(adapter: aws.AwsAdapter) -> None:
    make_nodegroup("us-west-2", "prod", "h100", desired=2, max_size=4)
    ref = base.PoolRef(cloud="aws", name="aws-h100", region="us-west-2", cluster="prod", provider_name="h100")
    state = adapter.pool_state(ref)
    assert (state.desired_nodes, state.ready_nodes, state.min_nodes, state.max_nodes) == (2, 2, 0, 4)
    assert state.warm_pool_nodes is None and state.status == "ACTIVE"


def test_scale_pool_changes_what_the_next_read_returns(adapter: aws.AwsAdapter) -> None:
    make_nodegroup("us-west-2", "prod", "h100", desired=1, max_size=4)
    ref = base.PoolRef(cloud="aws", name="h100", region="us-west-2", cluster="prod")
    result = adapter.scale_pool(base.ScaleRequest(ref=ref, desired_nodes=3))
    assert (result.previous_desired, result.desired_nodes) == (1, 3) and result.operation
    assert adapter.pool_state(ref).desired_nodes == 3


def test_scale_pool_beyond_max_is_refused(adapter: aws.AwsAdapter) -> None:
    make_nodegroup("us-west-2", "prod", "h100", desired=1, max_size=4)
    ref = base.PoolRef(cloud="aws", name="h100", region="us-west-2", cluster="prod")
    with pytest.raises(errors.InvalidRequest, match=r"outside \[0, 4\]"):
        adapter.scale_pool(base.ScaleRequest(ref=ref, desired_nodes=5))
    assert adapter.pool_state(ref).desired_nodes == 1


def test_missing_nodegroup_is_not_found(adapter: aws.AwsAdapter) -> None:
    make_nodegroup("us-west-2", "prod", "h100", desired=1, max_size=4)
    ref = base.PoolRef(cloud="aws", name="nope", region="us-west-2", cluster="prod")
    with pytest.raises(errors.NotFound) as info:
        adapter.pool_state(ref)
    assert info.value.code == "ResourceNotFoundException" and info.value.region == "us-west-2"


def test_warm_pool_is_set_on_the_nodegroup_asg(adapter: aws.AwsAdapter) -> None:
    make_nodegroup("us-west-2", "prod", "h100", desired=1, max_size=4)
    ref = base.PoolRef(cloud="aws", name="h100", region="us-west-2", cluster="prod")
    assert adapter.set_warm_pool(ref, 2).warm_pool_nodes == 2
    assert adapter.pool_state(ref).warm_pool_nodes == 2


@pytest.mark.parametrize(
    ("code", "error_type", "blocks"),
    [
        ("InsufficientInstanceCapacity", errors.CapacityError, "zone"),
        ("VcpuLimitExceeded", errors.QuotaExceeded, "region"),
        ("Unsupported", errors.NotOffered, "zone"),
        ("UnauthorizedOperation", errors.PermissionDenied, "cloud"),
        ("RequestLimitExceeded", errors.Throttled, "request"),
    ],
)
def test_client_errors_map_to_typed_errors(adapter: aws.AwsAdapter, code: str, error_type: type, blocks: str) -> None:
    response = {"Error": {"Code": code, "Message": "from EC2"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
    with pytest.raises(error_type) as info, adapter._errors("us-east-1", "us-east-1a"):
        raise ClientError(response, "RunInstances")  # type: ignore[arg-type]
    assert (info.value.code, info.value.blocks, info.value.zone) == (code, blocks, "us-east-1a")
