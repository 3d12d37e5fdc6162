"""A simulated replica served from a background thread, for tests and benchmarks written as sync code."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gpufleet.router.replica.app import listen
from gpufleet.router.replica.settings import SimSettings
from gpufleet.router.replica.sim import ReplicaSim

__all__ = ["RunningReplica", "serve_in_thread"]


class RunningReplica:
    """A replica-sim served from a background thread (for tests and benchmarks in sync code)."""

    def __init__(self, settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.host = host
        self._port = port
        self.port = 0
        self.sim: ReplicaSim | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The replica's base URL."""
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """Started and not stopped (nor died)."""
        return self._thread is not None and not self._stopped.is_set()

    def start(self) -> RunningReplica:
        """Start serving (idempotent); returns once the port is bound."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"replica-sim:{self.settings.replica_id}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        if not self._started.is_set():
            raise RuntimeError("replica-sim did not start within 10 s")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._started.set()
        finally:
            loop.close()
            self._stopped.set()

    async def _serve(self) -> None:
        self.sim = ReplicaSim(self.settings)
        self._die = asyncio.Event()
        self._runner, self.port = await listen(self.sim, self.host, self._port, on_die=self._die.set)
        self._started.set()
        try:
            await self._die.wait()
        finally:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Close the listener and every connection; wait for the thread to end."""
        if self._loop is not None and not self._stopped.is_set():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._die.set)
        if self._thread is not None:
            self._thread.join(10)

    def call(self, fn: Callable[[ReplicaSim], Any]) -> Any:
        """Run `fn(sim)` on the replica's loop thread and return its result (safe state access)."""
        assert self._loop is not None and self.sim is not None
        sim = self.sim

        async def _call() -> Any:
            return fn(sim)

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(10)

    def __enter__(self) -> RunningReplica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(settings: SimSettings, host: str = "127.0.0.1", port: int = 0) -> RunningReplica:
    """Start a replica-sim on a background thread; `.url` to call it, `.stop()` to end it."""
    return RunningReplica(settings, host, port).start()
