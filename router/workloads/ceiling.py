"""The infinite-cache ceiling: the prefix-hit ratio no routing policy can beat.

One unbounded KV cache per model sees every request in the order given; a request's hit is the
longest run of its leading full blocks some earlier prompt of the same model had, counted the way
the engine counts (at most all but the last prompt token: one token is always computed). Blocks
are the router's own (`gpufleet.router.prefix`), so the ceiling speaks about the blocks the
replicas cache. Caches never cross models: a model's first sight of a prefix is a miss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gpufleet.router.prefix import features_from_body
from gpufleet.router.types import RequestFeatures
from gpufleet.router.workloads.types import SimRequest, WorkRequest

__all__ = ["ceiling_hit_ratio"]


def _ratio(features: Iterable[RequestFeatures], block_size_tokens: int) -> float:
    seen: dict[str, set[int]] = {}
    hit = total = 0
    for f in features:
        hashes = f.block_hashes[: f.prompt_tokens // block_size_tokens]
        known = seen.setdefault(f.model, set())
        n = 0
        for h in hashes:
            if h not in known:
                break
            n += 1
        if f.prompt_tokens > 0:
            hit += min(n, (f.prompt_tokens - 1) // block_size_tokens) * block_size_tokens
        total += f.prompt_tokens
        known.update(hashes)
    return hit / total if total else 0.0


def ceiling_hit_ratio(
    requests: Sequence[SimRequest] | Sequence[WorkRequest],
    block_size_tokens: int = 16,
    *,
    chars_per_token: float = 4.0,
    model: str | None = None,
) -> float:
    """Prefix-hit ratio of an infinite KV cache per model over `requests` in the order given.

    Simulator requests carry their features; the demo's HTTP requests are rendered the way the
    router renders them (`chars_per_token` applies to those only). `model` limits it to one model.
    """

    def features() -> Iterable[RequestFeatures]:
        for r in requests:
            if isinstance(r, SimRequest):
                f = r.features
            else:
                f = features_from_body(
                    r.body, model=r.model, block_size_tokens=block_size_tokens, chars_per_token=chars_per_token
                )
            if model is None or f.model == model:
                yield f

    return _ratio(features(), block_size_tokens)
