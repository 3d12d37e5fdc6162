"""User plugins end to end: a fleet's `router:` section names them, validation reports file:line,
`gpufleet router serve` imports and uses them; the entry-point group works without any config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpufleet.infra import spec
from gpufleet.infra.cli import app
from gpufleet.router.policies import registry
from tests.infra.conftest import BASE
from tests.router.router_fakes import serve_process

# A scorer defined by the test, in a module of its own package (not gpufleet's).
PLUGIN = '''
from pydantic import BaseModel, ConfigDict

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Scorer


class PreferReplica(Scorer):
    """Every replica but `replica_id` costs `penalty_tokens` prefill tokens."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        replica_id: str
        penalty_tokens: int = 1_000_000

    def __init__(self, params, ctx):
        self.params = params

    def score(self, candidates):
        p = self.params
        return [0 if r.id == p.replica_id else p.penalty_tokens for r in candidates.replicas]


registry.register("{name}", PreferReplica)
'''

ROUTER = """\
router:
  policy: sticky
  plugins: [{module}]
  profiles:
    sticky:
      filters: [pool_priority]
      scorers:
        - {{type: prefix, weight: 1}}
        - {{type: {scorer}, weight: 1, params: {{replica_id: {replica}}}}}
      picker: {{type: min_cost}}
"""


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package `userplugins` on sys.path (and PYTHONPATH, for subprocesses); forgotten afterwards."""
    pkg = tmp_path / "site" / "userplugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scorers.py").write_text(PLUGIN.replace("{name}", "user_prefers"))
    (pkg / "broken.py").write_text("raise RuntimeError('this plugin is broken')\n")
    site = str(tmp_path / "site")
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    yield tmp_path / "site"
    registry.unregister("scorer", "user_prefers")
    for name in [m for m in sys.modules if m.split(".")[0] == "userplugins"]:
        del sys.modules[name]


def fleet_text(module: str = "userplugins.scorers", scorer: str = "user_prefers", replica: str = "x") -> str:
    return BASE + ROUTER.format(module=module, scorer=scorer, replica=replica)


def problems(text: str) -> list[str]:
    with pytest.raises(spec.FleetError) as exc:
        spec.load_text(text, "fleet.yaml")
    return [str(i) for i in exc.value.issues]


def test_a_fleet_composes_a_profile_with_a_user_scorer(plugin_path: Path) -> None:
    fleet, _ = spec.load_text(fleet_text())
    assert fleet.router.policy == "sticky"
    assert [s.type for s in fleet.router.profiles["sticky"].scorers] == ["prefix", "user_prefers"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"scorer": "user_prefer"},
            "fleet.yaml:36: router.profiles.sticky.scorers[1].type: unknown scorer 'user_prefer'; "
            "registered scorers: added_prefill, in_flight, kv_usage, prefix, queued_prefill, ttft, user_prefers",
        ),
        (
            {"replica": "x, weight_x: 2"},
            "fleet.yaml:36: router.profiles.sticky.scorers[1].params.weight_x: unknown parameter of scorer "
            "'user_prefers'; its parameters: replica_id, penalty_tokens",
        ),
        (
            {"module": "userplugins.broken"},
            "fleet.yaml:30: router.plugins[0]: cannot import plugin module 'userplugins.broken': "
            "RuntimeError: this plugin is broken",
        ),
        (
            {"module": "userplugins.absent"},
            "fleet.yaml:30: router.plugins[0]: cannot import plugin module 'userplugins.absent': "
            "ModuleNotFoundError: No module named 'userplugins.absent'",
        ),
    ],
)
def test_bad_plugin_references_are_reported_with_file_and_line(
    plugin_path: Path, change: dict[str, str], expected: str
) -> None:
    # A module that does not import is the one problem reported: what it registers is unknown.
    assert problems(fleet_text(**change)) == [expected]


def test_an_unknown_field_of_a_profile_lists_the_allowed_fields(plugin_path: Path) -> None:
    text = fleet_text().replace("      picker:", "      pickr:")
    assert problems(text) == [
        "fleet.yaml:37: router.profiles.sticky.pickr: unknown field; allowed: filters, picker, scorers"
    ]


def test_gpufleet_validate_prints_the_plugin_error_without_a_traceback(tmp_path: Path, plugin_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(fleet_text(module="userplugins.broken"))
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 1
    assert f"{f}:30: router.plugins[0]: cannot import plugin module 'userplugins.broken'" in result.output
    assert "Traceback" not in result.output


ROUTER_CONFIG = """\
fleet: demo
settings:
  policy: sticky
  plugins: [userplugins.scorers]
  profiles:
    sticky:
      scorers: [prefix, {{type: user_prefers, params: {{replica_id: {replica}}}}}]
replicas:
{replicas}"""

REPLICA = """\
  - id: {id}
    url: {url}
    deployment: d
    model: m
    pool: p
    priority: 1
    kv_capacity_tokens: 100000
    max_model_len: 4096
    max_concurrent_requests: 8
"""


def test_router_serve_imports_and_uses_a_user_scorer(tmp_path: Path, plugin_path: Path, replicas) -> None:  # type: ignore[no-untyped-def]
    reps = replicas(3)
    rows = "".join(REPLICA.format(id=f"r{i}", url=r.url) for i, r in enumerate(reps))
    f = tmp_path / "router.yaml"
    f.write_text(ROUTER_CONFIG.format(replica="r2", replicas=rows))
    with serve_process(f, GPUFLEET_ADMIN_TOKEN="t") as (line, url):
        assert re.search(r"policy sticky, plugins userplugins.scorers, 3 replicas", line), line
        chosen = set()
        for i in range(6):
            body = {"model": "m", "messages": [{"role": "user", "content": f"question {i} " * 40}], "max_tokens": 4}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200, r.text
            chosen.add(r.headers["x-gpufleet-replica"])
        assert chosen == {"r2"}


def test_router_serve_reports_a_broken_plugin_module_with_its_line(tmp_path: Path, plugin_path: Path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(
        ROUTER_CONFIG.format(replica="r0", replicas=REPLICA.format(id="r0", url="http://127.0.0.1:9")).replace(
            "userplugins.scorers", "userplugins.broken"
        )
    )
    result = CliRunner().invoke(app, ["router", "serve", "--config", str(f)])
    assert result.exit_code == 1
    assert f"{f}:4: settings.plugins[0]: cannot import plugin module 'userplugins.broken'" in result.output
    assert "Traceback" not in result.output


def test_an_entry_point_registers_a_scorer_without_any_config(tmp_path: Path, plugin_path: Path) -> None:
    (plugin_path / "userplugins" / "epscorers.py").write_text(PLUGIN.replace("{name}", "from_entry_point"))
    dist = plugin_path / "userplugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userplugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gpufleet.router.plugins]\nprefer = userplugins.epscorers\n")
    code = textwrap.dedent(
        """
        from gpufleet.router.config import RouterSettings
        from gpufleet.router.policies import registry
        s = RouterSettings.model_validate(
            {"policy": "p", "profiles": {"p": {"scorers": [{"type": "from_entry_point", "params": {"replica_id": "a"}}]}}}
        )
        print(registry.make(s.policy, s).name, "from_entry_point" in registry.names("scorer"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["p", "True"]


def test_a_declaration_with_profiles_validates_without_the_router_extra(plugin_path: Path) -> None:
    # The base install has no xxhash, aiohttp, ...: validating the router section must not need them.
    code = textwrap.dedent(
        f"""
        import sys
        for m in ("xxhash", "aiohttp", "httpx", "prometheus_client", "redis", "uvloop"):
            sys.modules[m] = None
        from gpufleet.infra import spec
        fleet, _ = spec.load_text({fleet_text()!r})
        print(fleet.router.policy, sorted(fleet.router.profiles))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sticky ['sticky']"
