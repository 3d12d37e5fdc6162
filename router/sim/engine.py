"""The discrete-event simulator: a policy routes a workload over kvmodel replicas on virtual time.

One event heap holds each replica's next step end (lazily invalidated); arrivals are merged in
time order, engine events first at equal times. Per request the simulator does what the live
server does around a policy (`router.proxy`): `choose`, `on_routed`, `ReplicaState.begin` with
the decision's estimated prefill, `prefill_done` at the first token, `end` and `on_completed`
(with the output length) at the end. A request no replica can take (every replica saturated or
unhealthy) is *rejected*, as the server answers 429/503; one the engine refuses (longer than
`max_model_len` or the KV capacity) *fails*, as the engine answers 400.

Everything is deterministic for a given workload, fleet, policy and seed: no wall clock, no
unseeded randomness, ties broken by sequence numbers.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gpufleet.router import kvmodel
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.policies import Policy, registry
from gpufleet.router.sim.fleet import SimFleet
from gpufleet.router.types import Decision, RequestFeatures
from gpufleet.router.workloads.types import SimRequest, Workload

__all__ = ["KV_STATES", "RequestRecord", "ReplicaRecord", "SimResult", "simulate"]

_FIRST = kvmodel.EventKind.FIRST_TOKEN
_FINISHED = kvmodel.EventKind.FINISHED


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request."""

    id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    replica: str | None = None
    outcome: str = "pending"
    """ok, rejected (no replica could take it), failed (the engine refused it)."""
    cached_tokens: int = 0
    """Every tier's; of them `tier_cached_tokens` came from the CPU or disk tier."""
    tier_cached_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s


@dataclass(slots=True)
class ReplicaRecord:
    """Per-replica totals."""

    id: str
    requests: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    """Prompt tokens actually computed (not served from the cache)."""
    max_used_blocks: int = 0
    num_blocks: int = 0
    evicted_blocks: int = 0


@dataclass
class SimResult:
    """The outcome of one policy on one workload and fleet."""

    policy: str
    workload: str
    fleet: SimFleet
    records: list[RequestRecord]
    replicas: list[ReplicaRecord]
    end_s: float
    decisions: list[tuple[str, str, Decision]] = field(default_factory=list)
    """(request id, replica id, decision) when recording was asked for (tests)."""


@dataclass(slots=True)
class _Live:
    rec: RequestRecord
    features: RequestFeatures
    state_i: int
    prefill: int
    router: int = 0


KV_STATES = ("approximate", "events")


