"""Workers die, run out of memory, shut down, lose their broker: no job is stuck, none runs twice to completion,
no artifact is lost or left behind. Real worker processes on the embedded default and on Redis + PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINAL = {"succeeded", "failed", "cancelled"}
QUICK = {"batch_sizes": [1], "iterations": 3}


def _upload(stack: Stack, kind: str, path: Path) -> str:
    with open(path, "rb") as handle:
        response = stack.client.post(f"/v1/{kind}", files={"file": (path.name, handle)})
    assert response.status_code == 201, response.text
    object_id = str(response.json()["id"])
    assert stack.wait(f"/v1/{kind}/{object_id}", {"ready", "invalid"})["status"] == "ready"
    return object_id


def _submit(stack: Stack, **body: object) -> str:
    response = stack.client.post("/v1/jobs", json={"backend": "fbgemm", "benchmark": QUICK} | body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _runners(job_id: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"workers.runner .*{job_id}"], capture_output=True, text=True)
    return found.stdout.split()


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.2)


def _stored_files(stack: Stack, job_id: str) -> list[str]:
    folder = stack.data_dir / "artifacts" / job_id
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    """Enough samples for 4 000 calibration batches of 4: a calibration long enough to be caught in."""
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((40_000, 64)).astype(np.float32))
    return path


@pytest.mark.no_worker
def test_a_worker_killed_during_calibration_loses_nothing(
    stack: Stack, pt2_file: Path, calibration_file: Path
) -> None:
    first = stack.start_worker()
    model_id = _upload(stack, "models", pt2_file)
    dataset_id = _upload(stack, "datasets", calibration_file)
    job_id = _submit(
        stack,
        model_id=model_id,
        mode="static",
        calibration_dataset_id=dataset_id,
        options={"calibration_batches": 4_000, "batch_size": 4},
    )
    _wait_for(
        lambda: stack.client.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"] == "calibrating",
        120,
        "calibration",
    )
    os.killpg(first.pid, signal.SIGKILL)  # the worker and everything in its process group
    first.wait()
    _wait_for(lambda: not _runners(job_id), 10, "the orphaned runner's death (PR_SET_PDEATHSIG)")

    stack.start_worker()
    job = stack.wait(f"/v1/jobs/{job_id}", FINAL, timeout_s=240)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), (job, stack.worker_log.read_text()[-6000:])
    names = [a["name"] for a in job["artifacts"]]
    assert sorted(names) == sorted(set(names)) == ["manifest.json", "model.int8.ts", "report.json"]
    # One artifact set, the second attempt's; nothing left of the first one, in storage or in work/.
    assert _stored_files(stack, job_id) == [f"attempt-2/{name}" for name in sorted(names)]
    assert not (stack.data_dir / "work" / job_id).exists()


@pytest.fixture
def memory_hog_pt2(tmp_path: Path) -> Path:
    """A valid program whose forward needs ~4 GB for a batch of 4: past a 2 GB runner limit at once."""

    class Hog(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            wide = x.unsqueeze(2).expand(-1, -1, 4_000_000).contiguous()
            return self.fc(wide.mean(dim=2))

    path = tmp_path / "hog.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(Hog().eval(), (torch.randn(2, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return path


@pytest.mark.no_worker
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)  # the runner's limit, whatever the stack
def test_a_runner_past_its_memory_limit_fails_once_and_the_worker_goes_on(
    stack: Stack, memory_hog_pt2: Path, pt2_file: Path
) -> None:
    stack.start_worker(QAAS_RUNNER_MEMORY_MB="2048")
    hog = _submit(stack, model_id=_upload(stack, "models", memory_hog_pt2), mode="dynamic")
    job = stack.wait(f"/v1/jobs/{hog}", FINAL, timeout_s=120)
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "memory_limit", 1), job
    assert "2048 MB" in job["error"]["message"]
    time.sleep(2)  # a few reaper passes: a limit the job hit itself is not retried
    assert stack.client.get(f"/v1/jobs/{hog}").json()["attempts"] == 1
    fine = _submit(stack, model_id=_upload(stack, "models", pt2_file), mode="dynamic")
    assert stack.wait(f"/v1/jobs/{fine}", FINAL, timeout_s=120)["status"] == "succeeded"


@pytest.fixture
def evil_pt2(tmp_path: Path, pt2_file: Path) -> tuple[Path, Path]:
    """A real torch.export archive whose weight entry is a pickle that writes a canary when unpickled."""
    import io
    import json
    import pickle
    import zipfile

    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            code = f"import os; open({str(canary)!r}, 'w').write(repr(sorted(k for k in os.environ if k.startswith('QAAS'))))"
            return (exec, (code,))

    with zipfile.ZipFile(pt2_file) as zf:
        prefix = next(n.split("/")[0] for n in zf.namelist() if n.endswith("/archive_format"))
        config_name = f"{prefix}/data/weights/model_weights_config.json"
        config = json.loads(zf.read(config_name))
        fqn = next(iter(config["config"]))
        config["config"][fqn]["use_pickle"] = True
        weight_name = f"{prefix}/data/weights/{config['config'][fqn]['path_name']}"
        buffer = io.BytesIO()
        pickle.dump(Payload(), buffer)
        replace = {config_name: json.dumps(config).encode(), weight_name: buffer.getvalue()}
        target = tmp_path / "evil.pt2"
        with zipfile.ZipFile(target, "w") as out:
            for info in zf.infolist():
                out.writestr(info, replace.get(info.filename, zf.read(info.filename)))
    return target, canary


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_a_pt2_that_runs_code_when_unpickled_harms_nothing(
    stack: Stack, evil_pt2: tuple[Path, Path], pt2_file: Path
) -> None:
    evil, canary = evil_pt2
    with open(evil, "rb") as handle:
        model_id = stack.client.post("/v1/models", files={"file": ("evil.pt2", handle)}).json()["id"]
    model = stack.wait(f"/v1/models/{model_id}", {"ready", "invalid"})
    # qaas reads the archive's weight config before torch does and refuses pickled entries: the payload
    # never runs (and tests/workers/test_sandbox.py shows what the runner's sandbox does to code that does).
    assert (model["status"], model["error"]["code"]) == ("invalid", "pickle_not_allowed"), model
    assert not canary.exists()
    assert not list(stack.data_dir.rglob("canary"))
    fine = _submit(stack, model_id=_upload(stack, "models", pt2_file), mode="dynamic")
    assert stack.wait(f"/v1/jobs/{fine}", FINAL, timeout_s=120)["status"] == "succeeded"


@pytest.mark.no_worker
def test_sigterm_lets_a_job_finish_within_the_grace_period_or_hands_it_back(
    stack: Stack, pt2_file: Path, calibration_file: Path
) -> None:
    model_id = _upload_with_a_worker(stack, "models", pt2_file)
    dataset_id = _upload_with_a_worker(stack, "datasets", calibration_file)
    slow = {"calibration_batches": 4_000, "batch_size": 4}

    # A grace period long enough: the job finishes, then the worker exits.
    patient = stack.start_worker(QAAS_SHUTDOWN_GRACE_S="300")
    job_id = _submit(stack, model_id=model_id, mode="static", calibration_dataset_id=dataset_id)
    stack.wait(f"/v1/jobs/{job_id}", {"running"}, timeout_s=60)
    patient.send_signal(signal.SIGTERM)
    job = stack.wait(f"/v1/jobs/{job_id}", FINAL, timeout_s=180)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), (job, stack.worker_log.read_text()[-6000:])
    assert patient.wait(timeout=60) == 0

    # A short one: the job is stopped and handed back, and the next worker finishes it.
    hasty = stack.start_worker(QAAS_SHUTDOWN_GRACE_S="1")
    job_id = _submit(stack, model_id=model_id, mode="static", calibration_dataset_id=dataset_id, options=slow)
    _wait_for(
        lambda: stack.client.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"] == "calibrating",
        120,
        "calibration",
    )
    hasty.send_signal(signal.SIGTERM)
    assert hasty.wait(timeout=60) == 0
    handed = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert handed["status"] == "queued", handed
    assert "shut down" in handed["progress"]["message"]
    assert not _runners(job_id)
    stack.start_worker()
    job = stack.wait(f"/v1/jobs/{job_id}", FINAL, timeout_s=240)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), (job, stack.worker_log.read_text()[-6000:])
    assert _stored_files(stack, job_id) == [
        f"attempt-2/{name}" for name in ("manifest.json", "model.int8.ts", "report.json")
    ]


def _upload_with_a_worker(stack: Stack, kind: str, path: Path) -> str:
    """Uploads are inspected by a worker: one that comes and goes for the purpose."""
    helper = stack.start_worker()
    try:
        return _upload(stack, kind, path)
    finally:
        helper.terminate()
        helper.wait(timeout=30)
