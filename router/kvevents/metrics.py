"""The KV-event metrics on the router's registry: each replica's KV-state source and what its
stream delivered or could not be used (`gpufleet.router.kvevents.subscriber` feeds them)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["STATES", "KvEventMetrics"]

STATES = ("events", "approximate")


class KvEventMetrics:
    """The KV-event metrics, on the router's registry."""

    def __init__(self, registry: CollectorRegistry, replicas: Iterable[str]) -> None:
        p = "gpufleet_router_"
        self.state = Gauge(
            p + "kv_state",
            "1 for the replica's KV-state source: events (exact, from its KV-event stream) or approximate",
            ["replica", "state"],
            registry=registry,
        )
        self.messages = Counter(p + "kv_event_batches", "KV-event batches applied", ["replica"], registry=registry)
        self.problems = Counter(
            p + "kv_event_problems",
            "KV-event input the router could not use, by kind: malformed, unknown_tag, unknown_block, "
            "unknown_parent, skipped, gap, replay, reset, fallback",
            ["replica", "kind"],
            registry=registry,
        )
        for rid in replicas:
            self.set_state(rid, False)
            self.messages.labels(rid)

    def forget(self, replica_id: str) -> None:
        """A replica left: its state gauge goes (its counters stay, as Prometheus counters do)."""
        for state in STATES:
            try:
                self.state.remove(replica_id, state)
            except KeyError:
                pass

    def set_state(self, replica_id: str, exact: bool) -> None:
        self.state.labels(replica_id, "events").set(1 if exact else 0)
        self.state.labels(replica_id, "approximate").set(0 if exact else 1)

    def problem(self, replica_id: str, kind: str, n: int = 1) -> None:
        if n > 0:
            self.problems.labels(replica_id, kind).inc(n)
