"""The metrics document (qaas.contract.metrics) in words and numbers, written once for every reader: the report
page, `qaas submit` and `qaas jobs show`, `qaas quantize`, and bench/. Stdlib and the contract only: it
returns strings and rows of strings; drawing them (HTML, a terminal, markdown) is the caller's.

Two notations write the same numbers: `TEXT` in ASCII for terminals and markdown, `PAGE` for the report
page (a multiplication sign, an arrow, an em dash for a missing value).

    TEXT.times(3.971) == "3.97x"; PAGE.times(3.971) == "3.97×"; TEXT.change(0.8) == "0.80x slower"
    header, rows = summary_table(metrics)      # what both CLIs print
    print("\\n".join(summary_lines(metrics)))   # the same, aligned, with auto's choice and the warnings
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qaas.contract.metrics import BackendRow, JobMetrics, LatencyRow, LayerError

__all__ = [
    "PAGE",
    "TEXT",
    "Headline",
    "Notation",
    "backend_table",
    "finite",
    "headline",
    "headline_latency",
    "latency_table",
    "summary_lines",
    "summary_table",
    "text_table",
    "worst_layers",
]


def finite(value: object) -> float | None:
    """A finite number, else None: bools, strings, NaN and infinities are not numbers (templates pass anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Notation:
    """How numbers are written; every method takes anything and writes `missing` for what is not a number."""

    times_sign: str = "x"
    arrow: str = "->"
    missing: str = "-"

    def _number(self, value: object, write: Callable[[float], str]) -> str:
        x = finite(value)
        return self.missing if x is None else write(x)

    def times(self, value: object, digits: int = 2) -> str:
        """A ratio: '3.97x'."""
        return self._number(value, lambda x: f"{x:.{digits}f}{self.times_sign}")

    def change(self, ratio: object, better: str = "faster", worse: str = "slower") -> str:
        """A ratio fp32 / int8 as measured, with its direction: '4.02x faster', '0.80x slower'."""
        return self._number(ratio, lambda x: f"{self.times(x)} {better if x >= 1 else worse}")

    def db(self, value: object) -> str:
        return self._number(value, lambda x: f"{x:.1f} dB")

    def cosine(self, value: object) -> str:
        return self._number(value, lambda x: f"{x:.6f}")

    def pp(self, value: object) -> str:
        """An accuracy difference in percentage points, signed: '-0.42 pp'."""
        return self._number(value, lambda x: f"{x:+.2f} pp")

    def percent(self, value: object) -> str:
        return self._number(value, lambda x: f"{x:.2f}%")

    def ms(self, value: object) -> str:
        """Milliseconds to three significant digits or so, without the unit: '88.3', '3.10', '0.412'."""
        return self._number(value, _ms)

    def bytes(self, value: object) -> str:
        """Decimal units: '46.8 MB', '512 B'."""
        return self._number(value, _bytes)

    def cell(self, value: object) -> str:
        """Any JSON value as one cell: text as is, numbers compact, lists of scalars joined, the rest as JSON."""
        if value is None:
            return self.missing
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, str | int):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            return ", ".join(self.cell(v) for v in value) or "[]"
        return json.dumps(value, sort_keys=True, default=str)


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _bytes(x: float) -> str:
    for unit in ("B", "kB", "MB"):
        if abs(x) < 1000:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


TEXT = Notation()
PAGE = Notation(times_sign="×", arrow="→", missing="—")


# --- the headline ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """One headline number: what it is, the number, where it comes from, and whether it is good news."""

    label: str
    value: str
    detail: str
    tone: str = ""  # "good", "bad" or "" (neutral)


def headline_latency(metrics: JobMetrics) -> LatencyRow | None:
    """The row the headline speedup comes from: batch 1, else the first batch size measured (as the job's
    `speedup` column is defined)."""
    return next((row for row in metrics.latency if row.batch_size == 1), metrics.first_latency())


def headline(metrics: JobMetrics, n: Notation = TEXT) -> list[Headline]:
    """Size ×, speedup ×, accuracy Δ, output cosine: what a reader wants first."""
    size, fidelity = metrics.size, metrics.fidelity
    ratio = finite(size.ratio)
    cards = [
        Headline(
            "Smaller",
            n.times(ratio),
            f"fp32 {n.bytes(size.fp32_bytes)} {n.arrow} int8 {n.bytes(size.int8_bytes)}",
            "good" if ratio is not None and ratio > 1 else "bad",
        )
    ]
    row = headline_latency(metrics)
    speedup = finite(row.speedup) if row else None
    if row is not None and speedup is not None:
        detail = (
            f"at batch {row.batch_size}: p50 {n.ms(row.fp32_ms.p50)} ms {n.arrow} {n.ms(row.int8_ms.p50)} ms"
        )
        if finite(row.speedup_same_build) is not None:
            detail += f"; {n.times(row.speedup_same_build)} against fp32 compiled the same way"
        faster = speedup >= 1
        cards.append(
            Headline("Faster" if faster else "Slower", n.times(speedup), detail, "good" if faster else "bad")
        )
    accuracy = metrics.accuracy
    delta = finite(accuracy.delta) if accuracy else None
    if accuracy is not None and delta is not None:
        detail = f"top-1 {n.percent(accuracy.fp32)} {n.arrow} {n.percent(accuracy.int8)}"
        tone = "bad" if delta < -1 else "good" if delta >= 0 else ""
        cards.append(Headline("Accuracy", n.pp(delta), detail, tone))
    cards.append(
        Headline("Output cosine", n.cosine(fidelity.cosine), f"SQNR {n.db(fidelity.sqnr_db)} against fp32")
    )
    return cards


