"""The worker's tasks: claim -> runner -> store -> finish. Ids in, state re-read from the database."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import logs, queue
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.storage import StoredFileMissing, get_storage
from app.models import Dataset, Job, Model
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.services import models as model_service
from app.services import stored as stored_service
from qaas.contract.backends import ARTIFACT_FILES
from qaas.contract.jobs import BenchmarkOptions, JobOptions, RunnerSpec, explain
from qaas.contract.metrics import JobMetrics
from qaas.contract.vocab import TERMINAL, Backend, DataRole, Mode, UploadStatus
from workers import upkeep
from workers.sandbox import RunnerLimits
from workers.supervise import INSPECTION_TIME_LIMIT_ADVICE, RunnerOutcome, run_runner

log = logging.getLogger("qaas.worker")
# What `qaas worker` did to its own process before Celery started (see workers.sandbox).
WORKER_PROTECTIONS: list[str] = []
celery = queue.get_celery()

Stored = TypeVar("Stored", Model, Dataset)
PROGRESS_EVERY_S = 0.5
# The only files the worker takes from a job's runner, with their formats: read by these names through the
# output folder's handle, never by a path the runner chose (docs/security.md). The report and the manifest are
# written from the runner's result (data), not read from its files.
RUNNER_FILES = ARTIFACT_FILES


class RunnerOutputRefused(Exception):
    """The runner left something other than a plain file of an allowed name and size: nothing is stored."""


def _worker_id() -> str:
    return f"{upkeep.worker_name()}:{uuid.uuid4().hex[:8]}"


def _error_of(outcome: RunnerOutcome) -> tuple[str, str] | None:
    if outcome.result is not None:
        return None
    return outcome.error_code or "internal_error", outcome.error_message or "the runner gave no result"


def _inspect(cls: type[Stored], object_id: str, command: str) -> None:
    """Run `command` of the runner on the stored upload and record what it found (or why it is invalid)."""
    settings = get_settings()
    with session_scope() as session:
        row = session.get(cls, object_id)
        if row is None or row.status != UploadStatus.INSPECTING:
            return
        key = row.storage_key
        args: list[str] = []
        if isinstance(row, Model) and row.input_shapes is not None:
            args += ["--input-shapes", json.dumps(row.input_shapes)]
        if isinstance(row, Dataset) and row.preprocess is not None:
            args += ["--preprocess", json.dumps(row.preprocess)]
    work = settings.work_dir / f"inspect-{object_id}-{uuid.uuid4().hex[:8]}"
    service = model_service if cls is Model else dataset_service
    try:
        try:
            # The runner reads local files only: an object store's copy lands in its work folder.
            upload = get_storage().local_copy(key, work / "inputs")
        except StoredFileMissing as exc:
            with session_scope() as session:
                service.record_inspection(
                    session,
                    object_id,
                    result=None,
                    error=("file_missing", f"the uploaded file is gone: {exc}"),
                )
            return
        outcome = run_runner(
            [command, "--file", str(upload), *args, "--out", str(work / "out")],
            work_dir=work,
            timeout_s=settings.inspect_timeout_s,
            limits=RunnerLimits.from_settings(settings),
            bench_lock=False,  # an inspection never benchmarks
            time_limit_advice=INSPECTION_TIME_LIMIT_ADVICE,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with session_scope() as session:
        service.record_inspection(session, object_id, result=outcome.result, error=_error_of(outcome))


def _inspect_next() -> None:
    """Inspect the upload that is fairly next across tenants (app.services.stored.claim_next_inspection)."""
    settings = get_settings()
    with session_scope() as session:
        picked = stored_service.claim_next_inspection(session, timeout_s=settings.inspect_timeout_s)
    if picked is None:
        log.info("no upload is waiting for inspection")
        return
    cls, object_id = picked
    if cls is Model:
        _inspect(Model, object_id, "inspect-model")
    else:
        _inspect(Dataset, object_id, "inspect-dataset")


@celery.task(name=queue.INSPECT_MODEL)
def inspect_model(model_id: str) -> None:
    """An upload's turn: load the fairly next waiting upload (`model_id` itself unless another tenant waits with
    fewer inspections running) in a runner and record its inputs, parameters and layers, or why it is invalid."""
    _inspect_next()


@celery.task(name=queue.INSPECT_DATASET)
def inspect_dataset(dataset_id: str) -> None:
    """An upload's turn, as inspect_model: the fairly next waiting upload is read in a runner."""
    _inspect_next()


