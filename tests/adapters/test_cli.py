"""`gpufleet discover` and `gpufleet catalog refresh` through CliRunner, on moto and the fake GCE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from moto import mock_aws
from typer.testing import CliRunner

from gpufleet.infra import catalog
from gpufleet.infra.cli import app
from gpufleet.provider_adapters import discovery
from tests.fakes.aws_quotas import ec2_gpu_quotas
from tests.fakes.gcp_server import FakeGcpServer

runner = CliRunner()


@pytest.fixture
def gce(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGcpServer]:
    fake = FakeGcpServer.with_defaults()
    fake.start()
    monkeypatch.setenv(discovery.GCP_ENDPOINT_ENV, fake.url)
    try:
        yield fake
    finally:
        fake.stop()


def test_discover_aws_json_lists_offers_prices_and_headroom() -> None:
    with mock_aws(), ec2_gpu_quotas({"us-west-2": {"L-417A185B": 768}}):
        result = runner.invoke(
            app,
            [
                "discover",
                "--cloud",
                "aws",
                "--region",
                "us-west-2",
                "--region",
                "eu-west-1",
                "--gpu",
                "H100",
                "-o",
                "json",
            ],
        )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {(m["region"], m["machine_type"]): m for m in data["machines"]}
    p5 = rows[("us-west-2", "p5.48xlarge")]
    assert p5["gpu_model"] == "H100" and p5["quota_headroom_nodes"] == 4 and p5["spot_usd_per_h"] is not None
    assert ("eu-west-1", "p5.48xlarge") not in rows
    assert {m["gpu_model"] for m in data["machines"]} == {"H100"}


def test_discover_gcp_table(gce: FakeGcpServer) -> None:
    result = runner.invoke(app, ["discover", "--cloud", "gcp", "--project", gce.project, "--region", "us-central1"])
    assert result.exit_code == 0, result.output
    assert "a3-highgpu-8g" in result.output and "8x H100 80GiB" in result.output
    assert "1 nodes" in result.output  # 8 free H100s / 8 per machine
    assert "Compute Engine API has no price endpoint" in result.output


def test_discover_gcp_without_project_is_one_line_error(gce: FakeGcpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    result = runner.invoke(app, ["discover", "--cloud", "gcp", "--region", "us-central1"])
    assert result.exit_code == 1 and "needs a project" in result.output and "Traceback" not in result.output


def test_catalog_refresh_gcp_writes_a_loadable_user_catalog(gce: FakeGcpServer, tmp_path: Path) -> None:
    out = tmp_path / "gcp.yaml"
    result = runner.invoke(
        app,
        [
            "catalog",
            "refresh",
            "--cloud",
            "gcp",
            "--project",
            gce.project,
            "--region",
            "us-central1",
            "--region",
            "europe-west4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["schema"] == "gpufleet.catalog.machines/v1" and doc["cloud"] == "gcp"
    assert doc["machines"]["a3-highgpu-8g"]["regions"] == ["us-central1"]
    assert doc["machines"]["a2-highgpu-8g"]["regions"] == ["europe-west4"]
    merged = catalog.load([out])
    machine = merged.machine("gcp", "a3-highgpu-8g")
    assert machine is not None and machine.gpu == "H100" and machine.regions == ("us-central1",)


def test_catalog_refresh_aws_takes_live_spot_prices(tmp_path: Path) -> None:
    out = tmp_path / "aws.yaml"
    with mock_aws():
        result = runner.invoke(
            app, ["catalog", "refresh", "--cloud", "aws", "--region", "us-east-1", "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    merged = catalog.load([out])
    p5 = merged.machine("aws", "p5.48xlarge")
    assert p5 is not None and p5.spot_usd_per_hour == pytest.approx(0.00001)  # moto's spot price
    assert p5.usd_per_hour == catalog.bundled().machine("aws", "p5.48xlarge").usd_per_hour  # type: ignore[union-attr]
    assert "no on-demand price in the bundled catalog" in result.output  # e.g. g4dn types are not priced


def test_discover_all_regions_walks_every_zone_region(gce: FakeGcpServer) -> None:
    result = runner.invoke(
        app,
        [
            "discover",
            "--cloud",
            "gcp",
            "--project",
            gce.project,
            "--region",
            "all",
            "--gpu",
            "A100",
            "-o",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    machines = json.loads(result.stdout)["machines"]
    assert [(m["region"], m["machine_type"]) for m in machines] == [("europe-west4", "a2-highgpu-8g")]


def test_catalog_refresh_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["catalog", "refresh", "--cloud", "aws", "--out", str(tmp_path / "no" / "x.yaml")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
