"""Every error the router raises, and how each becomes an OpenAI-style JSON response.

    RouterError                       base; `status`, `type`, `code`, `to_body()`
    ├── ConfigError                   router config unreadable/invalid (CLI: one line, exit 1)
    ├── RequestError                  the client's mistake (4xx)
    │   ├── MalformedRequest    400   body is not a JSON object, or a field has the wrong type
    │   ├── PromptTooLong       400   the prompt alone does not fit max_model_len
    │   ├── Unauthorized        401   admin endpoint without a bearer token
    │   ├── Forbidden           403   wrong admin token, or admin disabled (no token configured)
    │   ├── UnknownModel        404   no replica serves the requested model
    │   ├── RequestTimeout      408   the body did not arrive within server.body_timeout_s
    │   ├── MembershipConflict  409   an admin change to a replica another source owns
    │   └── BodyTooLarge        413   body over settings.max_body_bytes
    ├── NoReplicaAvailable            no replica of the model can take the request now
    │   ├── AllSaturated        429   every healthy replica at max_concurrent_requests (Retry-After)
    │   └── NoHealthyReplica    503   no healthy replica of the model
    └── UpstreamError                 a replica failed
        ├── UpstreamFailed      502   every attempt failed before the first byte (retries exhausted)
        └── UpstreamTimeout     504   the replica did not answer within request_timeout_s

A replica's own error answer (the engine refused this input) is not a router error: it is
passed on with the replica's status, reshaped by `replica_error_body` into the same JSON shape.

Messages never contain secrets: not tokens, not Authorization values, not request bodies.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "AllSaturated",
    "replica_error_body",
    "BodyTooLarge",
    "ConfigError",
    "Forbidden",
    "MalformedRequest",
    "MembershipConflict",
    "NoHealthyReplica",
    "NoReplicaAvailable",
    "PromptTooLong",
    "RequestError",
    "RequestTimeout",
    "RouterError",
    "Unauthorized",
    "UnknownModel",
    "UpstreamError",
    "UpstreamFailed",
    "UpstreamTimeout",
]


class RouterError(Exception):
    """Base of the router's errors; carries its HTTP status and OpenAI error type."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def to_body(self) -> bytes:
        """The OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
        err: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": err}).encode()


class ConfigError(RouterError):
    """The router configuration cannot be loaded."""


class RequestError(RouterError):
    """The client's mistake: a 4xx."""

    status = 400
    type = "invalid_request_error"


class MalformedRequest(RequestError):
    """The body is not a JSON object, or a field has the wrong type."""

    code = "malformed_request"


class PromptTooLong(RequestError):
    """The prompt alone does not fit the model's max_model_len."""

    code = "context_length_exceeded"


class Unauthorized(RequestError):
    """An admin endpoint was called without a bearer token."""

    status = 401
    type = "authentication_error"
    code = "missing_token"


class Forbidden(RequestError):
    """Wrong admin token, or admin endpoints disabled."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class UnknownModel(RequestError):
    """No replica serves the requested model."""

    status = 404
    code = "model_not_found"


class RequestTimeout(RequestError):
    """The request body did not arrive within server.body_timeout_s."""

    status = 408
    code = "request_timeout"


class MembershipConflict(RequestError):
    """An admin membership change names a replica that another source (discovery) owns."""

    status = 409
    code = "membership_conflict"


class BodyTooLarge(RequestError):
    """The body is over settings.max_body_bytes."""

    status = 413
    code = "body_too_large"


class NoReplicaAvailable(RouterError):
    """No replica of the model can take the request now (named apart from the adapters' CapacityError)."""

    status = 503
    type = "server_error"


class AllSaturated(NoReplicaAvailable):
    """Every healthy replica of the model is at max_concurrent_requests."""

    status = 429
    type = "rate_limit_error"
    code = "replicas_saturated"


class NoHealthyReplica(NoReplicaAvailable):
    """No replica of the model is healthy."""

    status = 503
    code = "no_healthy_replica"


class UpstreamError(RouterError):
    """A replica failed."""

    status = 502
    type = "server_error"


class UpstreamFailed(UpstreamError):
    """Every attempt failed before the first byte (retries exhausted), or a stream broke."""

    code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    """The replica did not answer within request_timeout_s."""

    status = 504
    code = "upstream_timeout"


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def replica_error_body(status: int, data: bytes) -> bytes:
    """A replica's error answer in the documented shape: {"error": {"message", "type", "param", "code"}}.

    vLLM answers `{"object": "error", "message", "type", "param", "code"}` (newer versions and
    OpenAI nest it under "error"); SGLang similar; anything else (HTML from a proxy, plain text)
    becomes a message naming the status. The replica's own message is kept: it is about the
    client's input.
    """
    doc: Any = None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        pass
    inner = doc.get("error") if isinstance(doc, dict) else None
    src = inner if isinstance(inner, dict) else doc if isinstance(doc, dict) else {}
    message = src.get("message")
    if not isinstance(message, str) or not message:
        message = f"the replica answered HTTP {status}"
    etype = src.get("type")
    default_type = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    err = {
        "message": message,
        "type": etype if isinstance(etype, str) and etype else default_type,
        "param": src.get("param") if isinstance(src.get("param"), str) else None,
        "code": src.get("code") if isinstance(src.get("code"), (str, int)) else None,
    }
    return json.dumps({"error": err}).encode()
