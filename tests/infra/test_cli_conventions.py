"""The CLI's habits, for every command: -h, --version, completion, one output convention, help
that reads at 80 columns, progress when not on a terminal, NO_COLOR."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer.main
from rich.console import Console
from typer.testing import CliRunner

from gpufleet.infra.cli import app
from gpufleet.infra.cli._common import PlainProgress

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "stacks" / "multicloud" / "fleet.yaml"
runner = CliRunner()


def _commands() -> list[tuple[list[str], object]]:
    """Every command and group of the CLI as (argv path, click command)."""
    found: list[tuple[list[str], object]] = []

    def walk(path: list[str], cmd: object) -> None:
        found.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk([*path, name], sub)

    walk([], typer.main.get_command(app))
    return found


COMMANDS = _commands()


def _opts(cmd: object) -> dict[str, object]:
    return {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts)}  # type: ignore[attr-defined]


def test_version_prints_the_installed_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"gpufleet {metadata.version('gpufleet')}"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "gpufleet")
def test_every_command_takes_dash_h_and_its_help_reads_at_80_columns(path):
    res = runner.invoke(app, [*path, "-h"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Usage: gpufleet")
    for line in res.stdout.splitlines():
        # a default URL is one word that cannot be broken; everything else wraps at 80
        assert len(line) <= 80 or "://" in line, line
    assert "<bool>" not in res.stdout and "<list[" not in res.stdout
    assert "…" not in res.stdout
    if "Commands:" in res.stdout:  # each command's first sentence shows whole
        listing = res.stdout.split("Commands:")[1].splitlines()
        assert not [line for line in listing if line.endswith("...")], listing
    cmd = dict((tuple(p), c) for p, c in COMMANDS)[tuple(path)]
    for param in cmd.params:  # type: ignore[attr-defined]
        if not getattr(param, "hidden", False):
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in res.stdout, f"{opt} missing or cut in the help of {' '.join(path)}"


def test_outputs_follow_one_convention_across_commands():
    """-o/--output names a format and comes with --out PATH; old spellings are hidden."""
    with_output = []
    for path, cmd in COMMANDS:
        opts = _opts(cmd)
        if "--output" in opts:
            with_output.append(" ".join(path))
            assert set(opts["--output"].opts) == {"--output", "-o"}
            assert "--out" in opts, f"{' '.join(path)}: -o/--output without --out"
            assert opts["--output"].metavar == "<format>"
        for old in ("--json", "--format", "-f"):
            if old in opts:
                assert opts[old].hidden, f"{' '.join(path)}: {old} is not part of the convention"
        if "-o" in opts:
            assert "--output" in opts["-o"].opts, f"{' '.join(path)}: -o means --output (the format) everywhere"
    assert {"plan", "preview", "discover", "bench sim", "bench live", "render router-config"} <= set(with_output)


def test_an_unknown_format_lists_the_formats_and_points_to_out(tmp_path):
    res = runner.invoke(app, ["plan", str(FLEET), "-o", "plan.json"])
    assert res.exit_code == 2
    assert "'plan.json' is not a format; choose table, json, markdown" in res.output
    assert "--out PATH writes to a file" in res.output


def test_out_writes_the_format_to_a_file_and_still_shows_the_table(tmp_path):
    out = tmp_path / "plan.json"
    res = runner.invoke(app, ["plan", str(FLEET), "-o", "json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["schema"] == "gpufleet.plan/v1"
    assert "aws-h100" in res.stdout and not res.stdout.lstrip().startswith("{")
    assert f"wrote {out}" in res.stderr


def test_old_format_flag_still_works_with_one_warning_on_stderr():
    res = runner.invoke(app, ["plan", str(FLEET), "-f", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["schema"] == "gpufleet.plan/v1"
    assert res.stderr.strip() == "warning: -f/--format is deprecated; use -o json"


ONE_CLUSTER = """\
fleet: one-cluster
clouds:
  aws: {region: us-west-2, cluster: prod-eks}
