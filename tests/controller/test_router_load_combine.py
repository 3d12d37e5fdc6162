"""Reading several router pods: sums per replica, TTFT histograms merged over a window into a
p90, a pod that cannot be read counted and left out (never read as idle). The metrics text is
what the real `RouterMetrics` renders; only the transport (`fetch`) is a table here."""

from __future__ import annotations

import logging
import math

import pytest

from gpufleet.infra import spec
from gpufleet.infra.controller import autoscale as a
from gpufleet.infra.controller import router_load as rl
from gpufleet.infra.controller.runtime import ControllerMetrics
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.types import ReplicaState

INF = math.inf


@pytest.mark.parametrize(
    ("q", "buckets", "want"),
    [
        (0.9, {}, None),
        (0.9, {0.1: 0, 1.0: 0, INF: 0}, None),  # no observation in the window
        (0.5, {1.0: 10, INF: 10}, 0.5),  # first bucket: interpolated from 0
        (0.9, {0.1: 0, 0.2: 10, INF: 10}, 0.19),  # all in (0.1, 0.2]: 0.1 + 0.1 x 0.9
        (0.9, {0.1: 5, 0.5: 5, 1.0: 10, INF: 10}, 0.9),  # rank 9 in (0.5, 1]: 0.5 + 0.5 x 4/5
        (0.9, {0.1: 1, 1.0: 1, INF: 10}, 1.0),  # in +Inf: the highest finite bound
    ],
)
def test_histogram_quantile_interpolates_as_prometheus_does(q, buckets, want) -> None:  # type: ignore[no-untyped-def]
    got = rl.histogram_quantile(q, buckets)
    assert got == (None if want is None else pytest.approx(want))


class Routers:
    """Router pods by name, each a real `RouterMetrics`; `down` ones refuse the connection."""

    def __init__(self, *pods: str) -> None:
        self.metrics = {p: RouterMetrics([("llama-top-0", "m"), ("llama-mid-0", "m")], "cache_aware") for p in pods}
        self.down: set[str] = set()
        self.pods = list(pods)

    def urls(self) -> dict[str, str]:
        return {p: f"http://{p}/metrics" for p in self.pods}

    def fetch(self, url: str, timeout_s: float) -> str:
        pod = url.split("/")[2]
        if pod in self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return self.metrics[pod].render().decode()


def reader(routers: Routers, now: list[float], **kw: object) -> rl.RouterLoadReader:
    return rl.RouterLoadReader(routers.urls, clock=lambda: now[0], fetch=routers.fetch, window_s=60, **kw)  # type: ignore[arg-type]


def facts(signal: str) -> a.AutoscaleFacts:
    auto = spec.Autoscaling.model_validate({"signal": signal, "target": 1})
    chain = (a.PoolSlots("top", 100, capacity=4), a.PoolSlots("mid", 50, capacity=4))
    return a.AutoscaleFacts((a.ScalingFacts("llama", 1, 8, 1, chain, auto),), {"top": 4, "mid": 4})


def test_in_flight_and_queued_prefill_add_up_over_the_router_pods() -> None:
    routers = Routers("router-a", "router-b")
    routers.metrics["router-a"].in_flight.labels("llama-top-0").set(3)
    routers.metrics["router-b"].in_flight.labels("llama-top-0").set(4)
    routers.metrics["router-b"].in_flight.labels("llama-mid-0").set(1)
    for pod, tokens in (("router-a", 1200), ("router-b", 800)):
        state = ReplicaState(id="llama-top-0", model="m")
        state.begin(tokens)
        routers.metrics[pod].watch_replicas(lambda state=state: [state])  # type: ignore[misc]
    load = reader(routers, [100.0]).read()
    assert load is not None and not load.partial and load.answered == ("router-a", "router-b")
    assert load.in_flight == {"llama-top-0": 7, "llama-mid-0": 1}
    assert load.queued_prefill_tokens == {"llama-top-0": 2000}
    assert rl.samples(facts("in_flight"), load)["llama"] == a.LoadSample(100.0, 8)
    assert rl.samples(facts("queued_prefill_tokens"), load)["llama"] == a.LoadSample(100.0, 2000)


