"""Failure classification and outlier ejection (router/health.py), table-driven where it fits, no network."""

from __future__ import annotations

import pytest

from gpufleet.router import health
from gpufleet.router.config import HealthSettings
from gpufleet.router.health import Failure, classify_status
from gpufleet.router.types import ReplicaState


def fleet(n: int, model: str = "m") -> list[ReplicaState]:
    return [ReplicaState(id=f"r{i}" if model == "m" else f"{model}{i}", model=model) for i in range(n)]


def tracker(reps: list[ReplicaState], **kw: object) -> tuple[health.HealthTracker, list[tuple[str, str, str]]]:
    ejected: list[tuple[str, str, str]] = []
    t = health.HealthTracker(
        HealthSettings.model_validate(kw), reps, on_eject=lambda r, kind, why: ejected.append((r.id, kind, why))
    )
    return t, ejected


@pytest.mark.parametrize(
    ("status", "kind"),
    [(200, None), (204, None), (400, Failure.REQUEST), (404, Failure.REQUEST), (422, Failure.REQUEST),
     (429, Failure.BUSY), (500, Failure.REQUEST), (501, Failure.REQUEST), (502, Failure.GATEWAY),
     (503, Failure.GATEWAY), (504, Failure.GATEWAY)],
)  # fmt: skip
def test_status_classification(status: int, kind: Failure | None) -> None:
    assert classify_status(status) is kind


def test_replica_faults_count_and_request_failures_do_not() -> None:
    assert {k for k in Failure if k.replica_fault} == {
        Failure.CONNECT, Failure.RESET, Failure.TIMEOUT, Failure.FIRST_BYTE, Failure.PROTOCOL, Failure.GATEWAY
    }  # fmt: skip
    assert not Failure.REQUEST.retryable and Failure.BUSY.retryable and not Failure.BUSY.replica_fault


def test_an_engine_error_answer_resets_the_consecutive_count_and_never_ejects() -> None:
    reps = fleet(3)
    t, ejected = tracker(reps, eject_after_failures=2)
    for _ in range(100):
        t.answered_error(reps[0], 500)
        t.failure(reps[0], Failure.REQUEST)
    t.failure(reps[0], Failure.CONNECT)
    t.answered_error(reps[0], 500)  # it answered: alive
    t.failure(reps[0], Failure.CONNECT)
    assert reps[0].healthy and ejected == []
    t.failure(reps[0], Failure.CONNECT)
    assert not reps[0].healthy and ejected[0][:2] == ("r0", "consecutive_failures")
    assert "2 consecutive replica failures (last connect" in ejected[0][2]


def test_a_replica_failure_makes_the_replica_suspect_and_asks_for_a_check_once() -> None:
    reps = fleet(2)
    probed: list[str] = []
    t = health.HealthTracker(HealthSettings(), reps, on_suspect=lambda r: probed.append(r.id))
    t.failure(reps[0], Failure.FIRST_BYTE)
    t.failure(reps[0], Failure.FIRST_BYTE)
    assert reps[0].suspect and probed == ["r0"]
    t.check_passed(reps[0])
    assert not reps[0].suspect


@pytest.mark.parametrize(("n", "percent", "cap"), [(2, 50, 1), (4, 50, 2), (10, 10, 1), (10, 30, 3), (5, 100, 5)])
def test_outlier_ejection_is_capped_per_model(n: int, percent: float, cap: int) -> None:
    reps = fleet(n) + fleet(2, model="other")
    t, ejected = tracker(reps, eject_after_failures=1, max_ejection_percent=percent)
    for r in reps[:n]:
        t.failure(r, Failure.RESET)
    assert sum(not r.healthy for r in reps[:n]) == cap
    t.failure(reps[n], Failure.RESET)  # another model has its own cap
    assert not reps[n].healthy


def test_a_models_only_replica_is_not_ejected_by_outlier_detection_but_is_by_a_failed_check() -> None:
    reps = fleet(1)
    t, ejected = tracker(reps, eject_after_failures=1)
    t.failure(reps[0], Failure.CONNECT)
    assert reps[0].healthy
    assert t.check_failed(reps[0], "ConnectionRefusedError")
    assert not reps[0].healthy and ejected[0][1] == "active_check"


def test_a_failed_active_check_ejects_past_the_cap() -> None:
    reps = fleet(4)
    t, ejected = tracker(reps, max_ejection_percent=25)
    for r in reps:
        t.check_failed(r, "no answer in 2s")
    assert not any(r.healthy for r in reps)  # a killed pool is out entirely
    assert [e[1] for e in ejected] == ["active_check"] * 4


def test_success_rate_outlier_is_ejected_and_its_peers_are_not() -> None:
    reps = fleet(5)
    t, ejected = tracker(reps, eject_after_failures=1000, success_rate_min_requests=20)
    for r in reps:
        for _ in range(50):
            t.success(r)
    for _ in range(15):  # r0 resets 15 of 65 connections, never enough in a row
        t.failure(reps[0], Failure.RESET)
        t.success(reps[0])
    assert t.evaluate() == ["r0"]
    assert ejected[0][1] == "success_rate" and all(r.healthy for r in reps[1:])
    assert t.evaluate() == []  # the window was reset


def test_poison_answers_spread_or_concentrated_never_make_an_outlier() -> None:
    reps = fleet(4)
    t, ejected = tracker(reps, eject_after_failures=1)
    for r in reps:
        for _ in range(40):
            t.success(r)
    for _ in range(20):  # a poison request every 2 s for 60 s, all to one replica
        t.answered_error(reps[0], 500)
    assert t.evaluate() == [] and ejected == []


def test_a_replica_failing_every_input_is_ejected_by_failure_percentage() -> None:
    reps = fleet(3)
    t, ejected = tracker(reps, failure_percentage_threshold=85, success_rate_min_requests=20)
    for _ in range(30):
        t.answered_error(reps[0], 500)
        t.success(reps[1])
        t.success(reps[2])
    assert t.evaluate() == ["r0"] and ejected[0][1] == "failure_percentage"


def test_replicas_added_later_are_tracked_and_forgotten() -> None:
    reps = fleet(2)
    t, _ = tracker(reps, eject_after_failures=1)
    late = ReplicaState(id="late", model="m")
    t.failure(late, Failure.CONNECT)
    assert not late.healthy and t.record("late")[0] == 1
    t.forget("late")
    with pytest.raises(KeyError):
        t.record("late")


def test_the_cap_counts_a_replicas_current_state_after_membership_rebuilt_it() -> None:
    reps = fleet(4)
    t, _ = tracker(reps, eject_after_failures=1, max_ejection_percent=50)
    rebuilt = [ReplicaState(id=r.id, model="m") for r in reps]  # a reload made new state objects
    for r in rebuilt:
        t.failure(r, Failure.RESET)
    assert sum(not r.healthy for r in rebuilt) == 2
