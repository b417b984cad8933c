"""Upload, inspect, quantize, poll, download, verify: through the HTTP API with a real worker process."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qaas.client import Client, QaasError
from tests.e2e.conftest import MLP, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _upload(stack: Stack, path: Path, **fields: str) -> dict:
    with open(path, "rb") as handle:
        response = stack.client.post("/v1/models", files={"file": (path.name, handle)}, data=fields)
    assert response.status_code == 201, response.text
    return response.json()


def _quantize_and_verify(
    stack: Stack, model_id: str, float_model: MLP, upload_bytes: int, tmp_path: Path
) -> dict:
    model = stack.wait(f"/v1/models/{model_id}", {"ready", "invalid"})
    assert model["status"] == "ready", model
    assert model["inspection"]["inputs"] == [{"name": "x", "shape": [None, 64], "dtype": "float32"}]
    assert model["inspection"]["parameters"] == sum(p.numel() for p in float_model.parameters())

    response = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "mode": "dynamic",
            "backend": "fbgemm",
            "benchmark": {"batch_sizes": [1], "iterations": 10},
        },
    )
    assert response.status_code == 202, response.text
    job = stack.wait(f"/v1/jobs/{response.json()['id']}", {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    assert job["backend"] == {"requested": "fbgemm", "chosen": "fbgemm"}
    assert job["progress"]["percent"] == 100.0
    assert "torch.jit.load" in job["load_snippet"]
    assert {"clean_env", "rlimit_as", "worker_not_dumpable"} <= set(job["runner"]["sandbox"])

    artifact = next(a for a in job["artifacts"] if a["name"] == "model.int8.ts")
    download = stack.client.get(artifact["url"])
    assert download.status_code == 200
    assert (
        hashlib.sha256(download.content).hexdigest()
        == artifact["sha256"]
        == download.headers["etag"].strip('"')
    )
    path = tmp_path / "model.int8.ts"
    path.write_bytes(download.content)

    # The user's side: plain torch, the engine the report names.
    torch.backends.quantized.engine = "fbgemm"
    int8 = torch.jit.load(str(path))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = float_model(x), int8(x)
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0).item()
    assert cosine >= 0.99
    assert "quantized::linear_dynamic" in str(int8.inlined_graph)

    size = job["metrics"]["size"]
    assert size["fp32_bytes"] == upload_bytes
    assert size["int8_bytes"] == len(download.content)
    assert size["ratio"] >= 3.0
    assert upload_bytes / len(download.content) >= 3.0
    [latency] = job["metrics"]["latency"]
    assert latency["batch_size"] == 1 and latency["fp32_ms"]["p50"] > 0 and latency["int8_ms"]["p50"] > 0
    assert job["metrics"]["fidelity"]["cosine"] >= 0.99

    report = stack.client.get(job["report_url"]).json()
    assert report["metrics"] == job["metrics"]
    assert {a["name"] for a in job["artifacts"]} >= {"model.int8.ts", "report.json", "manifest.json"}
    return job


def test_pt2_dynamic_end_to_end(stack: Stack, pt2_file: Path, float_model: MLP, tmp_path: Path) -> None:
    model = _upload(stack, pt2_file)
    assert model["status"] == "inspecting"
    job = _quantize_and_verify(stack, model["id"], float_model, pt2_file.stat().st_size, tmp_path)

    # A second delivery of the finished job's id does nothing.
    from app.core import queue

    queue.enqueue(queue.RUN_JOB, job["id"])
    deadline = time.monotonic() + 30
    while f"job {job['id']} is not queued any more" not in stack.worker_log.read_text():
        assert time.monotonic() < deadline, stack.worker_log.read_text()[-2000:]
        time.sleep(0.2)
    after = stack.client.get(f"/v1/jobs/{job['id']}").json()
    assert (after["status"], after["attempts"], after["artifacts"]) == ("succeeded", 1, job["artifacts"])
    ready = stack.client.get(f"/v1/models/{model['id']}").json()
    assert ready["format"] == "pt2"
    assert ready["inspection"]["layers"].get("Linear") == 3


def test_torchscript_dynamic_end_to_end(
    stack: Stack, torchscript_file: Path, float_model: MLP, tmp_path: Path
) -> None:
    model = _upload(stack, torchscript_file, input_shapes='{"x": [null, 64]}')
    job = _quantize_and_verify(stack, model["id"], float_model, torchscript_file.stat().st_size, tmp_path)
    assert stack.client.get(f"/v1/models/{model['id']}").json()["format"] == "torchscript"
    assert job["manifest"]["mode"] == "dynamic"


def test_python_client_round_trip(
    stack: Stack, torchscript_file: Path, float_model: MLP, tmp_path: Path
) -> None:
    with Client(http=stack.client) as qaas:
        model = qaas.upload_model(torchscript_file, name="mlp", input_shapes={"x": [None, 64]})
        assert qaas.wait_model(model["id"], timeout=180)["status"] == "ready"
        submitted = qaas.submit(
            model["id"], mode="dynamic", backend="fbgemm", benchmark={"batch_sizes": [1], "iterations": 5}
        )
        seen: list[str] = []
        job = qaas.wait(
            submitted["id"], timeout=180, interval=0.1, callback=lambda j: seen.append(j["status"])
        )
        assert job["status"] == "succeeded", job
        assert seen[-1] == "succeeded" and len(seen) >= 2
        path = qaas.download(job["id"], "model.int8.ts", tmp_path / "out" / "model.int8.ts")
        assert torch.jit.load(str(path))(torch.randn(2, 64)).shape == (2, 10)
        with pytest.raises(QaasError) as missing:
            qaas.job("job_missing")
        assert missing.value.status == 404 and missing.value.code == "job_not_found"


def test_bad_models_become_invalid_with_a_reason(
    stack: Stack, tmp_path: Path, torchscript_file: Path
) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    model = stack.wait(f"/v1/models/{_upload(stack, junk)['id']}", {"ready", "invalid"})
    assert model["status"] == "invalid"
    assert model["error"]["code"] == "not_a_model"
    assert (
        "not a torch.export program, TorchScript archive or zipped Hugging Face model"
        in model["error"]["message"]
    )

    no_shapes = stack.wait(f"/v1/models/{_upload(stack, torchscript_file)['id']}", {"ready", "invalid"})
    assert no_shapes["status"] == "invalid"
    assert no_shapes["error"]["code"] == "input_shapes_required"

    response = stack.client.post("/v1/jobs", json={"model_id": model["id"], "mode": "dynamic"})
    assert response.status_code == 409 and response.json()["error"] == "model_not_ready"


SLOW_BENCHMARK = {"batch_sizes": [256], "iterations": 10_000}


def _runner_processes(job_id: str) -> list[str]:
    """The job's runner, found by its spec path (work/<job id>/attempt-N/spec.json)."""
    found = subprocess.run(
        ["pgrep", "-f", f"workers.runner quantize .*{job_id}"], capture_output=True, text=True
    )
    return found.stdout.split()


