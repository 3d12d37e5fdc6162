"""What every router settings model shares: strict, frozen models and errors at a field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["Strict", "field_error"]


def field_error(loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    """A validation error at `loc` (relative to the model being validated) saying `message`."""
    # PydanticCustomError keeps the message as is; spec.py and loader.py add file:line.
    return InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)


class Strict(BaseModel):
    """Unknown fields are errors; a settings object never changes once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)
