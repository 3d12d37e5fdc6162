"""vLLM's KV-cache event wire format: msgspec structs as `vllm/distributed/kv_events.py` declares them.

The engine (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`)
publishes on a ZMQ PUB socket one multipart message per engine step:

    frame 0  topic (utf-8, the config's `topic`, may be empty)
    frame 1  sequence number, 8 bytes big-endian, from 0, +1 per message
    frame 2  msgpack of a `KVEventBatch` (msgspec's encoding of the structs below)

and, when `replay_endpoint` is set, answers on a ROUTER socket a request frame holding a start
sequence (8 bytes big-endian) with every buffered `(seq, payload)` from there on, then the end
marker `(-1 as 8 signed bytes, b"")`.

Layouts. `EventBatch` is `array_like` (`[ts, events, data_parallel_rank]`). The events are a
tagged union (`tag=True`: the tag is the class name, `BlockStored`, `BlockRemoved`,
`AllBlocksCleared`); vLLM releases since the `medium` field encode them as maps with the tag under
`"type"`, earlier releases (and SGLang's legacy publisher) as arrays with the tag first and every
field in declaration order. `decode_batch` reads both, and a batch given as a map; unknown trailing
fields or keys are ignored (msgspec's rule), so newer engines still decode.

Block hashes are `ExternalBlockHash = bytes | int`: the low 64 bits of the digest as an int by
default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`), or the digest bytes. The router never
recomputes them: it keys blocks by their tokens (`gpufleet.router.kvevents.keys`).

SGLang publishes the same structs (its `EventBatch` carries `attn_dp_rank` in the third slot and
its events default `medium` to None), so its streams decode here too.

Nothing in this module raises on bad input: `decode_batch` returns what it could read and counts
the rest (`DecodeResult.malformed`, `unknown_tags`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodeResult",
    "EventBatch",
    "KVCacheEvent",
    "KVEventBatch",
    "LegacyAllBlocksCleared",
    "LegacyBlockRemoved",
    "LegacyBlockStored",
    "LegacyKVEventBatch",
    "MEDIUM_GPU",
    "decode_batch",
    "encode_batch",
    "seq_bytes",
    "seq_from_bytes",
]

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The replay endpoint's end-of-replay sequence frame (its payload frame is empty)."""

BlockHash = int | bytes


# -- the current layout: array-like batch, events as tagged maps ----------------------------


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of every KV-cache event (the tag is the class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


# -- the legacy layout: events array-like too (tag first, fields in order) -------------------


class _LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(_LegacyEvent, tag="BlockStored"):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class LegacyBlockRemoved(_LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class LegacyAllBlocksCleared(_LegacyEvent, tag="AllBlocksCleared"):
    pass


class LegacyKVEventBatch(EventBatch):
    events: list[LegacyBlockStored | LegacyBlockRemoved | LegacyAllBlocksCleared]


# -- decoding -------------------------------------------------------------------------------

Stored = BlockStored | LegacyBlockStored
Removed = BlockRemoved | LegacyBlockRemoved
Cleared = AllBlocksCleared | LegacyAllBlocksCleared
Event = Stored | Removed | Cleared

_TAGS = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
_MAP_TYPES: dict[str, type[Any]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}
_ARRAY_TYPES: dict[str, type[Any]] = {
    "BlockStored": LegacyBlockStored,
    "BlockRemoved": LegacyBlockRemoved,
    "AllBlocksCleared": LegacyAllBlocksCleared,
}
_OPTIONAL = {"BlockStored": ("lora_id", "medium", "lora_name"), "BlockRemoved": ("medium",)}
_current = msgspec.msgpack.Decoder(KVEventBatch)
_legacy = msgspec.msgpack.Decoder(LegacyKVEventBatch)
_generic = msgspec.msgpack.Decoder()


@dataclass(slots=True)
class DecodeResult:
    """What one payload held: the events read, in order, and what could not be read."""

    events: list[Event] = field(default_factory=list)
    ts: float | None = None
    data_parallel_rank: int | None = None
    malformed: int = 0
    """Events (or the whole payload, counted once) that are not valid msgpack of a known struct."""
    unknown_tags: int = 0
    """Events whose tag names no struct this router knows (a newer engine's event type)."""


def decode_batch(payload: bytes) -> DecodeResult:
    """Decode one `KVEventBatch` payload in either layout; never raises (see `DecodeResult`)."""
    for dec in (_current, _legacy):
        try:
            batch = dec.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        return DecodeResult(list(batch.events), batch.ts, batch.data_parallel_rank)
    return _decode_leniently(payload)


def _decode_leniently(payload: bytes) -> DecodeResult:
    """Event by event: keep the valid ones, count unknown tags and malformed ones."""
    out = DecodeResult()
    try:
        raw = _generic.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        out.malformed = 1
        return out
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        out.malformed = 1
        return out
    if not isinstance(events, list) or not isinstance(ts, (int, float)):
        out.malformed = 1
        return out
    out.ts = float(ts)
    out.data_parallel_rank = rank if isinstance(rank, int) else None
    for ev in events:
        if isinstance(ev, dict):
            tag, types = ev.get("type"), _MAP_TYPES
        elif isinstance(ev, list) and ev:
            tag, types = ev[0], _ARRAY_TYPES
        else:
            out.malformed += 1
            continue
        if tag not in _TAGS:
            out.unknown_tags += 1
            continue
        if types is _MAP_TYPES:
            # SGLang (and omit_defaults publishers) leave out optional fields that are None.
            for name in _OPTIONAL.get(tag, ()):
                ev.setdefault(name, None)
        try:
            out.events.append(msgspec.convert(ev, types[tag]))
        except msgspec.ValidationError:
            out.malformed += 1
    return out


# -- encoding (the simulated replica publishes what vLLM publishes) ---------------------------

_encoder = msgspec.msgpack.Encoder()


def encode_batch(
    events: list[BlockStored | BlockRemoved | AllBlocksCleared], ts: float, data_parallel_rank: int | None = 0
) -> bytes:
    """msgpack of a `KVEventBatch`, byte for byte what vLLM's publisher sends for these events."""
    return _encoder.encode(KVEventBatch(ts=ts, events=events, data_parallel_rank=data_parallel_rank))


def seq_bytes(seq: int) -> bytes:
    """A sequence number as the publisher frames it (8 bytes big-endian, signed for the end marker)."""
    return seq.to_bytes(8, "big", signed=True)


def seq_from_bytes(frame: bytes) -> int | None:
    """The sequence number of a frame, or None when the frame is not 8 bytes."""
    if len(frame) != 8:
        return None
    return int.from_bytes(frame, "big", signed=True)
