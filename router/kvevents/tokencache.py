"""Token ids of a rendered prompt, re-encoding only the text the router has not seen from this tenant.

A chat prompt is mostly text the router tokenized before: the shared system prompt, and in a
multi-turn conversation every earlier turn. `ChunkedEncoder` cuts the rendered text right before
each occurrence of a *special added token* (`<|im_start|>`, `<|start_header_id|>`, ...: the
markers chat templates put between messages), looks each chunk up in a `TokenCache` and encodes
only the chunks it misses, in one `encode_batch_fast` call.

Why the cut is exact (the concatenated ids are the ids of encoding the whole text): `tokenizers`
splits the raw text on its added tokens *before* normalizing and pre-tokenizing, and encodes each
piece on its own. A cut right before an added token that is matched on the raw text
(`normalized=False`) and strips nothing around it (`lstrip`, `rstrip`, `single_word` false)
separates pieces that never influenced each other; a chunk starts with that token, so its text
after the token is not "the start of the input" either way (a `Metaspace` prepend applies to the
first piece only). The matches are found leftmost-longest over every raw-matched added token, as
the library does, so a cut is never placed inside a longer added token. A tokenizer without such
tokens (or a template that writes none) gets no cut and is encoded whole, as before.

The cache is an LRU bounded in tokens, and every entry is keyed by its scope (the tenant): a
tenant never reads token ids another tenant's text produced, so the router's latency cannot tell
it whether someone else sent that text.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeAlias

from xxhash import xxh3_128_digest

__all__ = ["ChunkedEncoder", "TokenCache"]

ANONYMOUS = ""
"""The scope of requests without a tenant."""


class TokenCache:
    """Chunk text digest -> token ids (`array('I')`), per scope, least recently used out past `max_tokens`.

    Thread-safe: the tokenizer's threads and the event loop share it.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[tuple[str, bytes], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, scope: str, digest: bytes) -> array[int] | None:
        with self._lock:
            ids = self._lru.get((scope, digest))
            if ids is None:
                return None
            self._lru.move_to_end((scope, digest))
            return ids

    def count(self, hit_tokens: int, miss_tokens: int) -> None:
        """Tokens one encode took from the cache and tokens it had to encode."""
        with self._lock:
            self.hits += hit_tokens
            self.misses += miss_tokens

    def put(self, scope: str, digest: bytes, ids: array[int]) -> None:
        n = len(ids)
        if n > self.max_tokens:
            return  # larger than the whole cache: it would only evict everything else
        key = (scope, digest)
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self.tokens -= len(old)
            self._lru[key] = ids
            self.tokens += n
            while self.tokens > self.max_tokens:
                _, gone = self._lru.popitem(last=False)
                self.tokens -= len(gone)


def cut_pattern(added: dict[int, Any]) -> tuple[re.Pattern[str] | None, frozenset[str]]:
    """The leftmost-longest pattern of the raw-matched added tokens, and which of them are cut points.

    `added` is `Tokenizer.get_added_tokens_decoder()`: id -> `AddedToken`.
    """
    raw = sorted({t.content for t in added.values() if not t.normalized and t.content}, key=len, reverse=True)
    cuts = frozenset(
        t.content
        for t in added.values()
        if t.special and not t.normalized and not (t.lstrip or t.rstrip or t.single_word) and t.content
    )
    if not cuts:
        return None, cuts
    return re.compile("|".join(re.escape(c) for c in raw)), cuts


