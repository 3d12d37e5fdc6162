"""The simulator's events mode and several routers: the same policy objects fed by engine KV events."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gpufleet.infra.cli import app as cli_app
from gpufleet.router.sim import engine, metrics
from gpufleet.router.sim.fleet import uniform_fleet
from gpufleet.router.workloads import generators


def _wl(n=400):
    fleet = uniform_fleet(4, kv_capacity_tokens=60_000)
    return fleet, generators.make_workload("multiturn", n, seed=1, settings=fleet.settings)


def test_approximate_mode_with_one_router_is_the_default_path():
    fleet, wl = _wl(200)
    a = engine.simulate(wl, fleet, "cache_aware", seed=0)
    b = engine.simulate(wl, fleet, "cache_aware", seed=0, kv_state="approximate", routers=1)
    assert [r.replica for r in a.records] == [r.replica for r in b.records]


def test_events_mode_feeds_each_router_the_engines_blocks():
    fleet, wl = _wl()
    res = engine.simulate(wl, fleet, "cache_aware", seed=0, kv_state="events", routers=1, event_delay_s=0.02)
    s = metrics.summarize(res)
    oracle = metrics.summarize(engine.simulate(wl, fleet, "oracle", seed=0))
    assert s.hit_ratio >= 0.95 * oracle.hit_ratio


def test_four_routers_agree_in_events_mode_and_lose_hits_when_guessing():
    fleet, wl = _wl()
    ev1 = metrics.summarize(engine.simulate(wl, fleet, "cache_aware", seed=0, kv_state="events"))
    ev4 = metrics.summarize(engine.simulate(wl, fleet, "cache_aware", seed=0, kv_state="events", routers=4))
    ap4 = metrics.summarize(engine.simulate(wl, fleet, "cache_aware", seed=0, kv_state="approximate", routers=4))
    assert ev4.hit_ratio >= 0.97 * ev1.hit_ratio
    assert ap4.hit_ratio < ev4.hit_ratio  # each guessing router sees only its own share


def test_bad_arguments_are_refused():
    fleet, wl = _wl(10)
    with pytest.raises(ValueError, match="kv_state"):
        engine.simulate(wl, fleet, "cache_aware", kv_state="exact")
    with pytest.raises(ValueError, match="routers"):
        engine.simulate(wl, fleet, "cache_aware", routers=0)


def test_bench_sim_cli_takes_kv_state_and_routers(tmp_path):
    import pathlib

    fleet = pathlib.Path(__file__).resolve().parents[2] / "bench" / "fleet.yaml"
    r = CliRunner().invoke(
        cli_app,
        [
            "bench", "sim", "--fleet", str(fleet), "--deployment", "qwen-32b", "--workload", "multiturn",
            "--requests", "150", "--policies", "cache_aware", "--kv-state", "events", "--routers", "2",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "kv state events, 2 router(s)" in r.output
    bad = CliRunner().invoke(
        cli_app,
        [
            "bench",
            "sim",
            "--fleet",
            str(fleet),
            "--deployment",
            "qwen-32b",
            "--workload",
            "multiturn",
            "--kv-state",
            "x",
        ],
    )
    assert bad.exit_code == 1 and "--kv-state" in bad.output
