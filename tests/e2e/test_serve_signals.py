"""`qaas serve` and its worker live and die together: SIGTERM stops both (serve waits for the worker), and a
`kill -9` of serve takes the worker down too (its PR_SET_PDEATHSIG), the runner of a running job with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

START_TIMEOUT_S = 120
# A job that runs until stopped: 10,000 timed runs at batch 256.
SLOW_BENCHMARK = {"batch_sizes": [256], "iterations": 10000}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_time(pid: int) -> str | None:
    """The process's start time (to tell it from a later one with its pid), or None when it is gone (a zombie
    left unreaped by whatever adopted it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        found |= {int(child) for child in children.read_text().split()}
    return found


def _mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line or environment mentions `text`, with their command lines."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                environ = (proc / "environ").read_bytes().decode(errors="replace")
            except PermissionError:
                environ = ""
        except (FileNotFoundError, ProcessLookupError):
            continue
        if (text in cmdline or text in environ) and _start_time(int(proc.name)) is not None:
            found[int(proc.name)] = cmdline
    return found


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path
    worker_pid: int = 0
    worker_started: str | None = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def worker_alive(self) -> bool:
        return _start_time(self.worker_pid) == self.worker_started

    def left_behind(self) -> dict[int, str]:
        return _mentioning(str(self.data_dir))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """A `qaas serve` with its worker up (listed live by /readyz); whatever of it is left is killed after."""
    port = _free_port()
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")} | {
        "QAAS_DATA_DIR": str(data_dir),
        "QAAS_HEARTBEAT_S": "1",
        "QAAS_REAPER_INTERVAL_S": "1",
    }
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "qaas", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Serve(proc, f"http://127.0.0.1:{port}", data_dir, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, served.tail()
            try:
                workers = httpx.get(f"{served.url}/readyz", timeout=2).json().get("workers", [])
            except (httpx.TransportError, ValueError):
                workers = []
            if workers:
                break
            assert time.monotonic() < deadline, served.tail()
            time.sleep(0.3)
        served.worker_pid = int(workers[0]["id"].rpartition(":")[2])
        served.worker_started = _start_time(served.worker_pid)
        assert served.worker_pid in _children(proc.pid), (served.worker_pid, _children(proc.pid))
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in served.left_behind():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _gone_within(serve: Serve, timeout_s: float) -> float:
    """Seconds until the worker and every process mentioning the data directory are gone; fails after."""
    started = time.monotonic()
    while serve.worker_alive() or serve.left_behind():
        assert time.monotonic() - started < timeout_s, (
            f"still running {timeout_s:.0f} s later: worker {serve.worker_pid} alive={serve.worker_alive()}, "
            f"{serve.left_behind()}\n{serve.tail()}"
        )
        time.sleep(0.2)
    return time.monotonic() - started


def test_sigterm_stops_the_api_and_the_worker(serve: Serve) -> None:
    serve.proc.send_signal(signal.SIGTERM)
    try:
        code = serve.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"qaas serve still runs 20 s after SIGTERM\n{serve.tail()}") from None
    assert code == 0, serve.tail()
    # serve waited for its worker: nothing of it is left the moment serve is gone.
    assert not serve.worker_alive(), serve.tail()
    assert serve.left_behind() == {}


def test_sigkill_of_serve_takes_the_worker_down(serve: Serve) -> None:
    serve.proc.kill()
    serve.proc.wait()
    _gone_within(serve, 15)


def test_a_restarted_worker_dies_with_serve_too(serve: Serve) -> None:
    """serve restarts a worker that died, from its watching thread: that one dies with serve as well."""
    os.kill(serve.worker_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (restarted := _children(serve.proc.pid) - {serve.worker_pid}):
        assert time.monotonic() < deadline, f"no worker restarted\n{serve.tail()}"
        time.sleep(0.2)
    serve.worker_pid = restarted.pop()
    serve.worker_started = _start_time(serve.worker_pid)
    time.sleep(2)  # well into its start-up
    assert serve.worker_alive(), serve.tail()
    serve.proc.kill()
    serve.proc.wait()
    _gone_within(serve, 15)


def test_sigkill_of_serve_takes_a_running_jobs_runner_down(serve: Serve, tmp_path: Path) -> None:
    import torch

    from qaas.client import Client
    from tests.e2e.conftest import MLP

    model_file = tmp_path / "mlp.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(MLP().eval(), (torch.randn(2, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, model_file)
    with Client(serve.url, api_key="") as client:
        model = client.wait_model(client.upload_model(model_file), timeout=180)
        assert model.status == "ready", model
        job = client.submit(model, mode="dynamic", backend="fbgemm", benchmark=SLOW_BENCHMARK)
        deadline = time.monotonic() + 120
        while (job := client.job(job.id)).status != "running":
            assert not job.done and time.monotonic() < deadline, (job, serve.tail())
            time.sleep(0.2)
    runners = {
        pid: cmd for pid, cmd in serve.left_behind().items() if pid not in (serve.proc.pid, serve.worker_pid)
    }
    assert runners, "no runner process found for the running job"
    serve.proc.kill()
    serve.proc.wait()
    # The worker's SIGTERM: the job's grace (5 s under serve), then the job is handed back and the runner stopped.
    _gone_within(serve, 30)
