"""Read a router config file (YAML or JSON) into a `RouterConfig`, with errors for people.

Every validation error names the file, the line and the field, and what is allowed, e.g.

    router.yaml:12: replicas[1].max_concurrent_requests: Input should be greater than or equal to 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gpufleet.router.config import RouterConfig
from gpufleet.router.errors import ConfigError

__all__ = ["load_router_config"]


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location `loc` (deepest node found)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    node = v
                    line = k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_router_config(path: str | Path) -> RouterConfig:
    """Load and validate a router config file; raises `ConfigError` with file:line: field: message."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}:1: a router config must be a mapping with `fleet`, `settings` and `replicas`")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            line = _line_of(root, loc)
            where = f"{p}:{line}" if line else str(p)
            msg = err.get("msg", "invalid")
            if err.get("type") == "literal_error" and err.get("ctx", {}).get("expected"):
                msg = f"must be one of {err['ctx']['expected']}"
            lines.append(f"{where}: {_loc_text(loc)}: {msg}")
        raise ConfigError("\n".join(lines)) from None
