"""Bar charts as geometry: a Chart is a scene of rectangles, lines and texts in SVG user units, computed in
Python and drawn by the `chart` macro of app/templates/_charts.html (no charting script, nothing fetched)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str = ""


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    css: str


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    css: str
    anchor: str = "middle"
    vertical: bool = False
    title: str = ""


@dataclass
class Chart:
    """An SVG scene in user units: the template draws these primitives and nothing else."""

    title: str
    width: float
    height: float
    rects: list[Rect] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


def nice_scale(low: float, high: float, count: int = 4) -> tuple[float, float, list[float]]:
    """Round axis bounds and about `count` ticks on a 1-2-2.5-5 step that cover [low, high]."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high - low <= 0:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = [round(i * step, 10) for i in range(first, last + 1)]
    return ticks[0], ticks[-1], ticks


def tick_label(value: float) -> str:
    return f"{value:g}"


def legend(chart: Chart, items: list[tuple[str, str]], x: float, y: float) -> None:
    for label, css in items:
        chart.rects.append(Rect(x, y - 10, 12, 12, f"{css} swatch"))
        chart.texts.append(Text(x + 17, y, label, "legend", "start"))
        x += 30 + 7 * len(label)
