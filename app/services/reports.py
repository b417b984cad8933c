"""The report page and the model comparison: read a finished job (or a model's jobs) and shape its numbers for
display, written by qaas.contract.formatting in the page's notation. Pure Python: the charts are bar geometry
computed here and drawn by app/templates/_charts.html, so the pages need no JavaScript and load nothing from
anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.models import Job, Model
from app.services.charts import Chart, Line, Rect, Text, legend, nice_scale, tick_label
from app.services.jobs import get_job
from app.services.models import get_model
from app.services.pagination import paginate
from qaas.contract.formatting import (
    PAGE,
    backend_table,
    finite,
    headline,
    latency_table,
    worst_layers,
)
from qaas.contract.metrics import JobMetrics, LatencyRow, LayerError, Percentiles
from qaas.contract.vocab import JobStatus

MAX_LAYER_BARS = 40  # a chart of hundreds of layers helps nobody: the worst ones are the ones to act on
# Per-layer SQNR bands, below what the weights alone reach (per-channel int8 weights ~48 dB, per-tensor
# 34-39 dB: docs/engine-notes.md#per-channel-and-per-tensor-weights).
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


# --- the metrics document, read for the page --------------------------------------------------------------

REQUIRED_PARTS = frozenset(name for name, field in JobMetrics.model_fields.items() if field.is_required())
MAX_PROBLEMS = 10  # a document with thousands of bad layers needs a few lines, not thousands


def read_metrics(data: object) -> tuple[JobMetrics | None, list[str]]:
    """The stored document, typed, and what of it could not be read, one line per problem.

    The worker stores only documents that validate (workers/tasks.py), but a row written before the contract
    must not turn the page into a 500: an optional part that does not validate is left out and named; when a
    required part (size, latency, fidelity) does not, the page shows no numbers and says why."""
    try:
        return JobMetrics.model_validate(data), []
    except ValidationError as error:
        problems = _problems(error)
        broken = {item["loc"][0] for item in error.errors() if item["loc"]}
    if not isinstance(data, dict) or not broken or broken & REQUIRED_PARTS:
        return None, problems
    try:
        return JobMetrics.model_validate({k: v for k, v in data.items() if k not in broken}), problems
    except ValidationError:  # only a document-wide check (JobMetrics has none today) could refuse it now
        return None, problems


def _problems(error: ValidationError) -> list[str]:
    lines = [
        f"{'.'.join(['metrics', *(str(part) for part in item['loc'])])}: {item['msg']}"
        for item in error.errors(include_url=False)
    ]
    more = len(lines) - MAX_PROBLEMS
    return lines[:MAX_PROBLEMS] + ([f"and {more} more"] if more > 0 else [])


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects as (dotted key, cell) rows, in their order: a readable table of a config or manifest."""
    if not isinstance(data, dict):
        return [(prefix or "value", PAGE.cell(data))] if data is not None else []
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name))
        else:
            rows.append((name, PAGE.cell(value)))
    return rows


# --- the charts (geometry primitives in app.services.charts) ---------------------------------------------

SERIES = (("fp32 (as uploaded)", "bar-fp32"), ("int8", "bar-int8"), ("fp32 compiled like int8", "bar-same"))


def _bars(row: LatencyRow) -> list[Percentiles | None]:
    """The row's percentiles in SERIES order."""
    return [row.fp32_ms, row.int8_ms, row.fp32_same_build_ms]


def latency_chart(rows: Sequence[LatencyRow]) -> Chart | None:
    """Grouped bars, one panel per batch size with its own scale (batch 1 and batch 64 differ by orders of
    magnitude): p50 bars, a p95 whisker, the value on each bar and the speedup above each panel."""
    if not rows:
        return None
    series = SERIES if any(row.fp32_same_build_ms for row in rows) else SERIES[:2]
    # Panels share about 1000 user units, so that one or two batch sizes do not make a thumbnail.
    axis_w, top, plot_h = 56.0, 76.0, 210.0
    panel_w = max(170.0, min(320.0, 940.0 / len(rows)))
    base = top + plot_h
    chart = Chart(
        "p50 latency, fp32 against int8, per batch size", axis_w + len(rows) * panel_w + 8, base + 58
    )
    legend(chart, list(series), axis_w, 18)
    chart.texts.append(Text(16, top + plot_h / 2, "latency p50 (ms)", "axis-title", vertical=True))
    chart.texts.append(Text(axis_w + len(rows) * panel_w / 2, base + 50, "batch size", "axis-title"))
    for i, row in enumerate(rows):
        x0 = axis_w + i * panel_w + 40
        x1 = axis_w + (i + 1) * panel_w - 14
        values = [
            (finite(p.p50) if p else None, finite(p.p95) if p else None, label, css)
            for p, (label, css) in zip(_bars(row), series, strict=False)
        ]
        _low, high, ticks = nice_scale(0, max(max(p50 or 0, p95 or 0) for p50, p95, _l, _c in values))

        def y(v: float, high: float = high) -> float:
            return round(base - v / high * plot_h, 1)

        for t in ticks:
            chart.lines.append(Line(x0, y(t), x1, y(t), "grid" if t else "axis"))
            chart.texts.append(Text(x0 - 5, y(t) + 4, tick_label(t), "tick", "end"))
        slot = (x1 - x0) / len(values)
        bar_w = min(52.0, slot * 0.66)
        for j, (p50, p95, label, css) in enumerate(values):
            if p50 is None:
                continue
            bx = round(x0 + j * slot + (slot - bar_w) / 2, 1)
            cx = round(bx + bar_w / 2, 1)
            title = f"{label}, batch {row.batch_size}: p50 {PAGE.ms(p50)} ms, p95 {PAGE.ms(p95)} ms"
            chart.rects.append(Rect(bx, y(p50), round(bar_w, 1), round(base - y(p50), 1), css, title))
            tip = p50
            if p95 is not None and p95 > p50:
                chart.lines.append(Line(cx, y(p50), cx, y(p95), "whisker"))
                chart.lines.append(Line(cx - 5, y(p95), cx + 5, y(p95), "whisker"))
                tip = p95
            chart.texts.append(Text(cx, y(tip) - 6, PAGE.ms(p50), "value"))
        middle = round((x0 + x1) / 2, 1)
        chart.texts.append(Text(middle, base + 20, str(row.batch_size), "category"))
        speedup = finite(row.speedup)
        if speedup is not None:
            css = "speedup good" if speedup >= 1 else "speedup bad"
            chart.texts.append(Text(middle, top - 26, f"int8 {PAGE.change(speedup)}", css))
    return chart