nodepools:
  - {name: h100, cloud: aws, zones: [us-west-2a], instance_type: p5.48xlarge, priority: 100, max_nodes: 4}
deployments:
  - {name: llama-8b, model: meta-llama/Llama-3.1-8B-Instruct, min_replicas: 1, max_replicas: 8}
"""


def test_render_manifests_goes_to_stdout_for_one_cluster_and_asks_for_a_directory_for_several(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(ONE_CLUSTER)
    one = runner.invoke(app, ["render", "manifests", str(fleet), "-o", "json"])
    assert one.exit_code == 0, one.output
    doc = json.loads(one.stdout)
    assert doc["kind"] == "List" and any(o["kind"] == "PriorityClass" for o in doc["items"])
    several = runner.invoke(app, ["render", "manifests", str(FLEET)])
    assert several.exit_code == 1 and "give --out DIR" in several.output


def test_shell_completion_completes_commands_and_formats():
    def complete(words: str) -> list[str]:
        env = {"_GPUFLEET_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()))}
        if not words.endswith(" "):
            env["COMP_CWORD"] = str(len(words.split()) - 1)
        return runner.invoke(app, [], env=env, prog_name="gpufleet").stdout.split()

    assert complete("gpufleet pl") == ["plan"]
    assert complete("gpufleet plan fleet.yaml -o ") == ["table", "json", "markdown", "infracost-json"]
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="gpufleet")
    assert script.exit_code == 0 and "_GPUFLEET_COMPLETE=complete_bash" in script.stdout


def test_plain_progress_prints_start_tenths_and_done():
    now = [0.0]
    buffer = Console(width=200, file=io.StringIO())
    with PlainProgress(buffer, every_s=1e9, clock=lambda: now[0]) as bar:
        task = bar.add_task("simulating", total=20)
        for _ in range(20):
            now[0] += 0.5
            bar.advance(task)
    lines = buffer.file.getvalue().splitlines()
    assert lines[0] == "simulating 0/20"
    assert lines[1] == "simulating 2/20 (1.0 s)"
    assert lines[-1] == "simulating 20/20 done (10.0 s)"
    assert len(lines) == 11  # the start and one line per tenth, no more


def test_plain_progress_ends_a_removed_task_with_one_done_line():
    now = [0.0]
    buffer = Console(width=200, file=io.StringIO())
    with PlainProgress(buffer, every_s=1e9, clock=lambda: now[0]) as bar:
        task = bar.add_task("run 1", total=None)
        now[0] = 2.0
        bar.remove_task(task)
        bar.remove_task(task)  # removing twice prints nothing more
        now[0] = 3.0
    assert buffer.file.getvalue().splitlines() == ["run 1", "run 1 done (2.0 s)"]


def test_progress_is_plain_lines_when_not_a_terminal():
    res = runner.invoke(
        app,
        [
            "bench",
            "sim",
            "--fleet",
            str(ROOT / "bench" / "fleet.yaml"),
            "--deployment",
            "qwen-32b",
            "--workload",
            "rag",
            "--requests",
            "60",
            "--policies",
            "round_robin",
            "-o",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["schema"] == "gpufleet.bench-sim/v1"  # stdout carries only the output
    assert "round_robin" in res.stderr and "60/60 done" in res.stderr


def _on_a_terminal(env: dict[str, str]) -> bytes:
    """Run `gpufleet validate` with stdout on a pseudo-terminal and return what it printed."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "from gpufleet.infra.cli import main; main()", "validate", str(FLEET)],
            stdout=follower,
            stderr=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}, **env},
            timeout=60,
            check=True,
        )
        assert proc.returncode == 0
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)


@pytest.mark.skipif("NO_COLOR" in os.environ, reason="NO_COLOR is set in the test environment")
def test_no_color_removes_colours_on_a_terminal():
    base = {"TERM": "xterm-256color", "COLUMNS": "120"}
    coloured = _on_a_terminal(base)
    assert b"ok" in coloured and b"\x1b[" in coloured
    plain = _on_a_terminal({**base, "NO_COLOR": "1"})
    assert b"ok" in plain and b"\x1b[" not in plain
