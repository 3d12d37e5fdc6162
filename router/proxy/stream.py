"""The SSE relay: a replica's stream passed to the client chunk by chunk once its first chunk is here.

Bounded by `stream_idle_timeout_s` between chunks and `request_timeout_s` overall; with
`hide_cached_tokens` the usage's cached-token counts are cut from the events; a complete answer
is assembled for the prediction cache. A replica that breaks mid-stream cannot be retried (the
client has bytes): the stream ends with an error event and without [DONE].
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from gpufleet.router import errors, wire
from gpufleet.router.health import Failure
from gpufleet.router.prediction_cache import SSEAssembler
from gpufleet.router.proxy.request import ProxyRequest
from gpufleet.router.proxy.responses import response_headers
from gpufleet.router.tenant import CachedTokensFilter
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream import UpstreamClientError, UpstreamResponse

if TYPE_CHECKING:
    from gpufleet.router.proxy.attempt import Attempts

__all__ = ["relay_stream"]


async def relay_stream(
    att: Attempts, req: ProxyRequest, resp: UpstreamResponse, first: bytes, r: ReplicaState, t0: float
) -> tuple[web.StreamResponse, bool, int]:
    """Pass SSE through chunk by chunk, starting with the already-read first chunk.

    Returns (response, finished cleanly, completion tokens reported). A client that goes
    away raises out of here (write error or cancellation), which closes the upstream.
    """
    loop = asyncio.get_running_loop()
    headers = response_headers(resp, r.id, req.cache_state, att.session_headers(req, r.id))
    out = web.StreamResponse(status=resp.status, headers=headers)
    await out.prepare(req.request)
    key = req.cache_key
    assembler = SSEAssembler() if key is not None else None
    usage = None
    chunk = first
    failed: BaseException | None = None
    hide = CachedTokensFilter() if att.settings.hide_cached_tokens else None
    idle_s = att.settings.stream_idle_timeout_s
    end = t0 + att.settings.request_timeout_s
    while chunk:
        # A stream that stalls (a hung replica) is cut after idle_s, not held to the end.
        resp.set_deadline(min(end, loop.time() + idle_s))
        if assembler is not None:
            assembler.feed(chunk)
        else:
            usage = wire.usage_from_sse_chunk(chunk) or usage
        if hide is not None:
            chunk = hide.feed(chunk)
            if not chunk:
                chunk = b" "  # nothing complete yet; keep the loop going
                try:
                    chunk = await resp.readany()
                except (TimeoutError, UpstreamClientError) as exc:
                    failed = exc
                    break
                continue
        await out.write(chunk)
        try:
            chunk = await resp.readany()
        except (TimeoutError, UpstreamClientError) as exc:
            failed = exc
            break
    if hide is not None and (rest := hide.flush()):
        await out.write(rest)
    if failed is not None:
        # The replica broke mid-stream: the client already has bytes, so no retry. Say so
        # in the stream (as vLLM does) and leave out [DONE], so clients see it is truncated.
        kind = Failure.TIMEOUT if isinstance(failed, TimeoutError) else Failure.RESET
        att.health.failure(r, kind, f"no data for {idle_s:g}s mid-stream" if kind is Failure.TIMEOUT else "mid-stream")
        err = errors.UpstreamFailed(f"replica {r.id} failed mid-stream ({type(failed).__name__})")
        await out.write(b"data: " + err.to_body() + b"\n\n")
    ok = failed is None
    if assembler is not None:
        usage = assembler.usage
        answer = assembler.result()
        if ok and answer is not None and att.cache is not None and key is not None:
            await att.cache.store(key, answer)
    output_tokens = att.record_usage(r, usage) if usage else 0
    await out.write_eof()
    att.count(r.id, resp.status if ok else 502)
    att.metrics.replica[r.id].latency.observe(loop.time() - t0)
    if ok:
        att.health.success(r)
    return out, ok, output_tokens