def _shorten(text: str, limit: int = 40) -> str:
    # Keep both ends: "encoder.layer.11.attention.output.dense" needs its index and its last parts.
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[-(limit - 1 - head) :]


def layer_chart(worst: Sequence[LayerError]) -> Chart | None:
    """Horizontal bars of per-layer SQNR (`worst_layers`, worst first), coloured by band; None without any."""
    rows = worst[:MAX_LAYER_BARS]
    if not rows:
        return None
    values = [finite(r.sqnr_db) for r in rows]
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
        label = f"{row.name} ({row.type})" if row.type else row.name
        title = f"{label}: {PAGE.db(value)}"
        short = f"{_shorten(row.name)} ({_shorten(row.type, 12)})" if row.type else _shorten(row.name)
        chart.texts.append(Text(label_w, cy + 4, short, "layer-name", "end", title=title))
        if value is None:
            chart.texts.append(Text(x(0) + 6, cy + 4, "n/a", "value", "start"))
            continue
        css = "bar-low" if value < LOW_SQNR_DB else "bar-fair" if value < FAIR_SQNR_DB else "bar-good"
        left, right = sorted((x(0), x(value)))
        chart.rects.append(Rect(left, round(cy - 8, 1), round(right - left, 1), 16, css, title))
        chart.texts.append(Text(right + 6, cy + 4, PAGE.db(value), "value", "start"))
    return chart


# --- the page -------------------------------------------------------------------------------------------------


def _dumped(part: BaseModel | None) -> dict[str, Any]:
    """A part of the document as the worker wrote it (its keys only, extra ones included), or {}."""
    return part.model_dump(mode="json") if part is not None else {}


def _numbers(metrics: JobMetrics) -> dict[str, Any]:
    """The page's parts drawn from the metrics: cards, charts, tables."""
    latency_header, latency_rows = latency_table(metrics, PAGE)
    backend_header, backend_rows = backend_table(metrics, PAGE)
    worst, layers = worst_layers(metrics), metrics.layers
    return {
        "cards": headline(metrics, PAGE),
        "warnings": metrics.warnings,
        "latency_chart": latency_chart(metrics.latency),
        "latency_header": latency_header,
        "latency_rows": latency_rows,
        "latency_threads": metrics.latency[0].threads if metrics.latency else None,
        "layer_chart": layer_chart(worst),
        "layer_count": len(worst),
        "layer_chart_limit": MAX_LAYER_BARS,
        "layers_quantized": PAGE.cell(layers.quantized if layers else None),
        "layers_float": PAGE.cell(layers.float if layers else None),
        "fidelity": flatten(_dumped(metrics.fidelity)),
        "verification": metrics.verification,
        "accuracy": flatten(_dumped(metrics.accuracy)),
        "size": flatten(_dumped(metrics.size)),
        "environment": _dumped(metrics.environment),
        "backend_header": backend_header,
        "backend_rows": backend_rows,
        "backend_choice": metrics.backend_choice,
    }


def report_context(job: Job) -> dict[str, Any]:
    """Everything the report page shows: the job's own parts, and its metrics document's where it reads."""
    assert job.metrics is not None
    metrics, unreadable = read_metrics(job.metrics.data)
    context = {
        "metrics": metrics,
        "unreadable": unreadable,
        "config": flatten(job.config or {}),
        "manifest": flatten(job.manifest or {}),
        "runner": flatten(job.runner or {}),
    }
    return context | (_numbers(metrics) if metrics is not None else {})


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
            if job.status == JobStatus.SUCCEEDED
            and job.metrics is not None
            and (value := finite(getattr(job.metrics, column))) is not None
        }
        top = max(scored.values(), default=None)
        winners = {job_id for job_id, value in scored.items() if value == top}
        if top is not None and len(winners) < len(scored):
            best[column] = winners
    return best