# --- tables ---------------------------------------------------------------------------------------------------

Rows = tuple[list[str], list[list[str]]]  # (header, rows)


def latency_table(metrics: JobMetrics, n: Notation = TEXT) -> Rows:
    """Every batch size: p50 / p95 of both models, the speedups (the report page's table)."""
    header = [
        "batch",
        "threads",
        "fp32 p50 / p95 (ms)",
        "int8 p50 / p95 (ms)",
        "speedup",
        "fp32 same build p50 (ms)",
        "speedup same build",
    ]
    rows = [
        [
            str(row.batch_size),
            str(row.threads),
            f"{n.ms(row.fp32_ms.p50)} / {n.ms(row.fp32_ms.p95)}",
            f"{n.ms(row.int8_ms.p50)} / {n.ms(row.int8_ms.p95)}",
            n.times(row.speedup),
            n.ms(row.fp32_same_build_ms.p50 if row.fp32_same_build_ms else None),
            n.times(row.speedup_same_build),
        ]
        for row in metrics.latency
    ]
    return header, rows


def summary_table(metrics: JobMetrics, n: Notation = TEXT) -> Rows:
    """Size, latency per batch size, fidelity and accuracy, fp32 against int8 (what the CLIs print). The last
    column, int8 against fp32 compiled the way the artifact is, appears when the job measured it."""
    size, fidelity, accuracy = metrics.size, metrics.fidelity, metrics.accuracy
    rows = [
        [
            "size",
            n.bytes(size.fp32_bytes),
            n.bytes(size.int8_bytes),
            n.change(size.ratio, "smaller", "larger"),
        ]
    ]
    for row in metrics.latency:
        rows.append(
            [
                f"latency p50, batch {row.batch_size}",
                f"{n.ms(row.fp32_ms.p50)} ms",
                f"{n.ms(row.int8_ms.p50)} ms",
                n.change(row.speedup),
                n.change(row.speedup_same_build) if row.speedup_same_build is not None else "",
            ]
        )
    rows.append(["SQNR (int8 vs fp32)", "", n.db(fidelity.sqnr_db), ""])
    rows.append(["cosine (int8 vs fp32)", "", n.cosine(fidelity.cosine), ""])
    if accuracy is not None:
        rows.append(
            ["top-1 accuracy", n.percent(accuracy.fp32), n.percent(accuracy.int8), n.pp(accuracy.delta)]
        )
    header = ["", "fp32", "int8", "change"]
    if any(row.speedup_same_build is not None for row in metrics.latency):
        header.append("vs fp32 compiled alike")
    return header, [(row + [""])[: len(header)] for row in rows]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """Columns padded to their widest cell; `align` has an "l" or "r" per column (default: the first left,
    the others right, as numbers are)."""
    body = [list(header)] + [list(row) for row in rows]
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=True)
        ).rstrip()
        for row in body
    ]


def summary_lines(metrics: JobMetrics, n: Notation = TEXT) -> list[str]:
    """The summary table as aligned text, then auto's reason for its backend and the warnings."""
    lines = text_table(*summary_table(metrics, n))
    if metrics.backend_choice:
        lines.append(f"auto: {metrics.backend_choice}")
    return lines + [f"warning: {warning}" for warning in metrics.warnings]


def worst_layers(metrics: JobMetrics) -> list[LayerError]:
    """The per-layer SQNR, worst first; a layer without a finite number last."""
    layers = metrics.layers.per_layer if metrics.layers and metrics.layers.per_layer else []
    return sorted(layers, key=lambda layer: (finite(layer.sqnr_db) is None, finite(layer.sqnr_db) or 0.0))


def backend_table(metrics: JobMetrics, n: Notation = TEXT) -> Rows:
    """auto's candidates as (header, rows): one row per backend, its numbers or why it failed; ([], []) for a
    job that did not compare backends."""
    cells = {name: _backend_cells(row, n) for name, row in (metrics.backends or {}).items()}
    if not cells:
        return [], []
    columns = list(dict.fromkeys(key for row in cells.values() for key in row))
    return ["backend", *columns], [
        [name, *(row.get(c, n.missing) for c in columns)] for name, row in cells.items()
    ]


def _backend_cells(row: BackendRow, n: Notation) -> dict[str, str]:
    def error(value: object) -> str:
        if isinstance(value, dict) and "code" in value:
            message = value.get("message")
            return f"{value['code']}: {message}" if message else str(value["code"])
        return n.cell(value)

    formats: dict[str, Callable[[object], str]] = {"int8_ms_p50": n.ms, "cosine": n.cosine, "error": error}
    # As stored: the keys the worker wrote, in order, a newer worker's extra ones included.
    return {key: formats.get(key, n.cell)(value) for key, value in row.model_dump(mode="json").items()}
