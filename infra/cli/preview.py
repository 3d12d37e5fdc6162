"""`gpufleet preview STACK_DIR`: what `pulumi up` would create, offline, under Pulumi's mocks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet.infra.cli._common import OutOpt, emit, legacy_format, output_option, user_errors

PREVIEW_FORMATS = {
    "table": "a resource tree, the cost and the outputs",
    "json": "a list of {type, name, parent, inputs}",
}


def _errors() -> tuple[type[BaseException], ...]:
    import pulumi
    from pulumi.config import ConfigMissingError, ConfigTypeError

    from gpufleet.infra.pulumi import preview

    return (preview.PreviewError, pulumi.RunError, ConfigMissingError, ConfigTypeError)


def _fmt(value: Any) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 90 else text[:87] + "..."


def _print_tree(result: Any, target: Any) -> None:
    from rich.markup import escape
    from rich.tree import Tree

    from gpufleet.infra.pulumi import preview

    root = Tree(f"[bold]{escape(result.project)}/{escape(result.stack)}[/]: {len(result.resources)} resources")
    nodes: dict[str, Tree] = {}
    pending = list(result.resources)
    # Parents register before their children, but attach in passes to be safe.
    for _ in range(len(pending) + 1):
        rest = []
        for r in pending:
            parent = root if r.parent is None else nodes.get(r.parent)
            if parent is None:
                rest.append(r)
                continue
            inputs = "  ".join(f"[dim]{escape(k)}=[/]{escape(_fmt(v))}" for k, v in preview.key_inputs(r).items())
            style = "cyan" if not r.custom else "green"
            nodes[r.name] = parent.add(f"[{style}]{escape(r.type)}[/] [bold]{escape(r.name)}[/]  {inputs}")
        if not rest:
            break
        pending = rest
    target.print(root)


def _print_outputs(result: Any, target: Any) -> None:
    from rich.table import Table

    cost = result.outputs.get("cost")
    if isinstance(cost, dict):
        table = Table(title="Plan cost (USD)", title_justify="left")
        table.add_column("")
        table.add_column("per hour", justify="right")
        table.add_column("per month", justify="right")
        for row in ("baseline", "warm", "peak"):
            h, m = cost.get(f"{row}_usd_per_hour"), cost.get(f"{row}_usd_per_month")
            table.add_row(
                row,
                f"{h:,.2f}" if isinstance(h, (int, float)) else "-",
                f"{m:,.0f}" if isinstance(m, (int, float)) else "-",
            )
        target.print(table)
    others = {k: v for k, v in result.outputs.items() if k != "cost"}
    if others:
        table = Table(title="Stack outputs", title_justify="left")
        table.add_column("output")
        table.add_column("value")
        for k, v in others.items():
            table.add_row(k, _fmt(v))
        target.print(table)
    for note in result.notes:
        target.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `gpufleet preview`."""

    @app.command("preview")
    def preview_cmd(
        stack_dir: Annotated[
            Path, typer.Argument(help="A stack directory (Pulumi.yaml, Pulumi.<stack>.yaml, __main__.py).")
        ],
        stack: Annotated[
            str | None, typer.Option("--stack", "-s", help="Stack name, when the directory has several.")
        ] = None,
        output: Annotated[str, output_option(PREVIEW_FORMATS)] = "table",
        out: OutOpt = None,
        as_json: Annotated[bool, typer.Option("--json", hidden=True)] = False,
    ) -> None:
        """Preview what `pulumi up` would create, offline.

        The stack's program runs under Pulumi's mocks, without the Pulumi CLI or credentials;
        secret values are masked.
        """
        import json

        from gpufleet.infra.pulumi import preview

        output = legacy_format("json" if as_json else None, "--json", PREVIEW_FORMATS, output)
        with user_errors(*_errors()):
            result = preview.preview_stack(stack_dir, stack)

        def show(target: Any) -> None:
            _print_tree(result, target)
            _print_outputs(result, target)

        text = json.dumps([r.to_json() for r in result.resources], indent=2) + "\n" if output == "json" else None
        emit(show, text, out)