def _preload(workload: Workload, engines: list[kvmodel.ReplicaEngine]) -> list[list[int]]:
    """Put the blocks of the workload's preload prompts in every engine's cache (evictable, as a
    finished request leaves them), before the first arrival; per engine, the blocks it stored.
    The policy is told they were routed to every replica (`on_routed`), as when the router itself
    sent the warm-up."""
    out: list[list[int]] = []
    for e in engines:
        cache = e.cache
        out.append(stored := [])
        for f in workload.preload:
            hashes = f.block_hashes[: f.prompt_tokens // e.params.block_size_tokens]
            hit = hashes[: cache.match(hashes)]
            new = hashes[len(hit) :]
            if not cache.can_allocate(hit, len(new)):
                continue  # a replica too small for the prompt simply does not hold it
            cache.acquire(hit, len(new))
            registered = [h for h in new if cache.register(h)]
            cache.release([*hit, *registered], len(new) - len(registered))
            stored.extend(registered)
    return out


def simulate(
    workload: Workload,
    fleet: SimFleet,
    policy: str | Policy,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    record_decisions: bool = False,
    on_decision: Callable[[Policy, SimRequest, Decision], None] | None = None,
    kv_state: str = "approximate",
    routers: int = 1,
    event_delay_s: float = 0.02,
    peer_interval_s: float | None = None,
) -> SimResult:
    """Run `workload` through `fleet` with `policy` (a registered name, a profile of the fleet's
    settings, or an object; either gets the simulator's clock and engines as context).

    `progress(n)` is called with the number of requests routed so far, every 256 requests.
    `on_decision` sees each decision before it is applied (tests check the oracle with it).

    `kv_state="events"`: each router's prefix scorer reads a `KvIndex` fed by the engines' KV
    events (blocks stored and evicted), delivered `event_delay_s` after the engine step that
    made them. `routers=N`: N independent router instances (own policy objects, own view of
    in-flight load), each request sent to one of them at random (seeded); every router gets
    every engine's events and samples every engine's load (`engine_metrics_interval_s`), and a
    session's client echoes the session token of its last answer, so every router knows where
    the session lives (`RequestFeatures.session_replica`). Every `peer_interval_s` (default the
    fleet's `peer_interval_s`; 0: never) each router reports its own per-replica counts (queued
    prefill tokens, queued and in-flight requests) to every other one (`report_peer_load`), as
    the live routers' peer poller does (`router.peers`).
    """
    if kv_state not in KV_STATES:
        raise ValueError(f"kv_state must be one of {', '.join(KV_STATES)}, not {kv_state!r}")
    if routers < 1:
        raise ValueError("routers must be >= 1")
    if routers > 1 and not isinstance(policy, str):
        raise ValueError("several routers need a policy name (each builds its own)")
    events_mode = kv_state == "events"
    now = 0.0
    engines = [kvmodel.ReplicaEngine(spec.engine, record_kv_events=events_mode) for spec in fleet.replicas]
    states_by = [[spec.state() for spec in fleet.replicas] for _ in range(routers)]
    states = states_by[0]
    by_id = {spec.id: e for spec, e in zip(fleet.replicas, engines)}
    index = {spec.id: i for i, spec in enumerate(fleet.replicas)}
    ids = [spec.id for spec in fleet.replicas]

    def clock() -> float:
        return now

    kv_indexes: list[KvIndex] = []
    if events_mode:
        bs = fleet.settings.block_size_tokens
        for _ in range(routers):
            kv = KvIndex(bs, pending_ttl_s=fleet.settings.kv_events.pending_ttl_s)
            for spec in fleet.replicas:
                kv.add_replica(
                    spec.id,
                    spec.engine.num_blocks,
                    exact=True,
                    tier_capacity_blocks=spec.engine.cpu_capacity_tokens // bs,
                )
            kv_indexes.append(kv)
    pols: list[Policy] = []
    for r_i in range(routers):
        kv_ctx: dict[str, Any] = {"kv_index": kv_indexes[r_i]} if events_mode else {}
        if isinstance(policy, str):
            pols.append(registry.make(policy, fleet.settings, seed=seed + r_i, clock=clock, engines=by_id, **kv_ctx))
        else:
            policy.bind(clock=clock, engines=by_id, **kv_ctx)
            pols.append(policy)
    pol = pols[0]
    pick_router = random.Random(seed).randrange
    deliveries: list[tuple[float, int, int, list[tuple[str, int, str, int]]]] = []
    dseq = 0

    def collect(i: int) -> None:
        nonlocal dseq
        log = engines[i].drain_kv_events()
        if log:
            dseq += 1
            heapq.heappush(deliveries, (now + event_delay_s, dseq, i, log))

    def deliver() -> None:
        _, _, i, log = heapq.heappop(deliveries)
        rid = ids[i]
        for kv in kv_indexes:
            for kind, h, _, _ in log:
                if kind == "stored":
                    kv.stored(rid, (h,), (h,))
                elif kind == "removed":
                    kv.removed(rid, (h,))
                else:  # a lower tier's "stored:CPU" / "removed:DISK"
                    what, medium = kind.split(":", 1)
                    if what == "stored":
                        kv.stored(rid, (h,), (h,), medium)
                    else:
                        kv.removed(rid, (h,), medium)

    for i, stored in enumerate(_preload(workload, engines)):
        for kv in kv_indexes:  # events mode: the engines published these blocks when they cached them
            for h in stored:
                kv.stored(ids[i], (h,), (h,))
    for p_i, p in enumerate(pols):  # served through the router(s): the policies saw them go everywhere
        for f in workload.preload:
            for st in states_by[p_i]:
                p.on_routed(f, Decision(st, reason="preload", prefill_tokens=f.prompt_tokens))

    reps = [ReplicaRecord(spec.id, num_blocks=e.cache.num_blocks) for spec, e in zip(fleet.replicas, engines)]
    records: list[RequestRecord] = []
    decisions: list[tuple[str, str, Decision]] = []
    live: dict[str, _Live] = {}
    heap: list[tuple[float, int, int]] = []
    due: list[float | None] = [None] * len(engines)
    seq = 0
    # The live router learns each replica's KV usage only from its health checker's periodic
    # scrape of /metrics (`health.scrape_kv_usage`), so the policy gets the same: a sample every
    # health interval, stale in between (taken once every engine event up to then is applied).
    sample_every = fleet.settings.health.interval_s
    next_sample = sample_every if fleet.settings.health.scrape_kv_usage else math.inf

    # Engine-reported load, as the live router scrapes it every `engine_metrics_interval_s`
    # (`router.engine_load`): waiting and running requests and KV usage, stale in between.
    load_every = fleet.settings.engine_metrics_interval_s
    next_load = load_every if load_every > 0 else math.inf

    # Peer routers' own counts, exchanged every `peer_interval_s` (`router.peers` polls them live).
    peer_every = fleet.settings.peer_interval_s if peer_interval_s is None else peer_interval_s
    next_peer = peer_every if routers > 1 and peer_every > 0 else math.inf
    router_names = [f"router-{k}" for k in range(routers)]

    def exchange() -> None:
        for a, sts in enumerate(states_by):
            name = router_names[a]
            for b, other in enumerate(states_by):
                if b != a:
                    for st, dst in zip(sts, other):
                        dst.report_peer_load(name, st.queued_prefill_tokens, st.queued_requests, st.in_flight, now)

    def sample_usage() -> None:
        for sts in states_by:
            for st, e in zip(sts, engines):
                st.report_kv_usage(e.kv_usage)

    # vLLM's waiting gauge is the scheduler's, taken after its last step: a request that arrived
    # during the step in progress is not counted yet (it is scheduled when the step ends).
    stepped_at = [0.0] * len(engines)

    def sample_load() -> None:
        for i, e in enumerate(engines):
            last = stepped_at[i]
            waiting = sum(1 for v in e.requests() if not v.running and v.arrival < last) if e.num_waiting else 0
            for sts in states_by:
                sts[i].report_engine_load(waiting, e.num_running, e.kv_usage, now)

    def schedule(i: int) -> None:
        nonlocal seq
        t = engines[i].next_event_time()
        if t is not None and t != due[i]:
            due[i] = t
            seq += 1
            heapq.heappush(heap, (t, seq, i))

    def finish(lv: _Live, outcome: str, output_tokens: int) -> None:
        st = states_by[lv.router][lv.state_i]
        if lv.rec.first_token_s is None:
            st.prefill_done(lv.prefill)
        st.end()
        pols[lv.router].on_completed(lv.features, st, ok=outcome == "ok", output_tokens=output_tokens)

    def run_engine(i: int, t: float) -> None:
        e = engines[i]
        stepped_at[i] = t
        for ev in e.step(t):
            kind = ev.kind
            if kind is _FIRST:
                lv = live[ev.request_id]
                lv.rec.first_token_s = ev.time
                lv.rec.cached_tokens = ev.cached_tokens
                lv.rec.tier_cached_tokens = ev.cpu_cached_tokens + ev.disk_cached_tokens
                states_by[lv.router][lv.state_i].prefill_done(lv.prefill)
            elif kind is _FINISHED:
                lv = live.pop(ev.request_id)
                lv.rec.finish_s = ev.time
                lv.rec.outcome = "ok"
                finish(lv, "ok", ev.output_tokens)
        rep = reps[i]
        used = e.cache.used_blocks
        if used > rep.max_used_blocks:
            rep.max_used_blocks = used
        if events_mode:
            collect(i)

    def advance(until: float) -> None:
        nonlocal now, next_sample, next_load, next_peer
        while True:
            if not heap and not deliveries and until == math.inf:
                break  # nothing left to run: later samples could not change anything
            t_next = heap[0][0] if heap else math.inf
            if deliveries and deliveries[0][0] <= until and deliveries[0][0] <= t_next:
                if not (next_sample <= until and next_sample < deliveries[0][0]):
                    now = max(now, deliveries[0][0])
                    deliver()
                    continue
            if next_sample <= until and next_sample < t_next and next_sample <= next_load:
                sample_usage()
                next_sample += sample_every
                continue
            if next_peer <= until and next_peer < t_next and next_peer <= next_load:
                now = max(now, next_peer)
                exchange()
                # Idle engines: every exchange until `until` would send the same zeros.
                skip = math.floor((until - next_peer) / peer_every) if not heap and until < math.inf else 0
                next_peer += max(1, skip) * peer_every
                continue
            if next_load <= until and next_load < t_next:
                if not heap:
                    # Idle engines: every sample until `until` would read the same zeros.
                    now = max(now, next_load)
                    sample_load()
                    next_load += max(1, math.floor((until - next_load) / load_every)) * load_every
                    continue
                now = max(now, next_load)
                sample_load()
                next_load += load_every
                continue
            if t_next > until:
                break
            t, _, i = heapq.heappop(heap)
            if due[i] != t:
                continue  # superseded
            due[i] = None
            now = t
            run_engine(i, t)
            schedule(i)

    session_home: dict[str, str] = {}
    for n, req in enumerate(workload.requests):
        advance(req.arrival_s)
        now = max(now, req.arrival_s)
        f = req.features
        rec = RequestRecord(req.id, req.arrival_s, f.prompt_tokens, req.output_tokens)
        records.append(rec)
        r_i = pick_router(routers) if routers > 1 else 0
        pol, states = pols[r_i], states_by[r_i]
        sid = f.session_id
        if routers > 1 and sid is not None and (home := session_home.get(sid)) is not None:
            # The client echoes the signed session token of its last answer (`router.sessions`),
            # so whichever router takes the turn knows the session's replica.
            f = replace(f, session_replica=home)
        d = pol.choose(f, states)
        if on_decision is not None:
            on_decision(pol, req, d)
        r = d.replica
        if r is None:
            rec.outcome = "rejected"
            continue
        i = index[r.id]
        rec.replica = r.id
        if sid is not None:
            session_home[sid] = r.id
        if record_decisions:
            decisions.append((req.id, r.id, d))
        pol.on_routed(f, d)
        r.begin(d.prefill_tokens)
        lv = _Live(rec, f, i, d.prefill_tokens, r_i)
        try:
            engines[i].admit(kvmodel.EngineRequest(req.id, f.prompt_tokens, req.output_tokens, f.block_hashes), now)
        except kvmodel.AdmissionError:
            rec.outcome = "failed"
            finish(lv, "failed", 0)
            continue
        if events_mode:
            collect(i)
        live[req.id] = lv
        rep = reps[i]
        rep.requests += 1
        rep.prompt_tokens += f.prompt_tokens
        schedule(i)
        if progress is not None and n % 256 == 255:
            progress(n + 1)
    advance(float("inf"))
    if progress is not None:
        progress(len(workload.requests))
    for rec in records:
        if rec.outcome == "ok" and rec.replica is not None:
            reps[index[rec.replica]].prefill_tokens += rec.prompt_tokens - rec.cached_tokens
    for rep, e in zip(reps, engines):
        rep.evicted_blocks = e.cache.evicted
    return SimResult(pol.name, workload.name, fleet, records, reps, now, decisions)
