"""Chained block hashing of prompts and a per-replica prefix index bounded by KV capacity.

A prompt is rendered to text (chat messages in order, each with its role), cut into
fixed-size blocks of `block_size_tokens * chars_per_token` characters, and each full block is
hashed with xxhash seeded by the previous block's hash. Equal hashes at position i therefore
mean equal prefixes up to block i, the way an engine's paged KV cache shares blocks. A trailing
partial block is not hashed: engines only share full blocks.

`PrefixIndex` remembers which blocks a replica probably holds. Its size is the replica's
declared KV capacity in blocks, with LRU eviction, so once a replica has processed more tokens
than it can hold, the router knows the old prefixes are probably gone. Within one prompt the
blocks are touched tail first, so the head of a prefix is the most recent and the tail is
evicted first, as in vLLM's block pool; the matched prefix therefore stays contiguous.

The indexes of a fleet can share one `gpufleet.router.holders.HolderMasks` (each with its own
bit): every block an index holds is then marked with its bit there, so one walk over a prompt
answers `match` for all of them at once (`HolderMasks.depths`), as the events index does. Block
hashes are non-negative (xxhash digests); the placeholders of `consume` are negative and never
shared.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.router.holders import HolderMasks
from gpufleet.router.types import RequestFeatures, stable_hash, xxh3_64_intdigest

__all__ = ["PrefixIndex", "block_hashes", "features_from_body", "render_prompt"]

_ROLE_SEP = "\x1f"  # unit separator: cannot collide with ordinary text
_MSG_SEP = "\x1e"  # record separator between messages


def _content_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string, or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping):
                kind = part.get("type")
                if kind in ("text", "input_text", "output_text"):  # chat parts; Responses API parts
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    url = part.get("image_url")
                    parts.append(str(url.get("url", "") if isinstance(url, Mapping) else url))
                else:
                    parts.append(str(part.get(kind, "")) if isinstance(kind, str) else "")
            else:
                parts.append(str(part))
        return "".join(parts)
    return str(content)


def _render_input(body: Mapping[str, Any]) -> str:
    """The `input` of a Responses (with its `instructions` as the system turn) or Embeddings body.

    Message items render as chat messages do, so a shared instructions + history prefix maps to
    the same blocks; a list of strings or token ids (embeddings) renders whole, in order.
    """
    out: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out += ["system", _ROLE_SEP, instructions, _MSG_SEP]
    items = body.get("input")
    if isinstance(items, str):
        if out:  # a Responses turn: the input is the user's message
            out += ["user", _ROLE_SEP, items, _MSG_SEP]
        else:
            out.append(items)
        return "".join(out)
    if not isinstance(items, list):
        return "".join(out)
    for item in items:
        if isinstance(item, Mapping) and "role" in item:
            out += [str(item.get("role", "")), _ROLE_SEP, _content_text(item.get("content")), _MSG_SEP]
        elif isinstance(item, Mapping):  # function calls and their outputs: their JSON-ish text
            out += [str(item), _MSG_SEP]
        elif isinstance(item, list):  # embeddings: a list of token-id lists
            out += [" ".join(str(t) for t in item), _MSG_SEP]
        else:  # embeddings: strings, or one list of token ids
            out += [str(item), " " if isinstance(item, int) else _MSG_SEP]
    return "".join(out)


def render_prompt(body: Mapping[str, Any]) -> str:
    """Render a chat or completions request body to the text whose prefix the KV cache shares.

    Chat: every message as `role<US>content<RS>`, in order (tool calls included as JSON-ish
    text). Completions: the `prompt` string (or the first of a list of strings). Responses and
    Embeddings: `instructions` and `input` (`_render_input`).
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        out: list[str] = []
        for m in messages:
            if not isinstance(m, Mapping):
                continue
            out.append(str(m.get("role", "")))
            out.append(_ROLE_SEP)
            out.append(_content_text(m.get("content")))
            if m.get("tool_calls"):
                out.append(str(m["tool_calls"]))
            out.append(_MSG_SEP)
        return "".join(out)
    if "input" in body:
        return _render_input(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        # a list of token ids: render them so equal id prefixes give equal text prefixes
        return " ".join(str(t) for t in prompt)
    return ""


def block_hashes(text: str, block_chars: int, seed: int = 0) -> tuple[int, ...]:
    """Chained xxhash of every full `block_chars`-character block of `text` (the chain starts at `seed`)."""
    if block_chars <= 0:
        raise ValueError("block_chars must be positive")
    n = len(text) // block_chars
    out = [0] * n
    h = seed
    for i in range(n):
        h = xxh3_64_intdigest(text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass"), seed=h)
        out[i] = h
    return tuple(out)


def features_from_body(
    body: Mapping[str, Any],
    *,
    model: str,
    block_size_tokens: int,
    chars_per_token: float,
    session_id: str | None = None,
    salt: str | None = None,
) -> RequestFeatures:
    """Build the policy's view of a request from its parsed body.

    With `salt` (a tenant's, under `tenant_isolation: kv`) the block chain starts from it, so
    equal prompts of two tenants share no block, as in the engines' salted caches.
    """
    text = render_prompt(body)
    block_chars = max(1, int(block_size_tokens * chars_per_token))
    hashes = block_hashes(text, block_chars, stable_hash(salt) if salt else 0)
    if hashes:
        key = hashes[0]
    else:
        key = stable_hash(text) if text else 0
    return RequestFeatures(
        model=model,
        block_hashes=hashes,
        prompt_tokens=math.ceil(len(text) / chars_per_token),
        session_id=session_id,
        affinity_key=key,
    )


class PrefixIndex:
    """The blocks one replica probably holds: an LRU set of at most `capacity_blocks` hashes.

    Memory is bounded by construction (one dict entry per block, never more than capacity);
    `match` is O(matched blocks) and `insert` O(blocks of the prompt + evictions).
    """

    __slots__ = ("_blocks", "_phantom", "_shared", "bit", "capacity_blocks", "effective_blocks", "evictions")

    def __init__(self, capacity_blocks: int, *, shared: HolderMasks | None = None, bit: int = 0) -> None:
        """`shared` and `bit`: mark every block held with `bit` in a fleet's table (module docs)."""
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        if shared is not None and bit <= 0:
            raise ValueError("a shared index needs a bit")
        self.capacity_blocks = capacity_blocks
        self._shared = shared
        self.bit = bit
        # What the replica can keep right now (<= capacity_blocks): lowered by `limit` when the
        # replica reports that running requests hold most of its memory.
        self.effective_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        # Negative counters stand for KV blocks filled by generated tokens, which the router
        # cannot hash but which still push older prefixes out of the replica's cache.
        self._phantom = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of `hashes` present in the index (longest matched prefix)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the replica now holds these blocks (most recently used), evicting LRU ones."""
        if not self.capacity_blocks:
            return
        blocks = self._blocks
        shared = self._shared
        # Tail first, so the prefix head ends up most recent and the tail is evicted first.
        # A prompt longer than the capacity keeps only its head, as the engine would.
        if shared is None:
            for h in reversed(hashes[: self.capacity_blocks]):
                if h in blocks:
                    blocks.move_to_end(h)
                else:
                    blocks[h] = None
        else:
            new: list[int] = []
            for h in reversed(hashes[: self.capacity_blocks]):
                if h in blocks:
                    blocks.move_to_end(h)
                else:
                    blocks[h] = None
                    new.append(h)
            shared.add_all(new, self.bit)
        self._evict()

    def consume(self, n_blocks: int) -> None:
        """Account for `n_blocks` of KV the replica filled with content the router cannot hash."""
        if not self.capacity_blocks or n_blocks <= 0:
            return
        n_blocks = min(n_blocks, self.capacity_blocks)
        blocks = self._blocks
        for _ in range(n_blocks):
            self._phantom -= 1
            blocks[self._phantom] = None
        self._evict()

    def limit(self, blocks: int) -> None:
        """Set how many blocks the replica can keep now (clamped to 0..capacity); evict down to it.

        Eviction is for good: an engine short of memory evicts its least recently used blocks,
        and they do not come back when memory frees up, so raising the limit later only lets new
        blocks in.
        """
        self.effective_blocks = min(self.capacity_blocks, max(0, blocks))
        self._evict()

    def clear(self) -> None:
        """Forget everything (the replica restarted or was ejected: its cache is gone)."""
        if self._shared is not None:
            self._shared.drop_all(self._blocks, self.bit)
        self._blocks.clear()

    def oldest(self) -> int | None:
        """The hash that would be evicted next (for tests and admin views)."""
        return next(iter(self._blocks), None)

    def _evict(self) -> None:
        blocks = self._blocks
        over = len(blocks) - self.effective_blocks
        if over > 0 and self._shared is not None:
            drop, bit = self._shared.drop, self.bit
            for _ in range(over):
                drop(blocks.popitem(last=False)[0], bit)
        else:
            for _ in range(over):
                blocks.popitem(last=False)
        if over > 0:
            self.evictions += over
