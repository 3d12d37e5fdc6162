"""Where a declaration is wrong: `FleetIssue` (file, line, field, message), `FleetError` (every
issue of a declaration at once) and `SourceMap` (the line each field path stands on)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FleetError", "FleetIssue", "SourceMap", "field_path"]


@dataclass(frozen=True)
class FleetIssue:
    """One problem in a declaration, located by file, line and field path."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class FleetError(Exception):
    """The declaration is invalid; `issues` lists every problem found."""

    def __init__(self, issues: Sequence[FleetIssue]) -> None:
        self.issues = list(issues)
        super().__init__(self._text())

    def _text(self) -> str:
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} in the fleet declaration:"
        return "\n".join([head, *(f"  {i}" for i in self.issues)])


def field_path(loc: Iterable[Any]) -> str:
    """('nodepools', 1, 'max_nodes') -> 'nodepools[1].max_nodes'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class SourceMap:
    """Where each value of a declaration stands: field path (tuple) -> 1-based line."""

    file: str
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def line(self, loc: Sequence[Any]) -> int | None:
        loc = tuple(loc)
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]

    def issue(self, loc: Sequence[Any], message: str) -> FleetIssue:
        return FleetIssue(self.file, self.line(loc), field_path(loc), message)