@dataclass(frozen=True)
class _Claimed:
    """A job this worker claimed: what its runner needs, read in the claim's transaction."""

    job_id: str
    worker_id: str
    lease_s: float
    attempt: int
    spec: RunnerSpec  # storage keys where the input files go: `_localize` turns them into paths
    timeout_s: float


def _job_spec(session: Session, job: Job) -> RunnerSpec:
    """The runner's spec for a job: its request's mode, backend and options, and where its inputs are stored."""
    model = session.get(Model, job.model_id)
    assert model is not None
    keys: dict[str, str | None] = {}
    preprocess: dict[DataRole, Any] = {}
    for role, dataset_id in (
        (DataRole.CALIBRATION, job.calibration_dataset_id),
        (DataRole.TRAIN, job.train_dataset_id),
        (DataRole.EVAL, job.eval_dataset_id),
    ):
        dataset = session.get(Dataset, dataset_id) if dataset_id else None
        keys[role.value] = dataset.storage_key if dataset else None
        if dataset is not None and dataset.preprocess:
            preprocess[role] = dataset.preprocess
    return RunnerSpec(
        model=model.storage_key,
        input_shapes=model.input_shapes,
        mode=Mode(job.mode),
        backend=Backend(job.backend_requested),
        options=JobOptions.model_validate(job.config.get("options") or {}),
        benchmark=BenchmarkOptions.model_validate(job.config.get("benchmark") or {}),
        preprocess=preprocess,
        **keys,
    )


def _claim(job_id: str, worker_id: str, lease_s: float) -> _Claimed | None:
    """Claim the job for this worker (None when it is not queued any more) and read what its runner needs."""
    settings = get_settings()
    with session_scope() as session:
        job = job_service.claim_job(session, job_id, worker_id, lease_s)
        if job is None:
            return None
        logs.bind(tenant_id=job.tenant_id, worker=worker_id)
        timeout_s = float(job.config.get("timeout_s") or settings.job_timeout_s)
        try:
            spec = _job_spec(session, job)
        except ValidationError as exc:  # a row the job contract no longer accepts: fail it, never loop on it
            job_service.fail_job(session, job_id, worker_id, "invalid_config", explain(exc))
            return None
        return _Claimed(job_id, worker_id, lease_s, job.attempts, spec, timeout_s)


@celery.task(name=queue.RUN_JOB)
def run_job(job_id: str) -> None:
    """Claim the job, run the runner, store the artifacts, then mark it succeeded in one transaction.
    A second delivery of a claimed or finished job does nothing. Its log lines carry job_id and tenant_id."""
    with logs.log_context(job_id=job_id):
        _run_job(job_id)


