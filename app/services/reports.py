"""The report page and the model comparison: read a finished job (or a model's jobs) and shape its numbers for
display. Pure Python: the charts are bar geometry computed here and drawn by app/templates/_charts.html, so the
pages need no JavaScript and load nothing from anywhere."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.models import Job, Model
from app.services.charts import Chart, Line, Rect, Text, legend, nice_scale, tick_label
from app.services.jobs import get_job
from app.services.models import get_model
from app.services.pagination import paginate

MAX_LAYER_BARS = 40  # a chart of hundreds of layers helps nobody: the worst ones are the ones to act on
# Per-layer SQNR bands (ENGINE_NOTES.md: per-channel int8 weights reach ~48 dB, per-tensor 34-39 dB).
LOW_SQNR_DB, FAIR_SQNR_DB = 20.0, 30.0


# --- reading --------------------------------------------------------------------------------------------------


def get_reported_job(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """The job, once it has metrics; `report_not_found` before that."""
    job = get_job(session, job_id, tenant_id=tenant_id)
    if job.metrics is None:
        raise NotFound(
            f"job {job_id} has no report yet (status {job.status}): poll the job", code="report_not_found"
        )
    return job


def model_jobs(
    session: Session, model_id: str, *, tenant_id: str, limit: int, cursor: str | None
) -> tuple[Model, list[Job], str | None]:
    """A model and one page of its jobs, newest first (metrics come with them: Job.metrics is selectin)."""
    model = get_model(session, model_id, tenant_id=tenant_id)
    query = select(Job).where(Job.model_id == model_id, Job.tenant_id == tenant_id)
    rows, next_cursor = paginate(session, query, Job.id, limit, cursor)
    return model, rows, next_cursor


# --- formatting (also the pages' Jinja filters) ---------------------------------------------------------------


def number(value: Any) -> float | None:
    """A finite number from untrusted JSON, else None (bools, strings, NaN and infinities are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def section(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """metrics[key] when it is an object, else {}: the document comes from a sandboxed runner."""
    value = metrics.get(key)
    return value if isinstance(value, dict) else {}


def fmt_times(value: Any) -> str:
    x = number(value)
    return "—" if x is None else f"{x:.2f}×"


def fmt_db(value: Any) -> str:
    x = number(value)
    return "—" if x is None else f"{x:.1f} dB"


def fmt_cosine(value: Any) -> str:
    x = number(value)
    return "—" if x is None else f"{x:.6f}"


def fmt_pp(value: Any) -> str:
    """An accuracy difference in percentage points, signed."""
    x = number(value)
    return "—" if x is None else f"{x:+.2f} pp"


def fmt_percent(value: Any) -> str:
    x = number(value)
    return "—" if x is None else f"{x:.2f}%"


def fmt_ms(value: Any) -> str:
    x = number(value)
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def fmt_bytes(value: Any) -> str:
    x = number(value)
    if x is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(x) < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    raise AssertionError("unreachable")


def fmt_value(value: Any) -> str:
    """One table cell: text as is, numbers compact, lists of scalars joined, anything else as JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(fmt_value(v) for v in value) or "[]"
    return json.dumps(value, sort_keys=True, default=str)


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects as (dotted key, cell) rows, in their order: a readable table of a config or manifest."""
    if not isinstance(data, dict):
        return [(prefix or "value", fmt_value(data))] if data is not None else []
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name))
        else:
            rows.append((name, fmt_value(value)))
    return rows


# --- the charts (geometry primitives in app.services.charts) ---------------------------------------------


def _p(row: dict[str, Any], key: str, which: str) -> float | None:
    value = row.get(key)
    return number(value.get(which)) if isinstance(value, dict) else None


def latency_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = metrics.get("latency")
    return [
        r
        for r in (rows if isinstance(rows, list) else [])
        if isinstance(r, dict) and _p(r, "fp32_ms", "p50") is not None and _p(r, "int8_ms", "p50") is not None
    ]


