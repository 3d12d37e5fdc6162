"""`gpufleet bench live`: the same workload over real loopback HTTP, gpufleet's router against the peers.

For each router, fresh simulated replicas (`gpufleet replica-sim` processes, with the plan's KV
capacity and rates multiplied by `speedup` so that a scaled-down run takes seconds) are started,
then the router in front of them:

    gpufleet  `gpufleet router serve` with a router config listing the replicas (cache_aware)
    sglang    `python -m sglang_router.launch_router --policy cache_aware` (SGLang router 0.3.x)
    vllm      `vllm-router --policy cache_aware` (it calls each replica's `/tokenize`)

The peers are installed outside the project (see ../shared/peers/README.md); give their virtual
environment with `--peers-venv` and a router whose executable is missing is skipped with a reason.
Everything binds 127.0.0.1; the peers get proxy variables pointing nowhere and HF_HUB_OFFLINE=1.

Requests are sent open-loop at their (scaled) arrival times as streaming chat or completions calls
by the workload library's HTTP driver (`gpufleet.router.workloads.driver`, the one `gpufleet demo`
uses); TTFT is the first streamed token, the prefix-hit ratio comes from each answer's
`usage.prompt_tokens_details.cached_tokens` as the replica reports it. Times in the table are
wall-clock seconds of the sped-up run (multiply by `speedup` for the plan's hardware).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.router.sim.fleet import SimFleet
from gpufleet.router.workloads import driver, stats
from gpufleet.router.workloads.driver import Result
from gpufleet.router.workloads.types import MODEL, Workload

__all__ = [
    "CHATML_SPECIAL",
    "CHATML_TEMPLATE",
    "ROUTERS",
    "LiveResult",
    "at_load",
    "find_peer",
    "free_port",
    "offered_load",
    "run_live",
    "train_tokenizer",
    "workload_tokenizer",
]

ROUTERS = ("gpufleet", "gpufleet-events", "sglang", "vllm")
"""`gpufleet-events`: gpufleet's router in precise mode, reading the replicas' vLLM KV events."""

CHATML_SPECIAL = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The trained tokenizers' chat template: ChatML (Qwen's shape), its markers special added tokens."""

