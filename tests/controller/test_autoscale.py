"""The autoscaler's pure decision: replica targets per (deployment, pool) by pool priority, table-driven."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.infra import spec
from gpufleet.infra.controller import autoscale as a

ROOT = Path(__file__).resolve().parents[2]


def auto(
    signal: str = "in_flight", target: float = 10, up: float = 0, down: float = 0, **kw: float
) -> spec.Autoscaling:
    return spec.Autoscaling.model_validate(
        {"signal": signal, "target": target, "scale_up_delay_s": up, "scale_down_delay_s": down, **kw}
    )


def facts(
    autoscaling: spec.Autoscaling | None = None, *, min_r: int = 2, max_r: int = 10, top: int = 4, mid: int = 3
) -> a.AutoscaleFacts:
    """One deployment (1 GPU per replica) over top (prio 100), mid (prio 50, 1 warm node), low (prio 10)."""
    chain = (
        a.PoolSlots("top", 100, capacity=top),
        a.PoolSlots("mid", 50, capacity=mid, warm_placeholders=1),
        a.PoolSlots("low", 10, capacity=4),
    )
    dep = a.ScalingFacts("llama", min_r, max_r, 1, chain, autoscaling)
    return a.AutoscaleFacts((dep,), {"top": top, "mid": mid, "low": 4})


def obs(**pools: int | tuple[int, int]) -> dict[tuple[str, str], a.PoolObservation]:
    """`top=3` (3 asked, 3 ready) or `top=(4, 3)` (4 asked, 3 ready); unnamed pools hold none."""
    out = {}
    for pool in ("top", "mid", "low"):
        v = pools.get(pool, 0)
        asked, ready = v if isinstance(v, tuple) else (v, v)
        out[("llama", pool)] = a.PoolObservation(asked, ready)
    return out


def targets(d: a.ScaleDecision) -> dict[str, int]:
    return {pool: n for (_dep, pool), n in d.targets.items()}


@dataclass
class Case:
    name: str
    autoscaling: spec.Autoscaling | None
    observed: dict[str, int | tuple[int, int]]
    value: float | None
    want: dict[str, int]
    evict: dict[str, int] = field(default_factory=dict)
    min_r: int = 2
    max_r: int = 10
    note: str | None = None
    partial: bool = False
    """The sample came from a partial read (a router pod did not answer)."""


CASES = [
    Case(
        "in-flight over target fills the top pool, then the next (its placeholder evicted)",
        auto(target=10),
        {"top": 2},
        60,
        {"top": 4, "mid": 2, "low": 0},
        {"mid": 1},
    ),
    Case(
        "demand within the top pool's room stays there", auto(target=10), {"top": 2}, 35, {"top": 4, "mid": 0, "low": 0}
    ),
    Case("within tolerance nothing moves", auto(target=10), {"top": 3}, 31, {"top": 3, "mid": 0, "low": 0}),
    Case(
        "low load scales down from the lowest priority first",
        auto(target=10),
        {"top": 4, "mid": 3, "low": 2},
        55,
        {"top": 4, "mid": 2, "low": 0},
    ),
    Case(
        "never above max_replicas",
        auto(target=10),
        {"top": 4},
        1000,
        {"top": 4, "mid": 2, "low": 0},
        {"mid": 1},
        max_r=6,
    ),
    Case("never below min_replicas", auto(target=10), {"top": 4, "mid": 2}, 0, {"top": 3, "mid": 0, "low": 0}, min_r=3),
    Case(
        "no load sample holds the count",
        auto(target=10),
        {"top": 3, "mid": 1},
        None,
        {"top": 3, "mid": 1, "low": 0},
        note="no load sample",
    ),
    Case(
        "no load sample below min_replicas still restores it at once",
        auto(target=10),
        {"top": 1},
        None,
        {"top": 2, "mid": 0, "low": 0},
    ),
    Case(
        "without autoscaling a deployment is held at min_replicas",
        None,
        {"top": 1},
        500,
        {"top": 2, "mid": 0, "low": 0},
    ),
    Case(
        "without autoscaling extra replicas are removed, lowest priority first",
        None,
        {"top": 2, "mid": 1},
        500,
        {"top": 2, "mid": 0, "low": 0},
    ),
    Case(
        "ttft p90 twice the target doubles the ready replicas",
        auto("ttft_p90_s", target=0.5),
        {"top": 2},
        1.0,
        {"top": 4, "mid": 0, "low": 0},
    ),
    Case(
        "ttft with no request in the window falls to min_replicas",
        auto("ttft_p90_s", target=0.5),
        {"top": 4},
        None,
        {"top": 2, "mid": 0, "low": 0},
    ),
    Case(
        "queued prefill tokens per replica",
        auto("queued_prefill_tokens", target=4000),
        {"top": 2},
        30000,
        {"top": 4, "mid": 3, "low": 1},
        {"mid": 1},
    ),
    Case(
        "a partial read still scales up on the load it proves",
        auto(target=10),
        {"top": 2},
        60,
        {"top": 4, "mid": 2, "low": 0},
        {"mid": 1},
        partial=True,
    ),
    Case(
        "a partial read never scales down: the routers not read may hold the load",
        auto(target=10),
        {"top": 4, "mid": 3, "low": 2},
        5,
        {"top": 4, "mid": 3, "low": 2},
        partial=True,
    ),
    Case(
        "a partial ttft read with no first token in the window holds",
        auto("ttft_p90_s", target=0.5),
        {"top": 4},
        None,
        {"top": 4, "mid": 0, "low": 0},
        partial=True,
    ),
    Case(
        "a partial read below min_replicas still restores it",
        auto(target=10),
        {"top": 1},
        0,
        {"top": 2, "mid": 0, "low": 0},
        partial=True,
    ),
    Case(
        "queued prefill tokens under target scale down from the lowest pool",
        auto("queued_prefill_tokens", target=4000),
        {"top": 4, "mid": 1},
        8000,
        {"top": 2, "mid": 0, "low": 0},
    ),
    Case(
        "pending replicas are kept while the ready ones run at target",
        auto(target=10),
        {"top": (4, 2)},
        20,
        {"top": 4, "mid": 0, "low": 0},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_scale_table(case: Case) -> None:
    f = facts(case.autoscaling, min_r=case.min_r, max_r=case.max_r)
    load = (
        {}
        if case.value is None and case.autoscaling is not None and case.autoscaling.signal != "ttft_p90_s"
        else {"llama": a.LoadSample(100.0, case.value, partial=case.partial)}
    )
    d = a.scale(f, obs(**case.observed), load, a.AutoscaleState(), 100.0)
    assert targets(d) == case.want
    assert d.evict_placeholders == case.evict
    if case.note:
        assert any(case.note in msg for _dep, msg in d.notes), d.notes
    for act in d.actions:
        assert act.target == case.want[act.pool] and act.current != act.target and act.reason


def run(f: a.AutoscaleFacts, script: list[tuple[float, dict[str, int], float]]) -> list[dict[str, int]]:
    """Feed (time, observed, in-flight total) rounds; the observation is what the last round asked for."""
    state = a.AutoscaleState()
    out = []
    for t, observed, value in script:
        d = a.scale(f, obs(**observed), {"llama": a.LoadSample(t, value)}, state, t)
        state = d.state
        out.append(targets(d))
    return out


def test_scale_up_waits_for_the_up_delay() -> None:
    f = facts(auto(target=10, up=30, down=300))
    rounds = run(f, [(0, {"top": 2}, 40), (15, {"top": 2}, 40), (30, {"top": 2}, 40)])
    assert [r["top"] for r in rounds] == [2, 2, 4]


def test_a_dip_restarts_the_up_delay() -> None:
    f = facts(auto(target=10, up=30))
    rounds = run(f, [(0, {"top": 2}, 40), (20, {"top": 2}, 20), (40, {"top": 2}, 40), (60, {"top": 2}, 40)])
    assert [r["top"] for r in rounds] == [2, 2, 2, 2]
    assert run(f, [(0, {"top": 2}, 40), (40, {"top": 2}, 40)])[-1]["top"] == 4


def test_scale_down_waits_for_the_down_delay_and_the_cool_down_after_a_scale_up() -> None:
    f = facts(auto(target=10, up=0, down=100))
    rounds = run(
        f,
        [
            (0, {"top": 2}, 60),  # up at once: top 4 + mid 2
            (10, {"top": 4, "mid": 2}, 20),  # wants 2 now, but the cool-down since t=0 runs to t=100
            (60, {"top": 4, "mid": 2}, 20),
            (99, {"top": 4, "mid": 2}, 20),
            (110, {"top": 4, "mid": 2}, 20),  # below since t=10 for 100 s, and 110 s since the change
        ],
    )
    assert rounds[0] == {"top": 4, "mid": 2, "low": 0}
    assert rounds[1] == rounds[2] == rounds[3] == {"top": 4, "mid": 2, "low": 0}
    assert rounds[4] == {"top": 2, "mid": 0, "low": 0}


def test_a_pod_pending_past_the_timeout_marks_the_pool_full_and_moves_on() -> None:
    f = facts(auto(target=10, pending_timeout_s=300))
    observed = obs(top=(4, 3))
    observed[("llama", "top")] = a.PoolObservation(4, 3, pending_since_s=(0.0,))
    load = {"llama": a.LoadSample(200.0, 40)}
    early = a.scale(f, observed, load, a.AutoscaleState(), 200.0)
    assert targets(early) == {"top": 4, "mid": 0, "low": 0}  # still within its timeout
    late = a.scale(f, observed, {"llama": a.LoadSample(301.0, 40)}, early.state, 301.0)
    assert targets(late) == {"top": 3, "mid": 1, "low": 0}
    assert late.evict_placeholders == {"mid": 1}
    assert "top" in late.state.full
    # the next round, with top still full, does not move the replica back
    again = a.scale(f, obs(top=3, mid=1), {"llama": a.LoadSample(320.0, 40)}, late.state, 320.0)
    assert targets(again) == {"top": 3, "mid": 1, "low": 0}
    # more demand skips the full pool
    more = a.scale(f, obs(top=3, mid=1), {"llama": a.LoadSample(330.0, 60)}, again.state, 330.0)
    assert targets(more) == {"top": 3, "mid": 3, "low": 0}


def test_a_capacity_error_marks_the_pool_full_until_the_retry_time() -> None:
    f = facts(auto(target=10))
    settings = a.AutoscaleSettings(full_retry_s=600)
    observed = obs(top=2)
    observed[("llama", "top")] = a.PoolObservation(2, 2, capacity_error_at_s=50.0)
    d = a.scale(f, observed, {"llama": a.LoadSample(100, 40)}, a.AutoscaleState(), 100.0, settings)
    assert targets(d) == {"top": 2, "mid": 2, "low": 0}
    assert d.state.full["top"][1] == "capacity error"
    # after the retry time, without a new error, the pool is tried again
    later = a.scale(f, obs(top=2, mid=2), {"llama": a.LoadSample(700, 60)}, d.state, 700.0, settings)
    assert "top" not in later.state.full
    assert targets(later) == {"top": 4, "mid": 2, "low": 0}


def test_every_pool_full_reports_below_min_replicas() -> None:
    f = facts(None, min_r=3, top=1, mid=1)
    observed = obs(top=1, mid=1)
    observed[("llama", "low")] = a.PoolObservation(0, 0, capacity_error_at_s=0.0)
    d = a.scale(f, observed, {}, a.AutoscaleState(), 10.0)
    assert targets(d) == {"top": 1, "mid": 1, "low": 0}
    text = " / ".join(msg for _dep, msg in d.notes)
    assert "below min_replicas: 2 of 3" in text and "low full (capacity error)" in text


def test_a_stale_sample_holds() -> None:
    f = facts(auto(target=10))
    d = a.scale(f, obs(top=3), {"llama": a.LoadSample(0.0, 500)}, a.AutoscaleState(), 100.0)
    assert targets(d)["top"] == 3 and not d.actions
    assert any("old" in msg for _dep, msg in d.notes)


def test_deployments_sharing_a_pool_share_its_gpus() -> None:
    shared = a.PoolSlots("shared", 50, capacity=4)
    llama = a.ScalingFacts("llama", 1, 8, 1, (a.PoolSlots("l4", 100, 2), shared), auto(target=10))
    qwen = a.ScalingFacts("qwen", 2, 8, 2, (a.PoolSlots("a10", 100, 1), shared), None)
    f = a.AutoscaleFacts((llama, qwen), {"l4": 2, "a10": 2, "shared": 4})
    observed = {
        ("llama", "l4"): a.PoolObservation(2, 2),
        ("llama", "shared"): a.PoolObservation(0, 0),
        ("qwen", "a10"): a.PoolObservation(1, 1),
        ("qwen", "shared"): a.PoolObservation(1, 1),  # 2 of the shared pool's 4 GPUs
    }
    d = a.scale(f, observed, {"llama": a.LoadSample(0, 100)}, a.AutoscaleState(), 0.0)
    assert d.targets[("llama", "shared")] == 2  # 4 GPUs less qwen's 2
    assert any("without room" in msg for dep, msg in d.notes if dep == "llama")


def test_facts_from_the_local_plan() -> None:
    from gpufleet.infra import plan

    p = plan.compile_file(ROOT / "stacks" / "local" / "fleet.yaml")
    f = a.AutoscaleFacts.from_plan(p)
    llama = next(d for d in f.deployments if d.name == "llama-8b")
    assert [(s.pool, s.capacity) for s in llama.chain] == [("local-l4", 4), ("local-l40s", 6)]
    assert f.pool_gpus["local-l40s"] == 6
    # the baseline placement is already what the function keeps without autoscaling
    observed = {
        (d.name, pl.pool): a.PoolObservation(pl.replicas, pl.replicas) for d in p.deployments for pl in d.placement
    }
    d = a.scale(f, observed, {}, a.AutoscaleState(), 0.0)
    assert not d.actions


def test_actions_list_removals_lowest_priority_first_then_additions_highest_first() -> None:
    f = facts(auto(target=10))
    down = a.scale(f, obs(top=4, mid=3, low=2), {"llama": a.LoadSample(0, 20)}, a.AutoscaleState(), 0.0)
    assert [(x.pool, x.target) for x in down.actions] == [("low", 0), ("mid", 0), ("top", 2)]
    up = a.scale(f, obs(top=1), {"llama": a.LoadSample(0, 90)}, a.AutoscaleState(), 0.0)
    assert [(x.pool, x.target) for x in up.actions] == [("top", 4), ("mid", 3), ("low", 2)]
