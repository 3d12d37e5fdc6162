"""A tokenizer for the demo's simulated models, so `gpufleet demo` can route in precise mode.

The simulated replicas stand for models whose real tokenizers are not here (and need not be):
precise mode needs only that the router and the replicas cut a prompt into the same tokens. The
demo trains a byte-level BPE (HF `tokenizers`, as real models' `tokenizer.json` are) on a sample
of its own traffic, its vocabulary sized by bisection so a token is about `chars_per_token`
characters, as the plan assumes: prompts cost the replicas the tokens the plan sized them for,
and the demo's load means what it meant in approximate mode. Byte-level: any text encodes
(no unknown token that would make different prompts look alike). A chat template with one
special token per role is written beside it (`tokenizer_config.json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["CHAT_TEMPLATE", "DemoTokenizer", "build"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class DemoTokenizer:
    """What `build` wrote: the directory (`tokenizer.json`, `tokenizer_config.json`) and its measure."""

    path: Path
    vocab_size: int
    chars_per_token: float
    """Characters per token over the training sample."""


def _train(sample: list[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=_SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    return tok


def build(
    directory: Path, texts: Iterable[str], chars_per_token: float, sample_chars: int = 200_000, rounds: int = 6
) -> DemoTokenizer:
    """Train the tokenizer on up to `sample_chars` of `texts` and write it into `directory`."""
    sample: list[str] = []
    total = 0
    for t in texts:
        sample.append(t)
        total += len(t)
        if total >= sample_chars:
            break
    if not total:
        raise ValueError("no text to train the demo's tokenizer on")
    # More merges, longer tokens: bisect the vocabulary size for the ratio closest to the target.
    lo, hi = 256 + len(_SPECIAL), 2048
    best: tuple[float, int, Tokenizer] | None = None
    for _ in range(rounds):
        size = (lo + hi) // 2
        tok = _train(sample, size)
        ratio = total / sum(len(e.ids) for e in tok.encode_batch(sample))
        if best is None or abs(ratio - chars_per_token) < abs(best[0] - chars_per_token):
            best = (ratio, size, tok)
        lo, hi = (size, hi) if ratio < chars_per_token else (lo, size)
    assert best is not None
    ratio, size, tok = best
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|end|>", "model_max_length": 1 << 20}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return DemoTokenizer(directory, size, ratio)
