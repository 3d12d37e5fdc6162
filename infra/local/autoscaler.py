"""Autoscaling of the local fleet: `gpufleet.infra.controller.autoscale.scale`, applied to processes.

Each supervision round (`Supervisor.check`, when the runtime runs with `autoscale=True`):

- **observe**: per (deployment, pool) the replicas asked for (active role: starting, serving, or
  dead and about to restart), those ready, since when the others have not been ready (a replica
  that keeps crashing stays Pending, and past `pending_timeout_s` its pool counts as full), and
  the last start failure of the pool (its capacity error);
- **load**: from the router, the deployment's requests in flight and queued prefill tokens
  (`GET /admin/replicas`), or the p90 of its time to first byte over the last `ttft_window_s`
  (the `gpufleet_router_first_byte_seconds` histogram on `/metrics`, diffed between rounds);
- **apply** the targets: a pool that needs replicas first promotes its warm standbys of the
  deployment (the placeholder evicted at once), stops standbys of other deployments whose GPUs it
  needs, then starts new replica-sim processes in free slots (`max_nodes x gpus_per_node` GPUs per
  pool); they join the router (config file rewritten, SIGHUP) once ready. A pool with too many
  leaves the router first, finishes its requests (up to `router.drain_timeout_s`), then stops; a
  slot the plan holds warm gets its standby back.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

import httpx

from gpufleet.infra.controller import autoscale
from gpufleet.infra.local.layout import LocalReplica

if TYPE_CHECKING:
    from gpufleet.infra.local.runtime import LocalRuntime

__all__ = ["LocalAutoscaler"]


def _p90(buckets: dict[float, float]) -> float | None:
    """The 90th percentile from cumulative histogram buckets (upper bound of its bucket)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    finite = sorted(b for b in buckets if b != float("inf"))
    for le in finite:
        if buckets[le] >= 0.9 * total:
            return le
    return finite[-1] if finite else None


