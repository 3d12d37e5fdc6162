"""What every CLI module shares: the command-line conventions and one-line domain errors.

The conventions (docs/cli.md), so that every command reads the same:

- `-o/--output FORMAT` chooses what a command writes: `table` (the default, for people), `json`
  (for tools) and the command's own formats (`markdown`, `infracost-json`, `yaml`). Build it
  with `output_option(...)`; an unknown format is refused with the formats listed.
- `--out PATH` writes that output to a file (a directory for `render manifests`) instead of
  stdout; the terminal then still shows the table and a `wrote PATH` line (`write_output`).
- stdout carries only the output; progress, notes and warnings go to stderr (`err_console`), so
  `-o json | jq` works. Progress is a live bar on a terminal and plain lines otherwise
  (`progress`). Rich honours NO_COLOR.
- Groups come from `group(...)`: plain help at any width (full option names, no type noise),
  `-h` as well as `--help`, the help when called without a command.
- Old spellings stay accepted for a while with one warning line (`deprecated`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console


# Piped output (CI logs, files) gets a wide fixed width so that tables are not squeezed.
def report_console(width: int = 160) -> Console:
    """A console on stdout: the terminal's width on a terminal, else `width` columns (logs, pipes,
    files: wide tables stay readable instead of wrapping at 80)."""
    return Console(width=None if sys.stdout.isatty() else width)


console = report_console()
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


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


def group(help: str | None = None, **kwargs: Any) -> typer.Typer:
    """A command group with the CLI's habits: plain click help (readable at 80 columns, markup-free
    so `gpufleet[router]` stays as written), `-h`, and the help when no command is given."""
    kwargs.setdefault("add_completion", False)
    if help is not None:  # an explicit None would hide the callback's docstring
        kwargs["help"] = help
    return typer.Typer(
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings=CONTEXT_SETTINGS,
        **kwargs,
    )


def check_format(value: str, formats: dict[str, str]) -> str:
    """`value` if it names one of `formats`; else a usage error listing them."""
    if value in formats:
        return value
    # -o named the output file in earlier versions: say where that went.
    raise typer.BadParameter(f"{value!r} is not a format; choose {', '.join(formats)} (--out PATH writes to a file)")


def output_option(formats: dict[str, str]) -> Any:
    """The `-o/--output FORMAT` option over `formats` (name -> what it is for), first one the default."""
    return typer.Option(
        "--output",
        "-o",
        parser=lambda value: check_format(value, formats),
        metavar="<format>",
        autocompletion=lambda incomplete: [f for f in formats if f.startswith(incomplete)],
        help="; ".join(f"{name}: {what}" for name, what in formats.items()) + ".",
        show_default=False,
    )


def legacy_format(value: str | None, flag: str, formats: dict[str, str], output: str) -> str:
    """The format asked for with an old flag (`-f/--format`, `--json`), with a deprecation warning."""
    if value is None:
        return output
    deprecated(flag, f"-o {value}")
    return check_format(value, formats)


OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="<path>", help="Write the output to this file instead of stdout (the table still shows)."
    ),
]


def write_output(text: str, out: Path | None, summary: str | None = None) -> None:
    """`text` to stdout, or to `out` with a `wrote PATH[: summary]` line on stderr."""
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        out.write_text(text)
    except OSError as exc:
        with user_errors():
            raise UserError(f"--out {out}: cannot write: {exc.strerror}") from None
    err_console.print(f"wrote {out}" + (f": {summary}" if summary else ""), highlight=False, soft_wrap=True)


def emit(show: Callable[[Console], None], text: str | None, out: Path | None, summary: str | None = None) -> None:
    """The output convention in one place.

    `show(console)` prints the table (the human view); `text` is the chosen machine format, or
    None when the format is the table. Without --out the chosen output goes to stdout; with it,
    to the file, and the terminal still gets the table.
    """
    if text is None:
        if out is None:
            show(console)
            return
        buffer = io.StringIO()
        show(Console(file=buffer, width=160, color_system=None))
        text = buffer.getvalue()
    write_output(text, out, summary)
    if out is not None:
        show(console)


def deprecated(old: str, new: str) -> None:
    """One warning line for an old spelling that still works."""
    err_console.print(f"[yellow]warning:[/] {old} is deprecated; use {new}", highlight=False, soft_wrap=True)


# The declaration option every command that reads a fleet takes.
CatalogOpt = Annotated[
    list[Path] | None,
    typer.Option("--catalog", metavar="<file>", help="A user catalog file layered over the bundled one (repeatable)."),
]


def declaration_errors() -> tuple[type[BaseException], ...]:
    """The domain errors of loading a declaration and its catalogs (shown as one line)."""
    from gpufleet.infra import catalog, report, spec

    return (spec.FleetError, catalog.CatalogError, report.PlanFormatError)


def debug_enabled() -> bool:
    return bool(os.environ.get("GPUFLEET_DEBUG"))


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


class PlainProgress:
    """Progress as plain lines, for output that is not a terminal (CI logs, pipes, files).

    The subset of `rich.progress.Progress` the CLI and the benchmarks use (`add_task`, `update`,
    `advance`, `remove_task`, a context manager). A task prints a line when it starts, when its description changes, at
    every tenth of its total and at least every `every_s` seconds while it moves, and when the
    block ends.
    """

    def __init__(self, console: Console, *, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._tasks:
            if not t["finished"]:
                self._line(t, final=True)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        with self._lock:
            now = self._clock()
            task = {"description": description, "total": total, "completed": 0.0, "start": now, "last": now}
            task.update(decile=0, finished=False)
            self._tasks.append(task)
            self._line(task)
            return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        """The task is over: its last line (once), as `rich` drops its bar."""
        with self._lock:
            t = self._tasks[task_id]
            if not t["finished"]:
                self._line(t, final=True)

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        total: float | None = None,
        **_: Any,
    ) -> None:
        with self._lock:
            t = self._tasks[task_id]
            if total is not None:
                t["total"] = total
            moved = completed is not None or advance is not None
            if completed is not None:
                t["completed"] = completed
            if advance is not None:
                t["completed"] += advance
            renamed = description is not None and description != t["description"]
            if description is not None:
                t["description"] = description
            decile = int(10 * t["completed"] / t["total"]) if t["total"] else 0
            due = moved and self._clock() - t["last"] >= self._every_s
            if renamed or decile > t["decile"] or due:
                t["decile"] = decile
                self._line(t, final=bool(t["total"]) and t["completed"] >= t["total"])

    def _line(self, t: dict[str, Any], *, final: bool = False) -> None:
        now = self._clock()
        t["last"] = now
        t["finished"] = final
        count = f" {t['completed']:g}/{t['total']:g}" if t["total"] else ""
        state = " done" if final else ""
        elapsed = f" ({now - t['start']:.1f} s)" if now > t["start"] else ""
        self._console.print(f"{t['description']}{count}{state}{elapsed}", markup=False, highlight=False, soft_wrap=True)


def progress(*, on: Console | None = None, bar: bool = True) -> Any:
    """A progress display on stderr (or `on`): a live rich bar on a terminal, plain lines otherwise."""
    target = on or err_console
    if not target.is_terminal:
        return PlainProgress(target)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if bar:
        columns += [BarColumn(), MofNCompleteColumn()]
    return Progress(*columns, TimeElapsedColumn(), console=target, transient=True)
