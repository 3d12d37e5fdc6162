"""The fault-injection soak (bench/soak.py) in its ~90 s version: real replica processes, real faults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _load_soak():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpufleet_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_90_second_soak_has_no_hang_no_loss_no_poison_ejection_and_no_5xx_or_traceback_from_bad_input(
    monkeypatch,
) -> None:
    if not SOAK.exists():
        pytest.skip("bench/soak.py is not in this checkout")
    soak_mod = _load_soak()
    lines: list[str] = []
    soak = soak_mod.Soak(seconds=90, rate=8, hang_s=30, idle=2000, on_line=lines.append)
    soak.run()
    by = {p.name: p for p in soak.phases}
    assert [p.name for p in soak.phases] == [name for name, _ in soak_mod.PHASES]
    report = "\n".join(lines[-40:])
    assert sum(p.hangs for p in soak.phases) == 0, report
    assert sum(p.lost for p in soak.phases) == 0, report
    assert by["poison"].poison_sent > 0 and by["poison"].ejected == 0, report
    assert by["poison"].poison_answered_4xx_5xx == by["poison"].poison_sent  # each poison got its own error
    assert by["bad_input"].bad_input_cases >= 2 * 93
    assert by["bad_input"].bad_input_5xx == 0 and by["bad_input"].bad_input_wrong == 0, by["bad_input"].errors
    assert soak.tracebacks == 0
    assert soak.cross_tenant_hits == 0
    assert by["idle"].idle_open >= 2000
    assert all(p.ok > 0 for p in soak.phases), report  # service continued through every fault
