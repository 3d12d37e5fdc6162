"""A corpus of hostile and broken client input, as raw bytes on a socket, and a client that sends it.

Every case is one HTTP/1.1 request (or something that is not one) with what a correct router
must answer: for a client's mistake a 4xx with the API's JSON error (`{"error": {"message", ...}}`),
never a 5xx, never a hang; the few well-formed cases (a gzip body, a header named in `Connection`)
must be served. The corpus is shared by the soak benchmark (`bench/soak.py`) and the tests.

Groups: `http` (malformed framing: Content-Length with Transfer-Encoding, duplicate
Content-Length, bare CR or LF, obs-fold, the HTTP/2 preface, bad chunking, control characters,
over-long lines), `json` (bodies that are not a JSON object: deep nesting, non-UTF-8, lone
surrogates, NaN, huge numbers), `fields` (a JSON object whose fields have the wrong type),
`encoding` (Content-Encoding), `headers` (non-UTF-8 admin tokens, API keys and session ids),
`paths` (encoded slashes, wrong methods, odd paths).
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Answer", "Case", "cases", "check", "send"]


@dataclass(frozen=True, slots=True)
class Case:
    """One request as bytes and what it must get."""

    group: str
    name: str
    data: bytes
    expect: str = "4xx"
    """"4xx": a client error with a JSON error body; "ok": a 2xx; "any": any answer but a 5xx (a lenient
    reading is allowed, like HTTP/0.9's request line); or an exact status like "404"."""


@dataclass(slots=True)
class Answer:
    """What came back: status (0 if nothing), headers (lower-case names), body, seconds taken."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    error: str = ""


def _req(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    raw_headers: bytes = b"",
) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {path} HTTP/1.1", "Host: router"]
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in items):
        items.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}" for k, v in items]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape") + raw_headers + b"\r\n"
    return head + (body or b"")


def _chat(model: str, content: str = "hello", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def cases(model: str = "m", admin_path: str = "/admin/replicas") -> list[Case]:
    """The corpus for a router serving `model` (at least 93 cases)."""
    out: list[Case] = []
    chat, comp = "/v1/chat/completions", "/v1/completions"
    ok_body = json.dumps(_chat(model)).encode()

    def add(group: str, name: str, data: bytes, expect: str = "4xx") -> None:
        out.append(Case(group, name, data, expect))

    # -- http: framing the server's parser must refuse -------------------------------------
    h = "http"
    add(h, "cl_and_te", _req("POST", chat, b"0\r\n\r\n", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]))
    add(h, "te_and_cl", _req("POST", chat, b"0\r\n\r\n", [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]))
    add(h, "duplicate_cl_differs", _req("POST", chat, b"{}x", [("Content-Length", "2"), ("Content-Length", "3")]))
    add(h, "duplicate_cl_same", _req("POST", chat, b"{}", [("Content-Length", "2"), ("Content-Length", "2")]))
    add(h, "cl_list", _req("POST", chat, b"{}", [("Content-Length", "2, 2")]))
    add(h, "cl_negative", _req("POST", chat, b"{}", [("Content-Length", "-2")]))
    add(h, "cl_not_a_number", _req("POST", chat, b"{}", [("Content-Length", "two")]))
    add(h, "cl_plus_sign", _req("POST", chat, b"{}", [("Content-Length", "+2")]))
    add(h, "cl_hex", _req("POST", chat, b"{}", [("Content-Length", "0x2")]))
    add(h, "bare_lf", b"POST " + chat.encode() + b" HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}")
    add(h, "bare_cr", b"POST " + chat.encode() + b" HTTP/1.1\rHost: x\r\nContent-Length: 2\r\n\r\n{}")
    add(h, "bare_cr_in_header", b"POST " + chat.encode() + b" HTTP/1.1\r\nHost: x\rX: y\r\nContent-Length: 2\r\n\r\n{}")
    add(h, "obs_fold", _req("POST", chat, ok_body, raw_headers=b"X-Folded: a\r\n b\r\n"))
    add(h, "obs_fold_tab", _req("POST", chat, ok_body, raw_headers=b"X-Folded: a\r\n\tb\r\n"))
    add(h, "http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    add(h, "http2_preface_and_frames", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    add(h, "tls_client_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    add(h, "garbage", b"\x00\x01\x02\x03 hello \xff\xfe\r\n\r\n")
    add(h, "http_0_9", b"GET /health\r\n\r\n", "any")
    add(h, "http_version_3", b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n")
    add(h, "http_version_junk", b"GET /health HTTP/1.x\r\nHost: x\r\n\r\n")
    add(h, "method_with_ctl", b"PO\x01ST " + chat.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    add(h, "space_in_target", b"GET /hea lth HTTP/1.1\r\nHost: x\r\n\r\n")
    add(h, "header_no_colon", _req("GET", "/health", raw_headers=b"NoColonHere\r\n"))
    add(h, "header_space_before_colon", _req("POST", chat, b"{}", raw_headers=b"Content-Type : application/json\r\n"))
    add(h, "header_nul", _req("GET", "/health", raw_headers=b"X-A: a\x00b\r\n"))
    add(h, "header_ctl", _req("GET", "/health", raw_headers=b"X-A: a\x07b\r\n"))
    add(h, "header_name_utf8", _req("GET", "/health", raw_headers="X-Ü: a\r\n".encode()))
    add(h, "header_too_long", _req("GET", "/health", raw_headers=b"X-Long: " + b"a" * 70_000 + b"\r\n"))
    add(h, "request_line_too_long", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    add(h, "too_many_headers", _req("GET", "/health", raw_headers=b"".join(b"X-%d: v\r\n" % i for i in range(300))))
    add(h, "te_gzip_only", _req("POST", chat, ok_body, [("Transfer-Encoding", "gzip")]))
    add(h, "te_chunked_twice", _req("POST", chat, b"0\r\n\r\n", [("Transfer-Encoding", "chunked, chunked")]))
    add(h, "te_unknown", _req("POST", chat, b"0\r\n\r\n", [("Transfer-Encoding", "bogus")]))
    add(h, "chunk_size_not_hex", _req("POST", chat, b"zz\r\n{}\r\n0\r\n\r\n", [("Transfer-Encoding", "chunked")]))
    add(h, "chunk_without_crlf", _req("POST", chat, b"2\r\n{}XX0\r\n\r\n", [("Transfer-Encoding", "chunked")]))
    add(h, "chunk_size_huge", _req("POST", chat, b"fffffffffffffffffff\r\n{}\r\n", [("Transfer-Encoding", "chunked")]))
    add(h, "chunk_ext_garbage", _req("POST", chat, b"2;\x00\r\n{}\r\n0\r\n\r\n", [("Transfer-Encoding", "chunked")]))
    add(h, "body_over_limit_declared", _req("POST", chat, b"{}", [("Content-Length", str(1 << 40))]), "413")

    # -- json: bodies that are not a JSON object of text ----------------------------------
    j = "json"

    def post_raw(name: str, body: bytes, path: str = chat, expect: str = "4xx", **hdr: str) -> None:
        add(j, name, _req("POST", path, body, {"Content-Type": "application/json", **hdr}), expect)

    post_raw("empty", b"")
    post_raw("not_json", b"hello")
    post_raw("truncated", ok_body[:-5])
    post_raw("array", b"[]")
    post_raw("string", b'"x"')
    post_raw("number", b"42")
    post_raw("null", b"null")
    post_raw("deep_arrays_10k", b"[" * 10_000 + b"]" * 10_000)
    post_raw("deep_objects_10k", b'{"a":' * 10_000 + b"1" + b"}" * 10_000)
    post_raw("deep_in_messages", b'{"model":"%s","messages":' % model.encode() + b"[" * 5000 + b"]" * 5000 + b"}")
    post_raw("deep_arrays_900", b'{"model":"%s","x":' % model.encode() + b"[" * 900 + b"]" * 900 + b"}")
    post_raw("non_utf8", b'{"model":"' + model.encode() + b'","messages":[{"role":"user","content":"\xff\xfe"}]}')
    post_raw("latin1", '{"model":"m","prompt":"café"}'.encode("latin-1"), comp)
    post_raw("utf16", json.dumps(_chat(model)).encode("utf-16"))
    post_raw("utf8_bom", b"\xef\xbb\xbf" + ok_body)
    post_raw("overlong_utf8", b'{"model":"' + model.encode() + b'","prompt":"\xc0\xaf"}', comp)
    post_raw("utf8_surrogate_bytes", b'{"model":"' + model.encode() + b'","prompt":"\xed\xa0\x80"}', comp)
    lone = "@LONE@"  # replaced by a lone surrogate escape after encoding
    user = [{"role": "user", "content": "x"}]
    surrogate_docs: dict[str, dict[str, object]] = {
        "content": {"model": model, "messages": [{"role": "user", "content": "x" * 2000 + lone}]},
        "model": {"model": model + lone, "messages": user},
        "role": {"model": model, "messages": [{"role": lone, "content": "x"}]},
        "stop": {"model": model, "messages": user, "stop": [lone]},
        "user": {"model": model, "messages": user, "user": lone},
        "key": {"model": model, "messages": user, lone: 1},
    }
    for where, doc in surrogate_docs.items():
        for t, escape in ((0, "\\ud800"), (0.7, "\\udfff")):
            data = json.dumps({**doc, "temperature": t}).replace(lone, escape)
            post_raw(f"lone_surrogate_{where}_t{t}", data.encode())
    post_raw("lone_surrogate_prompt", b'{"model":"%s","prompt":"\\udbff tail","temperature":0}' % model.encode(), comp)
    post_raw("nan", b'{"model":"%s","messages":[],"temperature":NaN}' % model.encode())
    post_raw("infinity", b'{"model":"%s","messages":[],"temperature":Infinity}' % model.encode())
    post_raw("minus_infinity", b'{"model":"%s","messages":[],"temperature":-Infinity}' % model.encode())
    post_raw("huge_int", b'{"model":"%s","max_tokens":%s}' % (model.encode(), b"9" * 5000))
    post_raw("float_overflow_max_tokens", b'{"model":"%s","messages":[],"max_tokens":1e999}' % model.encode())
    post_raw("trailing_garbage", ok_body + b"xyz")
    post_raw("two_objects", ok_body + ok_body)
    post_raw("nul_byte", b'{"model":"%s"\x00,"messages":[]}' % model.encode())

    # -- fields: a JSON object whose fields are wrong --------------------------------------
    f = "fields"

    def post_doc(name: str, doc: object, path: str = chat, expect: str = "4xx") -> None:
        add(f, name, _req("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}), expect)

    post_doc("no_model", {"messages": [{"role": "user", "content": "x"}]})
    post_doc("model_int", {"model": 3, "messages": []})
    post_doc("model_list", {"model": [model], "messages": []})
    post_doc("model_empty", {"model": "", "messages": []})
    post_doc("model_unknown", {"model": "no-such-model", "messages": []}, expect="404")
    post_doc("messages_missing", {"model": model})
    post_doc("messages_string", {"model": model, "messages": "hello"})
    post_doc("messages_object", {"model": model, "messages": {"role": "user"}})
    post_doc("prompt_missing", {"model": model}, comp)
    post_doc("prompt_int", {"model": model, "prompt": 7}, comp)
    post_doc("prompt_object", {"model": model, "prompt": {"a": 1}}, comp)
    post_doc("max_tokens_string", _chat(model, max_tokens="lots"))
    post_doc("max_tokens_zero", _chat(model, max_tokens=0))
    post_doc("max_tokens_negative", _chat(model, max_tokens=-5))
    post_doc("max_tokens_bool", _chat(model, max_tokens=True))
    post_doc("max_tokens_float", _chat(model, max_tokens=1.5))
    post_doc("max_completion_tokens_string", _chat(model, max_completion_tokens="x"))
    post_doc("prompt_too_long", {"model": model, "prompt": "word " * 2_000_000, "max_tokens": 4}, comp)

    # -- encoding: Content-Encoding --------------------------------------------------------
    e = "encoding"
    add(e, "gzip_corrupt", _req("POST", chat, b"not gzip at all", {"Content-Encoding": "gzip"}))
    add(e, "deflate_corrupt", _req("POST", chat, b"not deflate", {"Content-Encoding": "deflate"}))
    add(e, "gzip_truncated", _req("POST", chat, gzip.compress(ok_body)[:-12], {"Content-Encoding": "gzip"}))
    add(e, "gzip_of_garbage", _req("POST", chat, gzip.compress(b"\xff\xfe not json"), {"Content-Encoding": "gzip"}))
    add(e, "gzip_bomb", _req("POST", chat, gzip.compress(b"[" * (16 << 20)), {"Content-Encoding": "gzip"}), "4xx")
    add(e, "gzip_valid", _req("POST", chat, gzip.compress(ok_body), {"Content-Encoding": "gzip"}), "ok")
    add(e, "deflate_valid", _req("POST", chat, zlib.compress(ok_body), {"Content-Encoding": "deflate"}), "ok")
    add(e, "identity", _req("POST", chat, ok_body, {"Content-Encoding": "identity"}), "ok")

    # -- headers ---------------------------------------------------------------------------
    g = "headers"

    def get_with(name: str, path: str, raw: bytes, expect: str = "4xx", body: bytes | None = None) -> None:
        add(g, name, _req("POST" if body is not None else "GET", path, body, raw_headers=raw), expect)

    get_with("admin_token_non_utf8", admin_path, b"Authorization: Bearer \xff\xfe\xfd\r\n")
    get_with("admin_token_latin1", admin_path, "Authorization: Bearer café\r\n".encode("latin-1"))
    get_with("admin_token_empty", admin_path, b"Authorization: Bearer \r\n")
    get_with("admin_token_basic", admin_path, b"Authorization: Basic YTpi\r\n")
    get_with("admin_token_missing", admin_path, b"")
    get_with("admin_token_long", admin_path, b"Authorization: Bearer " + b"x" * 10_000 + b"\r\n")
    get_with("api_key_non_utf8", chat, b"Authorization: Bearer \xff\xfe\r\n", "ok", ok_body)
    get_with("api_key_header_non_utf8", chat, b"api-key: \xc3\x28\r\n", "ok", ok_body)
    get_with("session_non_utf8", chat, b"x-session-id: \xff\xfe\xfd\r\n", "ok", ok_body)
    get_with("connection_named_header", chat, b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\n", "ok", ok_body)
    get_with("expect_unknown", chat, b"Expect: 200-ok\r\n", "4xx", ok_body)

    # -- paths and methods -----------------------------------------------------------------
    p = "paths"
    add(p, "encoded_slash_admin", _req("GET", "/admin%2freplicas"), "404")
    add(p, "encoded_slash_admin_upper", _req("GET", "/admin%2Freplicas"), "404")
    add(p, "encoded_slash_chat", _req("POST", "/v1%2fchat%2fcompletions", ok_body), "404")
    add(p, "get_on_chat", _req("GET", chat), "405")
    add(p, "put_on_chat", _req("PUT", chat, ok_body), "405")
    add(p, "delete_on_completions", _req("DELETE", comp), "405")
    add(p, "post_on_health", _req("POST", "/health", b"{}"), "405")
    add(p, "dot_dot", _req("GET", "/v1/../admin/replicas"))
    add(p, "nul_in_path", _req("GET", "/v1/models%00"), "404")
    add(p, "unicode_path", _req("GET", "/v1/mödels"))
    add(p, "long_path", _req("GET", "/" + "a" * 8000), "404")
    add(p, "unknown", _req("GET", "/nope"), "404")
    # RFC 9112 3.2.2: a server accepts the absolute form; the router answers for itself, proxies nothing
    add(p, "absolute_form_other_host", b"GET http://evil.example/health HTTP/1.1\r\nHost: evil.example\r\n\r\n", "ok")
    add(p, "connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    add(p, "options_star", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    add(p, "query_garbage", _req("POST", chat + "?%zz=%%", ok_body), "ok")
    return out


def _read_answer(sock: socket.socket, deadline: float) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return Answer(0, error="closed without an answer" if not buf else "closed mid-head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return Answer(0, error=f"not HTTP: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        want = int(length)
        while len(rest) < want:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        rest = rest[:want]
    elif "chunked" in headers.get("transfer-encoding", "").lower() or headers.get("connection") == "close":
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk or rest.endswith(b"0\r\n\r\n"):
                rest += chunk
                break
            rest += chunk
    return Answer(status, headers, rest)


def send(host: str, port: int, data: bytes, timeout_s: float = 10.0) -> Answer:
    """Send `data` on a new connection and read one answer (or note that none came)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may refuse before reading it all; its answer is still there
            ans = _read_answer(sock, deadline)
    except TimeoutError:
        ans = Answer(0, error="no answer (timeout)")
    except OSError as exc:
        ans = Answer(0, error=f"{type(exc).__name__}")
    ans.seconds = time.monotonic() - t0
    return ans


def check(case: Case, ans: Answer) -> str | None:
    """Why `ans` is wrong for `case`, or None when it is right."""
    if ans.status == 0:
        return ans.error or "no answer"
    if ans.status >= 500:
        return f"HTTP {ans.status}"
    if case.expect == "any":
        return None
    if case.expect == "ok":
        return None if 200 <= ans.status < 300 else f"HTTP {ans.status}, wanted 2xx"
    if case.expect.isdigit() and ans.status != int(case.expect):
        return f"HTTP {ans.status}, wanted {case.expect}"
    if not 400 <= ans.status < 500:
        return f"HTTP {ans.status}, wanted 4xx"
    if not ans.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {ans.headers.get('content-type')!r}, wanted JSON"
    try:
        err = json.loads(ans.body)["error"]
        if not isinstance(err.get("message"), str):
            return "error body has no message"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"not an error body: {ans.body[:80]!r}"
    return None


def iter_groups(corpus: list[Case]) -> Iterator[tuple[str, list[Case]]]:
    """The corpus by group, in order."""
    groups: dict[str, list[Case]] = {}
    for c in corpus:
        groups.setdefault(c.group, []).append(c)
    yield from groups.items()
