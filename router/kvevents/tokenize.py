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

The `tokenizers` library releases the GIL while encoding, so the server runs long prompts in a
thread pool (`encode_async`) and the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

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
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

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

    def encode_body(self, body: Mapping[str, Any]) -> list[int]:
        """Token ids of a chat or completion body; [] when the body has no prompt the router can read."""
        if isinstance(body.get("messages"), list):
            try:
                text = self.render_chat(body)
            except Exception:  # a template that rejects these messages: the engine will say why
                return []
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str) else prompt
        if isinstance(prompt, list):
            return [t for t in prompt if isinstance(t, int)]
        if isinstance(prompt, str):
            return list(self._tok.encode(prompt, add_special_tokens=True).ids)
        return []

    def encode_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    async def encode_async(self, body: Mapping[str, Any], size_hint: int) -> list[int]:
        """`encode_body` inline for short bodies, in the thread pool for long ones (`size_hint` bytes)."""
        if size_hint <= self.inline_chars:
            return self.encode_body(body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.encode_body, body)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
