"""The worker trusts nothing a runner leaves behind: runner code that plants links in place of its output folder
or its files, before or after it exits, gets no other job's files stored as its own (docs/security.md).

The hostile code runs as a real runner does, in the real sandbox (workers.supervise.supervise) started by the
real job task against a real database and storage: only the program is swapped in, since a model can no longer
run code in the runner (tests/engine/test_pt2_hostile.py)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.storage import get_storage
from app.main import create_app
from app.models import Artifact, Job
from tests.api.conftest import make_ready_model
from workers import supervise as supervise_module

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)

VICTIM_BYTES = b"the other tenant's int8 model"
OWN_BYTES = b"the attacker's own file"

RESULT = {
    "backend": "fbgemm",
    "artifacts": [{"name": "model.int8.ts", "file": "model.int8.ts", "format": "torchscript"}],
    # The least a runner's metrics must hold (qaas.contract.metrics.JobMetrics): the job fails otherwise.
    "metrics": {
        "size": {"fp32_bytes": 1, "int8_bytes": 1, "ratio": 1.0},
        "latency": [],
        "fidelity": {"sqnr_db": 40.0, "cosine": 1.0, "max_abs_error": 0.0},
        "warnings": [],
    },
    "load_snippet": "",
    "manifest": {},
}

# Runner code: `out` is the --out argument; VICTIM is the other job's artifact folder.
SWAP_OUT_FOR_A_LINK = """
os.rename(out, out + ".old")
os.symlink(VICTIM, out)
"""
LINK_IN_OUT = """
os.symlink(os.path.join(VICTIM, "model.int8.ts"), os.path.join(out, "model.int8.ts"))
"""
FLIP_AFTER_EXIT = """
with open(os.path.join(out, "model.int8.ts"), "wb") as f:
    f.write(OWN)
if os.fork() == 0:  # left behind in a session of its own: swaps `out` once the runner has exited
    os.setsid()
    if os.fork() == 0:
        for _ in range(200):
            try:
                os.rename(out, out + ".old")
                os.symlink(VICTIM, out)
                break
            except OSError:
                time.sleep(0.01)
        time.sleep(60)
    os._exit(0)
"""
ARTIFACT_NAMED_OUTSIDE = """
with open(os.path.join(out, "model.int8.ts"), "wb") as f:
    f.write(OWN)
RESULT["artifacts"][0]["file"] = "../../../" + os.path.relpath(os.path.join(VICTIM, "model.int8.ts"), "/")
"""


def _hostile_program(action: str, victim: Path) -> str:
    return (
        textwrap.dedent(
            f"""
        import json, os, sys, time
        VICTIM, OWN, RESULT = {str(victim)!r}, {OWN_BYTES!r}, {json.dumps(RESULT)}
        out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
        """
        )
        + textwrap.dedent(action)
        + "\nprint(json.dumps({'event': 'result', 'result': RESULT}), flush=True)\n"
    )


@pytest.fixture
def victim(service_env: Path) -> tuple[str, Path]:
    """Another tenant's finished job: its model, report and manifest in storage."""
    key = "artifacts/job_victim/attempt-1/model.int8.ts"
    source = service_env / "victim.bin"
    for name, data in (("model.int8.ts", VICTIM_BYTES), ("report.json", b"{}"), ("manifest.json", b"{}")):
        source.write_bytes(data)
        get_storage().store_file(source, f"artifacts/job_victim/attempt-1/{name}")
    source.unlink()
    return key, service_env / "artifacts" / "job_victim" / "attempt-1"


