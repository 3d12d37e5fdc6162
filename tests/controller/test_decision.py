"""The controller's pure decision on scripted utilisation sequences."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from pydantic import ValidationError

from gpufleet.infra.controller import decision as d

# lead_s=0: these scripts test the thresholds themselves; the look-ahead has its own tests.
S = d.ControllerSettings(high_water=0.8, low_water=0.5, cool_down_s=300, stale_after_s=60, lead_s=0)

FLEET = d.FleetFacts(
    pools={
        "aws": d.PoolFacts(
            "aws", "aws", 100, min_nodes=1, baseline_nodes=2, warm_nodes=0, max_nodes=4, gpus_per_node=8
        ),
        "gcp": d.PoolFacts("gcp", "gcp", 50, min_nodes=0, baseline_nodes=0, warm_nodes=1, max_nodes=4, gpus_per_node=8),
        "onprem": d.PoolFacts(
            "onprem", "kubernetes", 10, min_nodes=0, baseline_nodes=0, warm_nodes=0, max_nodes=2, gpus_per_node=8
        ),
    },
    deployments=(d.DeploymentFacts("llama", ("aws", "gcp", "onprem")),),
)


def sample(
    pool: str,
    t: float,
    busy: int,
    *,
    alloc: int = 16,
    pending: int = 0,
    placeholders: int | None = None,
    desired: int | None = None,
    load: float | None = None,
) -> d.PoolSample:
    return d.PoolSample(
        pool,
        t,
        ready_nodes=alloc // 8,
        gpus_allocatable=alloc,
        gpus_busy=busy,
        pending_gpus=pending,
        placeholders_desired=placeholders,
        desired_nodes=desired,
        replica_load=load,
    )


class Loop:
    """Feeds decide() a script and applies its actions to the observed counts, like the real loop."""

    def __init__(self, settings: d.ControllerSettings = S) -> None:
        self.settings = settings
        self.state: dict[str, d.PoolMemory] = {}
        self.placeholders = {"aws": 0, "gcp": 1, "onprem": 0}
        self.nodes = {"aws": 2, "gcp": 1, "onprem": 0}

    def step(self, t: float, aws_busy: int, *, gcp_busy: int = 0, stale: Iterable[str] = ()) -> d.ControllerDecision:
        samples = {
            "aws": sample("aws", t, aws_busy, placeholders=self.placeholders["aws"], desired=self.nodes["aws"]),
            "gcp": sample(
                "gcp",
                t,
                gcp_busy,
                alloc=8 * self.nodes["gcp"],
                placeholders=self.placeholders["gcp"],
                desired=self.nodes["gcp"],
            ),
            "onprem": sample("onprem", t, 0, alloc=0, placeholders=self.placeholders["onprem"]),
        }
        for name in stale:
            samples[name] = d.PoolSample(**{**samples[name].__dict__, "observed_at_s": t - 1000})
        decision = d.decide(FLEET, samples, self.state, t, self.settings)
        self.state = decision.state
        for action in decision.actions:
            (self.placeholders if action.kind == "set_placeholders" else self.nodes)[action.pool] = action.target
        return decision


def kinds(decision: d.ControllerDecision) -> set[tuple[str, str, int]]:
    return {(a.kind, a.pool, a.target) for a in decision.actions}


def test_below_threshold_keeps_declared_warmth() -> None:
    loop = Loop()
    decision = loop.step(0, aws_busy=10)  # 62 %: inside the band
    assert decision.actions == () and decision.warm_targets["gcp"] == 1


def test_crossing_high_water_warms_the_next_pool_and_its_nodes() -> None:
    loop = Loop()
    decision = loop.step(0, aws_busy=13)  # 81 %
    assert ("set_placeholders", "gcp", 2) in kinds(decision)
    # gcp has 1 node: the second placeholder would not fit, so its node count rises too.
    assert ("scale_nodes", "gcp", 2) in kinds(decision)
    assert decision.pressure["aws"] == pytest.approx(13 / 16)


def test_extra_warmth_grows_with_unmet_demand() -> None:
    # 16 busy + 8 pending on 16 GPUs: 8 GPUs cannot be placed -> 1 node of 8, plus one step ahead.
    decision = d.decide(
        FLEET,
        {
            "aws": sample("aws", 0, 16, pending=8, placeholders=0, desired=2),
            "gcp": sample("gcp", 0, 0, alloc=8, placeholders=1, desired=1),
            "onprem": sample("onprem", 0, 0, alloc=0, placeholders=0),
        },
        {},
        0,
        S,
    )
    assert decision.warm_targets["gcp"] == 3  # 1 declared + 2 extra


def test_hysteresis_holds_in_the_band_and_decays_only_after_cool_down() -> None:
    loop = Loop()
    loop.step(0, aws_busy=14)
    assert loop.placeholders["gcp"] == 2
    assert loop.step(60, aws_busy=11).actions == ()  # 69 %: in the band, hold
    assert loop.step(120, aws_busy=4).actions == ()  # cool, but the cool-down just started
    assert loop.step(400, aws_busy=4).actions == ()  # 280 s < 300 s
    decision = loop.step(421, aws_busy=4)
    assert kinds(decision) == {("set_placeholders", "gcp", 1)}  # back to declared warm_nodes
    assert loop.step(2000, aws_busy=0).actions == ()  # never below warm_nodes


def test_band_resets_the_cool_down() -> None:
    loop = Loop()
    loop.step(0, aws_busy=14)
    loop.step(100, aws_busy=4)  # cool from 100
    loop.step(200, aws_busy=10)  # back in the band: timer reset
    loop.step(300, aws_busy=4)  # cool from 300
    assert loop.step(450, aws_busy=4).actions == ()
    assert kinds(loop.step(600, aws_busy=4)) == {("set_placeholders", "gcp", 1)}


def test_bounds_cap_warmth_at_max_nodes() -> None:
    loop = Loop()
    for t in range(0, 600, 15):
        loop.step(t, aws_busy=16, gcp_busy=0)
    assert loop.placeholders["gcp"] == 2 and loop.nodes["gcp"] <= 4
    loop.step(700, aws_busy=16)
    decision = d.decide(
        FLEET,
        {
            "aws": sample("aws", 800, 16, pending=64, placeholders=0, desired=2),
            "gcp": sample("gcp", 800, 0, alloc=16, placeholders=2, desired=2),
            "onprem": sample("onprem", 800, 0, alloc=0, placeholders=0),
        },
        loop.state,
        800,
        S,
    )
    assert decision.warm_targets["gcp"] == 4
    assert all(a.target <= FLEET.pools[a.pool].max_nodes for a in decision.actions)


def test_cascade_warms_the_third_pool_when_the_second_is_hot() -> None:
    loop = Loop()
    decision = loop.step(0, aws_busy=16, gcp_busy=8)
    assert ("set_placeholders", "onprem", 1) in kinds(decision)
    # onprem is an existing cluster: its nodes are the cluster autoscaler's, never ours.
    assert not any(a.kind == "scale_nodes" and a.pool == "onprem" for a in decision.actions)


def test_stale_source_freezes_the_next_pool() -> None:
    loop = Loop()
    decision = loop.step(0, aws_busy=16, stale=["aws"])
    assert not any(a.pool == "gcp" for a in decision.actions)
    assert ("aws", "stale sample (1000s old)") in decision.notes


def test_stale_target_takes_no_action_and_decay_waits() -> None:
    loop = Loop()
    loop.step(0, aws_busy=14)
    assert loop.step(500, aws_busy=0, stale=["gcp"]).actions == ()
    assert loop.step(1000, aws_busy=0, stale=["gcp"]).actions == ()
    assert loop.placeholders["gcp"] == 2


def test_missing_sample_is_no_action() -> None:
    decision = d.decide(FLEET, {"aws": sample("aws", 0, 16, placeholders=0, desired=2)}, {}, 0, S)
    assert decision.actions == () and ("gcp", "no sample") in decision.notes


def test_replica_saturation_alone_triggers_warming() -> None:
    decision = d.decide(
        FLEET,
        {
            "aws": sample("aws", 0, 4, placeholders=0, desired=2, load=0.9),
            "gcp": sample("gcp", 0, 0, alloc=8, placeholders=1, desired=1),
            "onprem": sample("onprem", 0, 0, alloc=0, placeholders=0),
        },
        {},
        0,
        S,
    )
    assert ("set_placeholders", "gcp", 2) in kinds(decision)


def test_drifted_placeholders_are_restored_to_declared() -> None:
    decision = d.decide(
        FLEET,
        {
            "aws": sample("aws", 0, 4, placeholders=0, desired=2),
            "gcp": sample("gcp", 0, 0, alloc=8, placeholders=0, desired=1),
            "onprem": sample("onprem", 0, 0, alloc=0, placeholders=0),
        },
        {},
        0,
        S,
    )
    assert kinds(decision) == {("set_placeholders", "gcp", 1)}


def test_settings_reject_an_inverted_band() -> None:
    with pytest.raises(ValidationError, match="low_water"):
        d.ControllerSettings(high_water=0.5, low_water=0.6)


def test_facts_from_plan_follow_failover_order() -> None:
    plan = {
        "schema": "gpufleet.plan/v1",
        "pools": [
            {
                "name": "a",
                "cloud": "aws",
                "priority": 100,
                "min_nodes": 1,
                "baseline_nodes": 1,
                "warm_nodes": 1,
                "max_nodes": 4,
                "gpus_per_node": 8,
            },
            {
                "name": "b",
                "cloud": "gcp",
                "priority": 50,
                "min_nodes": 0,
                "baseline_nodes": 0,
                "warm_nodes": 1,
                "max_nodes": 4,
                "gpus_per_node": 8,
            },
        ],
        "deployments": [{"name": "m", "failover": ["a", "b"], "placement": [{"pool": "a", "replicas": 4}]}],
    }
    facts = d.FleetFacts.from_plan(plan)
    assert facts.deployments[0].chain == ("a", "b") and facts.pools["b"].warm_ceiling == 4
    with pytest.raises(ValueError, match="schema"):
        d.FleetFacts.from_plan({"schema": "x"})


LOOK_AHEAD = d.ControllerSettings(high_water=0.8, low_water=0.5, cool_down_s=300, stale_after_s=60, lead_s=300)


def test_fast_ramp_warms_before_crossing_high_water() -> None:
    loop, without = Loop(LOOK_AHEAD), Loop()
    warmed_at = {}
    for t, busy in zip(range(0, 300, 15), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16, 16, 16, 16, 16]):
        for name, lp in (("ahead", loop), ("threshold", without)):
            lp.step(t, busy)
            if lp.placeholders["gcp"] > 1 and name not in warmed_at:
                warmed_at[name] = (t, busy)
    # One GPU every 15 s: the look-ahead warms gcp while aws is still below 80 % (12.8 of 16).
    assert warmed_at["ahead"][1] < 12.8 <= warmed_at["threshold"][1]


def test_one_replica_step_does_not_trigger_the_look_ahead() -> None:
    loop = Loop(LOOK_AHEAD)
    for t in range(0, 600, 15):
        loop.step(t, 10)
    decision = loop.step(600, 11)  # +1 GPU once: 69 %, the forecast moves by about one GPU
    assert decision.actions == () and decision.pressure["aws"] < 0.8


def test_falling_demand_never_forecasts_a_spill() -> None:
    loop = Loop(LOOK_AHEAD)
    for t, busy in zip(range(0, 150, 15), [16, 15, 14, 13, 12, 11, 10, 9, 8, 7]):
        decision = loop.step(t, busy)
    assert decision.pressure["aws"] == pytest.approx(7 / 16)
