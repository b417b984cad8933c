"""The Python client and `qaas submit` / `qaas jobs`: unit tests on a mock transport, then the command line
against a real `qaas serve` (API + worker processes, SQLite) with QAAS_AUTH=required and a key.

The e2e `Stack` (tests/e2e/conftest.py) runs the API in-process behind a TestClient; a command line needs a
URL, so these tests start `qaas serve` on a free port instead, as a user does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import httpx
import numpy as np
import pytest

from qaas import submit
from qaas.cli import build_parser
from qaas.client import Client, Job, QaasConnectionError, QaasError, WaitTimeout
from qaas.contract.jobs import BenchmarkOptions, JobOptions, QATOptions
from qaas.contract.vocab import Backend, Mode

ROOT = Path(__file__).resolve().parents[1]
E2E = [pytest.mark.e2e, pytest.mark.slow]
START_TIMEOUT_S = 120
# A job that runs until cancelled: 10,000 timed runs at batch 256.
SLOW_BENCHMARK = '{"batch_sizes": [256], "iterations": 10000}'


# --- a real server --------------------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    key: str  # "" without auth
    data_dir: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client command: the server's URL and key, nothing of the server's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
        return env | {"QAAS_SERVER": self.url, "QAAS_API_KEY": self.key} | extra

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def qaas_serve(folder: Path, *, auth: bool = True) -> Iterator[Served]:
    """`qaas serve` (the embedded default) on a free port with its data in `folder`; with `auth`, every /v1
    request needs a key, made with `qaas keys create`. Stopped with SIGINT, as Ctrl-C does."""
    port = _free_port()
    data_dir = folder / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")} | {
        "QAAS_DATA_DIR": str(data_dir),
        "QAAS_AUTH": "required" if auth else "disabled",
        "QAAS_HEARTBEAT_S": "1",  # a cancel reaches the runner within a second
    }
    log = folder / "serve.log"
    command = [sys.executable, "-m", "qaas", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(f"http://127.0.0.1:{port}", "", data_dir, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, served.tail()
            try:
                if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, served.tail()
            time.sleep(0.3)
        if auth:
            created = subprocess.run(
                [sys.executable, "-m", "qaas", "keys", "create", "--tenant", "ml-team"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert created.returncode == 0, created.stdout + created.stderr
            served.key = created.stdout.strip().splitlines()[-1]
        yield served
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_qaas(
    served: Served, *args: str | Path, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qaas", *map(str, args)],
        env=served.env(**env), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with qaas_serve(tmp_path_factory.mktemp("serve")) as server:
        yield server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The e2e suite's MLP (64 -> 512 -> 512 -> 10) as a .pt2, its datasets, and models that cannot work."""
    import torch

    from tests.e2e.conftest import MLP

    folder = tmp_path_factory.mktemp("files")
    batch = torch.export.Dim("batch")
    torch.manual_seed(0)
    program = torch.export.export(MLP().eval(), (torch.randn(2, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, folder / "mlp.pt2")

    class NoLayers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2

    program = torch.export.export(NoLayers(), (torch.randn(2, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, folder / "no-layers.pt2")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    np.savez(
        folder / "eval.npz",
        x=rng.standard_normal((32, 64)).astype(np.float32),
        labels=rng.integers(0, 10, 32).astype(np.int64),
    )
    np.savez(folder / "wrong-shape.npz", x=np.zeros((16, 32), np.float32))
    (folder / "junk.pt2").write_bytes(rng.bytes(4096))
    return {path.name: path for path in folder.iterdir()}


@pytest.fixture(scope="module")
def finished(
    served: Served, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One `qaas submit --wait` of a static job: its output, its download folder and the job."""
    out = tmp_path_factory.mktemp("download") / "artifacts"
    started = time.monotonic()
    done = run_qaas(
        served, "submit", files["mlp.pt2"], "--mode", "static", "--calib", files["calib.npz"],
        "--eval", files["eval.npz"], "--backend", "fbgemm", "--batch-sizes", "1,4", "--iterations", "5",
        "--wait", "-o", out,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr + served.tail()
    match = re.search(r"^job (job_\w+) succeeded", done.stdout, re.M)
    assert match, done.stdout
    with Client(served.url, api_key=served.key) as client:
        job = client.job(match.group(1))
    return {"done": done, "out": out, "job": job, "elapsed": elapsed}


# --- the command line against the server ----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_submit_wait_prints_the_numbers_and_downloads_checked_artifacts(finished: dict[str, Any]) -> None:
    done, out, job = finished["done"], finished["out"], finished["job"]
    assert job.status == "succeeded" and job.backend_chosen == "fbgemm"
    assert {a.name for a in job.artifacts} == {"model.int8.ts", "report.json", "manifest.json"}
    for artifact in job.artifacts:
        assert hashlib.sha256((out / artifact.name).read_bytes()).hexdigest() == artifact.sha256
        assert (
            f"downloaded {out / artifact.name} ({artifact.size_bytes:,} bytes, sha256 {artifact.sha256}"
            in done.stdout
        )
    assert not list(out.glob("*.part"))
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    for label in (
        "size", "latency p50, batch 1", "latency p50, batch 4", "SQNR (int8 vs fp32)", "cosine (int8 vs fp32)",
        "top-1 accuracy",
    ):  # fmt: skip
        assert label in rows, done.stdout
    ratio = job.metrics.size.ratio
    assert rows["size"].endswith(f"{ratio:.2f}x smaller")
    assert "backend: fbgemm (asked: fbgemm)" in done.stdout
    assert 'torch.jit.load("model.int8.ts")' in done.stdout
    # stderr is a pipe here: plain lines a CI log keeps, no terminal escapes.
    assert "uploading mlp.pt2: 100%" in done.stderr and "uploading calib.npz: 100%" in done.stderr
    assert re.search(r"\] succeeded +saving +100\.0%", done.stderr), done.stderr
    assert "\x1b[" not in done.stderr + done.stdout
    import torch

    torch.backends.quantized.engine = "fbgemm"
    assert torch.jit.load(str(out / "model.int8.ts"))(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.e2e
@pytest.mark.slow
def test_jobs_list_show_report(served: Served, finished: dict[str, Any], tmp_path: Path) -> None:
    job: Job = finished["job"]
    listing = run_qaas(served, "jobs", "list")
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    assert header.split() == [
        "id",
        "status",
        "mode",
        "backend",
        "progress",
        "size",
        "speedup",
        "created",
        "error",
    ]
    line = next(line for line in lines if line.startswith(job.id))
    assert line.split()[1:4] == ["succeeded", "static", "fbgemm"]
    assert f"{job.metrics.size.ratio:.2f}x" in line
    assert job.id not in run_qaas(served, "jobs", "list", "--status", "failed").stdout
    as_json = run_qaas(served, "jobs", "list", "--limit", "1", "--json")
    assert len(json.loads(as_json.stdout)) == 1

    show = run_qaas(served, "jobs", "show", job.id)
    assert show.returncode == 0, show.stderr
    assert f"job       {job.id}" in show.stdout and "status    succeeded in " in show.stdout
    assert "top-1 accuracy" in show.stdout and "artifact  model.int8.ts" in show.stdout
    assert f"report    {served.url}/v1/jobs/{job.id}/report.html" in show.stdout

    report = run_qaas(served, "jobs", "report", job.id)
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert body["job_id"] == job.id and body["metrics"]["size"] == job["metrics"]["size"]
    page = tmp_path / "pages" / "report.html"
    saved = run_qaas(served, "jobs", "report", job.id, "--html", page)
    assert saved.returncode == 0 and f"wrote {page}" in saved.stdout
    assert job.id in page.read_text() and "<html" in page.read_text().lower()

    missing = run_qaas(served, "jobs", "show", "job_missing")
    assert missing.returncode == 1 and "qaas: job_not_found: no job with id 'job_missing'" in missing.stderr
    no_key = run_qaas(served, "jobs", "list", QAAS_API_KEY="")
    assert no_key.returncode == 1 and "unauthenticated" in no_key.stderr and "--key" in no_key.stderr
    wrong_key = run_qaas(served, "jobs", "show", job.id, "--key", "qaas_wrong")
    assert wrong_key.returncode == 1 and "invalid_api_key" in wrong_key.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_submit_then_follow_and_cancel(served: Served, files: dict[str, Path], tmp_path: Path) -> None:
    submitted = run_qaas(
        served, "submit", files["mlp.pt2"], "--backend", "fbgemm", "--benchmark", SLOW_BENCHMARK
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id, url = submitted.stdout.split()
    assert url == f"{served.url}/v1/jobs/{job_id}"

    follow = subprocess.Popen(
        [sys.executable, "-m", "qaas", "jobs", "wait", job_id, "-o", str(tmp_path / "never")],
        env=served.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with Client(served.url, api_key=served.key) as client:
            deadline = time.monotonic() + 60
            while client.job(job_id).status != "running":
                assert time.monotonic() < deadline, served.tail()
                time.sleep(0.2)
    except BaseException:
        follow.kill()
        raise
    cancel = run_qaas(served, "jobs", "cancel", job_id)
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.startswith(f"{job_id} running: cancelling")
    stdout, stderr = follow.communicate(timeout=60)
    assert follow.returncode == 1, stdout + stderr
    assert f"qaas: job {job_id} cancelled" in stderr
    assert not (tmp_path / "never").exists()
    again = run_qaas(served, "jobs", "cancel", job_id)
    assert again.returncode == 1 and "qaas: job_finished:" in again.stderr
    assert "status    cancelled" in run_qaas(served, "jobs", "show", job_id).stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_failures_exit_1_with_the_code(served: Served, files: dict[str, Path]) -> None:
    no_calib = run_qaas(served, "submit", files["mlp.pt2"], "--mode", "static")
    assert no_calib.returncode == 1
    assert (
        "qaas: dataset_required: static quantization needs calibration data: pass --calib FILE"
        in no_calib.stderr
    )

    junk = run_qaas(served, "submit", files["junk.pt2"], "--wait")
    assert junk.returncode == 1 and re.search(r"junk\.pt2 is invalid: not_a_model: ", junk.stderr), (
        junk.stderr
    )

    refused = run_qaas(
        served, "submit", files["mlp.pt2"], "--mode", "static", "--calib", files["wrong-shape.npz"]
    )
    assert refused.returncode == 1
    assert "qaas: dataset_mismatch: calibration tensor 'x' has shape [16, 32]" in refused.stderr

    failed = run_qaas(served, "submit", files["no-layers.pt2"], "--backend", "fbgemm", "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.search(r"qaas: job job_\w+ failed: nothing_quantized: ", failed.stderr), failed.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_usage_errors_exit_2(served: Served, files: dict[str, Path], tmp_path: Path) -> None:
    model = files["mlp.pt2"]
    cases = {
        "required: model": ["submit"],
        "invalid choice: 'int4'": ["submit", model, "--mode", "int4"],
        f"the model {tmp_path / 'nope.pt2'} is not a file": ["submit", tmp_path / "nope.pt2"],
        f"the calibration dataset {tmp_path / 'no.npz'} is not a file": [
            "submit", model, "--mode", "static", "--calib", tmp_path / "no.npz",
        ],
        "--options is not JSON": ["submit", model, "--options", "{bad"],
        "options.seed: must be >= 0, got -1": ["submit", model, "--seed", "-1"],
        "'1,x' is not a comma-separated list of ints": ["submit", model, "--batch-sizes", "1,x"],
        "-o/--out needs --wait": ["submit", model, "-o", tmp_path],
        "'not a url' is not an http(s) URL": ["submit", model, "--server", "not a url"],
        "is the server running?": ["submit", model, "--server", f"http://127.0.0.1:{_free_port()}"],
        "--limit must be 0 (all) or more": ["jobs", "list", "--limit", "-1"],
        "Connection refused): is the server running?": ["jobs", "list", "--server", f"http://127.0.0.1:{_free_port()}"],
        "required: jobs_command": ["jobs"],
    }  # fmt: skip
    for expected, args in cases.items():
        done = run_qaas(served, *args)
        assert (done.returncode, expected in done.stderr) == (2, True), (args, done.stderr)


# --- the job flags: the job contract's, validated by it -------------------------------------------------


def _submit_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", "model.pt2", *flags])


def test_submit_sends_the_job_flags_given_and_nothing_else() -> None:
    assert submit._requested(_submit_args()) == (None, None)  # the server applies the contract's defaults
    args = _submit_args(
        "--weight-granularity", "per_tensor", "--exclude", "head", "--exclude", "Conv2d", "--epochs", "2",
        "--qat-batch-size", "4", "--no-quantize-embeddings", "--batch-sizes", "1,4", "--threads", "2",
        "--options", '{"seed": 7, "qat": {"learning_rate": 0.01}}', "--benchmark", '{"iterations": 5}',
    )  # fmt: skip
    options, benchmark = submit._requested(args)
    assert options == {
        "weight_granularity": "per_tensor", "exclude": ["head", "Conv2d"], "quantize_embeddings": False, "seed": 7,
        "qat": {"learning_rate": 0.01, "epochs": 2, "batch_size": 4},
    }  # fmt: skip
    assert benchmark == {"batch_sizes": [1, 4], "threads": 2, "iterations": 5}
    assert submit._requested(_submit_args("--seed", "3", "--options", '{"seed": 7}')) == ({"seed": 3}, None)


def test_a_value_the_contract_refuses_is_a_usage_error_in_its_words() -> None:
    cases = {
        "options.seed: must be >= 0, got -1": ["--seed", "-1"],
        "benchmark.threads: must be <= 64, got 65": ["--threads", "65"],
        "options.qat.learning_rate: must be > 0": ["--learning-rate", "0"],
        "benchmark.batch_sizes: takes at most 8 items": ["--batch-sizes", "1,2,3,4,5,6,7,8,9"],
        "options.bogus: is not an option here": ["--options", '{"bogus": 1}'],
    }
    for expected, flags in cases.items():
        with pytest.raises(submit.UsageError) as refused:
            submit._requested(_submit_args(*flags))
        assert expected in str(refused.value), (flags, str(refused.value))


def test_every_job_option_is_a_flag_with_the_contracts_choices_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    flags = set(re.findall(r"--[a-z][a-z-]*", text))
    for model in (JobOptions, QATOptions, BenchmarkOptions):
        for name, field in model.model_fields.items():
            if name == "qat":
                continue  # its fields are flags of their own
            dashed = name.replace("_", "-")
            assert {f"--{dashed}", f"--qat-{dashed}"} & flags, name
            if get_origin(field.annotation) is Literal:
                assert "{" + ",".join(get_args(field.annotation)) + "}" in text, name
                assert f"(default: {field.default})" in text, name
    for enum in (Mode, Backend):
        assert "{" + ",".join(member.value for member in enum) + "}" in text
    assert "(default: 1,8)" in text  # a tuple default, as its flag takes it


# --- the client on a mock transport (no server) ---------------------------------------------------------


def _mock(handler: Any, **kwargs: Any) -> Client:
    transport = httpx.MockTransport(handler)
    return Client(
        "http://qaas.test", http=httpx.Client(transport=transport, base_url="http://qaas.test"), **kwargs
    )


def _job(status: str = "queued", percent: float = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": "job_1", "model_id": "mdl_1", "status": status, "mode": "dynamic",
        "backend": {"requested": "auto", "chosen": None}, "progress": {"stage": None, "percent": percent},
        "artifacts": [], "error": None, "metrics": None, "created_at": "2026-01-01T00:00:00Z",
    } | extra  # fmt: skip


class _Recorder(httpx.BaseTransport):
    """Reads the request body chunk by chunk as a socket would (MockTransport reads it whole first)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.headers: dict[str, str] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        self.chunks = list(request.stream)
        self.headers = dict(request.headers)
        return httpx.Response(201, json={"id": "ds_1", "status": "inspecting", "size_bytes": 1})


def test_upload_streams_the_file_in_chunks_with_an_exact_length(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    path.write_bytes(os.urandom(3 * (1 << 20) + 5))
    recorder = _Recorder()
    progress: list[tuple[int, int]] = []
    http = httpx.Client(transport=recorder, base_url="http://qaas.test")
    with Client("http://qaas.test", api_key="k", http=http) as client:
        dataset = client.upload_dataset(path, name="big", progress=lambda s, t: progress.append((s, t)))
    assert dataset.id == "ds_1" and dataset["status"] == "inspecting"
    body = b"".join(recorder.chunks)
    assert (
        int(recorder.headers["content-length"]) == len(body) and "transfer-encoding" not in recorder.headers
    )
    assert recorder.headers["authorization"] == "Bearer k"
    assert max(len(chunk) for chunk in recorder.chunks) <= 1 << 20  # never the whole file at once
    assert path.read_bytes() in body and b'name="name"\r\n\r\nbig\r\n' in body
    assert b'filename="big.npz"' in body
    total = path.stat().st_size
    assert progress == [(0, total), (1 << 20, total), (2 << 20, total), (3 << 20, total), (total, total)]


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_SERVER", "https://qaas.example.com:8443/")
    monkeypatch.setenv("QAAS_API_KEY", "from-env")
    headers: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json=_job())

    client = Client(http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://x"))
    assert client.url == "https://qaas.example.com:8443"
    client.job("job_1")
    assert headers == ["Bearer from-env"]
    monkeypatch.delenv("QAAS_SERVER")
    assert Client().url == "http://127.0.0.1:8000"
    for bad in ("localhost:8000", "ftp://host", "http://"):
        with pytest.raises(ValueError, match="URL"):
            Client(bad)


def test_errors_retries_and_idempotency_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qaas.client.time.sleep", lambda _s: None)
    answers = [
        httpx.Response(503, json={"error": "dependency_unavailable", "detail": "the database is down"}),
        httpx.Response(202, json=_job()),
    ]
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job_404":
            return httpx.Response(404, json={"error": "job_not_found", "detail": "no job"})
        if request.url.path == "/v1/jobs/job_proxy":
            return httpx.Response(502, text="<html>bad gateway</html>")
        keys.append(request.headers.get("idempotency-key"))
        return answers.pop(0)

    with _mock(handler) as client:
        job = client.submit("mdl_1", mode="dynamic", options={"seed": 1})
        assert job.status == "queued" and len(keys) == 2 and keys[0] == keys[1] and keys[0]
        with pytest.raises(QaasError) as missing:
            client.job("job_404")
        assert (missing.value.status, missing.value.code, missing.value.detail) == (
            404,
            "job_not_found",
            "no job",
        )
        with pytest.raises(QaasError) as proxy:
            client.job("job_proxy")
        assert (proxy.value.status, proxy.value.code) == (502, "http_502")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with _mock(refuse) as client, pytest.raises(QaasConnectionError) as down:
        client.health()
    assert down.value.code == "connection_failed" and "connection refused" in down.value.detail


def test_wait_backs_off_and_calls_back_on_each_change(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("qaas.client.time.sleep", sleep)
    monkeypatch.setattr("qaas.client.time.monotonic", lambda: clock[0])
    states = [_job()] * 4 + [_job("running", 10)] * 3 + [_job("running", 50), _job("succeeded", 100)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=states.pop(0) if len(states) > 1 else states[0])

    seen: list[tuple[str, float]] = []
    with _mock(handler) as client:
        job = client.wait(
            "job_1",
            max_interval=1.0,
            callback=lambda j: seen.append((j.status, j.progress.percent)),
        )
    assert job.done and job.status == "succeeded"
    assert seen == [("queued", 0), ("running", 10), ("running", 50), ("succeeded", 100)]
    # Longer while nothing changes, back to 0.5 s on a change.
    assert sleeps == [0.5, 0.75, 1.0, 1.0, 0.5, 0.75, 1.0, 0.5]

    # An interval given is kept (a benchmark timing the end of a job polls at a fixed rate).
    states[:] = [_job()] * 3 + [_job("succeeded", 100)]
    sleeps.clear()
    with _mock(handler) as client:
        assert client.wait("job_1", interval=0.1).status == "succeeded"
    assert sleeps == [0.1, 0.1, 0.1]

    running = _mock(lambda request: httpx.Response(200, json=_job("running", 5)))
    with running as client, pytest.raises(WaitTimeout) as timeout:
        client.wait("job_1", timeout=10)
    assert isinstance(timeout.value, TimeoutError) and timeout.value.code == "wait_timeout"
    assert "still running after 10 s" in str(timeout.value)


def test_download_checks_the_sha256(tmp_path: Path) -> None:
    content = b"int8 weights"
    good = hashlib.sha256(content).hexdigest()
    listed = _job(
        "succeeded",
        100,
        artifacts=[
            {"name": "model.int8.ts", "format": "torchscript", "size_bytes": 12, "sha256": good, "url": ""}
        ],
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job_1":
            return httpx.Response(200, json=listed)
        etag = {"job_1": "", "job_bad": f'"{hashlib.sha256(b"other").hexdigest()}"'}[
            request.url.path.split("/")[3]
        ]
        return httpx.Response(200, content=content, headers={"etag": etag} if etag else {})

    with _mock(handler) as client:
        with pytest.raises(QaasError) as mismatch:
            client.download("job_bad", "model.int8.ts", tmp_path / "bad.ts")
        assert mismatch.value.code == "checksum_mismatch"
        assert list(tmp_path.iterdir()) == []  # neither the file nor its .part
        # No ETag (a proxy dropped it): checked against the job's listing instead.
        paths = client.download_all(client.job("job_1"), tmp_path / "out")
    assert paths == [tmp_path / "out" / "model.int8.ts"] and paths[0].read_bytes() == content
    hostile = Job.from_json(listed | {"artifacts": [listed["artifacts"][0] | {"name": "../escape.ts"}]})
    with (
        _mock(handler) as client,
        pytest.raises(QaasError, match="refusing to write artifact '../escape.ts'"),
    ):
        client.download_all(hostile, tmp_path / "out")


def test_results_are_typed_and_read_like_the_json() -> None:
    raw = _job("failed", 40, error={"code": "job_timeout", "message": "stopped after 10 s"})
    job = Job.from_json(raw)
    assert (job.status, job.error and job.error.code, job.progress.percent) == ("failed", "job_timeout", 40.0)
    assert job["status"] == "failed" and job.get("metrics") is None and dict(job) == raw and job.raw is raw
    assert job.done and job.created_at is not None and job.created_at.year == 2026
    assert "metrics" not in repr(job)
    with pytest.raises(KeyError, match="has no artifact 'model.int8.ts'"):
        job.artifact("model.int8.ts")


def test_jobs_follow_the_cursor(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {None: (["a", "b"], "c1"), "c1": (["c", "d"], "c2"), "c2": (["e"], None)}
    asked: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        ids, cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"items": [_job(id=i) for i in ids], "next_cursor": cursor})

    with _mock(handler) as client:
        assert [job.id for job in client.jobs(limit=None, status="queued")] == ["a", "b", "c", "d", "e"]
        asked.clear()
        assert [job.id for job in client.jobs(limit=3)] == ["a", "b", "c"]
    assert asked == [{"limit": "3"}, {"limit": "3", "cursor": "c1"}]