def _run_job(job_id: str) -> None:
    if upkeep.shutting_down():
        # Taken in before the shutdown began: another worker runs it (the message is acked on return).
        queue.enqueue(queue.RUN_JOB, job_id)
        log.info("job %s: this worker is shutting down, sent back to the queue", job_id)
        return
    settings = get_settings()
    lease_s = max(10.0, 6 * settings.heartbeat_s)  # a lost worker's job is re-queued once this runs out
    claimed = _claim(job_id, _worker_id(), lease_s)
    if claimed is None:
        log.info("job %s is not queued any more: nothing to do", job_id)
        return
    work = settings.work_dir / job_id / f"attempt-{claimed.attempt}"
    out_fd: int | None = None
    try:
        (work / "out").mkdir(parents=True, exist_ok=True)
        # Taken before the runner starts: whatever it does to the name `out` (a link to another job's folder in
        # its place), its files are read through this handle.
        out_fd = os.open(work / "out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        (work / "spec.json").write_text(_localize(claimed.spec, work / "inputs").model_dump_json())
        outcome, limits = _run_attempt(claimed, work)
        _record_outcome(claimed, outcome, limits, out_fd)
    except Exception as exc:
        log.exception("job %s failed in the worker", job_id)
        with session_scope() as session:
            job_service.fail_job(
                session, job_id, claimed.worker_id, "internal_error", f"{type(exc).__name__}: {exc}"
            )
    finally:
        if out_fd is not None:
            os.close(out_fd)
        shutil.rmtree(work, ignore_errors=True)
        _forget_finished_attempts(job_id, work.parent)


class _ProgressRelay:
    """Writes the runner's progress to the job row: within one stage at most every PROGRESS_EVERY_S (a runner
    may report every batch, and would otherwise wait on the database through its stdout pipe); heartbeats
    (stage None) always write. Returns True when the runner must stop (cancelled, or the worker hands back)."""

    def __init__(self, claimed: _Claimed) -> None:
        self.claimed = claimed
        self.written_at, self.written_stage = 0.0, ""

    def __call__(self, stage: str | None, percent: float | None, message: str | None) -> bool:
        if upkeep.handing_back():
            return True  # the worker is shutting down and the grace period is over
        now = time.monotonic()
        if stage is not None and stage == self.written_stage and now - self.written_at < PROGRESS_EVERY_S:
            return False
        self.written_at, self.written_stage = now, stage or self.written_stage
        c = self.claimed
        with session_scope() as session:
            return job_service.record_progress(
                session, c.job_id, c.worker_id, c.lease_s, stage, percent, message
            )


def _run_attempt(claimed: _Claimed, work: Path) -> tuple[RunnerOutcome, RunnerLimits]:
    """Run the job's runner in its sandbox, relaying its progress; the outcome and the limits it ran under."""
    settings = get_settings()
    threads = claimed.spec.benchmark.threads
    limits = RunnerLimits.from_settings(settings)
    if limits.cpu_seconds is not None:
        # CPU time counts every thread: a multi-threaded job must meet its wall clock first.
        cpu_seconds = max(limits.cpu_seconds, int(threads * claimed.timeout_s) + 60)
        limits = replace(limits, cpu_seconds=cpu_seconds)
    outcome = run_runner(
        ["quantize", "--spec", str(work / "spec.json"), "--out", str(work / "out")],
        work_dir=work,
        timeout_s=claimed.timeout_s,
        threads=threads,
        relay=_ProgressRelay(claimed),
        heartbeat_s=settings.heartbeat_s,
        limits=limits,
        # One benchmark at a time on this host: the workers sharing this data directory take turns.
        bench_lock=settings.data_dir / "bench.lock",
    )
    return outcome, limits


def _record_outcome(claimed: _Claimed, outcome: RunnerOutcome, limits: RunnerLimits, out_fd: int) -> None:
    """The job's end as the runner left it: cancelled or handed back, failed, or succeeded with its artifacts."""
    job_id, worker_id = claimed.job_id, claimed.worker_id
    # What protected this runner, recorded whatever the outcome.
    runner = {"sandbox": [*outcome.sandbox, *WORKER_PROTECTIONS], "gaps": outcome.sandbox_gaps}
    runner["limits"] = asdict(limits)
    if outcome.stopped:
        with session_scope() as session:
            cancelled = session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id))
            if cancelled is None and upkeep.handing_back():
                job_service.hand_back(session, job_id, worker_id, "its worker shut down before it finished")
                log.info("job %s handed back to the queue: this worker is shutting down", job_id)
            else:
                job_service.mark_cancelled(session, job_id, worker_id, runner=runner)
                log.info("job %s cancelled while running", job_id)
        return
    error = _error_of(outcome)
    if error is not None:
        with session_scope() as session:
            job_service.fail_job(session, job_id, worker_id, *error, runner=runner)
        log.warning("job %s failed: %s: %s", job_id, error[0], error[1][:500])
        return
    assert outcome.result is not None
    metrics = dict(outcome.result["metrics"])
    if outcome.lock_notes:
        metrics["warnings"] = [*metrics.get("warnings", []), *outcome.lock_notes]
    try:
        JobMetrics.model_validate(metrics)  # the runner is not trusted to write the document's shape
        # run_runner returned: every process of the runner is gone, nothing changes in `out` any more.
        stored = _store_artifacts(
            job_id, claimed.attempt, out_fd, outcome.result, metrics, limits.file_size_mb
        )
    except (RunnerOutputRefused, ValidationError) as exc:
        why = (
            f"its metrics do not follow the contract: {explain(exc)}"
            if isinstance(exc, ValidationError)
            else exc
        )
        with session_scope() as session:
            job_service.fail_job(session, job_id, worker_id, "invalid_runner_output", str(why), runner=runner)
        log.warning("job %s failed: the runner's output was refused: %s", job_id, why)
        return
    _succeed(claimed, outcome.result, metrics, stored, runner)


