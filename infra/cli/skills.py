"""`gpufleet skills`: the Agent Skills shipped with gpufleet, listed and installed for coding assistants."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet.infra.cli._common import UserError, console, err_console, group, user_errors

skills_app = group("Agent Skills for coding assistants: list them, install them.")

DEFAULT_TARGET = Path(".claude/skills")


def source() -> Any:
    """The folder holding the skills: package data (`gpufleet.skills`), or the source tree's `skills/`."""
    from importlib import resources

    try:
        return resources.files("gpufleet.skills")
    except ModuleNotFoundError:  # an editable install made before the skills were packaged
        tree = Path(__file__).resolve().parents[2] / "skills"
        if tree.is_dir():
            return tree
        raise UserError("the skills are not installed with this gpufleet (reinstall it)") from None


def _front_matter(text: str) -> dict[str, Any]:
    import yaml

    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---", 1)[0]
    data = yaml.safe_load(head)
    return data if isinstance(data, dict) else {}


def skills() -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, folder, front matter) of every shipped skill, by name."""
    found = []
    for entry in source().iterdir():
        skill_md = entry / "SKILL.md"
        if entry.is_dir() and skill_md.is_file():
            found.append((entry.name, entry, _front_matter(skill_md.read_text())))
    return sorted(found, key=lambda x: x[0])


def _copy(src: Any, dst: Path) -> int:
    """Copy a skill folder (a Traversable) to `dst`; the number of files written."""
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for item in src.iterdir():
        if item.name.startswith((".", "__")):
            continue
        if item.is_dir():
            n += _copy(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())
            n += 1
    return n


@skills_app.command("list")
def list_cmd() -> None:
    """List the shipped skills and what each is for."""
    from rich.table import Table

    table = Table(title="gpufleet skills", title_justify="left")
    table.add_column("skill", no_wrap=True)
    table.add_column("description")
    for name, _, meta in skills():
        table.add_row(name, str(meta.get("description", "")))
    console.print(table)


@skills_app.command("install")
def install(
    target: Annotated[
        Path,
        typer.Option(
            "--target",
            metavar="<dir>",
            help="Where the assistant looks for skills (e.g. ~/.claude/skills, ~/.codex/skills, .github/skills).",
        ),
    ] = DEFAULT_TARGET,
    force: Annotated[bool, typer.Option("--force", help="Replace skills of the same name already there.")] = False,
) -> None:
    """Copy the skills where a coding assistant looks for them.

    Default: .claude/skills. One folder per skill (SKILL.md with its front matter, then instructions, reference and
    examples); a skill already there is kept unless --force.
    """
    with user_errors():
        found = skills()
        if not found:
            raise UserError("no skills found in this gpufleet installation")
        target = target.expanduser()
        clash = [name for name, _, _ in found if (target / name).exists()]
        if clash and not force:
            raise UserError(f"{target}: {', '.join(clash)} exist already; give --force to replace them")
        try:
            for name, folder, _ in found:
                if (target / name).exists():
                    shutil.rmtree(target / name)
                files = _copy(folder, target / name)
                err_console.print(
                    f"installed {target / name} ({files} file{'s' if files != 1 else ''})", highlight=False
                )
        except OSError as exc:
            raise UserError(f"--target {target}: cannot write: {exc.strerror}") from None
    console.print(f"{len(found)} skills in {target}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `skills` group."""
    app.add_typer(skills_app, name="skills")
