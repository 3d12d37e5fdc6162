"""The controller simulation: on a fast ramp, fewer requests wait for a cold node with the controller."""

from __future__ import annotations

from gpufleet.infra.controller import decision as d
from gpufleet.infra.controller import sim

FACTS = d.FleetFacts(
    pools={
        "top": d.PoolFacts(
            "top", "aws", 100, min_nodes=1, baseline_nodes=1, warm_nodes=1, max_nodes=4, gpus_per_node=8
        ),
        "next": d.PoolFacts(
            "next", "gcp", 50, min_nodes=0, baseline_nodes=0, warm_nodes=1, max_nodes=4, gpus_per_node=8
        ),
    },
    deployments=(d.DeploymentFacts("m", ("top", "next")),),
)


def run(controller: d.ControllerSettings | None) -> sim.SimResult:
    return sim.simulate(
        FACTS,
        ("top", "next"),
        1,
        sim.ramp(4, 56, up_s=1200),
        duration_s=3 * 3600,
        provision_delay_s=600,
        usd_per_node_hour={"top": 55.0, "next": 88.0},
        controller=controller,
    )


def test_controller_cuts_requests_waiting_for_cold_nodes() -> None:
    without, with_controller = run(None), run(d.ControllerSettings())
    assert without.waited > 0
    assert with_controller.waited < 0.5 * without.waited
    assert with_controller.actions > 0 and without.actions == 0
    assert with_controller.requests == without.requests


def test_warmth_costs_node_hours() -> None:
    assert run(d.ControllerSettings()).node_hours > run(None).node_hours


def test_ramp_shape() -> None:
    demand = sim.ramp(4, 40, warm_s=10, up_s=100, hold_s=10, down_s=100)
    assert [demand(t) for t in (0, 60, 115, 170, 500)] == [4, 22, 40, 22, 4]
