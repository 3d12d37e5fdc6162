"""`gpufleet demo` in precise mode: which tokenizer it routes on, and the KV state it prints.

The demo routes in precise mode (each replica's KV events, `gpufleet.infra.local.precise`) unless
`--no-precise`: on the declaration's tokenizer when it has one, else on one the demo trains on its
own traffic (`gpufleet.infra.local.demo_tokenizer`: the simulated models have none of their own).
`declared_mode` says which when nothing needs training; `with_trained_tokenizer` trains one and
gives the settings that use it. After each run the demo prints the router's KV state of the live
replicas in one line (`kv_state_line`): how many route on their events, how many are approximate
and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpx

from gpufleet.infra.local import demo_tokenizer
from gpufleet.infra.local.runtime import LocalRuntime
from gpufleet.router.config import RouterSettings

__all__ = ["declared_mode", "kv_state_line", "with_trained_tokenizer"]


def declared_mode(settings: RouterSettings, precise: bool) -> str | None:
    """The line saying how the demo routes when it needs no tokenizer of its own: approximate
    (`precise` off) or precise on the declared tokenizer; None when it must train one."""
    ke = settings.kv_events
    if not precise:
        return "routing: approximate (--no-precise): the router estimates what each replica holds"
    if ke.enabled and ke.tokenizer is not None:
        return f"routing: precise, from every replica's KV events; tokenizer {ke.tokenizer} (declared)"
    return None


def with_trained_tokenizer(
    settings: RouterSettings, texts: Iterable[str], directory: Path
) -> tuple[RouterSettings, list[str]]:
    """Train the demo's tokenizer on `texts` into `directory`; the settings in precise mode on it
    and the lines that say so (its size against the plan's chars/token)."""
    tok = demo_tokenizer.build(directory, texts, settings.chars_per_token)
    ke = settings.kv_events.model_copy(update={"enabled": True, "tokenizer": str(tok.path), "chat_template": None})
    lines = [
        "routing: precise, from every replica's KV events",
        f"  tokenizer: the simulated models have none, so the demo trained one on its traffic (byte-level "
        f"BPE, {tok.vocab_size} tokens, {tok.chars_per_token:.1f} chars/token; the plan assumes "
        f"{settings.chars_per_token:g})",
    ]
    return settings.model_copy(update={"kv_events": ke}), lines


def kv_state_line(rt: LocalRuntime) -> str:
    """The router's KV state of the live replicas in one line (its /admin/replicas `kv_state` rows)."""
    try:
        rows = rt.router_rows()
    except httpx.HTTPError as exc:
        return f"router KV state: unknown ({exc})"
    live = {r.id for r in rt.replicas if r.state in ("active", "warm")}
    kv = [row.get("kv_state") or {} for row in rows if str(row["id"]) in live]
    if not any("endpoint" in k for k in kv):  # no replica has a stream: precise mode is off
        return f"router KV state: approximate on {len(kv)} (precise mode off)"
    exact = [k for k in kv if k.get("state") == "events"]
    approx = [k for k in kv if k.get("state") != "events"]
    parts = [f"events on {len(exact)}"] if exact else []
    if approx:
        quiet = sum(1 for k in approx if not k.get("batches"))  # no stream, or nothing sent to it yet
        why = [f"{quiet} without traffic yet"] if quiet else []
        why += [f"{len(approx) - quiet} fell back (silent after a request)"] if len(approx) > quiet else []
        parts.append(f"approximate on {len(approx)} ({', '.join(why)})")
    held = f"; {sum(int(k.get('blocks', 0)) for k in exact)} blocks indexed from their events" if exact else ""
    return f"router KV state: {', '.join(parts) or 'no replicas'}{held}"