def headline_row(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The latency row the headline speedup comes from: batch 1, else the first measured (as JobMetrics)."""
    rows = latency_rows(metrics)
    return next((r for r in rows if r.get("batch_size") == 1), rows[0] if rows else None)


def latency_chart(metrics: dict[str, Any]) -> Chart | None:
    """Grouped bars, one panel per batch size with its own scale (batch 1 and batch 64 differ by orders of
    magnitude): p50 bars, a p95 whisker, the value on each bar and the speedup above each panel."""
    rows = latency_rows(metrics)
    if not rows:
        return None
    series = [("fp32_ms", "fp32 (as uploaded)", "bar-fp32"), ("int8_ms", "int8", "bar-int8")]
    if any(_p(r, "fp32_same_build_ms", "p50") is not None for r in rows):
        series.append(("fp32_same_build_ms", "fp32 compiled like int8", "bar-same"))
    # Panels share about 1000 user units, so that one or two batch sizes do not make a thumbnail.
    axis_w, top, plot_h = 56.0, 76.0, 210.0
    panel_w = max(170.0, min(320.0, 940.0 / len(rows)))
    base = top + plot_h
    chart = Chart(
        "p50 latency, fp32 against int8, per batch size", axis_w + len(rows) * panel_w + 8, base + 58
    )
    legend(chart, [(label, css) for _key, label, css in series], axis_w, 18)
    chart.texts.append(Text(16, top + plot_h / 2, "latency p50 (ms)", "axis-title", vertical=True))
    chart.texts.append(Text(axis_w + len(rows) * panel_w / 2, base + 50, "batch size", "axis-title"))
    for i, row in enumerate(rows):
        x0 = axis_w + i * panel_w + 40
        x1 = axis_w + (i + 1) * panel_w - 14
        values = [(_p(row, key, "p50"), _p(row, key, "p95"), label, css) for key, label, css in series]
        _low, high, ticks = nice_scale(0, max(max(p50 or 0, p95 or 0) for p50, p95, _l, _c in values))

        def y(v: float, high: float = high) -> float:
            return round(base - v / high * plot_h, 1)

        for t in ticks:
            chart.lines.append(Line(x0, y(t), x1, y(t), "grid" if t else "axis"))
            chart.texts.append(Text(x0 - 5, y(t) + 4, tick_label(t), "tick", "end"))
        slot = (x1 - x0) / len(values)
        bar_w = min(52.0, slot * 0.66)
        batch = row.get("batch_size")
        for j, (p50, p95, label, css) in enumerate(values):
            if p50 is None:
                continue
            bx = round(x0 + j * slot + (slot - bar_w) / 2, 1)
            cx = round(bx + bar_w / 2, 1)
            title = f"{label}, batch {batch}: p50 {fmt_ms(p50)} ms, p95 {fmt_ms(p95)} ms"
            chart.rects.append(Rect(bx, y(p50), round(bar_w, 1), round(base - y(p50), 1), css, title))
            tip = p50
            if p95 is not None and p95 > p50:
                chart.lines.append(Line(cx, y(p50), cx, y(p95), "whisker"))
                chart.lines.append(Line(cx - 5, y(p95), cx + 5, y(p95), "whisker"))
                tip = p95
            chart.texts.append(Text(cx, y(tip) - 6, fmt_ms(p50), "value"))
        middle = round((x0 + x1) / 2, 1)
        chart.texts.append(Text(middle, base + 20, str(batch), "category"))
        speedup = number(row.get("speedup"))
        if speedup is not None:
            word, css = ("faster", "speedup good") if speedup >= 1 else ("slower", "speedup bad")
            chart.texts.append(Text(middle, top - 26, f"int8 {fmt_times(speedup)} {word}", css))
    return chart


def worst_layers(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.layers.per_layer, worst SQNR first; layers without a number last."""
    per_layer = section(metrics, "layers").get("per_layer")
    rows = [r for r in (per_layer if isinstance(per_layer, list) else []) if isinstance(r, dict)]
    return sorted(rows, key=lambda r: (number(r.get("sqnr_db")) is None, number(r.get("sqnr_db")) or 0.0))


def _shorten(text: str, limit: int = 40) -> str:
    # Keep both ends: "encoder.layer.11.attention.output.dense" needs its index and its last parts.
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[-(limit - 1 - head) :]


def layer_chart(metrics: dict[str, Any]) -> Chart | None:
    """Horizontal bars of per-layer SQNR, worst first, coloured by band; None without per-layer data."""
    rows = worst_layers(metrics)[:MAX_LAYER_BARS]
    if not rows:
        return None
    values = [number(r.get("sqnr_db")) for r in rows]
    known = [v for v in values if v is not None]
    low, high, ticks = nice_scale(min(known, default=0.0), max(known, default=1.0), 5)
    label_w, plot_w, top, row_h = 350.0, 440.0, 30.0, 24.0
    x0, bottom = label_w + 12, top + len(rows) * row_h
    chart = Chart("per-layer SQNR, worst first", x0 + plot_w + 72, bottom + 48)
    legend(
        chart,
        [
            (f"< {LOW_SQNR_DB:g} dB", "bar-low"),
            (f"{LOW_SQNR_DB:g}–{FAIR_SQNR_DB:g} dB", "bar-fair"),
            (f"≥ {FAIR_SQNR_DB:g} dB", "bar-good"),
        ],
        x0,
        16,
    )

    def x(v: float) -> float:
        return round(x0 + (v - low) / (high - low) * plot_w, 1)

    for t in ticks:
        chart.lines.append(Line(x(t), top, x(t), bottom, "axis" if t == 0 else "grid"))
        chart.texts.append(Text(x(t), bottom + 16, tick_label(t), "tick"))
    chart.texts.append(Text(x0 + plot_w / 2, bottom + 40, "SQNR (dB), higher is more faithful", "axis-title"))
    for i, (row, value) in enumerate(zip(rows, values, strict=True)):
        cy = top + i * row_h + row_h / 2
        name, kind = str(row.get("name", "?")), str(row.get("type", ""))
        label = f"{name} ({kind})" if kind else name
        title = f"{label}: {fmt_db(value)}"
        short = f"{_shorten(name)} ({_shorten(kind, 12)})" if kind else _shorten(name)
        chart.texts.append(Text(label_w, cy + 4, short, "layer-name", "end", title=title))
        if value is None:
            chart.texts.append(Text(x(0) + 6, cy + 4, "n/a", "value", "start"))
            continue
        css = "bar-low" if value < LOW_SQNR_DB else "bar-fair" if value < FAIR_SQNR_DB else "bar-good"
        left, right = sorted((x(0), x(value)))
        chart.rects.append(Rect(left, round(cy - 8, 1), round(right - left, 1), 16, css, title))
        chart.texts.append(Text(right + 6, cy + 4, fmt_db(value), "value", "start"))
    return chart


# --- the page's other parts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    label: str
    value: str
    detail: str
    tone: str = ""  # "good", "bad" or "" (neutral)


def headline_cards(metrics: dict[str, Any]) -> list[Card]:
    """Size ×, speedup × (batch 1 or the first batch size), accuracy Δ, fidelity: what a reader wants first."""
    cards = []
    size = section(metrics, "size")
    ratio = number(size.get("ratio"))
    if ratio is not None:
        detail = f"fp32 {fmt_bytes(size.get('fp32_bytes'))} → int8 {fmt_bytes(size.get('int8_bytes'))}"
        cards.append(Card("Smaller", fmt_times(ratio), detail, "good" if ratio > 1 else "bad"))
    row = headline_row(metrics)
    speedup = number(row.get("speedup")) if row else None
    if row is not None and speedup is not None:
        detail = (
            f"at batch {row.get('batch_size')}: p50 {fmt_ms(_p(row, 'fp32_ms', 'p50'))} ms → "
            f"{fmt_ms(_p(row, 'int8_ms', 'p50'))} ms"
        )
        same = number(row.get("speedup_same_build"))
        if same is not None:
            detail += f"; {fmt_times(same)} against fp32 compiled the same way"
        cards.append(
            Card(
                "Faster" if speedup >= 1 else "Slower",
                fmt_times(speedup),
                detail,
                "good" if speedup >= 1 else "bad",
            )
        )
    accuracy = section(metrics, "accuracy")
    delta = number(accuracy.get("delta"))
    if delta is not None:
        detail = f"top-1 {fmt_percent(accuracy.get('fp32'))} → {fmt_percent(accuracy.get('int8'))}"
        cards.append(
            Card("Accuracy", fmt_pp(delta), detail, "bad" if delta < -1 else "good" if delta >= 0 else "")
        )
    fidelity = section(metrics, "fidelity")
    cosine, sqnr = number(fidelity.get("cosine")), number(fidelity.get("sqnr_db"))
    if cosine is not None:
        cards.append(Card("Output cosine", fmt_cosine(cosine), f"SQNR {fmt_db(sqnr)} against fp32"))
    elif sqnr is not None:
        cards.append(Card("Output SQNR", fmt_db(sqnr), "int8 against fp32 outputs"))
    return cards


def backend_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """metrics.backends (auto mode) as (columns, rows): a {name: numbers} map or a list of objects."""
    backends = metrics.get("backends")
    if isinstance(backends, dict):
        entries = [(str(name), v if isinstance(v, dict) else {"value": v}) for name, v in backends.items()]
    elif isinstance(backends, list):
        entries = [
            (str(b.get("backend", b.get("name", i + 1))), b)
            for i, b in enumerate(backends)
            if isinstance(b, dict)
        ]
    else:
        return [], []
    flat = [
        (name, dict(flatten({k: v for k, v in d.items() if k not in ("backend", "name")})))
        for name, d in entries
    ]
    columns = list(dict.fromkeys(key for _name, cells in flat for key in cells))
    return ["backend", *columns], [[name, *(cells.get(c, "—") for c in columns)] for name, cells in flat]


def _environment(metrics: dict[str, Any]) -> dict[str, Any]:
    env = section(metrics, "environment")
    isa = env.get("isa")
    return env | {"isa": [str(f) for f in isa] if isinstance(isa, list) else [str(isa)] if isa else []}


def report_context(job: Job) -> dict[str, Any]:
    """Everything the report page shows, computed from the job's metrics document."""
    assert job.metrics is not None
    metrics = job.metrics.data if isinstance(job.metrics.data, dict) else {}
    layers = section(metrics, "layers")
    warnings = metrics.get("warnings")
    choice = metrics.get("backend_choice")
    columns, rows = backend_table(metrics)
    return {
        "cards": headline_cards(metrics),
        "warnings": [str(w) for w in warnings] if isinstance(warnings, list) else [],
        "latency_chart": latency_chart(metrics),
        "latency_rows": latency_rows(metrics),
        "layer_chart": layer_chart(metrics),
        "layer_count": len(worst_layers(metrics)),
        "layer_chart_limit": MAX_LAYER_BARS,
        "layers": layers,
        "fidelity": flatten(section(metrics, "fidelity")),
        "verification": section(metrics, "verification"),
        "accuracy": flatten(section(metrics, "accuracy")),
        "size": flatten(section(metrics, "size")),
        "environment": _environment(metrics),
        "backend_columns": columns,
        "backend_rows": rows,
        "backend_choice": choice if isinstance(choice, str) else None,
        "backend_choice_rows": flatten(choice) if isinstance(choice, dict) else [],
        "config": flatten(job.config or {}),
        "manifest": flatten(job.manifest or {}),
        "runner": flatten(job.runner or {}),
    }


# --- the model's page -----------------------------------------------------------------------------------------

COMPARED = ("size_ratio", "speedup", "sqnr_db", "cosine", "accuracy_delta")


def best_jobs(jobs: list[Job]) -> dict[str, set[str]]:
    """For each compared column, the ids of the succeeded jobs with the highest value; none when every job
    that has a value shares it (nothing to tell apart)."""
    best = {}
    for column in COMPARED:
        scored = {
            job.id: value
            for job in jobs
            if job.status == "succeeded"
            and job.metrics is not None
            and (value := number(getattr(job.metrics, column))) is not None
        }
        top = max(scored.values(), default=None)
        winners = {job_id for job_id, value in scored.items() if value == top}
        if top is not None and len(winners) < len(scored):
            best[column] = winners
    return best
