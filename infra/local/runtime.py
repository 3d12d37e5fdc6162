"""The local runtime: a compiled plan's `cloud: local` pools run as processes on this machine.

From the Plan alone (`layout`) it starts:

- one process per planned replica: a `gpufleet replica-sim` shaped by the pool's machine (KV
  capacity, prefill and decode rates from the plan's `PoolPerf`), or the pool's
  `engine_command` (a real engine such as `vllm serve`, placeholders filled in, see
  `processes.ENGINE_PLACEHOLDERS`, and `CUDA_VISIBLE_DEVICES` assigned in order);
- per warm node of a pool, a pre-started replica in *standby* (loaded and listening, but its
  `/health` and requests answer 503, so the router keeps it ejected) for a deployment that may
  use the pool (cycling over them in declaration order);
- the router (`gpufleet router serve`), configured by `gpufleet.infra.router_config.render`
  from the same plan, with the standby replicas listed under their pools.

Supervision (dead replicas, promotion of standbys) is `gpufleet.infra.local.supervisor`; the
router process (config, hot spare, restarts) `gpufleet.infra.local.router_process`; the work
directory `gpufleet.infra.local.workdir`; the process mechanics `gpufleet.infra.local.processes`;
precise mode (each replica's KV events, on ports of its own) `gpufleet.infra.local.precise`.
`start_replica` and `stop_replica` are the one place a replica process starts and the one place
it is stopped. Warm standby needs the simulated replica: pools with an `engine_command` hold no
warm replicas (reported as not held).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gpufleet.infra import router_config
from gpufleet.infra.controller.autoscale import AutoscaleSettings
from gpufleet.infra.local import precise, processes
from gpufleet.infra.local.autoscaler import LocalAutoscaler
from gpufleet.infra.local.layout import LocalReplica, layout, pool_perf
from gpufleet.infra.local.processes import LocalRuntimeError
from gpufleet.infra.local.router_process import RouterProcesses
from gpufleet.infra.local.supervisor import Supervisor
from gpufleet.infra.local.workdir import WORKDIR_PREFIX, claim, remove_stale_workdirs
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPerf
from gpufleet.router.config import RouterConfig, RouterSettings

__all__ = [
    "SIM_ADMIN_ENV",
    "WORKDIR_PREFIX",
    "LocalRuntime",
    "LocalRuntimeError",
    "check_local",
    "remove_stale_workdirs",
]

SIM_ADMIN_ENV = "GPUFLEET_SIM_ADMIN_TOKEN"
"""The variable through which simulated replicas get their admin token (for promotion)."""


def check_local(plan: Plan) -> None:
    """Raise `LocalRuntimeError` unless every pool of the plan is `cloud: local`."""
    other = [f"{p.name} ({p.cloud})" for p in plan.pools if p.cloud != "local"]
    if other:
        raise LocalRuntimeError(
            f"gpufleet up runs fleets whose pools are all `cloud: local`; not local: {', '.join(other)} "
            "(deploy those with the Pulumi stacks in stacks/)"
        )


class LocalRuntime(RouterProcesses):
    """Runs a compiled plan's local pools as processes on this machine. Use as a context manager."""

    def __init__(
        self,
        plan: Plan,
        *,
        router_port: int | None = None,
        settings: RouterSettings | None = None,
        workdir: Path | None = None,
        ready_timeout_s: float = 60.0,
        engine_ready_timeout_s: float = 900.0,
        scale_up_waiting_per_replica: float = 4.0,
        scale_up_utilization: float = 0.9,
        python: str = sys.executable,
        on_event: Callable[[str], None] | None = None,
        autoscale: bool = False,
        autoscale_settings: AutoscaleSettings | None = None,
    ) -> None:
        check_local(plan)
        self.plan = plan
        self.settings = precise.with_absolute_paths(settings or plan.router)
        local = plan.clouds.local
        self.host = local.host if local is not None else "127.0.0.1"
        self._base_port = local.base_port if local is not None else 0
        self.router_port = self.settings.port if router_port is None else router_port
        self.ready_timeout_s = ready_timeout_s
        self.engine_ready_timeout_s = engine_ready_timeout_s
        self.python = python
        self.on_event = on_event
        self._own_workdir = workdir is None
        self.events: list[str] = []
        precise.check(self.settings, self.emit)
        self.workdir, stale = claim(workdir)
        self.sim_admin_token = secrets.token_urlsafe(24)
        env_name = self.settings.admin_token.env
        self.router_admin_token: str | None = (
            (os.environ.get(env_name) or secrets.token_urlsafe(24)) if env_name else None
        )
        self.replicas: list[LocalReplica] = layout(plan)
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.router_config: RouterConfig | None = None
        self._router_bound_port: int | None = None
        self.router_log = self.workdir / "logs" / "router.log"
        self.router_spare: tuple[subprocess.Popen[bytes], Path] | None = None
        """A hot-spare router (imports done, waiting for SIGUSR1) that takes over when the router dies."""
        self._router_spawned = 0
        self._router_deaths: list[float] = []
        self._router_watch: threading.Thread | None = None
        self.draining = False
        """Set by `drain`: the router drains, nothing is restarted any more."""
        self._next_port = self._base_port
        self._next_gpu = 0
        self.lock = threading.RLock()
        """Held by every change of replica state (supervision runs on another thread than stop)."""
        self.stopped = False
        self.down_pools: set[str] = set()
        """Pools failed by `kill_pool`: their replicas are not restarted."""
        self.supervisor = Supervisor(
            self, waiting_per_replica=scale_up_waiting_per_replica, utilization=scale_up_utilization
        )
        self.autoscaler: LocalAutoscaler | None = LocalAutoscaler(self, autoscale_settings) if autoscale else None
        """With `autoscale`: each supervision round runs `controller.autoscale.scale` (standby
        promotion by load and for min_replicas is then its job)."""
        for d in stale:
            self.emit(f"removed stale work directory {d} (left by a gpufleet up that was killed)")

    def emit(self, msg: str) -> None:
        """Record a runtime event (a death, a promotion) and pass it to `on_event`."""
        self.events.append(msg)
        if self.on_event is not None:
            self.on_event(msg)

    # -- precise mode (router.kv_events): gpufleet.infra.local.precise -------------------
    @property
    def precise(self) -> bool:
        """Precise mode: kv_events on with a tokenizer (`precise.is_on`)."""
        return precise.is_on(self.settings)

    def routing_mode(self) -> str:
        """One line: precise (and where from) or approximate (and why)."""
        return precise.routing_mode(self.settings)

    def kv_block_size(self) -> int:
        """The block size the replicas use: the engines' (kv_events.block_size) in precise mode."""
        return precise.block_size(self.settings)

    def event_endpoints(self) -> dict[str, router_config.EventEndpoints]:
        """Each replica's KV-event endpoints in precise mode (`precise.event_endpoints`)."""
        return precise.event_endpoints(self.settings, self.plan, self.replicas, self.host)

    # -- replica processes ---------------------------------------------------------------
    def _port(self) -> int:
        if self._base_port:
            p = self._next_port
            self._next_port += 1
            return p
        return 0

    def _port_run(self, n: int) -> int:
        """The first of `n` consecutive ports: the next base ports, else a run free now."""
        if self._base_port:
            first, self._next_port = self._next_port, self._next_port + n
            return first
        return processes.free_ports(self.host, n)

    def _sim_argv(self, rep: LocalReplica, dep: DeploymentPlan, perf: PoolPerf, port: int) -> list[str]:
        """`gpufleet replica-sim` shaped by the pool's machine, speaking the router's blocks and tokens."""
        flags: dict[str, object] = {
            "--model": dep.model,
            "--replica-id": rep.id,
            "--host": self.host,
            "--port": port,
            "--kv-capacity-tokens": perf.kv_cache_tokens_per_replica,
            "--prefill-tokens-per-s": perf.prefill_tokens_per_s,
            "--decode-tokens-per-s": perf.decode_tokens_per_s,
            "--max-running": dep.max_concurrent_requests,
            "--max-batched-tokens": router_config.step_tokens(dep),
            "--max-model-len": dep.max_model_len,
            "--block-size-tokens": self.kv_block_size(),
            "--chars-per-token": self.settings.chars_per_token,
            "--port-file": self.workdir / f"{rep.id}.port",
        }
        flags.update(precise.sim_flags(self.settings, rep, self.workdir, self._port))  # KV events, own ports
        tiers = perf.kv_tiers
        if tiers is not None:  # the deployment's kv_offload, as the plan sized it for this pool
            flags["--cpu-kv-capacity-tokens"] = tiers.cpu_kv_tokens
            flags["--cpu-load-tokens-per-s"] = tiers.cpu_hit_tokens_per_s
            if tiers.disk_kv_tokens:
                flags["--disk-kv-capacity-tokens"] = tiers.disk_kv_tokens
                flags["--disk-load-tokens-per-s"] = tiers.disk_hit_tokens_per_s
        argv = [self.python, "-m", "gpufleet.infra.cli.replica_sim", "replica-sim"]
        argv += [arg for flag, value in flags.items() for arg in (flag, str(value))]
        return [*argv, "--standby"] if rep.role == "warm" else argv

    def start_replica(self, rep: LocalReplica) -> None:
        """Start the process of `rep` (a simulated replica or the pool's engine); `wait_replica` waits for it.

        A replica that ran before starts again on its port (the router keeps its URL), its engine
        on the same GPUs; its previous log is kept beside the new one (`.prev.log`)."""
        dep = self.plan.deployment(rep.deployment)
        perf = pool_perf(dep, rep.pool)
        rep.log_path = self.workdir / "logs" / f"{rep.id}.log"
        if rep.log_path.exists():
            rep.log_path.replace(rep.log_path.with_suffix(".prev.log"))
        (self.workdir / f"{rep.id}.port").unlink(missing_ok=True)
        precise.kv_port_file(self.workdir, rep).unlink(missing_ok=True)
        rep.started_at = time.monotonic()
        if rep.kind == "sim":
            argv = self._sim_argv(rep, dep, perf, rep.port or self._port())
            rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {SIM_ADMIN_ENV: self.sim_admin_token})
            return
        pool = self.plan.pool(rep.pool)
        assert pool.engine_command is not None
        port = rep.port or self._port() or processes.free_port(self.host)
        values = {
            "model": dep.model,
            "port": port,
            "host": self.host,
            "max_model_len": dep.max_model_len,
            "max_concurrent_requests": dep.max_concurrent_requests,
            "gpu_memory_utilization": dep.gpu_memory_utilization,
        }
        values.update(precise.engine_ports(rep, dep, pool.engine_command, self._port_run))
        try:
            argv = processes.fill_engine_command(pool.engine_command, values)
        except ValueError as exc:
            raise LocalRuntimeError(str(exc)) from None
        if rep.gpus is None:
            rep.gpus = ",".join(str(self._next_gpu + i) for i in range(dep.gpus_per_replica))
            self._next_gpu += dep.gpus_per_replica
        rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {"CUDA_VISIBLE_DEVICES": rep.gpus})
        rep.port = port
        rep.url = f"http://{processes.url_host(self.host)}:{port}"

    def replica_ready(self, rep: LocalReplica) -> bool:
        """Check once whether `rep` is ready (port file written, or the engine's /health 200); if so, mark it."""
        if rep.kind == "sim":
            port_file = self.workdir / f"{rep.id}.port"
            if not (port_file.exists() and (txt := port_file.read_text().strip())):
                return False
            if not precise.read_sim_ports(self.settings, rep, self.workdir):  # written before the port file
                return False
            rep.port = int(txt)
            rep.url = f"http://{processes.url_host(self.host)}:{rep.port}"
        else:
            try:
                if httpx.get(rep.url + "/health", timeout=1.0, trust_env=False).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        rep.state = "active" if rep.role == "active" else "warm"
        rep.ready_by = None
        return True

    def wait_replica(self, rep: LocalReplica, deadline: float) -> None:
        """Wait until `rep` is ready (its port file is written, or its engine's /health answers 200)."""
        assert rep.proc is not None
        while time.monotonic() < deadline:
            code = rep.proc.poll()
            if code is not None:
                tail = processes.log_tail(rep.log_path)
                raise LocalRuntimeError(f"replica {rep.id} exited with code {code} while starting{tail}")
            if self.replica_ready(rep):
                return
            time.sleep(0.05)
        raise LocalRuntimeError(f"replica {rep.id} did not become ready in time{processes.log_tail(rep.log_path)}")

    def ready_timeout(self, rep: LocalReplica) -> float:
        """Seconds `rep` may take to start."""
        return self.engine_ready_timeout_s if rep.kind == "engine" else self.ready_timeout_s

    def stop_replica(self, rep: LocalReplica, sig: int | None = None, grace_s: float = 5.0) -> bool:
        """Stop the process of `rep`: `sig` to its group then wait, or (no `sig`) SIGTERM, SIGKILL after
        `grace_s`. Its state is left to the supervisor (a killed replica is a dead one). True if it ran."""
        if rep.proc is None or not rep.running:
            return False
        if sig is None:
            processes.terminate([rep.proc], grace_s)
        else:
            processes.signal_group(rep.proc, sig)
            rep.proc.wait(10)
        return True

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] | None = None) -> LocalRuntime:
        """Start every replica, then the router; return once traffic can flow. Stops all on failure."""
        try:
            self._start(progress or (lambda _msg: None))
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, progress: Callable[[str], None]) -> None:
        # the router's imports (seconds on a busy machine) overlap the replicas' start: a hot spare
        # spawned now becomes the router once they are ready (`start_router`)
        self.router_spare = self._spawn_router(standby=True)
        for rep in self.replicas:  # start them all first: they load in parallel
            self.start_replica(rep)
        for rep in self.replicas:
            self.wait_replica(rep, time.monotonic() + self.ready_timeout(rep))
            progress(f"replica {rep.id} ({rep.role}) on {rep.url}")
        for pool in self.plan.pools:
            if pool.warm_nodes and pool.engine_command:
                self.emit(f"pool {pool.name}: {pool.warm_nodes} warm node(s) not held (warm standby needs replica-sim)")
        self.start_router(progress)

    @property
    def endpoint(self) -> str:
        """The router's base URL (OpenAI-compatible: `{endpoint}/v1/chat/completions`)."""
        return self.router_url

    def pids(self) -> list[int]:
        """Process ids of every child still tracked (router included)."""
        procs = [r.proc for r in self.replicas if r.proc is not None] + ([self.router_proc] if self.router_proc else [])
        if self.router_spare is not None:
            procs.append(self.router_spare[0])
        return [p.pid for p in procs]

    # -- supervision (gpufleet.infra.local.supervisor) -----------------------------------
    def check(self, load: bool = True) -> list[str]:
        """One supervision round (`Supervisor.check`): the events it produced."""
        return self.supervisor.check(load)

    def promote(self, deployment: str, reason: str, pool: str | None = None) -> LocalReplica | None:
        """Promote the first live standby of `deployment` (of `pool`, when given), in its failover
        order (`Supervisor.promote`)."""
        return self.supervisor.promote(deployment, reason, pool=pool)

    def kill_pool(self, pool: str, sig: int = signal.SIGKILL) -> list[str]:
        """Fail `pool` (the demo's and tests' pool failure): kill every live replica process of it and
        hold it down, as a lost pool's machines are: its replicas are not restarted, the supervisor
        promotes standbys of the next pools instead. The killed replicas' ids."""
        with self.lock:
            self.down_pools.add(pool)
            return [rep.id for rep in self.replicas if rep.pool == pool and self.stop_replica(rep, sig)]

    def drain(self, timeout_s: float | None = None) -> bool:
        """Stop gracefully: the router drains (readiness 503, no new connections, in-flight requests
        finish within `timeout_s`, default `settings.drain_timeout_s`), then every process stops.
        True if the router finished draining in time. `force` (e.g. from a second Ctrl-C) cuts it short."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        proc = self.router_proc
        drained = True
        if proc is not None and proc.poll() is None:
            processes.signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout_s + 5.0)  # the router cuts what is left at timeout_s itself
            except subprocess.TimeoutExpired:
                drained = False
        self.stop()
        return drained

    def force(self) -> None:
        """SIGKILL every child now (the second signal during a drain); `stop` then only reaps."""
        self.draining = True
        spare = [self.router_spare[0]] if self.router_spare is not None else []
        for p in [self.router_proc, *spare, *(r.proc for r in self.replicas)]:
            if p is not None and p.poll() is None:
                processes.signal_group(p, signal.SIGKILL)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and every replica: SIGTERM to each process group, SIGKILL after `grace_s`."""
        self.draining = True  # the router watcher must not restart what is being stopped
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            procs = ([self.router_proc] if self.router_proc is not None else []) + [
                r.proc for r in self.replicas if r.proc is not None
            ]
            if self.router_spare is not None:
                procs.append(self.router_spare[0])
            processes.terminate(procs, grace_s)
            # an engine's group may hold grandchildren (its workers): make sure none is left
            for r in self.replicas:
                if r.kind == "engine" and r.proc is not None:
                    processes.signal_group(r.proc, signal.SIGKILL)
            for r in self.replicas:
                if r.state != "dead":
                    r.state = "stopped"
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