class LocalAutoscaler:
    """Runs the autoscaling decision on a `LocalRuntime` and applies it to its processes."""

    def __init__(
        self, rt: LocalRuntime, settings: autoscale.AutoscaleSettings | None = None, ttft_window_s: float = 30.0
    ) -> None:
        self.rt = rt
        self.facts = autoscale.AutoscaleFacts.from_plan(rt.plan)
        self.settings = settings or autoscale.AutoscaleSettings()
        self.state = autoscale.AutoscaleState()
        self.ttft_window_s = ttft_window_s
        self.capacity_errors: dict[str, float] = {}
        self._ttft: deque[tuple[float, dict[str, dict[float, float]]]] = deque()
        self._last_notes: dict[str, str] = {}
        self.warm_slots = {
            p.name: sum(1 for r in rt.replicas if r.pool == p.name and r.role == "warm") for p in rt.plan.pools
        }
        """Standbys per pool at start: what scale-down gives back."""
        self.last: autoscale.ScaleDecision | None = None

    # -- observe -------------------------------------------------------------------------
    def observe(self) -> dict[tuple[str, str], autoscale.PoolObservation]:
        out = {}
        for dep in self.facts.deployments:
            for slot in dep.chain:
                mine = [
                    r
                    for r in self.rt.replicas
                    if r.deployment == dep.name
                    and r.pool == slot.pool
                    and r.role == "active"
                    and r.state in ("starting", "active", "dead")
                ]
                ready = [r for r in mine if r.state == "active" and r.running]
                pending = tuple(r.unready_since for r in mine if r not in ready and r.unready_since is not None)
                out[(dep.name, slot.pool)] = autoscale.PoolObservation(
                    len(mine), len(ready), pending, self.capacity_errors.get(slot.pool)
                )
        return out

    def _ttft_buckets(self) -> dict[str, dict[float, float]]:
        """Cumulative first-byte buckets per deployment, summed over its replicas."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.rt.router_url + "/metrics", timeout=2.0, trust_env=False).text
        dep_of = {r.id: r.deployment for r in self.rt.replicas}
        out: dict[str, dict[float, float]] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name != "gpufleet_router_first_byte_seconds":
                continue
            for s in fam.samples:
                dep = dep_of.get(s.labels.get("replica", ""))
                if s.name.endswith("_bucket") and dep is not None:
                    le = float(s.labels["le"])
                    out.setdefault(dep, {})[le] = out.get(dep, {}).get(le, 0.0) + s.value
        return out

    def load(self, now: float) -> dict[str, autoscale.LoadSample]:
        """Each autoscaled deployment's signal, from the router (none when it cannot be read)."""
        wanted = {d.name: d.autoscaling.signal for d in self.facts.deployments if d.autoscaling is not None}
        out: dict[str, autoscale.LoadSample] = {}
        if not wanted or not self.rt.router_url:
            return out
        dep_of = {r.id: r.deployment for r in self.rt.replicas}
        if any(sig != "ttft_p90_s" for sig in wanted.values()):
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, TypeError):
                totals: dict[str, dict[str, float]] = {}
                for row in self.rt.router_rows():
                    dep = dep_of.get(str(row["id"]))
                    if dep is None:
                        continue
                    t = totals.setdefault(dep, {"in_flight": 0.0, "queued_prefill_tokens": 0.0})
                    t["in_flight"] += float(row["in_flight"])
                    t["queued_prefill_tokens"] += float(row["queued_prefill_tokens"])
                for dep, sig in wanted.items():
                    if sig != "ttft_p90_s":
                        out[dep] = autoscale.LoadSample(now, totals.get(dep, {}).get(sig, 0.0))
        if any(sig == "ttft_p90_s" for sig in wanted.values()):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                snap = self._ttft_buckets()
                self._ttft.append((now, snap))
                while len(self._ttft) > 1 and now - self._ttft[1][0] >= self.ttft_window_s:
                    self._ttft.popleft()
                _t0, old = self._ttft[0]
                for dep, sig in wanted.items():
                    if sig == "ttft_p90_s":
                        new, base = snap.get(dep, {}), old.get(dep, {})
                        window = {le: max(0.0, v - base.get(le, 0.0)) for le, v in new.items()}
                        out[dep] = autoscale.LoadSample(now, _p90(window))
        return out

    # -- apply ---------------------------------------------------------------------------
    def round(self) -> None:
        """One decision and its application (the runtime's lock is held by the caller)."""
        rt = self.rt
        now = time.monotonic()
        self._finish_retiring(now)
        decision = autoscale.scale(self.facts, self.observe(), self.load(now), self.state, now, self.settings)
        self.state, self.last = decision.state, decision
        for dep, note in decision.notes:
            key = "".join(c for c in note if not c.isdigit())  # a countdown is the same note
            if self._last_notes.get(dep) != key:
                self._last_notes[dep] = key
                rt.emit(f"autoscale {dep}: {note}")
        for dep in list(self._last_notes):
            if not any(d == dep for d, _ in decision.notes):
                del self._last_notes[dep]
        changed = False
        for act in decision.actions:
            rt.emit(f"autoscale {act.deployment} on {act.pool}: {act.current} -> {act.target} ({act.reason})")
            if act.target > act.current:
                changed |= self._grow(act.deployment, act.pool, act.target - act.current, now)
            else:
                changed |= self._shrink(act.deployment, act.pool, act.current - act.target, now)
        if changed:
            rt.update_router_membership()

    def _asked(self, dep: str, pool: str) -> list[LocalReplica]:
        return [
            r
            for r in self.rt.replicas
            if r.deployment == dep
            and r.pool == pool
            and r.role == "active"
            and r.state in ("starting", "active", "dead")
        ]

    def _gpus_used(self, pool: str) -> int:
        per = {d.name: d.gpus_per_replica for d in self.rt.plan.deployments}
        return sum(per[r.deployment] for r in self.rt.replicas if r.pool == pool and r.state not in ("stopped",))

    def _grow(self, dep: str, pool: str, n: int, now: float) -> bool:
        rt = self.rt
        changed = False
        for _ in range(n):
            if rt.supervisor.promote(dep, "its placeholder evicted", pool=pool) is not None:
                continue
            gpus = rt.plan.deployment(dep).gpus_per_replica
            plan_pool = rt.plan.pool(pool)
            room = plan_pool.max_nodes * plan_pool.gpus_per_node - self._gpus_used(pool)
            while room < gpus:  # evict another deployment's standby holding the GPUs
                other = next(
                    (r for r in rt.replicas if r.pool == pool and r.role == "warm" and r.state == "warm"), None
                )
                if other is None:
                    break
                rt.stop_replica(other, grace_s=1.0)
                other.state = "stopped"
                rt.replicas.remove(other)
                rt.emit(f"evicted warm standby {other.id} (pool {pool}) for a replica of {dep}")
                changed = True
                room = plan_pool.max_nodes * plan_pool.gpus_per_node - self._gpus_used(pool)
            if room < gpus:
                self.capacity_errors[pool] = now
                rt.emit(f"no free slot in pool {pool} for {dep}: counted as a capacity error")
                break
            self._start_new(dep, pool, now)
        return changed

    def _start_new(self, dep: str, pool: str, now: float) -> None:
        rt = self.rt
        d = rt.plan.deployment(dep)
        taken = {r.id for r in rt.replicas}
        k = 0
        while f"{dep}-{pool}-{k}" in taken:
            k += 1
        rep = LocalReplica(f"{dep}-{pool}-{k}", dep, d.model, pool, rt.plan.pool(pool).priority, "active", "sim")
        rep.fresh, rep.unready_since, rep.ready_by = True, now, now + rt.ready_timeout(rep)
        if rt.plan.pool(pool).engine_command:
            rep.kind = "engine"
        rt.replicas.append(rep)
        try:
            rt.start_replica(rep)
        except Exception as exc:  # cannot even spawn: a capacity error of this pool
            rt.replicas.remove(rep)
            self.capacity_errors[pool] = now
            rt.emit(f"could not start {rep.id}: {exc}")
            return
        rt.emit(f"starting replica {rep.id} (pool {pool}) for {dep}")

    def _shrink(self, dep: str, pool: str, n: int, now: float) -> bool:
        asked = self._asked(dep, pool)
        # not ready first, then the most recently started
        asked.sort(key=lambda r: (r.state == "active", r.started_at))
        changed = False
        for rep in asked[:n]:
            if rep.state != "active":
                self.rt.stop_replica(rep, grace_s=1.0)
                rep.state = "stopped"
                self._after_retire(rep)
                changed = True
                continue
            rep.state, rep.retire_by = "retiring", now + self.rt.settings.drain_timeout_s
            self.rt.emit(f"retiring replica {rep.id} (pool {pool}): out of the router, finishing its requests")
            changed = True
        return changed

    def _busy(self, rep: LocalReplica) -> bool:
        """Requests still running or waiting inside `rep` (its vLLM metrics)."""
        try:
            text = httpx.get(rep.url + "/metrics", timeout=1.0, trust_env=False).text
        except httpx.HTTPError:
            return False
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                with contextlib.suppress(ValueError, IndexError):
                    if float(line.rsplit(" ", 1)[1]) > 0:
                        return True
        return False

    def _finish_retiring(self, now: float) -> None:
        for rep in [r for r in self.rt.replicas if r.state == "retiring"]:
            if rep.retire_by is not None and now < rep.retire_by and rep.running and self._busy(rep):
                continue
            self.rt.stop_replica(rep, grace_s=2.0)
            rep.state = "stopped"
            self.rt.emit(f"stopped replica {rep.id} (pool {rep.pool})")
            self._after_retire(rep)

    def _after_retire(self, rep: LocalReplica) -> None:
        """A stopped replica leaves the runtime, or, where the plan holds a standby, becomes one again."""
        rt = self.rt
        standbys = sum(1 for r in rt.replicas if r.pool == rep.pool and r.role == "warm" and r.state != "stopped")
        if rep.kind == "sim" and standbys < self.warm_slots.get(rep.pool, 0):
            rep.role, rep.state, rep.fresh = "warm", "starting", True
            rep.unready_since, rep.ready_by, rep.retire_by = None, time.monotonic() + rt.ready_timeout(rep), None
            rt.start_replica(rep)
            rt.emit(f"replica {rep.id} (pool {rep.pool}) back to warm standby")
            return
        rt.replicas.remove(rep)
