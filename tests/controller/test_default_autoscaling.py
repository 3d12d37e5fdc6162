"""A deployment that may grow and declares no `autoscaling:` is scaled by the controller's decision on
the default (in_flight, 80 % of max_concurrent_requests), from the plan object and from its JSON alike."""

from __future__ import annotations

import json

from gpufleet.infra import plan, spec
from gpufleet.infra.controller import autoscale as a
from gpufleet.infra.controller import scaler

FLEET = """\
fleet: t-default
clouds:
  local: {host: 127.0.0.1}
nodepools:
  - {name: top, cloud: local, instance_type: g6.xlarge, priority: 10, min_nodes: 1, max_nodes: 2}
  - {name: next, cloud: local, instance_type: g5.xlarge, priority: 5, min_nodes: 0, max_nodes: 3, warm_nodes: 1}
deployments:
  - {name: qwen, model: Qwen/Qwen3-0.6B, min_replicas: 1, max_replicas: 4, max_model_len: 4096, max_concurrent_requests: 10}
  - {name: fixed, model: Qwen/Qwen3-0.6B, nodepools: [next], min_replicas: 1, max_replicas: 1, max_model_len: 4096}
"""


def _plan() -> plan.Plan:
    return plan.compile_fleet(spec.load_text(FLEET)[0])


def test_the_plan_object_and_its_json_give_the_decision_the_same_default():
    p = _plan()
    from_obj = a.AutoscaleFacts.from_plan(p)
    from_json = scaler.facts_from_plan_json(json.loads(json.dumps(p.to_json_dict())))
    for facts in (from_obj, from_json):
        qwen, fixed = facts.deployments
        assert qwen.autoscaling == spec.Autoscaling(signal="in_flight", target=8)
        assert fixed.autoscaling is None


def test_load_above_the_default_target_grows_the_top_pool_first_and_a_fixed_deployment_stays():
    facts = a.AutoscaleFacts.from_plan(_plan())
    observed = {
        ("qwen", "top"): a.PoolObservation(1, 1),
        ("qwen", "next"): a.PoolObservation(0, 0),
        ("fixed", "next"): a.PoolObservation(1, 1),
    }
    load = {"qwen": a.LoadSample(0.0, 20.0), "fixed": a.LoadSample(0.0, 50.0)}  # 20 in flight / 8 -> 3
    state = a.AutoscaleState()
    d = a.scale(facts, observed, load, state, 0.0)  # the default scale_up_delay_s (30) starts running
    assert d.targets[("qwen", "top")] == 1 and d.desired["qwen"] == 3
    d = a.scale(facts, observed, load, d.state, 31.0)
    assert d.targets == {("qwen", "top"): 2, ("qwen", "next"): 1, ("fixed", "next"): 1}