def test_cancel_stops_a_running_job(stack: Stack, pt2_file: Path) -> None:
    model_id = _upload(stack, pt2_file)["id"]
    stack.wait(f"/v1/models/{model_id}", {"ready"})
    job_id = stack.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm", "benchmark": SLOW_BENCHMARK},
    ).json()["id"]
    running = stack.wait(f"/v1/jobs/{job_id}", {"running"}, timeout_s=60)
    assert running["attempts"] == 1
    deadline = time.monotonic() + 60
    while not _runner_processes(job_id):  # "running" is written just before the runner starts
        assert time.monotonic() < deadline, "the job's runner never started"
        time.sleep(0.1)
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    started = time.monotonic()
    while _runner_processes(job_id):  # SIGKILL to its process group at the next heartbeat (1 s here)
        assert time.monotonic() - started < 5, "the runner outlived its cancel by 5 s"
        time.sleep(0.1)
    job = stack.wait(f"/v1/jobs/{job_id}", {"cancelled", "succeeded", "failed"}, timeout_s=30)
    assert job["status"] == "cancelled", job
    assert job["artifacts"] == []


def test_time_limit_fails_the_job_with_its_code(stack: Stack, pt2_file: Path) -> None:
    model_id = _upload(stack, pt2_file)["id"]
    stack.wait(f"/v1/models/{model_id}", {"ready"})
    job_id = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "mode": "dynamic",
            "backend": "fbgemm",
            "benchmark": SLOW_BENCHMARK,
            "timeout_s": 10,
        },
    ).json()["id"]
    job = stack.wait(f"/v1/jobs/{job_id}", {"cancelled", "succeeded", "failed"}, timeout_s=60)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "time_limit"
    assert "worker_not_dumpable" in job["runner"]["sandbox"] and "rlimit_as" in job["runner"]["sandbox"]
    assert "10 s" in job["error"]["message"]
    assert _runner_processes(job_id) == []
    # The worker survived: the next job still runs.
    again = stack.client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "mode": "dynamic",
            "backend": "fbgemm",
            "benchmark": {"batch_sizes": [1], "iterations": 3},
        },
    )
    assert stack.wait(f"/v1/jobs/{again.json()['id']}", {"succeeded", "failed"})["status"] == "succeeded"
