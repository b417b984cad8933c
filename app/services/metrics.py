"""The job metrics of GET /metrics, read from the job table at scrape time: the numbers are the same whichever
API process answers, and they include what every worker process did.

Two queries per scrape, each bounded: queued and running jobs through the status index, and finished jobs
through a window on the primary key (ids sort by creation time, app.core.ids). Finished jobs count when they
finished in the last WINDOW, among those submitted within SUBMITTED_WITHIN (the bound that keeps the scan off
old rows). No label carries a tenant, an object id or text a tenant wrote.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import ColumnElement, and_, case, extract, func, select, union_all
from sqlalchemy.orm import Session

from app.core.ids import first_id_at
from app.models import Job
from app.models.common import utcnow
from qaas.contract.errors import JOB_CODES
from qaas.contract.vocab import ACTIVE as ACTIVE_STATUSES
from qaas.contract.vocab import JobStatus, Mode

WINDOW = timedelta(hours=24)
SUBMITTED_WITHIN = timedelta(days=7)
STATUSES: tuple[str, ...] = tuple(JobStatus)
MODES: tuple[str, ...] = tuple(Mode)
ACTIVE = tuple(sorted(ACTIVE_STATUSES))
# Seconds: jobs take from seconds to QAAS_JOB_TIMEOUT_S (at most a day).
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
# A failed job's error_code comes from the runner, which runs the tenant's model: only qaas's own job codes (the
# catalogue's, docs/errors.md) become a label, anything else is "other", so that a hostile model can neither
# add series nor write into the output.
EXIT_REASONS: frozenset[str] = frozenset(code.value for code in JOB_CODES)
_WINDOW_TEXT = f"finished in the last {WINDOW.total_seconds() / 3600:g} h (submitted within {SUBMITTED_WITHIN.days} days)"


def exit_reason(status: str, error_code: str | None) -> str:
    """succeeded, cancelled, or the failure's code (other when qaas does not know it)."""
    if status != JobStatus.FAILED:
        return status
    return error_code if error_code in EXIT_REASONS else "other"


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "sqlite":
        # Datetimes are text there. A julianday is a double of ~2.5 million days: round off its noise (~0.1 ms),
        # or a 10 s run may land above the 10 s bucket.
        return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)
    return extract("epoch", end - start)


def _recently_finished(now: datetime) -> ColumnElement[bool]:
    # Only finished jobs have a finished_at. No condition on status here: SQLite would pick the status index,
    # which holds every finished job ever, over the primary key's range.
    return and_(Job.id >= first_id_at("job", now - SUBMITTED_WITHIN), Job.finished_at >= now - WINDOW)


def _jobs(session: Session, now: datetime) -> list[Metric]:
    """qaas_jobs and qaas_queue_depth: one GROUP BY."""
    counts = {(status, mode): 0 for status in STATUSES for mode in MODES}
    # Two disjoint sets (a finished job is never active again), each read through its own index: with an OR,
    # SQLite walks the whole status index instead.
    both = union_all(
        select(Job.status, Job.mode).where(Job.status.in_(ACTIVE)),
        select(Job.status, Job.mode).where(_recently_finished(now)),
    ).subquery()
    rows = session.execute(
        select(both.c.status, both.c.mode, func.count()).group_by(both.c.status, both.c.mode)
    )
    for status, mode, count in rows.tuples():
        counts[(status, mode)] = count
    jobs = GaugeMetricFamily(
        "qaas_jobs",
        f"Jobs by status and mode: every queued and running job; succeeded, failed and cancelled ones "
        f"{_WINDOW_TEXT}.",
        labels=["status", "mode"],
    )
    for (status, mode), count in sorted(counts.items()):
        jobs.add_metric([status, mode], count)
    depth = sum(count for (status, _), count in counts.items() if status == JobStatus.QUEUED)
    return [
        jobs,
        GaugeMetricFamily(
            "qaas_queue_depth", "Jobs waiting for a worker (status queued), from the database.", depth
        ),
    ]


def _finished(session: Session, now: datetime) -> list[Metric]:
    """qaas_job_duration_seconds and qaas_runner_exits: one GROUP BY with the buckets summed in SQL."""
    seconds = _seconds(session, Job.started_at, Job.finished_at)
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    rows = session.execute(
        select(Job.mode, Job.status, Job.error_code, func.count(), func.sum(seconds), *buckets)
        .where(_recently_finished(now), Job.started_at.is_not(None))
        .group_by(Job.mode, Job.status, Job.error_code)
    )
    histograms: dict[tuple[str, str], list[float]] = {}
    exits = {
        reason: 0
        for reason in (JobStatus.SUCCEEDED.value, JobStatus.CANCELLED.value, *sorted(EXIT_REASONS), "other")
    }
    for mode, status, error_code, count, total, *in_buckets in rows.tuples():
        # count, sum, then one count per bucket: added up over error codes
        values = [count, float(total or 0.0), *in_buckets]
        kept = histograms.setdefault((mode, status), [0.0] * len(values))
        histograms[(mode, status)] = [a + float(b or 0) for a, b in zip(kept, values, strict=True)]
        exits[exit_reason(status, error_code)] += count
    durations = HistogramMetricFamily(
        "qaas_job_duration_seconds",
        f"Run time (finished_at - started_at, the last attempt) of jobs {_WINDOW_TEXT}, by mode and final "
        "status. A sliding window, not a running total: read the buckets directly (histogram_quantile without "
        "rate()).",
        labels=["mode", "status"],
    )
    for (mode, status), (count, total, *in_buckets) in sorted(histograms.items()):
        cumulative = [
            (f"{bound:g}", value) for bound, value in zip(DURATION_BUCKETS, in_buckets, strict=True)
        ]
        durations.add_metric([mode, status], [*cumulative, ("+Inf", count)], total)
    runner_exits = GaugeMetricFamily(
        "qaas_runner_exits",
        f"How the runs of jobs {_WINDOW_TEXT} ended: succeeded, cancelled, or the failure's error code "
        "(time_limit, memory_limit, worker_lost, verification_failed...; other: a code qaas does not know).",
        labels=["reason"],
    )
    for reason, count in exits.items():
        runner_exits.add_metric([reason], count)
    return [durations, runner_exits]


def job_metrics(session: Session, now: datetime | None = None) -> list[Metric]:
    """The job metric families for one scrape. Raises SQLAlchemy's errors when the database is down."""
    now = now or utcnow()
    return [*_jobs(session, now), *_finished(session, now)]
