"""How a local fleet does KV events: precise mode (`router.kv_events` on with a tokenizer).

In precise mode every replica publishes vLLM's KV events (ZMQ PUB, and a replay socket when
`kv_events.replay_port` is set) and the router's config lists each one's endpoints, so the router
indexes what each replica actually holds instead of estimating it. On one machine the replicas
cannot share the declared ports, so each gets ports of its own:

- a simulated replica (`gpufleet replica-sim`) is started with the tokenizer, the chat template,
  the topic and its ports (`sim_flags`: the next `base_port`s, or 0 so it binds free ones), and
  writes the ports it bound to `<id>.kv-port` before its `<id>.port` (`read_sim_ports`); it is one
  stream whatever the deployment's data-parallel size (one engine core);
- an engine whose `engine_command` names `{kv_events_port}` / `{kv_events_replay_port}` gets one
  run of ports for its data-parallel ranks (vLLM binds port + rank), the replay run after it
  (`engine_ports`); other engines keep the declared ports at their URL's host
  (`router_config.render`);
- ports are kept across restarts (as a replica's HTTP port is), so the router keeps its endpoints;
  late joiners (autoscaler, healing, promoted standbys) get theirs through the same config
  (`event_endpoints`, read by `router_process` each time it renders the config).

The replicas run in the work directory, so the tokenizer and chat template paths are made absolute
(`with_absolute_paths`); a missing one is refused (`check`). Without a tokenizer precise mode is off
and one line (the router's own, `NO_TOKENIZER`) says so. In precise mode the replicas cut blocks of
the engines' size (`block_size`: `kv_events.block_size`, else `block_size_tokens`).

`LocalRuntime` (`gpufleet.infra.local.runtime`) calls these; its `precise`, `routing_mode`,
`kv_block_size` and `event_endpoints` are this module's answers for its settings and replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from gpufleet.infra import router_config
from gpufleet.infra.local import processes
from gpufleet.infra.local.layout import LocalReplica
from gpufleet.infra.local.processes import LocalRuntimeError
from gpufleet.infra.plan import DeploymentPlan, Plan
from gpufleet.router.config import RouterSettings

__all__ = [
    "block_size",
    "check",
    "engine_ports",
    "event_endpoints",
    "is_on",
    "kv_port_file",
    "read_sim_ports",
    "routing_mode",
    "sim_flags",
    "with_absolute_paths",
]


def with_absolute_paths(settings: RouterSettings) -> RouterSettings:
    """The settings with kv_events' tokenizer and chat template as absolute paths: the processes
    run in the work directory (a declaration's relative paths are its directory's already,
    `spec.load_file`; these are given as code, so they are the caller's)."""
    ke = settings.kv_events
    files = {k: str(Path(v).expanduser().resolve()) for k, v in (("tokenizer", ke.tokenizer),
             ("chat_template", ke.chat_template)) if v is not None}  # fmt: skip
    if not files:
        return settings
    return settings.model_copy(update={"kv_events": ke.model_copy(update=files)})


def is_on(settings: RouterSettings) -> bool:
    """Precise mode: kv_events on with a tokenizer, so every simulated replica publishes KV events
    (vLLM's protocol) and the router's config lists each one's endpoints."""
    ke = settings.kv_events
    return ke.enabled and ke.tokenizer is not None


def check(settings: RouterSettings, emit: Callable[[str], None]) -> None:
    """Say why precise mode is off when kv_events is on without a tokenizer (the router says it
    too, in its log); refuse a tokenizer file that is not there (the replicas would not start)."""
    ke = settings.kv_events
    if ke.enabled and ke.tokenizer is None:
        from gpufleet.router.kvevents.runtime import NO_TOKENIZER

        emit(f"router.kv_events: {NO_TOKENIZER}")
        return
    if is_on(settings):
        for name, value in (("tokenizer", ke.tokenizer), ("chat_template", ke.chat_template)):
            if value is not None and not Path(value).exists():
                raise LocalRuntimeError(f"router.kv_events.{name}: {value}: no such file")


def routing_mode(settings: RouterSettings) -> str:
    """One line: precise (and where from) or approximate (and why)."""
    ke = settings.kv_events
    if is_on(settings):
        return f"routing: precise, from each replica's KV events (tokenizer {ke.tokenizer})"
    why = "no tokenizer configured" if ke.enabled else "router.kv_events off"
    return f"routing: approximate ({why})"


def block_size(settings: RouterSettings) -> int:
    """The block size the replicas use: the engines' (kv_events.block_size) in precise mode."""
    s = settings
    return (s.kv_events.block_size or s.block_size_tokens) if is_on(s) else s.block_size_tokens


def kv_port_file(workdir: Path, rep: LocalReplica) -> Path:
    """Where a simulated replica writes the KV-event ports it bound (`<pub> <replay or ->`)."""
    return workdir / f"{rep.id}.kv-port"


def sim_flags(settings: RouterSettings, rep: LocalReplica, workdir: Path, port: Callable[[], int]) -> dict[str, object]:
    """The replica-sim flags that make it publish vLLM's KV events on ports of its own (none when
    precise mode is off): its ports kept from a previous run, else `port()` (the next base port, or
    0: it binds a free one and writes it to `kv_port_file`)."""
    ke = settings.kv_events
    if not is_on(settings) or ke.tokenizer is None:
        return {}
    flags: dict[str, object] = {"--tokenizer": ke.tokenizer}
    if ke.chat_template is not None:
        flags["--chat-template"] = ke.chat_template
    flags["--kv-events-port"] = rep.kv_events_port or port()
    if ke.replay_port is not None:
        flags["--kv-events-replay-port"] = rep.kv_replay_port or port()
    flags["--kv-events-topic"] = ke.topic
    flags["--kv-events-port-file"] = kv_port_file(workdir, rep)
    return flags


def read_sim_ports(settings: RouterSettings, rep: LocalReplica, workdir: Path) -> bool:
    """In precise mode, learn the KV-event ports a simulated replica bound (its `kv_port_file`,
    written before its port file); False while that file is not there yet. True when off."""
    if not is_on(settings):
        return True
    kv_file = kv_port_file(workdir, rep)
    if not kv_file.exists():
        return False
    pub, replay = kv_file.read_text().split()
    rep.kv_events_port = int(pub)
    rep.kv_replay_port = 0 if replay == "-" else int(replay)
    return True


def engine_ports(
    rep: LocalReplica, dep: DeploymentPlan, command: Iterable[str], port_run: Callable[[int], int]
) -> dict[str, int]:
    """The `{kv_events_port}` / `{kv_events_replay_port}` values of an engine whose command names
    them (none otherwise): one run of ports for its data-parallel ranks (vLLM binds the port +
    rank), the replay ranks after them, from `port_run(n)` (the first of n consecutive ports);
    kept across restarts, as its HTTP port is."""
    text = " ".join(command)
    pub, replay = "{kv_events_port}" in text, "{kv_events_replay_port}" in text
    if not (pub or replay):
        return {}
    ranks = router_config.data_parallel_size(dep)
    if not (rep.kv_events_port or rep.kv_replay_port):
        first = port_run(ranks * (int(pub) + int(replay)))
        rep.kv_events_port = first if pub else 0
        rep.kv_replay_port = (first + ranks if pub else first) if replay else 0
    return {"kv_events_port": rep.kv_events_port, "kv_events_replay_port": rep.kv_replay_port}


def event_endpoints(
    settings: RouterSettings, plan: Plan, replicas: Iterable[LocalReplica], host: str
) -> dict[str, router_config.EventEndpoints]:
    """Each replica's KV-event endpoints in precise mode: a simulated replica's (one stream, ports
    learned when it started), an engine's whose command names `{kv_events_port}` (its deployment's
    data-parallel ranks). Other engines are left to the declared ports at their URL's host
    (`router_config.render`)."""
    if not is_on(settings):
        return {}
    host = processes.url_host(host)
    out = {}
    for rep in replicas:
        if rep.kv_events_port:
            ranks = 1 if rep.kind == "sim" else router_config.data_parallel_size(plan.deployment(rep.deployment))
            replay = f"tcp://{host}:{rep.kv_replay_port}" if rep.kv_replay_port else None
            out[rep.id] = router_config.EventEndpoints(f"tcp://{host}:{rep.kv_events_port}", replay, ranks)
    return out
