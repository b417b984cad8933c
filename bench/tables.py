"""Tables as aligned text and as markdown, number formatting, and the host facts that explain the numbers."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from qaas.contract.formatting import TEXT

__all__ = ["FAILED", "MISSING", "Table", "Target", "environment", "fmt", "markdown_header", "ratio", "times"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
MISSING = TEXT.missing  # "-"
FAILED = "failed"


def fmt(value: Any, digits: int = 2) -> str:
    """A cell: numbers with `digits` decimals (three significant digits below 1), None as '-'."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return MISSING
        if 0 < abs(value) < 1 and digits <= 2:
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    return str(value)


def times(value: float | None, digits: int = 2) -> str:
    """A ratio as '3.21x', or '-' when there is none: as the CLIs write it (qaas.contract.formatting)."""
    return TEXT.times(value, digits)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


@dataclass
class Table:
    """A titled table; cells are strings (use fmt), `notes` are printed under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def _numeric(self, index: int) -> bool:
        cells = [row[index] for row in self.rows if row[index] not in (MISSING, FAILED)]
        return bool(cells) and all(_looks_numeric(c) for c in cells)

    def text(self) -> str:
        widths = [max([len(c)] + [len(r[i]) for r in self.rows]) for i, c in enumerate(self.columns)]
        right = [self._numeric(i) for i in range(len(self.columns))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
            ).rstrip()

        out = [self.title, "=" * len(self.title), line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        right = [self._numeric(i) for i in range(len(self.columns))]
        out = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        out.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)


def _looks_numeric(cell: str) -> bool:
    """'1,234.5', '3.20x', '32 (bench)', '3.50 (fbgemm)': a number, maybe with a unit or a remark after it."""
    try:
        float(cell.split(" ")[0].replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


@dataclass
class Target:
    """One of the issue's targets, the value measured and whether it is met."""

    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured (the row says why)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(threads: int) -> dict[str, str]:
    """{date, cpu, isa, cores, torch, torchao, onnxruntime, threads, load}: the facts that explain the numbers."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "isa": ", ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS),
        "logical cpus": str(os.cpu_count() or 1),
        "torch": _version("torch"),
        "torchao": _version("torchao"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
        "threads": str(threads),
        "load average (1, 5, 15 min) at start": ", ".join(f"{x:.2f}" for x in load),
    }


def markdown_header(env: dict[str, str], command: str) -> str:
    lines = ["# qaas benchmark results", "", f"Generated by `{command}`.", ""]
    lines += [f"- **{key}**: {value}" for key, value in env.items()]
    return "\n".join(lines)
