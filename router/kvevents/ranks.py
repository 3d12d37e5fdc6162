"""Data-parallel ranks: one KV-event stream per rank, on the replica's ports offset by the rank.

vLLM run with `--data-parallel-size N` has N engine cores behind one API server; each core
publishes its own KV events, on the configured endpoints with the port plus its rank
(`ZmqEventPublisher.offset_endpoint_port` in `vllm/distributed/kv_events.py`: `tcp://*:5557`
becomes `:5558` for rank 1; an `inproc://` name gets `_dp<rank>`), the replay endpoint likewise,
and stamps `data_parallel_rank` on each batch. The router subscribes to every rank and merges
them into the replica's index (`gpufleet.router.kvevents.subscriber`).

Pure; imports nothing of the router, so the config can validate with it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["engine_data_parallel_size", "engine_int_arg", "offset_endpoint_port", "port_collision", "rank_endpoints"]


def offset_endpoint_port(endpoint: str, rank: int) -> str:
    """The endpoint rank `rank` publishes on, as vLLM offsets it; ValueError for one it cannot offset."""
    if rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    head, sep, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not sep or not port.isdigit():
        raise ValueError(f"cannot offset {endpoint!r} by a data-parallel rank: vLLM offsets only tcp://host:port")
    return f"{head}:{int(port) + rank}"


def rank_endpoints(endpoint: str, replay: str | None, size: int) -> list[tuple[str, str | None]]:
    """(PUB, replay) of every rank 0..size-1."""
    return [
        (offset_endpoint_port(endpoint, r), offset_endpoint_port(replay, r) if replay is not None else None)
        for r in range(size)
    ]


def port_collision(endpoint: str, replay: str | None, size: int) -> str | None:
    """Why these ranks' endpoints cannot all bind (two ranks' sockets on one address), or None."""
    try:
        ranks = rank_endpoints(endpoint, replay, size)
    except ValueError as exc:
        return str(exc)
    seen: dict[str, str] = {}
    for r, (pub, rep) in enumerate(ranks):
        for what, ep in (("events", pub), ("replay", rep)):
            if ep is None:
                continue
            if ep in seen:
                return (
                    f"rank {r}'s {what} endpoint {ep} is also {seen[ep]} (ports are offset by the rank): "
                    f"keep the events and replay ports at least data_parallel_size ({size}) apart"
                )
            seen[ep] = f"rank {r}'s {what} endpoint"
    return None


def engine_int_arg(engine_args: Sequence[str], *flags: str) -> int | None:
    """The positive integer given to any of `flags` among engine args (`--flag N` or
    `--flag=N`; the last one wins, as argparse does), None if absent or not a positive integer."""
    args = list(engine_args)
    found = None
    for i, a in enumerate(args):
        value = None
        if a in flags and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--") and a.split("=", 1)[0] in flags and "=" in a:
            value = a.split("=", 1)[1]
        if value is not None and value.isdigit() and int(value) >= 1:
            found = int(value)
    return found


def engine_data_parallel_size(engine_args: Sequence[str]) -> int:
    """vLLM's `--data-parallel-size N` / `-dp N` / `--data-parallel-size=N` among engine args (1 if absent)."""
    return engine_int_arg(engine_args, "--data-parallel-size", "-dp") or 1
