"""The Agent Skills in skills/: front matter per the Agent Skills spec, working examples, install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.infra.cli import app

ROOT = Path(__file__).resolve().parents[1]
SKILLS = sorted(p.parent for p in (ROOT / "skills").glob("*/SKILL.md"))
NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # lower-case letters, digits, single inner hyphens
FIELDS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
TOPICS = ("fleet-authoring", "plan-ci", "pulumi-deploy", "routing-tuning", "operations")


def _split(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n"), "SKILL.md must start with YAML front matter"
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _bash_blocks(body: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", body, re.S | re.M)


def test_there_is_a_skill_for_each_topic():
    names = {p.name for p in SKILLS}
    for topic in TOPICS:
        assert f"gpufleet-{topic}" in names


@pytest.mark.parametrize("skill", SKILLS, ids=lambda p: p.name)
def test_front_matter_follows_the_agent_skills_spec(skill):
    meta, body = _split((skill / "SKILL.md").read_text())
    assert set(meta) <= FIELDS, f"unknown front matter fields: {set(meta) - FIELDS}"
    name, description = meta["name"], meta["description"]
    assert name == skill.name and 1 <= len(name) <= 64 and NAME.match(name)
    assert isinstance(description, str) and 1 <= len(description) <= 1024
    assert "Use when" in description  # what it does and when to use it
    for section in ("## Instructions", "## Reference", "## Examples"):
        assert section in body
    assert _bash_blocks(body), "at least one working example"


@pytest.mark.slow
@pytest.mark.parametrize("skill", SKILLS, ids=lambda p: p.name)
def test_every_offline_example_runs(skill, tmp_path):
    """Every ```bash block, in order, in an empty directory, with this gpufleet on PATH."""
    _, body = _split((skill / "SKILL.md").read_text())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("GITHUB_SHA", None)
    for block in _bash_blocks(body):
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{skill.name} example failed:\n{block}\n--- stderr:\n{done.stderr[-2000:]}"


def test_skills_install_copies_every_skill_and_keeps_existing_ones(tmp_path):
    runner = CliRunner()
    target = tmp_path / "assistant" / "skills"
    res = runner.invoke(app, ["skills", "install", "--target", str(target)])
    assert res.exit_code == 0, res.output
    for skill in SKILLS:
        assert (target / skill.name / "SKILL.md").read_text() == (skill / "SKILL.md").read_text()
    again = runner.invoke(app, ["skills", "install", "--target", str(target)])
    assert again.exit_code == 1 and "--force" in again.output
    (target / SKILLS[0].name / "SKILL.md").write_text("edited")
    forced = runner.invoke(app, ["skills", "install", "--target", str(target), "--force"])
    assert forced.exit_code == 0
    assert (target / SKILLS[0].name / "SKILL.md").read_text() == (SKILLS[0] / "SKILL.md").read_text()


def test_skills_list_names_every_skill():
    res = CliRunner().invoke(app, ["skills", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for skill in SKILLS:
        assert skill.name in res.output