def _run_hostile_job(action: str, victim_folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from workers import tasks

    with TestClient(create_app()) as client:
        model_id = make_ready_model(client)
        response = client.post(
            "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"}
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
    program = _hostile_program(action, victim_folder)

    def hostile_runner(args: list[str], **kwargs: Any) -> supervise_module.RunnerOutcome:
        """run_runner with the runner's program replaced: the same sandbox, paths and limits."""
        work_dir = kwargs.pop("work_dir").resolve()
        reads, writes = supervise_module._runner_paths(args, work_dir)
        return supervise_module.supervise(
            [sys.executable, "-c", program, *args],
            work_dir=work_dir,
            read_paths=reads,
            write_dirs=writes,
            **kwargs,
        )

    monkeypatch.setattr(tasks, "run_runner", hostile_runner)
    tasks.run_job(job_id)
    return job_id


def _stored_bytes(job_id: str) -> list[bytes]:
    storage = get_storage()
    return [Path(storage.path(key)).read_bytes() for key in storage.keys_under(f"artifacts/{job_id}/")]


def _job(job_id: str) -> tuple[str, str | None, list[str]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        names = [a.name for a in session.query(Artifact).filter(Artifact.job_id == job_id)]
        return job.status, job.error_code, names


@pytest.mark.parametrize("action", [SWAP_OUT_FOR_A_LINK, LINK_IN_OUT, ARTIFACT_NAMED_OUTSIDE])
def test_links_and_paths_from_the_runner_store_nothing(
    action: str, victim: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, folder = victim
    job_id = _run_hostile_job(action, folder, monkeypatch)
    status, code, names = _job(job_id)
    assert (status, code, names) == ("failed", "invalid_runner_output", [])
    assert not _stored_bytes(job_id)
    assert Path(get_storage().path(key)).read_bytes() == VICTIM_BYTES  # the other job's file is untouched


def test_a_link_flipped_after_the_runner_exits_is_never_followed(
    victim: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, service_env: Path
) -> None:
    key, folder = victim
    job_id = _run_hostile_job(FLIP_AFTER_EXIT, folder, monkeypatch)
    status, _, names = _job(job_id)
    stored = _stored_bytes(job_id)
    assert VICTIM_BYTES not in stored
    assert status == "succeeded" and "model.int8.ts" in names, (status, names)
    model = next(a for a in stored if a == OWN_BYTES)
    assert hashlib.sha256(model).hexdigest()  # the attacker's own file, and only it
    # The process left behind went with its runner: nothing runs with a folder of this job as its cwd.
    time.sleep(0.2)
    work = service_env / "work" / job_id
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                assert not os.readlink(f"/proc/{entry}/cwd").startswith(str(work)), entry
            except OSError:
                continue


def test_an_upload_whose_loading_hangs_is_told_what_it_can_do(
    service_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that loops while it loads (a `__setstate__` that never returns) ends its inspection at the time
    limit with advice for an upload, not for a job request."""
    from app.core.config import get_settings
    from app.models import Model
    from tests.api.conftest import upload
    from workers import tasks

    monkeypatch.setattr(get_settings(), "inspect_timeout_s", 2)
    with TestClient(create_app()) as client:
        response = upload(client, "/v1/models", b"loops forever when loaded")
        assert response.status_code == 201, response.text
        model_id = response.json()["id"]

    def looping_runner(args: list[str], **kwargs: Any) -> supervise_module.RunnerOutcome:
        work_dir = kwargs.pop("work_dir").resolve()
        reads, writes = supervise_module._runner_paths(args, work_dir)
        return supervise_module.supervise(
            [sys.executable, "-c", "while True: pass"],
            work_dir=work_dir,
            read_paths=reads,
            write_dirs=writes,
            **kwargs,
        )

    monkeypatch.setattr(tasks, "run_runner", looping_runner)
    started = time.monotonic()
    tasks.inspect_model(model_id)
    assert time.monotonic() - started < 30
    with session_scope() as session:
        model = session.get(Model, model_id)
        assert model is not None and model.status == "invalid"
        assert model.error_code == "time_limit"
        assert "QAAS_INSPECT_TIMEOUT_S" in (model.error_message or "")
        assert "timeout_s in the job request" not in (model.error_message or "")
