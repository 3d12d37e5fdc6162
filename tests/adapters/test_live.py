"""`check_plan` (the `plan --live` checks) against moto and the fake Compute Engine server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from gpufleet.provider_adapters import aws, gcp, live
from tests.fakes.aws_quotas import ec2_gpu_quotas
from tests.fakes.gcp_server import FakeGcpServer


def pool(
    name: str,
    cloud: str,
    region: str,
    machine: str,
    *,
    zones: list[str],
    max_nodes: int = 4,
    capacity: str = "on_demand",
    gpu: str = "H100",
) -> dict[str, Any]:
    return {
        "name": name,
        "cloud": cloud,
        "region": region,
        "zones": zones,
        "instance_type": machine,
        "gpu": gpu,
        "capacity_type": capacity,
        "max_nodes": max_nodes,
    }


@pytest.fixture
def adapters() -> Iterator[dict[str, Any]]:
    fake = FakeGcpServer.with_defaults()
    fake.start()
    try:
        with (
            mock_aws(),
            ec2_gpu_quotas(
                {
                    "us-east-1": {"L-417A185B": 384, "L-7212CCBC": 0},
                    "us-west-2": {"L-417A185B": 2000, "L-7212CCBC": 2000},
                }
            ),
        ):
            yield {"aws": aws.AwsAdapter(), "gcp": gcp.GcpAdapter(fake.project, client_factory=fake.client)}
    finally:
        fake.stop()


def by_pool(findings: list[live.LiveFinding]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for f in findings:
        out.setdefault(f.pool, []).append((f.severity, f.check))
    return out


def test_aws_checks_offering_zone_quota_and_spot(adapters: dict[str, Any]) -> None:
    plan = {
        "pools": [
            pool("fits", "aws", "us-west-2", "p5.48xlarge", zones=["us-west-2a"]),
            pool("ireland", "aws", "eu-west-1", "p5.48xlarge", zones=["eu-west-1a"]),
            pool("bad-zone", "aws", "us-west-2", "p5.48xlarge", zones=["us-west-2a", "us-west-2z"]),
            pool("too-big", "aws", "us-east-1", "p5.48xlarge", zones=["us-east-1a"], max_nodes=4),
            pool("spot", "aws", "us-west-2", "p5.48xlarge", zones=["us-west-2a"], capacity="spot"),
        ]
    }
    findings = live.check_plan(plan, {"aws": adapters["aws"]})
    got = by_pool(findings)
    assert "fits" not in got
    assert got["ireland"] == [("error", "offered")]
    assert got["bad-zone"] == [("error", "zone")]
    assert got["too-big"] == [("error", "quota")]
    assert got["spot"] == [("warning", "spot_price")]  # moto's spot price is $0.00001/h
    quota_msg = next(f.message for f in findings if f.pool == "too-big")
    assert "384" in quota_msg and "768" in quota_msg


def test_gcp_checks_gpu_quota_and_says_spot_is_unchecked(adapters: dict[str, Any]) -> None:
    plan = {
        "pools": [
            pool("a3", "gcp", "us-central1", "a3-highgpu-8g", zones=["us-central1-a"], max_nodes=4),
            pool("l4", "gcp", "us-central1", "g2-standard-48", zones=["us-central1-b"], max_nodes=2, gpu="L4"),
            pool(
                "l4-spot",
                "gcp",
                "us-central1",
                "g2-standard-48",
                zones=["us-central1-a"],
                max_nodes=1,
                gpu="L4",
                capacity="spot",
            ),
            pool("a3-west", "gcp", "europe-west4", "a3-highgpu-8g", zones=["europe-west4-a"]),
        ]
    }
    got = by_pool(live.check_plan(plan, {"gcp": adapters["gcp"]}))
    assert got["a3"] == [("error", "quota")]  # 32 H100s needed, quota 16
    assert "l4" not in got
    assert ("info", "unchecked") in got["l4-spot"]  # GCP has no price API (CANNOT_DO)
    assert got["a3-west"] == [("error", "offered")]


def test_unreadable_quotas_are_a_warning_not_a_crash() -> None:
    with mock_aws():  # moto alone: Service Quotas knows no EC2 quota
        findings = live.check_plan(
            {"pools": [pool("p", "aws", "us-west-2", "p5.48xlarge", zones=[])]}, {"aws": aws.AwsAdapter()}
        )
    assert [(f.severity, f.check) for f in findings] == [("warning", "unchecked")]
    assert "NoSuchResourceException" in findings[0].message


def test_compiled_plan_object_is_checked(adapters: dict[str, Any]) -> None:
    from gpufleet.infra import plan as plan_mod

    compiled = plan_mod.compile_file(str(Path(__file__).resolve().parents[2] / "stacks" / "multicloud" / "fleet.yaml"))
    findings = live.check_plan(compiled, adapters)
    gcp_pool = next(p for p in compiled.pools if p.cloud == "gcp")
    assert any(f.pool == gcp_pool.name and f.check == "quota" and f.severity == "error" for f in findings)
    assert all(str(f).startswith(f.severity) for f in findings)


def test_adapters_for_plan_builds_what_the_pools_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.infra import plan as plan_mod
    from gpufleet.provider_adapters import discovery

    compiled = plan_mod.compile_file(str(Path(__file__).resolve().parents[2] / "stacks" / "multicloud" / "fleet.yaml"))
    with FakeGcpServer.with_defaults() as fake, mock_aws():
        monkeypatch.setenv(discovery.GCP_ENDPOINT_ENV, fake.url)
        adapters = live.adapters_for_plan(compiled)
        assert set(adapters) == {"aws", "gcp"} and adapters["gcp"].project == "acme-ml"
        # The fake serves one project: the plan's project is someone else's -> a finding, not a crash.
        findings = live.check_plan(compiled, {"gcp": adapters["gcp"]})
    assert findings and all(f.check == "unchecked" for f in findings) and "forbidden" in findings[0].message
