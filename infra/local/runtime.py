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
process mechanics are `gpufleet.infra.local.processes`. `start_replica` and `stop_replica` are
the one place a replica process starts and the one place it is stopped. Warm standby needs the
simulated replica: pools with an `engine_command` hold no warm replicas (reported as not held).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import yaml

from gpufleet.infra import router_config
from gpufleet.infra.local import processes
from gpufleet.infra.local.layout import LocalReplica, layout, pool_perf
from gpufleet.infra.local.supervisor import Supervisor
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPerf, ReplicaPlan
from gpufleet.router.config import RouterConfig, RouterSettings

__all__ = ["SIM_ADMIN_ENV", "LocalRuntime", "LocalRuntimeError", "check_local"]

SIM_ADMIN_ENV = "GPUFLEET_SIM_ADMIN_TOKEN"
"""The variable through which simulated replicas get their admin token (for promotion)."""
_LISTEN_RE = re.compile(r"listening on (http://[^\s:]+:(\d+))")


class LocalRuntimeError(Exception):
    """The local fleet cannot be started or run (shown to the user as one line)."""


def check_local(plan: Plan) -> None:
    """Raise `LocalRuntimeError` unless every pool of the plan is `cloud: local`."""
    other = [f"{p.name} ({p.cloud})" for p in plan.pools if p.cloud != "local"]
    if other:
        raise LocalRuntimeError(
            f"gpufleet up runs fleets whose pools are all `cloud: local`; not local: {', '.join(other)} "
            "(deploy those with the Pulumi stacks in stacks/)"
        )


