"""Seeded draws every generator is built from: popularity, arrivals and filler text.

- `zipf_weights` and `WeightedSampler`: Zipf popularity (of applications, documents, system
  prompts) and any other weighted choice, one `random()` draw per choice;
- `arrival_times`: Poisson arrivals;
- two sources of filler text, because the simulator's and the demo's pinned sequences draw
  differently: `TextPool` cuts keyed slices of one pool of random letters (equal keys give equal
  text, no draw from the generator's RNG, cheap for megabytes of prompts); `prose` strings words
  of a fixed vocabulary drawn from the generator's RNG (readable prompts for the demo).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from itertools import accumulate

from gpufleet.router.types import stable_hash

__all__ = ["TextPool", "WeightedSampler", "arrival_times", "prose", "zipf_weights"]


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights 1/k^s for ranks 1..n."""
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


class WeightedSampler:
    """Draw indices with fixed weights in O(log n), one `rng.random()` per draw.

    The draw is `random.Random.choices`' (the first index whose cumulative weight exceeds
    `random() * total`), so a zero weight is never drawn.
    """

    def __init__(self, weights: Sequence[float], rng: random.Random) -> None:
        self._cum = list(accumulate(weights))
        self._rng = rng

    def draw(self) -> int:
        """One index."""
        return min(bisect.bisect_right(self._cum, self._rng.random() * self._cum[-1]), len(self._cum) - 1)


def arrival_times(n: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which `n` Poisson arrivals at `rate_per_s` happen (seeded)."""
    if rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


class TextPool:
    """Deterministic filler text: slices of one seeded pool of lowercase letters and spaces.

    `segment(key, tokens)` is `tokens * chars_per_token` characters; equal keys give equal text.
    """

    def __init__(self, seed: int, size_chars: int = 1 << 22, chars_per_token: float = 4.0) -> None:
        alphabet = b"abcdefghijklmnopqrstuvwxyz      "  # 32 symbols: one in four is a space
        table = bytes(alphabet[i % len(alphabet)] for i in range(256))
        raw = random.Random(seed).randbytes(size_chars)
        self.text = raw.translate(table).decode("ascii")
        self.chars_per_token = chars_per_token

    def chars(self, tokens: int) -> int:
        """Characters standing for `tokens` tokens."""
        return max(1, int(round(tokens * self.chars_per_token)))

    def segment(self, key: str, tokens: int) -> str:
        """The text of segment `key`, `tokens` tokens long."""
        n = self.chars(tokens)
        if n >= len(self.text):
            raise ValueError(f"segment of {tokens} tokens exceeds the text pool; use a larger pool")
        off = stable_hash(key) % (len(self.text) - n)
        return self.text[off : off + n]


_WORDS = (
    "system data model cache router replica token prefix block memory latency request batch stream "
    "cluster node pool priority failover region zone price budget tenant session policy document "
    "question answer context summary detail report metric signal queue worker engine kernel tensor "
    "layer weight vector search index score rank query result value table field record schema "
    "network storage compute service client server config plan deploy update release version"
).split()


def prose(rng: random.Random, chars: int, title: str) -> str:
    """`title:` then words drawn from `rng` up to about `chars` characters."""
    words = [title + ":"]
    length = len(title) + 1
    while length < chars:
        w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    return " ".join(words)
