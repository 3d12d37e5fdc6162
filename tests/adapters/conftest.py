"""Puts the repo root on sys.path so `tests.fakes` imports; moto tests get fake AWS credentials."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.fakes.aws_env import fake_aws_env  # noqa: E402,F401 - an autouse fixture
