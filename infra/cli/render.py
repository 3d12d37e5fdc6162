"""`gpufleet` commands for: render. (Commands are added by the issue that owns this noun.)"""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