def test_ttft_histograms_merge_over_the_window_into_one_p90() -> None:
    routers = Routers("router-a", "router-b")
    now = [100.0]
    r = reader(routers, now)
    old = routers.metrics["router-a"].replica["llama-top-0"].time_to_first_token
    for _ in range(50):
        old.observe(5.0)  # before the window: must not count
    assert rl.samples(facts("ttft_p90_s"), r.read()) == {}  # no baseline yet: no sample, the count holds
    now[0] = 170.0
    for _ in range(9):
        routers.metrics["router-a"].replica["llama-top-0"].time_to_first_token.observe(0.12)
    routers.metrics["router-b"].replica["llama-mid-0"].time_to_first_token.observe(0.6)
    load = r.read()
    assert load is not None and load.ttft is not None
    merged_total = sum(b[INF] for b in load.ttft.values())
    assert merged_total == 10  # 9 + 1 in the window, the 50 old ones left out
    sample = rl.samples(facts("ttft_p90_s"), load)["llama"]
    # Rank 9 of 10: the 9th observation falls in (0.1, 0.15] -> its upper end.
    assert sample.value == pytest.approx(0.15)


def test_a_restarted_router_counts_from_zero_not_as_a_negative_increase() -> None:
    routers = Routers("router-a")
    now = [100.0]
    r = reader(routers, now)
    for _ in range(20):
        routers.metrics["router-a"].replica["llama-top-0"].time_to_first_token.observe(0.3)
    r.read()
    routers.metrics["router-a"] = RouterMetrics([("llama-top-0", "m")], "cache_aware")  # the pod restarted
    routers.metrics["router-a"].replica["llama-top-0"].time_to_first_token.observe(2.0)
    now[0] = 130.0
    load = r.read()
    assert load is not None and load.ttft is not None and load.ttft["llama-top-0"][INF] == 1
    assert rl.samples(facts("ttft_p90_s"), load)["llama"].value == pytest.approx(1.5 + 0.5 * 0.9)


def test_no_first_token_in_the_window_is_idle_unless_requests_are_in_flight() -> None:
    routers = Routers("router-a")
    now = [100.0]
    r = reader(routers, now)
    r.read()
    now[0] = 115.0
    assert rl.samples(facts("ttft_p90_s"), r.read())["llama"].value is None  # idle: may scale down
    routers.metrics["router-a"].in_flight.labels("llama-top-0").set(2)
    now[0] = 130.0
    assert rl.samples(facts("ttft_p90_s"), r.read()) == {}  # busy without a first token: hold


def test_a_router_pod_that_cannot_be_read_is_counted_logged_and_makes_the_read_partial(caplog) -> None:  # type: ignore[no-untyped-def]
    routers = Routers("router-a", "router-b")
    routers.metrics["router-a"].in_flight.labels("llama-top-0").set(2)
    routers.down.add("router-b")
    metrics = ControllerMetrics()
    r = reader(routers, [100.0], metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="gpufleet.controller.routers"):
        load = r.read()
    assert load is not None and load.partial and load.failed == ("router-b",) and load.in_flight["llama-top-0"] == 2
    assert any("router-b" in rec.getMessage() and "left out" in rec.getMessage() for rec in caplog.records)
    assert metrics.router_scrapes.labels("router-b", "failed")._value.get() == 1
    assert metrics.router_scrapes.labels("router-a", "ok")._value.get() == 1
    assert metrics.routers.labels("failed")._value.get() == 1
    assert r.errors and r.errors[0][0] == "router-b"
    sample = rl.samples(facts("in_flight"), load)["llama"]
    assert sample.partial and sample.value == 2
    # Partial: 2 in flight asks for 2 of the 6 running, but the pod not read may hold the rest.
    observed = {("llama", "top"): a.PoolObservation(4, 4), ("llama", "mid"): a.PoolObservation(2, 2)}
    d = a.scale(facts("in_flight"), observed, {"llama": sample}, a.AutoscaleState(), 100.0)
    assert d.targets == {("llama", "top"): 4, ("llama", "mid"): 2}
    routers.down.add("router-a")
    assert r.read() is None  # nobody answered: no read at all, so no sample (the count holds)


def test_no_router_pod_or_a_failed_listing_is_no_read() -> None:
    routers = Routers()
    assert reader(routers, [1.0]).read() is None

    def broken() -> dict[str, str]:
        raise OSError("connection refused")

    r = rl.RouterLoadReader(broken)
    assert r.read() is None and "cannot list the router pods" in r.errors[0][1]
