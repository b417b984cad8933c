"""Keeping work moving when workers die and messages get lost: the reaper, and the workers' heartbeats.

Every worker runs `reap` every QAAS_REAPER_INTERVAL_S (workers.upkeep). The job row is the truth and a broker
message only a hint, so the reaper works from the rows alone, with conditional updates that make several
reapers running at once harmless:

- a `running` job whose lease expired (its worker died, froze or lost the database) goes back to `queued` and
  is enqueued again, until it has been claimed QAAS_MAX_ATTEMPTS times; then it fails with `worker_lost`;
- a `queued` job (or an upload still `inspecting`) whose row has not moved for QAAS_REQUEUE_AFTER_S is enqueued
  again: a Redis restarted without persistence, the embedded SQLite transport (no visibility timeout) or an
  enqueue that failed after commit lose the message, never the row. A duplicate message is harmless: only a
  conditional update claims a job;
- a `*.part` file in DATA_DIR/tmp untouched for QAAS_STALE_TEMP_AFTER_S is deleted: an API killed mid-upload
  leaves its temporary file there, and an upload in progress rewrites its own with every chunk.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.config import Settings
from app.core.db import after_commit
from app.core.storage import get_storage
from app.models import Artifact, Dataset, Job, Model, Worker
from app.models.common import utcnow
from qaas.contract.vocab import ACTIVE, JobStatus, UploadStatus

log = logging.getLogger("qaas.reaper")

BATCH = 200  # rows looked at per kind and pass
FORGET_WORKERS_AFTER = timedelta(days=1)


@dataclass
class Reaped:
    """What one pass did, by job or upload id."""

    requeued: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    reenqueued: list[str] = field(default_factory=list)
    reinspected: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # retention: model, dataset and artifact ids
    swept: list[str] = field(default_factory=list)  # names of stale temporary files deleted from DATA_DIR/tmp

    def __bool__(self) -> bool:
        return any(
            (
                self.requeued,
                self.lost,
                self.cancelled,
                self.reenqueued,
                self.reinspected,
                self.expired,
                self.swept,
            )
        )


def _enqueue_after_commit(session: Session, task: str, object_id: str) -> None:
    after_commit(session, lambda: queue.enqueue(task, object_id))


def _expired_leases(session: Session, settings: Settings, now: datetime, reaped: Reaped) -> None:
    rows = session.execute(
        select(Job.id, Job.attempts, Job.lease_expires_at, Job.cancel_requested_at)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        .limit(BATCH)
    ).all()
    for job_id, attempts, lease, cancel_at in rows:
        # The lease in the condition: a worker that renewed it meanwhile keeps its job.
        still_lost = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_expires_at == lease)
        common: dict[str, Any] = {"lease_expires_at": None, "worker_id": None}
        if cancel_at is not None:
            values = common | {
                "status": JobStatus.CANCELLED,
                "finished_at": now,
                "message": "cancelled (its worker was lost)",
            }
            bucket = reaped.cancelled
        elif attempts >= settings.max_attempts:
            values = common | {
                "status": JobStatus.FAILED,
                "finished_at": now,
                "error_code": "worker_lost",
                "error_message": (
                    f"the worker running this job stopped answering {attempts} times (QAAS_MAX_ATTEMPTS="
                    f"{settings.max_attempts}); it may be killed for memory outside qaas's own limits: lower "
                    "the model's size or raise the worker's memory"
                ),
                "message": "failed: its workers were lost",
            }
            bucket = reaped.lost
        else:
            values = common | {
                "status": JobStatus.QUEUED,
                "stage": None,
                "percent": 0.0,
                "message": (
                    f"re-queued: the worker running attempt {attempts} stopped answering "
                    f"(at most {settings.max_attempts} attempts)"
                ),
            }
            bucket = reaped.requeued
        result = session.execute(update(Job).where(*still_lost).values(values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        bucket.append(job_id)
        if bucket is reaped.requeued:
            _enqueue_after_commit(session, queue.RUN_JOB, job_id)
        else:  # files a lost attempt left half-stored belong to no result now
            after_commit(session, functools.partial(get_storage().delete_under, f"artifacts/{job_id}/"))
        log.warning("job %s: lease expired on attempt %s: %s", job_id, attempts, values["message"])


def _resend_stale(
    session: Session, cls: Any, status: str, task: str, before: datetime, now: datetime, found: list[str]
) -> None:
    """Enqueue again the rows of `cls` in `status` untouched since `before`, touching each (a conditional
    update: with several reapers, one sends it)."""
    ids = session.scalars(
        select(cls.id).where(cls.status == status, cls.updated_at < before).order_by(cls.id).limit(BATCH)
    ).all()
    for object_id in ids:
        touched = session.execute(
            update(cls)
            .where(cls.id == object_id, cls.status == status, cls.updated_at < before)
            .values(updated_at=now)
        )
        if touched.rowcount == 1:  # type: ignore[attr-defined]
            found.append(object_id)
            _enqueue_after_commit(session, task, object_id)


def _stale_queued(session: Session, settings: Settings, now: datetime, reaped: Reaped) -> None:
    before = now - timedelta(seconds=settings.requeue_after_s)
    _resend_stale(session, Job, JobStatus.QUEUED, queue.RUN_JOB, before, now, reaped.reenqueued)


def _stale_inspections(session: Session, settings: Settings, now: datetime, reaped: Reaped) -> None:
    # An inspection that is still running must not be started twice: wait past its own time limit.
    wait = max(settings.requeue_after_s, settings.inspect_timeout_s + 60)
    before = now - timedelta(seconds=wait)
    for cls, task in ((Model, queue.INSPECT_MODEL), (Dataset, queue.INSPECT_DATASET)):
        _resend_stale(session, cls, UploadStatus.INSPECTING, task, before, now, reaped.reinspected)


def _retention(session: Session, settings: Settings, now: datetime, reaped: Reaped) -> None:
    """Files older than QAAS_RETENTION_DAYS: each row is marked in this transaction and its file deleted only
    after the commit, so no row ever points at a missing file (a crash between leaves an orphan file, not a
    broken row). Uploads a queued or running job uses wait until it ends."""
    cutoff = now - timedelta(days=settings.retention_days)
    storage = get_storage()
    old_artifacts = session.execute(
        select(Artifact.id, Artifact.storage_key)
        .join(Job, Job.id == Artifact.job_id)
        .where(Artifact.expired_at.is_(None), Job.finished_at < cutoff)
        .limit(BATCH)
    ).all()
    for artifact_id, key in old_artifacts:
        marked = session.execute(
            update(Artifact)
            .where(Artifact.id == artifact_id, Artifact.expired_at.is_(None))
            .values(expired_at=now)
        )
        if marked.rowcount == 1:  # type: ignore[attr-defined]
            reaped.expired.append(artifact_id)
            after_commit(session, functools.partial(storage.delete, key))
    in_use: dict[Any, Any] = {
        Model: exists().where(Job.model_id == Model.id, Job.status.in_(ACTIVE)),
        Dataset: exists().where(
            or_(
                Job.calibration_dataset_id == Dataset.id,
                Job.train_dataset_id == Dataset.id,
                Job.eval_dataset_id == Dataset.id,
            ),
            Job.status.in_(ACTIVE),
        ),
    }
    for cls, used in in_use.items():
        old = select(cls.id, cls.storage_key).where(cls.expired_at.is_(None), cls.created_at < cutoff, ~used)
        for object_id, key in session.execute(old.limit(BATCH)).all():
            marked = session.execute(
                update(cls)
                .where(cls.id == object_id, cls.expired_at.is_(None))
                .values(status=UploadStatus.EXPIRED, expired_at=now)
            )
            if marked.rowcount == 1:  # type: ignore[attr-defined]
                reaped.expired.append(object_id)
                after_commit(session, functools.partial(storage.delete, key))
    if reaped.expired:
        log.info("retention (%s days): deleted the files of %s", settings.retention_days, reaped.expired)


def _stale_temp_files(settings: Settings, now: datetime, reaped: Reaped) -> None:
    """Delete the `*.part` regular files of DATA_DIR/tmp last written before QAAS_STALE_TEMP_AFTER_S ago.

    Links are never followed: neither the folder (opened with O_NOFOLLOW) nor its entries (lstat; unlink
    removes a link itself). Names are resolved against the open folder, so that a folder swapped meanwhile
    changes nothing. Several reapers at once are harmless: a file already gone is skipped."""
    cutoff = now.timestamp() - settings.stale_temp_after_s
    try:
        folder = os.open(
            settings.data_dir / "tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError:
        return
    except OSError as exc:  # a link or not a folder: left to the operator
        log.warning("stale temporary files not swept: %s", exc)
        return
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".part"):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                        continue
                    os.unlink(entry.name, dir_fd=folder)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # one file the worker may not delete must not stop the reaper
                    log.warning("stale temporary file %s not deleted: %s", entry.name, exc)
                    continue
                reaped.swept.append(entry.name)
    except OSError as exc:
        log.warning("stale temporary files not swept: %s", exc)
    finally:
        os.close(folder)
    if reaped.swept:
        log.info(
            "deleted %s temporary files left by interrupted uploads: %s", len(reaped.swept), reaped.swept
        )


def reap(session: Session, settings: Settings, now: datetime | None = None) -> Reaped:
    """One pass over lost jobs, stale queued jobs, stale inspections, with QAAS_RETENTION_DAYS old files, and
    stale temporary files; enqueues and deletes stored files after the caller commits (temporary files at once:
    no row names them)."""
    now = now or utcnow()
    reaped = Reaped()
    _expired_leases(session, settings, now, reaped)
    _stale_queued(session, settings, now, reaped)
    _stale_inspections(session, settings, now, reaped)
    if settings.retention_days > 0:
        _retention(session, settings, now, reaped)
    _stale_temp_files(settings, now, reaped)
    session.execute(
        delete(Worker).where(
            or_(
                Worker.last_seen_at < now - FORGET_WORKERS_AFTER,
                Worker.stopped_at < now - FORGET_WORKERS_AFTER,
            )
        )
    )
    return reaped


# --- heartbeats --------------------------------------------------------------------------------------------


def beat(
    session: Session,
    worker_id: str,
    *,
    hostname: str,
    pid: int,
    concurrency: int,
    sandbox: list[str],
    sandbox_gaps: dict[str, str],
) -> None:
    """Record that a worker is alive, with the runner protections it gives its jobs."""
    now = utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        session.add(
            Worker(
                id=worker_id,
                hostname=hostname,
                pid=pid,
                concurrency=concurrency,
                sandbox=sandbox,
                sandbox_gaps=sandbox_gaps,
                started_at=now,
                last_seen_at=now,
            )
        )
        return
    row.last_seen_at, row.stopped_at = now, None
    row.sandbox, row.sandbox_gaps, row.concurrency = sandbox, sandbox_gaps, concurrency


def signed_off(session: Session, worker_id: str) -> None:
    """A worker that shuts down cleanly says so, and leaves the list at once."""
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers heard from within three reaper intervals and not signed off, newest first."""
    since = utcnow() - timedelta(seconds=3 * settings.reaper_interval_s)
    query = select(Worker).where(Worker.last_seen_at >= since, Worker.stopped_at.is_(None))
    return list(session.scalars(query.order_by(Worker.last_seen_at.desc())))
