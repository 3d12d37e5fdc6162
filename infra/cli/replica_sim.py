"""`gpufleet replica-sim`: serve one simulated vLLM-like replica (see gpufleet.router.replica).

Assembled with the other nouns in `gpufleet.infra.cli` (`register`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra.cli._common import UserError, console, group, user_errors

__all__ = ["register", "register_replica_sim"]


def register_replica_sim(app: typer.Typer) -> None:
    """Add the top-level `replica-sim` command to `app`."""

    @app.command("replica-sim")
    def replica_sim_cmd(
        model: Annotated[
            str, typer.Option(help="model name served (requests for another model get 404)")
        ] = "sim-model",
        host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="port to bind (0: any free port, see --port-file)")] = 8000,
        replica_id: Annotated[str, typer.Option(help="name shown in logs and /server_info")] = "replica-sim",
        kv_capacity_tokens: Annotated[int, typer.Option(help="KV-cache capacity in tokens (from the plan)")] = 65_536,
        prefill_tokens_per_s: Annotated[float, typer.Option(help="prompt tokens prefilled per second")] = 20_000.0,
        decode_tokens_per_s: Annotated[float, typer.Option(help="tokens per second one sequence decodes alone")] = 80.0,
        max_running: Annotated[int, typer.Option(help="requests running at once; the rest wait")] = 64,
        max_batched_tokens: Annotated[int, typer.Option(help="token budget of one engine step")] = 8192,
        max_model_len: Annotated[int, typer.Option(help="longest prompt + output, in tokens")] = 32_768,
        block_size_tokens: Annotated[int, typer.Option(help="KV block size in tokens (match the router's)")] = 16,
        cpu_kv_capacity_tokens: Annotated[
            int, typer.Option(help="KV tokens of a CPU tier below the GPU (kv_offload; 0: none)")
        ] = 0,
        cpu_load_tokens_per_s: Annotated[float, typer.Option(help="rate a CPU-tier hit moves to the GPU")] = 0.0,
        disk_kv_capacity_tokens: Annotated[int, typer.Option(help="KV tokens of a disk tier below the CPU")] = 0,
        disk_load_tokens_per_s: Annotated[float, typer.Option(help="rate a disk-tier hit moves to the GPU")] = 0.0,
        chars_per_token: Annotated[float, typer.Option(help="characters per token (match the router's)")] = 4.0,
        admin_token_env: Annotated[
            str, typer.Option(help="environment variable holding the bearer token for /admin/* (unset: admin off)")
        ] = "GPUFLEET_SIM_ADMIN_TOKEN",
        standby: Annotated[bool, typer.Option(help="start as a warm standby: 503 until POST /admin/promote")] = False,
        tokenizer: Annotated[
            Path | None,
            typer.Option(
                help="the model's tokenizer.json (or its directory): tokenize as vLLM does (chat template too)"
            ),
        ] = None,
        chat_template: Annotated[
            Path | None, typer.Option(help="chat template file (default: tokenizer_config.json's)")
        ] = None,
        kv_events_port: Annotated[
            int | None,
            typer.Option(help="publish vLLM KV events (ZMQ PUB) on this port of --host (needs --tokenizer; 0: any)"),
        ] = None,
        kv_events_replay_port: Annotated[
            int | None, typer.Option(help="serve vLLM's KV-event replay (ZMQ ROUTER) on this port")
        ] = None,
        kv_events_topic: Annotated[str, typer.Option(help="the KV events' topic (match the router's)")] = "kv-events",
        port_file: Annotated[
            Path | None, typer.Option(help="write the bound port here once listening (for --port 0)")
        ] = None,
        kv_events_port_file: Annotated[
            Path | None,
            typer.Option(
                help="write the bound KV-event ports here (`PUB REPLAY`, `-` for no replay) before --port-file"
            ),
        ] = None,
    ) -> None:
        """Serve one simulated vLLM replica.

        The OpenAI API, a prefix cache, continuous batching and vLLM's metrics, over the engine
        model of gpufleet.router.kvmodel.
        """
        import asyncio

        import zmq

        from gpufleet.router import kvmodel
        from gpufleet.router.replica import ReplicaSim, SimSettings
        from gpufleet.router.replica.app import serve

        with user_errors(kvmodel.AdmissionError, ValueError, OSError, zmq.ZMQError):
            settings = SimSettings(
                model=model,
                replica_id=replica_id,
                kv_capacity_tokens=kv_capacity_tokens,
                prefill_tokens_per_s=prefill_tokens_per_s,
                decode_tokens_per_s=decode_tokens_per_s,
                max_running=max_running,
                max_batched_tokens=max_batched_tokens,
                max_model_len=max_model_len,
                block_size_tokens=block_size_tokens,
                cpu_kv_capacity_tokens=cpu_kv_capacity_tokens,
                cpu_load_tokens_per_s=cpu_load_tokens_per_s,
                disk_kv_capacity_tokens=disk_kv_capacity_tokens,
                disk_load_tokens_per_s=disk_load_tokens_per_s,
                chars_per_token=chars_per_token,
                admin_token=os.environ.get(admin_token_env) or None,
                standby=standby,
                tokenizer=str(tokenizer) if tokenizer else None,
                chat_template=str(chat_template) if chat_template else None,
                kv_events_endpoint=f"tcp://{host}:{kv_events_port}" if kv_events_port is not None else None,
                kv_events_replay_endpoint=(
                    f"tcp://{host}:{kv_events_replay_port}" if kv_events_replay_port is not None else None
                ),
                kv_events_topic=kv_events_topic,
                exit_on_die=True,
            )
            if kv_events_port is not None and tokenizer is None:
                raise UserError("replica-sim: --kv-events-port needs --tokenizer (KV events carry token ids)")
            try:
                settings.engine_params()
            except ValueError as exc:
                raise UserError(f"replica-sim: {exc}") from None

            def ready(bound: int, sim: ReplicaSim) -> None:
                pub = sim.publisher
                if kv_events_port_file is not None and pub is not None:
                    ports = [ep.rpartition(":")[2] if ep else "-" for ep in (pub.endpoint, pub.replay_endpoint)]
                    _write_atomic(kv_events_port_file, " ".join(ports))
                if port_file is not None:
                    _write_atomic(port_file, str(bound))
                console.print(f"replica-sim {replica_id} ({model}) listening on http://{host}:{bound}", highlight=False)

            try:
                asyncio.run(serve(settings, host, port, ready))
            except KeyboardInterrupt:
                pass


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader never sees a partial file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


register = register_replica_sim


def _standalone() -> typer.Typer:
    """An app holding only `replica-sim`, so `python -m gpufleet.infra.cli.replica_sim` works on its own."""
    app = group()

    @app.callback()
    def _root() -> None:
        """gpufleet replica-sim (standalone)."""

    register_replica_sim(app)
    return app


if __name__ == "__main__":  # `gpufleet up` starts replicas this way: no dependency on CLI wiring
    _standalone()()