_CLI = [sys.executable, "-c", "from gpufleet.infra.cli import main; main()"]
_PEER_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class LiveResult:
    """One router's run."""

    router: str
    skipped: str | None = None
    """Why the router did not run (missing executable, failed to start), else None."""
    requests: int = 0
    ok: int = 0
    errors: int = 0
    hit_ratio: float = float("nan")
    ttft_p50_s: float = float("nan")
    ttft_p99_s: float = float("nan")
    throughput_rps: float = float("nan")
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in self.__dict__.items()}


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 now (the child binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_peer(router: str, peers_venv: Path | None) -> tuple[list[str] | None, str]:
    """The command prefix to start a peer router, or None and the reason it is unavailable."""
    if peers_venv is None:
        return None, "no --peers-venv given"
    bin_dir = peers_venv / "bin"
    if router == "sglang":
        py = bin_dir / "python"
        probe = subprocess.run([str(py), "-c", "import sglang_router"], capture_output=True) if py.exists() else None
        if probe is None or probe.returncode != 0:
            return None, f"sglang_router is not installed in {peers_venv}"
        return [str(py), "-m", "sglang_router.launch_router"], ""
    if router == "vllm":
        exe = bin_dir / "vllm-router"
        if not exe.exists():
            return None, f"vllm-router is not installed in {peers_venv}"
        return [str(exe)], ""
    return None, f"unknown router {router!r}"


class _Procs:
    """Child processes started for one run; all are stopped on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = log.open("wb")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        fh.close()
        self.procs.append(p)
        self.logs.append(log)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=1.0, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s ({last})")


def train_tokenizer(workload: Workload, directory: Path) -> Path:
    """A byte-level BPE tokenizer (4k vocab) trained on the workload's own prompts, with the ChatML
    markers as special tokens and ChatML as its chat template (`CHATML_TEMPLATE`): what the
    replicas tokenize with when the run includes `gpufleet-events` (no model is downloaded; every
    router then faces replicas that count tokens the same way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gpufleet.router.prefix import render_prompt

    texts = [render_prompt(w.body) for w in workload.work_requests()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=4000, show_progress=False, special_tokens=list(CHATML_SPECIAL))
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    return directory


def _start_replicas(
    procs: _Procs, fleet: SimFleet, speedup: float, tmp: Path, tokenizer: Path | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """The replicas' URLs and, with a tokenizer, their KV-event (PUB, replay) endpoints."""
    urls = []
    events: list[tuple[str, str]] = []
    s = fleet.settings
    pending = []
    for spec in fleet.replicas:
        e = spec.engine
        port_file = tmp / f"{spec.id}.port"
        cmd = [
            *_CLI,
            "replica-sim",
            "--model",
            MODEL,
            "--replica-id",
            spec.id,
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--kv-capacity-tokens",
            str(e.kv_capacity_tokens),
            "--prefill-tokens-per-s",
            str(e.prefill_tokens_per_s * speedup),
            "--decode-tokens-per-s",
            str(e.decode_tokens_per_s * speedup),
            "--max-running",
            str(e.max_running),
            "--max-batched-tokens",
            str(e.max_batched_tokens),
            "--max-model-len",
            str(e.max_model_len),
            "--block-size-tokens",
            str(s.block_size_tokens),
            "--chars-per-token",
            str(s.chars_per_token),
        ]
        if tokenizer is not None:
            pub, replay = free_port(), free_port()
            cmd += ["--tokenizer", str(tokenizer), "--kv-events-port", str(pub), "--kv-events-replay-port", str(replay)]
            events.append((f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"))
        pending.append((procs.start(cmd, tmp / f"{spec.id}.log"), port_file))
    for proc, port_file in pending:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica-sim did not start (see {port_file.with_suffix('.log')})")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{int(port_file.read_text().strip())}"
        _wait_http(url + "/health", 30, proc)
        urls.append(url)
    return urls, events


def _start_router(
    router: str,
    procs: _Procs,
    fleet: SimFleet,
    urls: list[str],
    tmp: Path,
    peer: list[str] | None,
    events: list[tuple[str, str]] | None = None,
    tokenizer: Path | None = None,
) -> str:
    port = free_port()
    log = tmp / f"router-{router}.log"
    if router in ("gpufleet", "gpufleet-events"):
        from gpufleet.router.config import KvEventsSettings, ReplicaConfig, RouterConfig

        update: dict[str, object] = {"policy": "cache_aware"}
        precise = router == "gpufleet-events" and events and tokenizer is not None
        if precise:
            update["kv_events"] = KvEventsSettings(enabled=True, tokenizer=str(tokenizer))
        settings = fleet.settings.model_copy(update=update)
        ends = events if precise and events else [(None, None)] * len(urls)
        cfg = RouterConfig(
            fleet=fleet.name,
            settings=settings,
            replicas=[
                ReplicaConfig(
                    id=spec.id,
                    url=url,
                    deployment=fleet.name,
                    model=MODEL,
                    pool=spec.pool,
                    priority=spec.priority,
                    kv_capacity_tokens=spec.engine.kv_capacity_tokens,
                    max_model_len=spec.engine.max_model_len,
                    max_concurrent_requests=spec.max_concurrent_requests,
                    kv_events_endpoint=ep,
                    kv_events_replay_endpoint=replay,
                )
                for spec, url, (ep, replay) in zip(fleet.replicas, urls, ends)
            ],
        )
        path = tmp / "router.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json", by_alias=True)))
        proc = procs.start([*_CLI, "router", "serve", "--config", str(path), "--port", str(port)], log)
        _wait_http(f"http://127.0.0.1:{port}/health", 30, proc)
        return f"http://127.0.0.1:{port}"
    assert peer is not None
    metrics_port = free_port()
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        "cache_aware",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
    ]
    if router == "sglang":
        cmd = [*peer, *common, "--shutdown-grace-period-secs", "1"]
    else:
        cmd = [*peer, *common]
    proc = procs.start(cmd, log, env=_PEER_ENV)
    _wait_http(f"http://127.0.0.1:{port}/readiness", 60, proc)
    return f"http://127.0.0.1:{port}"


def _send(base: str, workload: Workload, speedup: float, on_done: Callable[[int], None] | None) -> list[Result]:
    """Every request at its (sped-up) arrival time, none waiting for another: an open loop."""
    reqs = workload.work_requests()
    t0 = workload.requests[0].arrival_s if workload.requests else 0.0
    send_at = {w.index: (r.arrival_s - t0) / speedup for w, r in zip(reqs, workload.requests)}
    done = 0

    def count(_res: Result) -> None:
        nonlocal done
        done += 1
        if on_done is not None:
            on_done(done)

    return asyncio.run(
        driver.drive(base, reqs, concurrency=max(1, len(reqs)), timeout_s=600.0, on_result=count, send_at=send_at)
    )


@contextlib.contextmanager
def workload_tokenizer(workload: Workload, routers: tuple[str, ...]) -> Iterator[Path | None]:
    """The tokenizer every replica of a run uses (`train_tokenizer`, in a temporary directory
    removed afterwards) when `routers` include `gpufleet-events`, else None."""
    if "gpufleet-events" not in routers:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gpufleet-live-tokenizer-") as d:
        yield train_tokenizer(workload, Path(d))


@contextlib.contextmanager
def at_load(
    workload: Workload, fleet: SimFleet, routers: tuple[str, ...], load: float
) -> Iterator[tuple[Workload, Path | None]]:
    """`workload` rescaled to offered `load` in the replicas' own tokens, and the tokenizer they
    use (`workload_tokenizer`; None without `gpufleet-events`), for `run_live(..., tokenizer=)`."""
    with workload_tokenizer(workload, routers) as tokenizer:
        yield workload.scaled(offered_load(workload, fleet, tokenizer) / load), tokenizer


def offered_load(workload: Workload, fleet: SimFleet, tokenizer: Path | None = None) -> float:
    """`metrics.offered_load` in the tokens the replicas will count: with `tokenizer`, the prompts
    as it encodes them (chat template included) rather than the workload's estimate. The BPE
    tokenizer trained on random filler text splits it into 1.5-1.8 x the estimated tokens, so
    without this a run "at load 2.0" would put the replicas at 3-3.6."""
    from gpufleet.router.sim import metrics

    base = metrics.offered_load(workload, fleet)
    if tokenizer is None or not workload.prompt_tokens:
        return base
    from gpufleet.router.kvevents.tokenize import PromptTokenizer

    tok = PromptTokenizer(tokenizer)
    try:
        counted = sum(len(tok.encode_body(w.body)) for w in workload.work_requests())
    finally:
        tok.close()
    return base * counted / workload.prompt_tokens


def run_live(
    workload: Workload,
    fleet: SimFleet,
    routers: tuple[str, ...] = ROUTERS,
    *,
    speedup: float = 1.0,
    peers_venv: Path | None = None,
    progress: Callable[[str, int], None] | None = None,
    tokenizer: Path | None = None,
) -> list[LiveResult]:
    """Run `workload` (built with `keep_bodies=True`) through each router in front of fresh replicas.

    `tokenizer`: the replicas' (from `at_load`, with which the caller scaled the load);
    without one, a run that includes `gpufleet-events` trains its own."""
    workload.work_requests()  # live runs need request bodies: fail before starting anything
    runs: list[LiveResult] = []
    with _terminate_as_exit(), contextlib.ExitStack() as stack:
        if tokenizer is None:
            tokenizer = stack.enter_context(workload_tokenizer(workload, routers))
        for router in routers:
            runs.append(_run_one(router, workload, fleet, speedup, peers_venv, progress, tokenizer))
    return runs


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While live runs go on, SIGTERM (`kill`, a CI timeout) exits through the `finally` blocks, so
    the replicas and routers a run started are stopped, not left behind. Python's default is to
    die at once. Only the main thread can set a handler; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_one(
    router: str,
    workload: Workload,
    fleet: SimFleet,
    speedup: float,
    peers_venv: Path | None,
    progress: Callable[[str, int], None] | None,
    tokenizer: Path | None,
) -> LiveResult:
    """One router in front of fresh replicas (all with the same tokenizer when there is one)."""
    ours = router in ("gpufleet", "gpufleet-events")
    peer, why = (None, "") if ours else find_peer(router, peers_venv)
    if not ours and peer is None:
        return LiveResult(router, skipped=why)
    procs = _Procs()
    with tempfile.TemporaryDirectory(prefix=f"gpufleet-live-{router}-") as d:
        tmp = Path(d)
        try:
            urls, events = _start_replicas(procs, fleet, speedup, tmp, tokenizer)
            base = _start_router(router, procs, fleet, urls, tmp, peer, events, tokenizer)
            cb = (lambda n, _r=router: progress(_r, n)) if progress else None
            results = _send(base, workload, speedup, cb)
        except RuntimeError as exc:
            tail = ""
            with contextlib.suppress(OSError):
                tail = (tmp / f"router-{router}.log").read_text(errors="replace")[-300:]
            return LiveResult(router, skipped=f"{exc}; log tail: {tail.strip()}" if tail else str(exc))
        finally:
            procs.stop()
    return _summarize(router, results)


def _summarize(router: str, results: list[Result]) -> LiveResult:
    s = stats.summarize(results)
    ok = [r for r in results if r.ok]
    span = max((r.sent_s + r.latency_s for r in ok), default=0.0)
    return LiveResult(
        router,
        requests=s.requests,
        ok=s.ok,
        errors=s.errors,
        hit_ratio=s.prefix_hit_ratio if any(r.prompt_tokens for r in ok) else math.nan,
        ttft_p50_s=stats.percentile((r.ttft_s for r in ok if r.ttft_s is not None), 50, math.nan),
        ttft_p99_s=stats.percentile((r.ttft_s for r in ok if r.ttft_s is not None), 99, math.nan),
        throughput_rps=len(ok) / span if span > 0 else math.nan,
        error_samples=[f"{r.status or 'no status'}: {r.error}"[:160] for r in results if r.error][:3],
    )
