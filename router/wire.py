"""The OpenAI-compatible wire format as the proxy reads it: request bodies, output budgets, usage.

Pure functions over bytes and parsed JSON (no I/O), so the request path's rules are tested
without a server. Bad input raises `gpufleet.router.errors.RequestError` subclasses, which the
proxy renders as OpenAI-style 4xx answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gpufleet.router import errors
from gpufleet.router.config import SessionSettings

__all__ = ["clamp_output", "output_budget", "parse_body", "session_id", "usage_from_sse_chunk", "usage_numbers"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object of valid Unicode text; `MalformedRequest` when it is not one.

    Refused, each with a 400 saying why: bytes that are not UTF-8, JSON that does not parse,
    nesting deeper than the parser's recursion limit, `NaN`/`Infinity` (not JSON), integers
    too long to convert, and strings with a lone surrogate escape (`"\ud800"`: not text, so no
    engine can tokenize it; engines answer those with a 500).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.MalformedRequest(f"request body is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise errors.MalformedRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise errors.MalformedRequest("request body is nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over the conversion limit
        raise errors.MalformedRequest(f"request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise errors.MalformedRequest("request body must be a JSON object")
    if "\\u" in text and _has_lone_surrogate(body):
        raise errors.MalformedRequest("request body has a lone UTF-16 surrogate escape: it is not valid Unicode text")
    return body


def _has_lone_surrogate(body: Any) -> bool:
    """True when a key or string anywhere in `body` cannot be encoded as UTF-8."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        raise errors.MalformedRequest("request body is nested too deeply") from None
    return False


# Per proxied endpoint: the body field holding the prompt, and the fields holding the output budget.
ENDPOINTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("messages", ("max_tokens", "max_completion_tokens")),
    "/v1/completions": ("prompt", ("max_tokens",)),
    "/v1/responses": ("input", ("max_output_tokens",)),
    "/v1/embeddings": ("input", ()),
}


def _budget_fields(chat: bool | str) -> tuple[str, tuple[str, ...]]:
    if isinstance(chat, str):
        return ENDPOINTS[chat]
    return ENDPOINTS["/v1/chat/completions" if chat else "/v1/completions"]


def clamp_output(body: dict[str, Any], prompt_tokens: int, limit: int, chat: bool | str) -> bool:
    """Clamp the output budget so prompt + output fit `limit` (max_model_len); True if `body` changed.

    `chat` is True/False for chat/completions, or the endpoint's path (`ENDPOINTS`). Raises
    `PromptTooLong` when the prompt alone does not fit, `MalformedRequest` for a budget that is
    not a positive integer.
    """
    param, fields = _budget_fields(chat)
    if prompt_tokens >= limit:
        raise errors.PromptTooLong(
            f"the prompt (about {prompt_tokens} tokens) does not fit this model's context of {limit} tokens",
            param=param,
        )
    changed = False
    for field in fields:
        v = body.get(field)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise errors.MalformedRequest(f"{field} must be a positive integer", param=field)
        if prompt_tokens + v > limit:
            body[field] = limit - prompt_tokens
            changed = True
    return changed


def output_budget(body: Mapping[str, Any], prompt_tokens: int, limit: int, chat: bool | str) -> int:
    """The most tokens the answer may have: the (clamped) budget asked for, else what the context leaves."""
    if chat == "/v1/embeddings":
        return 1  # an embedding generates no tokens: only its prompt's prefill counts
    asked = [body.get(f) for f in _budget_fields(chat)[1]]
    given = [v for v in asked if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(given) if given else max(1, limit - prompt_tokens)


def session_id(headers: Mapping[str, str], body: Mapping[str, Any], settings: SessionSettings) -> str | None:
    """The request's session id: the session header, else the body's `user` when allowed."""
    sid = headers.get(settings.header)
    if sid:
        return sid
    if settings.use_body_user:
        user = body.get("user")
        if isinstance(user, str) and user:
            return user
    return None


def usage_numbers(usage: Any) -> tuple[int, int, int | None]:
    """(prompt tokens, completion tokens, cached tokens or None) from an OpenAI `usage` object."""
    if not isinstance(usage, dict):
        return 0, 0, None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        (int(cached) if isinstance(cached, int) else None),
    )


def usage_from_sse_chunk(chunk: bytes) -> Any:
    """The `usage` object of an SSE chunk that carries one (cheap pre-check, then parse)."""
    if b'"usage"' not in chunk:
        return None
    found = None
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                ev = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("usage"):
                found = ev["usage"]
    return found
