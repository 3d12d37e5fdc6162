"""`gpufleet router serve`: clean errors for bad configs, and a real serving process."""

from __future__ import annotations

import subprocess
import sys

import httpx
from typer.testing import CliRunner

from gpufleet.infra.cli import app
from tests.router.router_fakes import serve_process
from tests.router.test_router_units import CONFIG


def test_serve_with_invalid_config_prints_one_line_and_exits_1(tmp_path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(CONFIG.replace("policy: cache_aware", "policy: fastest"))
    result = CliRunner().invoke(app, ["router", "serve", "--config", str(f)])
    assert result.exit_code == 1
    assert "router.yaml:3: settings.policy: must be one of" in result.output
    assert "Traceback" not in result.output


def test_serve_with_missing_config_exits_1(tmp_path) -> None:
    result = CliRunner().invoke(app, ["router", "serve", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_serve_runs_the_router_until_interrupted(tmp_path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(CONFIG)
    with serve_process(f, GPUFLEET_ADMIN_TOKEN="cli-token") as (_, url):
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "m"
        assert httpx.get(url + "/admin/replicas", headers={"Authorization": "Bearer cli-token"}).status_code == 200


def test_router_and_its_cli_import_no_cloud_sdk_or_pulumi() -> None:
    # The router image installs only the `router` extra: a fresh interpreter proves the imports.
    code = (
        "import sys\n"
        "from gpufleet.infra.cli import app\n"
        "from gpufleet.router import app, loader, policies, prediction_cache, proxy\n"
        "heavy = {'pulumi', 'boto3', 'botocore', 'google', 'kubernetes', 'moto'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
