"""Helpers shared by the CLI modules: turning domain errors into one clear line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# Piped output (CI logs, files) gets a wide fixed width so that tables are not squeezed.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class UserError(Exception):
    """A mistake of the user's (bad file, bad flag): shown as one line, exit code 1."""


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Show `UserError` (and the given domain error types) as a clean message and exit 1.

    With GPUFLEET_DEBUG=1 the original exception propagates with its traceback.
    """
    try:
        yield
    except (UserError, *types) as exc:  # type: ignore[misc]
        if os.environ.get("GPUFLEET_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


# The declaration option every command that reads a fleet takes.
CatalogOpt = Annotated[
    list[Path] | None,
    typer.Option("--catalog", help="A user catalog file layered over the bundled one (repeatable)."),
]


def declaration_errors() -> tuple[type[BaseException], ...]:
    """The domain errors of loading a declaration and its catalogs (shown as one line)."""
    from gpufleet.infra import catalog, report, spec

    return (spec.FleetError, catalog.CatalogError, report.PlanFormatError)


def debug_enabled() -> bool:
    return bool(os.environ.get("GPUFLEET_DEBUG"))


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
