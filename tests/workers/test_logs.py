"""JSON logs: one strict JSON object per line, the job's context on every line a worker logs while it handles
the job (and on no other), exceptions as text, values JSON cannot hold turned into strings."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core import logs
from app.core.db import session_scope
from app.main import create_app
from app.models import Job
from tests.api.conftest import make_ready_model

KEYS = {"ts", "level", "logger", "msg"}


def _strict(text: str) -> dict[str, Any]:
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    value = json.loads(text, parse_constant=refuse)
    assert isinstance(value, dict)
    return value


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        text = self.stream.getvalue()
        assert text.endswith("\n")
        return [_strict(line) for line in text.splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A JSON handler with the context filter on the root logger, as `logs.configure` sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_every_line_in_the_context_carries_it_and_no_line_outside(captured: Captured) -> None:
    logging.getLogger("qaas.test").info("before")
    with logs.log_context(job_id="job_1", tenant_id="ten_1"):
        logging.getLogger("qaas.worker").info("claimed %s", "job_1")
        logs.bind(worker="host:12:abcd")
        logging.getLogger("celery.app.trace").warning("from a library")
        logging.getLogger().error("from the root logger")
    logging.getLogger("qaas.test").info("after")

    before, claimed, library, root, after = captured.lines()
    assert set(before) == KEYS and set(after) == KEYS
    assert before["msg"] == "before" and before["level"] == "info" and before["logger"] == "qaas.test"
    assert datetime.fromisoformat(before["ts"]).tzinfo == UTC
    assert claimed["msg"] == "claimed job_1"
    assert (claimed["job_id"], claimed["tenant_id"]) == ("job_1", "ten_1")
    assert "worker" not in claimed
    for line in (library, root):
        assert (line["job_id"], line["tenant_id"], line["worker"]) == ("job_1", "ten_1", "host:12:abcd")
    assert library["level"] == "warning" and root["level"] == "error"


def test_contexts_of_concurrent_jobs_do_not_mix(captured: Captured) -> None:
    """Celery's thread pool runs jobs side by side: each thread's lines carry its own job."""
    both_in = threading.Barrier(2)

    def handle(job_id: str) -> None:
        with logs.log_context(job_id=job_id, tenant_id=f"tenant-of-{job_id}"):
            both_in.wait()
            for step in range(50):
                logging.getLogger("qaas.worker").info("%s step %d", job_id, step)

    threads = [threading.Thread(target=handle, args=(job_id,)) for job_id in ("job_a", "job_b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = captured.lines()
    assert len(lines) == 100
    for line in lines:
        assert line["msg"].startswith(line["job_id"])
        assert line["tenant_id"] == f"tenant-of-{line['job_id']}"


def test_exceptions_are_serialized_on_the_line(captured: Captured) -> None:
    with logs.log_context(job_id="job_1", tenant_id="ten_1"):
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logging.getLogger("qaas.worker").exception("job %s failed in the worker", "job_1")
    (line,) = captured.lines()  # one line: the traceback's newlines are escaped
    assert line["level"] == "error" and line["msg"] == "job job_1 failed in the worker"
    assert line["exc_info"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in line["exc_info"]
    assert line["job_id"] == "job_1"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_values_json_cannot_hold_become_strings(captured: Captured) -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    log = logging.getLogger("qaas.test")
    log.info(
        "extras",
        extra={
            "path": Path("/var/qaas"),
            "when": datetime(2026, 1, 2, tzinfo=UTC),
            "ratio": float("nan"),
            "blob": b"\xff\x00",
            "nested": {"ok": [1, 2.5, None], "bad": {1, 2}},
            "cyclic": cyclic,
            "odd": Unprintable(),
            "count": 3,
            "level": "overridden?",
        },
    )
    log.info({"a message": "that is a dict"})
    log.info("lone surrogate \udcff and ünïcode")
    extras, as_dict, text = captured.lines()
    assert extras["path"] == "/var/qaas"
    assert extras["when"] == "2026-01-02 00:00:00+00:00"
    assert extras["ratio"] == "nan"
    assert extras["blob"] == "b'\\xff\\x00'"
    assert extras["nested"] == str({"ok": [1, 2.5, None], "bad": {1, 2}})
    assert extras["cyclic"] == "[[...]]"
    assert extras["odd"] == "<unprintable Unprintable>"
    assert extras["count"] == 3
    assert extras["level"] == "info"  # an extra never replaces a documented key
    assert as_dict["msg"] == "{'a message': 'that is a dict'}"
    assert text["msg"] == "lone surrogate \udcff and ünïcode"
    captured.stream.getvalue().encode("utf-8")  # ASCII-escaped: any byte pipeline takes it

    # Arguments that do not fit the format (pytest's own handler would raise on this record): the line is kept.
    record = logging.LogRecord("qaas.test", logging.INFO, __file__, 1, "%d workers", ("many",), None)
    assert _strict(logs.JsonFormatter().format(record))["msg"] == "%d workers ('many',)"


def test_configure_picks_the_format_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # configure() replaces (and closes) the root's handlers: keep pytest's out of it
    try:
        monkeypatch.setenv("QAAS_LOG_FORMAT", "json")
        logs.configure()
        (handler,) = root.handlers
        assert isinstance(handler.formatter, logs.JsonFormatter)
        assert logs.uvicorn_log_config() is None  # uvicorn's loggers then reach this handler
        with logs.log_context(job_id="job_1", tenant_id="ten_1"):
            logging.getLogger("qaas.test").info("configured")
        line = _strict(capsys.readouterr().err)
        assert (line["msg"], line["job_id"], line["tenant_id"]) == ("configured", "job_1", "ten_1")

        monkeypatch.setenv("QAAS_LOG_FORMAT", "text")
        logs.configure()
        (handler,) = root.handlers
        assert not isinstance(handler.formatter, logs.JsonFormatter)
        assert logs.uvicorn_log_config() is not None

        monkeypatch.setenv(
            "QAAS_LOG_FORMAT", "xml"
        )  # a typo: text, a warning that says the fix, and it runs on
        logs.configure()
        (handler,) = root.handlers
        assert not isinstance(handler.formatter, logs.JsonFormatter)
        assert "QAAS_LOG_FORMAT='xml' is not a log format" in capsys.readouterr().err
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers:
            handler.close()
        root.handlers = saved[0]
        root.setLevel(saved[1])


def test_a_job_task_logs_with_its_job_and_tenant(
    service_env: Path, captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_job sets the context from the job row: the runner's supervisor and the task's own lines carry it."""
    from workers import tasks
    from workers.supervise import RunnerOutcome

    with TestClient(create_app()) as client:
        model_id = make_ready_model(client)
        response = client.post("/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "auto"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            tenant_id = job.tenant_id

    def runner(*_: Any, **__: Any) -> RunnerOutcome:
        logging.getLogger("qaas.worker").warning("the runner is running")
        raise OSError("the disk is full")

    monkeypatch.setattr(tasks, "run_runner", runner)
    captured.stream.truncate(0)
    captured.stream.seek(0)
    tasks.run_job(job_id)
    logging.getLogger("qaas.test").info("after the job")

    *during, after = captured.lines()
    assert [line["msg"] for line in during if line["logger"] == "qaas.worker"] == [
        "the runner is running",
        f"job {job_id} failed in the worker",
    ]
    for line in during:
        assert (line["job_id"], line["tenant_id"]) == (job_id, tenant_id), line
        assert line["worker"].count(":") == 2  # hostname:pid:claim
    assert "OSError: the disk is full" in during[-1]["exc_info"]
    assert "job_id" not in after and "tenant_id" not in after
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "internal_error")
