"""The benchmark's engine table on one tiny model: it runs end to end and fills its rows with positive numbers.

No timing thresholds: this machine is shared and small; `make bench` measures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.engine_vs_fp32 import Settings, engine_tables, run_case
from bench.models import tiny_cnn_case
from bench.tables import Table

pytestmark = pytest.mark.slow


def _number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("x"))


def test_engine_table_has_positive_rows_for_a_tiny_cnn(tmp_path: Path) -> None:
    settings = Settings(
        quick=True, batch_sizes=(1, 4), budget_s=0.5, min_iterations=3, max_iterations=5, backends=("fbgemm",)
    )
    runs = run_case(tiny_cnn_case(), settings, tmp_path, log=lambda _message: None)

    assert [run.error for run in runs] == [None]
    latency, sizes = engine_tables(runs, settings)
    assert [row[3] for row in latency.rows] == ["1", "4"]
    for row in latency.rows:
        fp32_ms, int8_ms, speedup = (_number(cell) for cell in row[4:7])
        assert fp32_ms > 0 and int8_ms > 0 and speedup > 0
    (row,) = sizes.rows
    columns = dict(zip(sizes.columns, row, strict=True))
    assert _number(columns["params"]) > 0
    assert _number(columns["file ratio"]) > 1 and _number(columns["weights ratio"]) > 1
    assert _number(columns["SQNR dB"]) > 0
    assert "TinyCNN" in latency.text() and latency.markdown().count("\n| TinyCNN |") == 2


def test_tables_align_text_and_escape_markdown() -> None:
    table = Table("t", ["name", "ms"])
    table.add("a|b", 1.5)
    table.add("longer name", 12.25)

    lines = table.text().splitlines()
    assert lines[2].index("ms") == lines[4].index("1.50") + 2  # numbers are right-aligned
    assert "| a\\|b | 1.50 |" in table.markdown()
    assert "|---|---:|" in table.markdown()
