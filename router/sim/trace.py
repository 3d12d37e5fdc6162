"""Mooncake-format trace replay: one JSON object a line, hash ids turned into fixed text blocks.

A line is `{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}`
with `hash_ids` naming the prompt's blocks of `trace_block_tokens` (512) tokens. As SGLang's
benchmark does, each id becomes a fixed block of text derived from the id, so equal ids give equal
text and the prefix structure survives; the last block is cut to the input length.

The router's block hashes of that text are computed without building the text of whole prompts:
a trace block spans a whole number of router blocks (512 tokens = 32 blocks of 16), so the chained
hashes of one trace block depend only on the hash before it and the id, and are memoised on that
pair. The result is exactly `prefix.block_hashes(text, block_chars)` of the full text (a test pins
this), at the cost of one dict lookup per trace block for repeated prefixes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from gpufleet.router.config import RouterSettings
from gpufleet.router.types import RequestFeatures
from gpufleet.router.workloads.sampling import TextPool
from gpufleet.router.workloads.types import MODEL, SimRequest, Workload

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "TraceError",
    "TraceRecord",
    "load_trace",
    "parse_trace",
    "trace_text",
    "trace_workload",
]

TRACE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A trace file that is not in the Mooncake format; the message names the file and line."""


class TraceRecord(NamedTuple):
    """(timestamp_ms, input_length, output_length, hash_ids) of one trace line."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int(obj: dict[str, Any], key: str, where: str, *, minimum: int) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TraceError(f"{where}: `{key}` must be an integer >= {minimum}, got {v!r}")
    return v


def parse_trace(
    lines: Iterable[str], source: str = "<trace>", block_tokens: int = TRACE_BLOCK_TOKENS
) -> Iterator[TraceRecord]:
    """Parse Mooncake lines; blank lines are skipped, anything malformed raises `TraceError`."""
    last_ts = -math.inf
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object with timestamp, input_length, output_length, hash_ids")
        ts = obj.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0 or not math.isfinite(ts):
            raise TraceError(f"{where}: `timestamp` must be a number of milliseconds >= 0, got {ts!r}")
        if ts < last_ts:
            raise TraceError(f"{where}: `timestamp` {ts} goes back in time (previous line: {last_ts})")
        last_ts = ts
        inp = _int(obj, "input_length", where, minimum=1)
        out = _int(obj, "output_length", where, minimum=1)
        ids = obj.get("hash_ids")
        if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
            raise TraceError(f"{where}: `hash_ids` must be a list of integers >= 0")
        need = math.ceil(inp / block_tokens)
        if len(ids) != need:
            raise TraceError(
                f"{where}: {len(ids)} hash_ids for input_length {inp}; expected ceil({inp}/{block_tokens}) = {need}"
            )
        yield TraceRecord(float(ts), inp, out, tuple(ids))


def load_trace(path: str | Path, block_tokens: int = TRACE_BLOCK_TOKENS) -> list[TraceRecord]:
    """Read a whole Mooncake trace file (clear `TraceError` with the line number on bad input)."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as fh:
            return list(parse_trace(fh, str(p), block_tokens))
    except OSError as exc:
        raise TraceError(f"cannot read trace {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not UTF-8 text") from None


def _block_key(hash_id: int) -> str:
    return f"trace-block-{hash_id}"


def trace_text(rec: TraceRecord, pool: TextPool, block_tokens: int = TRACE_BLOCK_TOKENS) -> str:
    """The prompt text a trace line stands for (for live benchmarks and for checking hashes)."""
    parts = []
    left = rec.input_length
    for h in rec.hash_ids:
        n = min(block_tokens, left)
        parts.append(pool.segment(_block_key(h), block_tokens)[: pool.chars(n)])
        left -= n
    return "".join(parts)


class _Hasher:
    """Router block hashes of trace prompts, memoised per (previous hash, trace block)."""

    def __init__(self, pool: TextPool, block_chars: int, block_tokens: int) -> None:
        self.pool = pool
        self.block_chars = block_chars
        self.block_tokens = block_tokens
        self.trace_chars = pool.chars(block_tokens)
        self.aligned = self.trace_chars % block_chars == 0
        self._memo: dict[tuple[int, int, int], tuple[int, ...]] = {}

    def _chunk(self, prev: int, hash_id: int, n_chars: int) -> tuple[int, ...]:
        key = (prev, hash_id, n_chars)
        got = self._memo.get(key)
        if got is None:
            text = self.pool.segment(_block_key(hash_id), self.block_tokens)[:n_chars]
            bc = self.block_chars
            out = []
            h = prev
            for i in range(n_chars // bc):
                h = xxhash.xxh3_64_intdigest(text[i * bc : (i + 1) * bc].encode(), seed=h)
                out.append(h)
            got = self._memo[key] = tuple(out)
        return got

    def hashes(self, rec: TraceRecord) -> tuple[int, ...]:
        if not self.aligned:  # trace blocks straddle router blocks: hash the whole text
            from gpufleet.router.prefix import block_hashes

            return block_hashes(trace_text(rec, self.pool, self.block_tokens), self.block_chars)
        out: list[int] = []
        prev = 0
        left = self.pool.chars(rec.input_length)
        for hid in rec.hash_ids:
            n = min(self.trace_chars, left)
            chunk = self._chunk(prev, hid, n)
            out.extend(chunk)
            left -= n
            if n < self.trace_chars or not chunk:
                break  # a partial block ends the prompt
            prev = chunk[-1]
        return tuple(out)


def trace_workload(
    records: Iterable[TraceRecord],
    *,
    name: str = "trace",
    rate_multiplier: float = 1.0,
    seed: int = 0,
    settings: RouterSettings | None = None,
    block_tokens: int = TRACE_BLOCK_TOKENS,
    limit: int | None = None,
    keep_bodies: bool = False,
) -> Workload:
    """Turn trace records into a workload; arrivals are `timestamp / rate_multiplier`."""
    if rate_multiplier <= 0:
        raise ValueError("rate multiplier must be positive")
    s = settings or RouterSettings()
    pool = TextPool(seed, chars_per_token=s.chars_per_token)
    block_chars = max(1, int(s.block_size_tokens * s.chars_per_token))
    hasher = _Hasher(pool, block_chars, block_tokens)
    reqs: list[SimRequest] = []
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            break
        hashes = hasher.hashes(rec)
        # The prompt is exactly input_length * chars_per_token characters, so the router's
        # estimate ceil(chars / chars_per_token) is the trace's input length.
        feats = RequestFeatures(
            model=MODEL,
            block_hashes=hashes,
            prompt_tokens=math.ceil(pool.chars(rec.input_length) / s.chars_per_token),
            affinity_key=hashes[0] if hashes else rec.hash_ids[0],
        )
        body = None
        if keep_bodies:
            body = {"model": MODEL, "prompt": trace_text(rec, pool, block_tokens), "max_tokens": rec.output_length}
        reqs.append(
            SimRequest(f"{name}-{i}", rec.timestamp_ms / 1000.0 / rate_multiplier, feats, rec.output_length, body)
        )
    return Workload(name, reqs, {"rate_multiplier": rate_multiplier, "block_tokens": block_tokens})
