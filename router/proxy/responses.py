"""The answers the router builds itself: OpenAI-style errors, relayed headers, cached answers replayed."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gpufleet.router import errors
from gpufleet.router.prediction_cache import replay_sse
from gpufleet.router.tenant import hide_cached_tokens
from gpufleet.router.upstream import UpstreamResponse
from gpufleet.router.upstream.request import HOP_BY_HOP

__all__ = ["JSON", "answer_from_cache", "error_response", "response_headers"]

JSON = "application/json"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def error_response(exc: errors.RouterError, extra: Mapping[str, str] | None = None) -> web.Response:
    """The OpenAI-style JSON answer for a router error, with its headers and any `extra` ones."""
    headers = dict(exc.headers)
    if extra:
        headers.update(extra)
    return web.Response(status=exc.status, body=exc.to_body(), content_type=JSON, headers=headers)


def response_headers(
    upstream: UpstreamResponse, replica: str, cache: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The replica's end-to-end headers for the client, with the router's own added."""
    out = {k: v for k, v in upstream.headers if k.lower() not in HOP_BY_HOP}
    out["x-gpufleet-replica"] = replica
    if cache is not None:
        out["x-gpufleet-cache"] = cache
    if extra:
        out.update(extra)
    return out


async def answer_from_cache(
    request: web.Request, answer: bytes, body: Mapping[str, Any], stream: bool, *, hide_cached: bool
) -> web.StreamResponse:
    """A cached answer as a new one: its own id, `created` and `x-request-id` (as an engine gives)."""
    doc = json.loads(answer)
    doc["id"] = _fresh_id(doc.get("id"))
    doc["created"] = int(time.time())
    answer = json.dumps(doc, separators=(",", ":")).encode()
    if hide_cached:
        answer = hide_cached_tokens(answer)
    given = request.headers.get("x-request-id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    headers = {"x-gpufleet-cache": "hit", "x-request-id": request_id}
    if not stream:
        return web.Response(body=answer, content_type=JSON, headers=headers)
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    for event in replay_sse(answer, include_usage=include_usage):
        await out.write(event)
    await out.write_eof()
    return out


def _fresh_id(old: Any) -> str:
    """A new completion id shaped like the cached one's (`chatcmpl-...`, `cmpl-...`)."""
    prefix = old.split("-", 1)[0] if isinstance(old, str) and "-" in old else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"
