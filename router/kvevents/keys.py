"""The router's own block keys: a chained hash of each full block of token ids.

    key[0] = xxh3_64(tokens[0:B],   seed = root)
    key[i] = xxh3_64(tokens[iB:(i+1)B], seed = key[i-1])

with the token ids as 4-byte little-endian integers (8 bytes for a vocabulary past 2**32) and
`root` 0 for a plain prompt. Equal key at position i means equal tokens up to block i, which is
what an engine's paged prefix cache shares. The router computes the keys of a prompt from its
own tokenization and the keys of an engine's `BlockStored` event from the event's `token_ids`
and the key of its parent block, so the engine's hash function and seed (vLLM's
`PYTHONHASHSEED`, sha256 or not) never have to match the router's.

A block whose hash covers more than its tokens (vLLM's `extra_keys`: a LoRA name, a cache salt,
multimodal item hashes) gets its extra keys folded into the seed, so it never matches a plain
prompt's block with the same tokens: the engine could not reuse it for one either.

A prompt's own keys follow vLLM's `generate_block_hash_extra_keys` for what the router sets on a
request: a `cache_salt` (tenant isolation, `gpufleet.router.tenant`) is the first block's only
extra key, `(salt,)`, so `prompt_keys(ids, B, salt)` equals the keys of the `BlockStored` events
of that prompt (whose `extra_keys` are `[(salt,), None, ...]`), and no other tenant's prompt.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from xxhash import xxh3_64_intdigest

__all__ = ["block_keys", "extra_seed", "prompt_keys"]


def _as_bytes(token_ids: Sequence[int]) -> tuple[memoryview, int]:
    try:
        arr = array("I", token_ids)
    except OverflowError:
        arr = array("Q", token_ids)
    return memoryview(arr).cast("B"), arr.itemsize


def block_keys(
    token_ids: Sequence[int],
    block_size: int,
    parent: int = 0,
    extras: Sequence[Any] | None = None,
) -> list[int]:
    """Chained keys of every full `block_size`-token block of `token_ids`, continuing from `parent`.

    `extras[i]` (if given and not None) is folded into block i's seed (module docs). A trailing
    partial block has no key: engines share only full blocks.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n = len(token_ids) // block_size
    if n == 0:
        return []
    data, width = _as_bytes(token_ids if len(token_ids) == n * block_size else token_ids[: n * block_size])
    step = block_size * width
    out: list[int] = []
    append = out.append
    h = parent
    head = 0
    # The blocks that may carry extra keys first (a salt is on the first block only), then the
    # rest on the plain chain: this loop is the hashing cost of a long prompt, kept minimal.
    ex: Sequence[Any] = extras if extras is not None else ()
    for i in range(min(n, len(ex))):
        extra = ex[i]
        h = xxh3_64_intdigest(data[head : head + step], h if extra is None else extra_seed(h, extra))
        append(h)
        head += step
    for pos in range(head, n * step, step):
        h = xxh3_64_intdigest(data[pos : pos + step], h)
        append(h)
    return out


def extra_seed(parent: int, extra: Any) -> int:
    """The seed of a block whose hash also covers `extra` (a tuple of str/int/bytes/tuples)."""
    return xxh3_64_intdigest(repr(extra).encode(), seed=parent) or 1


def prompt_keys(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[int]:
    """The keys of a prompt as the engine will hash it: with `cache_salt` in its first block (module docs)."""
    return block_keys(token_ids, block_size, extras=[(cache_salt,)] if cache_salt else None)