def _succeed(
    claimed: _Claimed,
    result: dict[str, Any],
    metrics: dict[str, Any],
    stored: list[job_service.StoredArtifact],
    runner: dict[str, Any],
) -> None:
    """Mark the job succeeded with its stored artifacts, in one transaction; drop them when the job was
    cancelled or taken over meanwhile, else delete what earlier attempts of this job left behind."""
    storage, job_id = get_storage(), claimed.job_id
    try:
        with session_scope() as session:
            committed = job_service.succeed_job(
                session,
                job_id,
                claimed.worker_id,
                backend=result["backend"],
                metrics=metrics,
                artifacts=stored,
                load_snippet=result["load_snippet"],
                manifest=result["manifest"],
                runner=runner,
            )
    except BaseException:
        for artifact in stored:
            storage.delete(artifact.storage_key)
        raise
    if not committed:
        log.info("job %s was cancelled or taken over while finishing: dropping its artifacts", job_id)
        for artifact in stored:
            storage.delete(artifact.storage_key)
        return
    log.info("job %s succeeded on %s (attempt %s)", job_id, result["backend"], claimed.attempt)
    # What earlier attempts of this job left behind, if their workers died while storing.
    ours = f"artifacts/{job_id}/attempt-{claimed.attempt}/"
    for folder in {"/".join(k.split("/")[:3]) for k in storage.keys_under(f"artifacts/{job_id}/")}:
        if not ours.startswith(folder + "/"):
            storage.delete_under(folder)


def _localize(spec: RunnerSpec, inputs: Path) -> RunnerSpec:
    """The spec with each stored input's key replaced by a local path (the runner reads local files only, and
    never gets storage credentials): the stored file itself, or a copy downloaded into the work folder."""
    storage = get_storage()
    keys = {"model": spec.model} | {role.value: key for role, key in spec.data().items()}
    return spec.model_copy(
        update={field: str(storage.local_copy(key, inputs)) for field, key in keys.items() if key}
    )


def _forget_finished_attempts(job_id: str, folder: Path) -> None:
    """Once the job is final, the work folders of attempts whose workers died on this host go too."""
    try:
        with session_scope() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
    except Exception:
        return  # the next attempt, or the next job of this worker, tries again
    if status in TERMINAL:
        shutil.rmtree(folder, ignore_errors=True)


def _open_runner_file(out_fd: int, name: str, max_bytes: int | None) -> IO[bytes]:
    """`name` in the runner's output folder, opened through the folder's handle: a regular file with one link
    (not a link to, nor a second name of, a file outside), no larger than the runner could write."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=out_fd)
    except OSError as exc:
        raise RunnerOutputRefused(
            f"the runner's {name} cannot be opened as a plain file ({exc.strerror})"
        ) from exc
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink != 1:
        problem = f"has {info.st_nlink} names (a hard link)"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"is larger than the runner's file size limit ({info.st_size} bytes)"
    if problem is not None:
        os.close(fd)
        raise RunnerOutputRefused(f"the runner's {name} {problem}: nothing was stored")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _runner_files(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, format) of each artifact the result lists; the names must be RUNNER_FILES', each once."""
    files: list[tuple[str, str]] = []
    for entry in result.get("artifacts") or []:
        name = entry.get("file") if isinstance(entry, dict) else None
        if name not in RUNNER_FILES or entry.get("name") != name or any(name == n for n, _ in files):
            raise RunnerOutputRefused(
                f"the runner named an artifact qaas does not make ({str(name)[:100]!r}): nothing was stored"
            )
        files.append((name, RUNNER_FILES[name]))
    if not files:
        raise RunnerOutputRefused("the runner reported success without an artifact")
    return files


def _store_artifacts(
    job_id: str,
    attempt: int,
    out_fd: int,
    result: dict[str, Any],
    metrics: dict[str, Any],
    max_mb: int | None,
) -> list[job_service.StoredArtifact]:
    """Copy the runner's model file into storage (local: temp name, fsync, rename; S3: a multipart upload) with
    its sha256, plus the report and manifest as JSON artifacts written from the result. Each attempt writes
    under its own prefix; nothing is left stored when one file is refused."""
    storage = get_storage()
    stored: list[job_service.StoredArtifact] = []

    def keep(name: str, fmt: str, source: IO[bytes]) -> None:
        key = f"artifacts/{job_id}/attempt-{attempt}/{name}"
        size, sha256 = storage.store_file(source, key)
        stored.append(job_service.StoredArtifact(name, fmt, size, sha256, key))

    try:
        for name, fmt in _runner_files(result):
            with _open_runner_file(out_fd, name, max_mb * 1024 * 1024 if max_mb else None) as source:
                keep(name, fmt, source)
        for name, data in (("report.json", metrics), ("manifest.json", result["manifest"])):
            text = json.dumps(data, indent=2, allow_nan=False) + "\n"
            keep(name, "json", io.BytesIO(text.encode("utf-8")))
    except BaseException:
        for artifact in stored:
            storage.delete(artifact.storage_key)
        raise
    return stored
