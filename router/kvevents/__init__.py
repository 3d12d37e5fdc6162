"""Precise prefix routing from the engines' own KV-cache events (vLLM's ZMQ stream).

Modules
    wire        vLLM's `KVEventBatch` structs (msgspec) and their decoding, both layouts
    keys        the router's chained block keys from token ids
    index       one index of key -> replicas holding it, fed by events, walked once per request
    tokenize    the prompt tokenized as the engine does (HF `tokenizers` + the chat template)
    subscriber  the ZMQ SUB per replica (one per data-parallel rank): sequence gaps, replay, reset, the watchdog
    metrics     gpufleet_router_kv_state and the stream counters
    ranks       data-parallel ranks: the endpoints each rank publishes on (vLLM offsets the ports)
    publisher   a vLLM-compatible PUB + replay ROUTER (what `gpufleet replica-sim` publishes with)

Only `index` and `keys` are imported by the policies; the rest is imported by the server.
"""