class LocalRuntime:
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
    ) -> None:
        check_local(plan)
        self.plan = plan
        self.settings = settings or plan.router
        local = plan.clouds.local
        self.host = local.host if local is not None else "127.0.0.1"
        self._base_port = local.base_port if local is not None else 0
        self.router_port = self.settings.port if router_port is None else router_port
        self.ready_timeout_s = ready_timeout_s
        self.engine_ready_timeout_s = engine_ready_timeout_s
        self.python = python
        self.on_event = on_event
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="gpufleet-up-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.sim_admin_token = secrets.token_urlsafe(24)
        env_name = self.settings.admin_token.env
        self.router_admin_token: str | None = (
            (os.environ.get(env_name) or secrets.token_urlsafe(24)) if env_name else None
        )
        self.replicas: list[LocalReplica] = layout(plan)
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.router_config: RouterConfig | None = None
        self.events: list[str] = []
        self._next_port = self._base_port
        self._next_gpu = 0
        self.lock = threading.RLock()
        """Held by every change of replica state (supervision runs on another thread than stop)."""
        self.stopped = False
        self.supervisor = Supervisor(
            self, waiting_per_replica=scale_up_waiting_per_replica, utilization=scale_up_utilization
        )

    def emit(self, msg: str) -> None:
        """Record a runtime event (a death, a promotion) and pass it to `on_event`."""
        self.events.append(msg)
        if self.on_event is not None:
            self.on_event(msg)

    # -- replica processes ---------------------------------------------------------------
    def _port(self) -> int:
        if self._base_port:
            p = self._next_port
            self._next_port += 1
            return p
        return 0

    def _sim_argv(self, rep: LocalReplica, dep: DeploymentPlan, perf: PoolPerf) -> list[str]:
        """`gpufleet replica-sim` shaped by the pool's machine, speaking the router's blocks and tokens."""
        flags = {
            "--model": dep.model,
            "--replica-id": rep.id,
            "--host": self.host,
            "--port": self._port(),
            "--kv-capacity-tokens": perf.kv_cache_tokens_per_replica,
            "--prefill-tokens-per-s": perf.prefill_tokens_per_s,
            "--decode-tokens-per-s": perf.decode_tokens_per_s,
            "--max-running": dep.max_concurrent_requests,
            "--max-model-len": dep.max_model_len,
            "--block-size-tokens": self.settings.block_size_tokens,
            "--chars-per-token": self.settings.chars_per_token,
            "--port-file": self.workdir / f"{rep.id}.port",
        }
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
        """Start the process of `rep` (a simulated replica or the pool's engine); `wait_replica` waits for it."""
        dep = self.plan.deployment(rep.deployment)
        perf = pool_perf(dep, rep.pool)
        rep.log_path = self.workdir / "logs" / f"{rep.id}.log"
        if rep.kind == "sim":
            argv = self._sim_argv(rep, dep, perf)
            rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {SIM_ADMIN_ENV: self.sim_admin_token})
            return
        pool = self.plan.pool(rep.pool)
        assert pool.engine_command is not None
        port = self._port() or processes.free_port(self.host)
        values = {
            "model": dep.model,
            "port": port,
            "host": self.host,
            "max_model_len": dep.max_model_len,
            "max_concurrent_requests": dep.max_concurrent_requests,
            "gpu_memory_utilization": dep.gpu_memory_utilization,
        }
        try:
            argv = processes.fill_engine_command(pool.engine_command, values)
        except ValueError as exc:
            raise LocalRuntimeError(str(exc)) from None
        gpus = ",".join(str(self._next_gpu + i) for i in range(dep.gpus_per_replica))
        self._next_gpu += dep.gpus_per_replica
        rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {"CUDA_VISIBLE_DEVICES": gpus})
        rep.port = port
        rep.url = f"http://{processes.url_host(self.host)}:{port}"

    def wait_replica(self, rep: LocalReplica, deadline: float) -> None:
        """Wait until `rep` is ready (its port file is written, or its engine's /health answers 200)."""
        assert rep.proc is not None
        port_file = self.workdir / f"{rep.id}.port"
        while time.monotonic() < deadline:
            code = rep.proc.poll()
            if code is not None:
                tail = processes.log_tail(rep.log_path)
                raise LocalRuntimeError(f"replica {rep.id} exited with code {code} while starting{tail}")
            if rep.kind == "sim":
                if port_file.exists() and (txt := port_file.read_text().strip()):
                    rep.port = int(txt)
                    rep.url = f"http://{processes.url_host(self.host)}:{rep.port}"
                    rep.state = "active" if rep.role == "active" else "warm"
                    return
            else:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(rep.url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                        rep.state = "active"
                        return
            time.sleep(0.05)
        raise LocalRuntimeError(f"replica {rep.id} did not become ready in time{processes.log_tail(rep.log_path)}")

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
        for rep in self.replicas:  # start them all first: they load in parallel
            self.start_replica(rep)
        for rep in self.replicas:
            timeout = self.engine_ready_timeout_s if rep.kind == "engine" else self.ready_timeout_s
            self.wait_replica(rep, time.monotonic() + timeout)
            progress(f"replica {rep.id} ({rep.role}) on {rep.url}")
        for pool in self.plan.pools:
            if pool.warm_nodes and pool.engine_command:
                self.emit(f"pool {pool.name}: {pool.warm_nodes} warm node(s) not held (warm standby needs replica-sim)")
        self._start_router()
        progress(f"router on {self.router_url}")
        self._wait_router_view(time.monotonic() + self.ready_timeout_s)

    # -- the router ----------------------------------------------------------------------
    def router_config_for_run(self) -> RouterConfig:
        """The router config: `router_config.render` over the plan plus the standby replicas."""
        warm: dict[str, list[ReplicaPlan]] = {}
        for rep in self.replicas:
            if rep.role == "warm":
                idx = len(warm.setdefault(rep.deployment, []))
                warm[rep.deployment].append(
                    ReplicaPlan(
                        id=rep.id, deployment=rep.deployment, pool=rep.pool, priority=rep.priority, index=1000 + idx
                    )
                )
        plan = self.plan.model_copy(
            update={
                "deployments": [
                    d.model_copy(update={"replicas": [*d.replicas, *warm.get(d.name, [])]})
                    for d in self.plan.deployments
                ]
            }
        )
        urls = {r.id: r.url for r in self.replicas}
        return router_config.render(plan, urls, self.settings)

    def _start_router(self) -> None:
        cfg = self.router_config_for_run()
        self.router_config = cfg
        path = self.workdir / "router.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
        env: dict[str, str] = {}
        if self.settings.admin_token.env and self.router_admin_token:
            env[self.settings.admin_token.env] = self.router_admin_token
        log = self.workdir / "logs" / "router.log"
        argv = processes.cli_argv(
            self.python, "router", "serve", "--config", str(path), "--host", self.host, "--port", str(self.router_port)
        )
        self.router_proc = processes.spawn(argv, log, self.workdir, env)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.router_proc.poll()
            if code is not None:
                raise LocalRuntimeError(f"router exited with code {code} while starting{processes.log_tail(log)}")
            m = _LISTEN_RE.search(log.read_text(errors="replace")) if log.exists() else None
            if m:
                self.router_url = f"http://{processes.url_host(self.host)}:{m.group(2)}"
                return
            time.sleep(0.05)
        raise LocalRuntimeError(f"router did not start listening in time{processes.log_tail(log)}")

    def router_rows(self) -> list[dict[str, object]]:
        """The router's view of every replica (its `/admin/replicas` rows: health, in-flight, ...)."""
        headers = {"Authorization": f"Bearer {self.router_admin_token}"} if self.router_admin_token else {}
        r = httpx.get(self.router_url + "/admin/replicas", headers=headers, timeout=2.0, trust_env=False)
        r.raise_for_status()
        return list(r.json()["replicas"])

    def router_view(self) -> dict[str, bool]:
        """Replica id -> healthy, as the router sees it."""
        return {str(row["id"]): bool(row["healthy"]) for row in self.router_rows()}

    def _wait_router_view(self, deadline: float) -> None:
        """Wait until the router routes to exactly the live active replicas (standbys ejected)."""
        want = {r.id: r.state == "active" for r in self.replicas}
        last: dict[str, bool] | object = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                last = self.router_view()
                if last == want:
                    return
            if self.router_proc is not None and self.router_proc.poll() is not None:
                tail = processes.log_tail(self.workdir / "logs" / "router.log")
                raise LocalRuntimeError(f"router exited{tail}")
            time.sleep(0.1)
        raise LocalRuntimeError(f"router did not see the expected replicas in time (saw {last})")

    def wait_routable(self, replica_ids: Iterable[str], timeout_s: float = 30.0) -> bool:
        """Wait until the router routes to every replica of `replica_ids` (e.g. after a promotion)."""
        ids = set(replica_ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                view = self.router_view()
                if all(view.get(i) for i in ids):
                    return True
            time.sleep(0.1)
        return False

    @property
    def endpoint(self) -> str:
        """The router's base URL (OpenAI-compatible: `{endpoint}/v1/chat/completions`)."""
        return self.router_url

    def pids(self) -> list[int]:
        """Process ids of every child still tracked (router included)."""
        procs = [r.proc for r in self.replicas if r.proc is not None] + ([self.router_proc] if self.router_proc else [])
        return [p.pid for p in procs]

    # -- supervision (gpufleet.infra.local.supervisor) -----------------------------------
    def check(self, load: bool = True) -> list[str]:
        """One supervision round (`Supervisor.check`): the events it produced."""
        return self.supervisor.check(load)

    def promote(self, deployment: str, reason: str) -> LocalReplica | None:
        """Promote the first live standby of `deployment`, in its failover order (`Supervisor.promote`)."""
        return self.supervisor.promote(deployment, reason)

    def kill_pool(self, pool: str, sig: int = signal.SIGKILL) -> list[str]:
        """Kill every live replica process of `pool` (the demo's and tests' pool failure)."""
        with self.lock:
            return [rep.id for rep in self.replicas if rep.pool == pool and self.stop_replica(rep, sig)]

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and every replica: SIGTERM to each process group, SIGKILL after `grace_s`."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            procs = ([self.router_proc] if self.router_proc is not None else []) + [
                r.proc for r in self.replicas if r.proc is not None
            ]
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
