"""Replica health: failure classification, outlier ejection, active checks, backoff, re-admission.

Failures are classified once, here (`Failure`, `classify_status`):

- a *replica* failure: could not connect, connection reset or closed before an answer, a
  timeout or a passed first-byte deadline, a response that is not HTTP, or 502/503/504 (the
  replica is down, overloaded or a gateway in front of it failed). The attempt is retried on
  another replica (before the first byte reached the client) and counts toward ejection.
- a *request* failure: the engine answered an error for this input (4xx, 500 and any other 5xx).
  It is the client's answer: passed through, never retried, never held against the replica,
  which has just shown it is alive. One bad request cannot eject healthy replicas.
- 429 (the replica is busy) is retried elsewhere but is no fault of the replica.

Ejection works like Envoy's outlier detection:

- *consecutive replica failures*: `health.eject_after_failures` in a row (any answer resets it);
- *success-rate outliers*: every `outlier_interval_s`, replicas of a model with at least
  `success_rate_min_requests` attempts (and at least `success_rate_min_replicas` such replicas)
  whose rate of replica failures puts them `success_rate_stdev_factor` standard deviations below
  the mean are ejected;
- *failure percentage*: a replica whose share of 5xx answers of any cause reaches
  `failure_percentage_threshold` (an engine that fails every input) is ejected;
- all three are capped: at most `max_ejection_percent` of a model's replicas (at least one, when
  it has two or more) are held ejected by outlier detection at once, so a fault that looks like
  every replica's (or a flood of poison) cannot empty the pool;
- a failed *active check* (`GET /health`) ejects regardless of the cap: it is a direct
  observation, not an inference. A replica failure makes a replica *suspect* (routed to only when
  nothing else is available) and triggers an immediate check, so a hung or dead replica is out
  within one check timeout.

An ejected replica is re-admitted only by an active check that passes after its backoff; each
ejection that follows a re-admission without an intervening success doubles the backoff, up to
`health.backoff_max_s`. Every ejection is logged with its reason. The bookkeeping here is pure
(time is passed in), so it is unit-tested without a network; `HealthChecker` does the I/O.

One module per part:

    classify.py  Failure and classify_status: what a failed attempt means, decided once
    tracker.py   HealthTracker: failure counting, outlier ejection capped per model, backoff,
                 re-admission (pure: time is passed in)
    checker.py   HealthChecker: the active checks (GET /health), immediate for a suspect
                 replica, the outlier window's clock, the KV-usage scrape (parse_kv_usage)

With `health.scrape_kv_usage`, each check that passes also reads the replica's KV-cache usage
from its Prometheus `/metrics` (`parse_kv_usage`) into `ReplicaState.kv_usage`: a sample per
interval, stale in between, which is exactly what the simulator gives policies too.
"""

from gpufleet.router.health.checker import KV_USAGE_METRICS, HealthChecker, parse_kv_usage
from gpufleet.router.health.classify import Failure, classify_status
from gpufleet.router.health.tracker import HealthTracker

__all__ = [
    "KV_USAGE_METRICS",
    "Failure",
    "HealthChecker",
    "HealthTracker",
    "classify_status",
    "parse_kv_usage",
]
