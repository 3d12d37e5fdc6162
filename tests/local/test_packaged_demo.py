"""The embedded default fleet is package data: `gpufleet demo` runs outside the repository."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_stacks_copy_of_the_embedded_fleet_equals_the_package_data():
    packaged = (ROOT / "infra" / "data" / "fleets" / "local.yaml").read_text()
    stacks = (ROOT / "stacks" / "local" / "fleet.yaml").read_text()
    assert stacks == packaged, "stacks/local/fleet.yaml must stay equal to infra/data/fleets/local.yaml: copy one over"


@pytest.mark.slow
def test_demo_runs_from_another_directory_when_installed_from_the_wheel(tmp_path):
    """Build the wheel, install it (without the repository on the path), install the skills and run the demo in tmp."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = wheels.glob("gpufleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpufleet/infra/data/fleets/local.yaml" in names
    assert "gpufleet/skills/gpufleet-plan-ci/SKILL.md" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The dependencies come from this environment's site-packages, added as a plain path entry:
    # its .pth files (the editable install of the repository among them) are not processed.
    (purelib,) = (venv / "lib").glob("python*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(python), "-c", "import gpufleet.infra as m; print(m.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's copy, not the repository's

    skills = subprocess.run(
        [str(venv / "bin" / "gpufleet"), "skills", "install", "--target", "assistant"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert skills.returncode == 0, skills.stderr
    assert (work / "assistant" / "gpufleet-plan-ci" / "SKILL.md").is_file()

    done = subprocess.run(
        [str(venv / "bin" / "gpufleet"), "demo", "--requests", "20"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot read" not in done.stderr
    assert "tore down" in done.stdout + done.stderr
    assert " 0 left" in done.stdout + done.stderr