class ChunkedEncoder:
    """Token ids of a text without special tokens added, through a `TokenCache` (module docs).

    `min_chunk_chars` merges neighbouring chunks until one has that much text (a cut is still
    only ever at a cut point, and merging depends only on the text before it, so an earlier turn's
    chunks come out the same when the conversation grows).
    """

    def __init__(self, tokenizer: Any, cache: TokenCache | None, *, min_chunk_chars: int = 256) -> None:
        self._tok = tokenizer
        self._encode_many = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        self.cache = cache
        self.min_chunk_chars = min_chunk_chars
        self.pattern, self.cuts = cut_pattern(tokenizer.get_added_tokens_decoder())

    def chunks(self, text: str) -> list[str]:
        """`text` cut right before cut-point tokens, into chunks of at least `min_chunk_chars` (but the last)."""
        if self.pattern is None:
            return [text]
        out: list[str] = []
        start = 0
        for m in self.pattern.finditer(text):
            p = m.start()
            if p - start >= self.min_chunk_chars and m.group() in self.cuts:
                out.append(text[start:p])
                start = p
        out.append(text[start:])
        return out

    def encode_many(self, texts: Sequence[str], *, special: bool = False) -> list[array[int]]:
        """Each text's ids, encoded in one call (the library releases the GIL while it works);
        `special`: with the tokenizer's special tokens added (its post-processor)."""
        return [array("I", e.ids) for e in self._encode_many(list(texts), add_special_tokens=special)]

    def lookup(self, text: str, scope: str = ANONYMOUS, wrap: Wrap | None = None) -> Lookup:
        """What of `text` `scope`'s cache holds; `Lookup.finish` encodes the rest.

        `wrap`: fixed ids to put before and after (a post-processor's). Cheap (string work about
        as long as rendering the template): the event loop can run it.
        """
        cache = self.cache
        if cache is None or self.pattern is None:
            return Lookup(self, scope, [text], [], [None], wrap)
        parts = self.chunks(text)
        digests = [xxh3_128_digest(p.encode("utf-8", "surrogatepass")) for p in parts]
        return Lookup(self, scope, parts, digests, [cache.get(scope, d) for d in digests], wrap)

    def encode(self, text: str, scope: str = ANONYMOUS) -> array[int]:
        """The ids of `text` (no special tokens added), reusing what `scope` encoded before."""
        return self.lookup(text, scope).finish()


Wrap: TypeAlias = "tuple[array[int], array[int]]"
"""Ids a post-processor puts before and after a text's own."""


class Lookup:
    """One text's chunks, those the cache held and those `finish` still has to encode.

    With no cache (or no cut point) the text is one chunk to encode; `special_whole` encodes it
    with the tokenizer's special tokens added instead (a post-processor that is not a fixed wrap).
    """

    __slots__ = ("_enc", "scope", "parts", "digests", "found", "wrap", "special_whole")

    def __init__(
        self,
        enc: ChunkedEncoder,
        scope: str,
        parts: list[str],
        digests: list[bytes],
        found: list[array[int] | None],
        wrap: Wrap | None,
        special_whole: bool = False,
    ) -> None:
        self._enc, self.scope, self.parts, self.digests, self.found = enc, scope, parts, digests, found
        self.wrap, self.special_whole = wrap, special_whole

    @property
    def pending_chars(self) -> int:
        """Characters of text still to encode."""
        return sum(len(p) for p, ids in zip(self.parts, self.found) if ids is None)

    def finish(self) -> array[int]:
        """The text's ids: the cached chunks' and the others', encoded now in one call (any thread)."""
        found = self.found
        missing = [i for i, ids in enumerate(found) if ids is None]
        hit = sum(len(ids) for ids in found if ids is not None)
        encoded = 0
        if missing:
            new = self._enc.encode_many([self.parts[i] for i in missing], special=self.special_whole)
            cache = self._enc.cache if self.digests else None
            for i, ids in zip(missing, new):
                found[i] = ids
                encoded += len(ids)
                if cache is not None:
                    cache.put(self.scope, self.digests[i], ids)
        out = array("I") if self.wrap is None else array("I", self.wrap[0])
        for part in found:
            assert part is not None
            out.extend(part)
        if self.wrap is not None:
            out.extend(self.wrap[1])
        if self.digests and self._enc.cache is not None:
            self._enc.cache.count(hit, encoded)
        return out
