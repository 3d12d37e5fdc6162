"""The prompt as the engine tokenizes it: the model's `tokenizer.json` (HF `tokenizers`) and chat template.

vLLM renders a chat request with the model's chat template (`tokenizer_config.json`'s
`chat_template`, or a template file) with `add_generation_prompt=True`, then encodes the text
without adding special tokens (the template writes them); a completion's `prompt` string is
encoded with the tokenizer's special tokens (`add_special_tokens=True`), and a prompt given as
token ids is used as is. `PromptTokenizer` does the same, so its token ids, cut into blocks, are
the engine's blocks.

The template runs in jinja2's immutable sandbox with the helpers Hugging Face templates expect
(`raise_exception`, `strftime_now`, `tojson`, loop controls, trimmed blocks). A model without a
template gets a plain `role: content` rendering, which cannot match an engine that has one; the
router says so once at start.

Text is encoded through a `tokencache.ChunkedEncoder`: a per-tenant cache of the chunks between
the template's special tokens, so a conversation's next turn and a shared system prompt cost only
their new text, with ids identical to encoding the whole text (that module's docs say why). The
encoding call is `encode_batch_fast`, which releases the GIL (the single-text `encode` holds it)
and skips the offsets the router never reads, so a long prompt encoded in the thread pool
(`encode_async`) does not stop the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from gpufleet.router.kvevents.tokencache import ANONYMOUS, ChunkedEncoder, Lookup, TokenCache

__all__ = ["PromptTokenizer", "TokenizerError"]

log = logging.getLogger("gpufleet.router.kvevents")


class TokenizerError(ValueError):
    """The tokenizer or its chat template could not be loaded (the message says which file and why)."""


def _token_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class PromptTokenizer:
    """Token ids of a request body as the engine computes them (module docs)."""

    def __init__(
        self,
        tokenizer_path: str | Path,
        *,
        chat_template: str | Path | None = None,
        inline_chars: int = 8192,
        threads: int = 2,
        cache_tokens: int = 0,
    ) -> None:
        try:
            import tokenizers
        except ModuleNotFoundError:
            raise TokenizerError(
                "precise mode needs the `tokenizers` package: pip install 'gpufleet[router]'"
            ) from None
        path = Path(tokenizer_path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"no tokenizer at {file}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises plain Exceptions for bad files
            raise TokenizerError(f"{file}: not a tokenizer.json: {exc}") from None
        config: dict[str, Any] = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{cfg_file}: {exc}") from None
        template: str | None = None
        if chat_template is not None:
            tpath = Path(chat_template)
            try:
                template = tpath.read_text()
            except OSError as exc:
                raise TokenizerError(f"chat template {tpath}: {exc.strerror or exc}") from None
        else:
            raw = config.get("chat_template")
            if isinstance(raw, list):  # named templates: the default one
                raw = next(
                    (t.get("template") for t in raw if isinstance(t, Mapping) and t.get("name") == "default"), None
                )
            if isinstance(raw, str):
                template = raw
            elif (file.parent / "chat_template.jinja").is_file():
                template = (file.parent / "chat_template.jinja").read_text()
        self.path = file
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.has_template = template is not None
        self._template = self._compile(template) if template is not None else None
        self.inline_chars = inline_chars
        self.threads = threads
        self.in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")
        # The engine's tokenizer (transformers) turns a tokenizer.json's truncation and padding
        # off unless a request asks for them; so must the router, or long prompts lose blocks.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.cache = TokenCache(cache_tokens) if cache_tokens > 0 else None
        self._chunked = ChunkedEncoder(self._tok, self.cache)
        self._wrap = _special_wrap(self._tok)

    @staticmethod
    def _compile(source: str) -> Any:
        try:
            import jinja2
            import jinja2.ext
            import jinja2.sandbox
        except ModuleNotFoundError:
            raise TokenizerError("chat templates need `jinja2`: pip install 'gpufleet[router]'") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template does not compile: {exc}") from None

    # -- rendering --------------------------------------------------------------------------------
    def render_chat(self, body: Mapping[str, Any]) -> str:
        """The text the engine's chat template makes of a chat body."""
        messages = body.get("messages") or []
        if self._template is None:
            return "".join(f"{m.get('role', '')}: {m.get('content', '')}\n" for m in messages if isinstance(m, Mapping))
        ctx: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": body.get("add_generation_prompt", True),
            **self.special,
        }
        if body.get("tools") is not None:
            ctx["tools"] = body["tools"]
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, Mapping):
            ctx.update({k: v for k, v in kwargs.items() if isinstance(k, str)})
        return str(self._template.render(**ctx))

    def prepare(self, body: Mapping[str, Any], scope: str = ANONYMOUS) -> Lookup | Sequence[int]:
        """A chat or completion body's prompt: the text's `Lookup` in `scope`'s token cache (the
        tenant's), still to `finish`, or the ids when nothing is to be encoded (empty when the body
        has no prompt the router can read). Cheap: renders the template and hashes the chunks."""
        if isinstance(body.get("messages"), list):
            try:
                text = self.render_chat(body)
            except Exception:  # a template that rejects these messages: the engine will say why
                return ()
            return self._chunked.lookup(text, scope)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str) else prompt
        if isinstance(prompt, list):
            return [t for t in prompt if isinstance(t, int)]
        if isinstance(prompt, str):
            if self._wrap is None:  # special tokens that depend on the text: encode it whole
                return Lookup(self._chunked, scope, [prompt], [], [None], None, special_whole=True)
            return self._chunked.lookup(prompt, scope, self._wrap)
        return ()

    def token_ids(self, body: Mapping[str, Any], scope: str = ANONYMOUS) -> Sequence[int]:
        """Token ids of a chat or completion body, through `scope`'s token cache (`prepare`)."""
        job = self.prepare(body, scope)
        return job.finish() if isinstance(job, Lookup) else job

    def encode_body(self, body: Mapping[str, Any], scope: str = ANONYMOUS) -> list[int]:
        """`token_ids` as a list."""
        return list(self.token_ids(body, scope))

    def encode_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def busy(self) -> bool:
        """Every thread is taken and as many requests again wait: a new one would only queue."""
        return self.in_flight >= 2 * self.threads

    async def encode_async(self, body: Mapping[str, Any], scope: str = ANONYMOUS) -> Sequence[int]:
        """`token_ids`, with the text left to encode (after the cache) encoded in the thread pool
        when it is longer than `inline_chars`."""
        job = self.prepare(body, scope)
        if not isinstance(job, Lookup):
            return job
        if job.pending_chars <= self.inline_chars:
            return job.finish()
        return await self.finish_async(job)

    async def finish_async(self, job: Lookup) -> array[int]:
        """`job.finish()` in the thread pool. Cancelling the wait (a deadline) leaves the thread to
        finish: its chunks still fill the cache."""
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        fut = loop.run_in_executor(self._pool, job.finish)
        fut.add_done_callback(self._done)
        return await asyncio.shield(fut)

    def _done(self, _fut: object) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _special_wrap(tok: Any) -> tuple[array[int], array[int]] | None:
    """The ids `add_special_tokens=True` puts before and after a text's own ids, if the same for any text.

    Post-processors (`TemplateProcessing`, BERT's, RoBERTa's) add fixed ids around the text; a
    completion prompt is then those ids around its cached encoding. None if probes disagree.
    """
    found: tuple[array[int], array[int]] | None = None
    for probe in ("hello world", "1 a\n\nb, c"):
        plain = list(tok.encode(probe, add_special_tokens=False).ids)
        full = list(tok.encode(probe, add_special_tokens=True).ids)
        n = len(plain)
        at = next((h for h in range(len(full) - n + 1) if full[h : h + n] == plain), None)
        if not n or at is None:
            return None
        wrap = (array("I", full[:at]), array("I", full[at + n :]))
        if found is not None and found != wrap:
            return None
        found = wrap
    return found
