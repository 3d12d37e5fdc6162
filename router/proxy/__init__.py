"""The router's request path: validate -> features -> clamp -> prediction cache -> route and retry.

`Proxy.handle(request, path)` serves POST /v1/chat/completions, /v1/completions, /v1/responses
and /v1/embeddings: read the body (bounded) -> parse -> model -> features (prefix hashes,
session id) -> clamp `max_tokens` -> prediction cache -> `policy.choose` -> forward; a
connection error, a 5xx or a stream that closes before its first byte is retried on another
replica (at most `max_retries` times) and counts toward that replica's ejection.

One module per stage:

    handler.py    Proxy: read, validate, features, clamp, tenant salt, cache lookup; maps every
                  exception to its answer
    route.py      Dispatcher: policy.choose, retry on another replica, the retry budget
    attempt.py    Attempts: one try on one replica (first-byte deadline, failure -> health)
    stream.py     relay_stream: the SSE relay after the first chunk
    request.py    ProxyRequest (what every stage after validation reads), Retryable
    responses.py  error_response (OpenAI-style JSON), relayed headers, cached answers replayed

The path is hot and was tuned (`bench/router_overhead.py` measures it): what every attempt
needs is gathered once into one `ProxyRequest` (`__slots__`); the model's replicas and each
replica's upstream target were resolved when the replica set was built; metric children are
looked up once per label value. The wire-format rules (body, output budget, usage) are the pure
functions of `gpufleet.router.wire`.

Errors are raised as `gpufleet.router.errors` types and rendered as OpenAI-style JSON
(`error_response`).
"""

from gpufleet.router.proxy.handler import Proxy
from gpufleet.router.proxy.request import ProxyRequest
from gpufleet.router.proxy.responses import JSON, error_response

__all__ = ["JSON", "Proxy", "ProxyRequest", "error_response"]
