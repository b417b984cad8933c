"""Table 3: what the service adds to the engine's time (and the server Table 4 loads).

`qaas serve` (the embedded default: SQLite database and broker, one worker) runs in a temporary data folder
on a free port. Service overhead: a static job submitted with the Python client (qaas.client), from submit to
the terminal status seen by polling every 0.1 s, against the same job run by `qaas quantize` (the same
sandboxed runner, no server) and by the engine in this process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.engine_vs_fp32 import Settings
from bench.models import Prepared
from bench.tables import Table, Target, fmt

__all__ = [
    "Server",
    "ServiceResult",
    "run_cli_job",
    "run_engine_job",
    "run_service_job",
    "service_overhead",
    "service_table",
    "upload",
]

START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 3600
POLL_INTERVAL_S = 0.1
OVERHEAD_TARGET_S, OVERHEAD_TARGET_PCT = 2.0, 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`qaas serve` in its own process group, data in `folder`; stopped with SIGINT (as Ctrl-C does)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        import httpx

        data = self.folder / "var"
        data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "QAAS_DATA_DIR": str(data)}
        command = [sys.executable, "-m", "qaas", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*command, "--data-dir", str(data)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qaas serve exited ({self.proc.returncode}): {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"qaas serve did not answer in {START_TIMEOUT_S} s: {self.tail()}")
            time.sleep(0.3)

    def tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def __exit__(self, *_exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group: serve and its worker
            self.proc.wait()


# --- service overhead ------------------------------------------------------------------------------------


@dataclass
class ServiceResult:
    """Wall times of one static job, run `repeats` times through the service and through `qaas quantize`
    (alternating), and once by the engine in-process; the overhead compares the fastest of each."""

    model: str
    upload_s: float = 0.0
    service_s: list[float] = field(default_factory=list)
    cli_s: list[float] = field(default_factory=list)
    queued_s: float | None = None  # of the fastest service job, from the job row
    worker_s: float | None = None
    engine_s: float | None = None
    job_id: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def overhead_s(self) -> float | None:
        if not self.service_s or not self.cli_s:
            return None
        return min(self.service_s) - min(self.cli_s)

    @property
    def overhead_pct(self) -> float | None:
        overhead = self.overhead_s
        return None if overhead is None else 100 * overhead / min(self.cli_s)


def _job_options(prepared: Prepared, iterations: int) -> tuple[dict[str, Any], dict[str, Any]]:
    case = prepared.case
    options = {
        "calibration_batches": max(1, case.calibration_samples // case.calibration_batch),
        "batch_size": case.calibration_batch,
    }
    return options, {"batch_sizes": [1], "threads": 1, "iterations": iterations}


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def upload(server: Server, prepared: Prepared) -> tuple[str, str, float]:
    """Upload the model and its calibration set and wait until both are ready: (model id, dataset id, s)."""
    from qaas.client import Client

    with Client(server.url, timeout=120) as client:
        started = time.perf_counter()
        model = client.upload_model(prepared.model_path, name=prepared.case.key)
        dataset = client.upload_dataset(prepared.calibration, name=f"{prepared.case.key}-calib")
        model = client.wait_model(model["id"], interval=POLL_INTERVAL_S)
        dataset = client.wait_dataset(dataset["id"], interval=POLL_INTERVAL_S)
        elapsed = time.perf_counter() - started
    if model["status"] != "ready" or dataset["status"] != "ready":
        raise RuntimeError(f"upload not ready: model {model.get('error')}, dataset {dataset.get('error')}")
    return model["id"], dataset["id"], elapsed


def run_service_job(
    server: Server, prepared: Prepared, ids: tuple[str, str], iterations: int, backend: str = "fbgemm"
) -> tuple[dict[str, Any], float]:
    """Submit a static job with the Python client and poll it to the end: (the job, seconds from submit)."""
    from qaas.client import Client

    options, benchmark = _job_options(prepared, iterations)
    model_id, dataset_id = ids
    with Client(server.url, timeout=120) as client:
        started = time.perf_counter()
        job = client.submit(
            model_id,
            mode=prepared.case.mode,
            backend=backend,
            calibration_dataset_id=dataset_id,
            options=options,
            benchmark=benchmark,
        )
        job = client.wait(job["id"], timeout=JOB_TIMEOUT_S, interval=POLL_INTERVAL_S)
        elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"the service job {job['status']}: {job.get('error')}")
    return job, elapsed


def run_cli_job(prepared: Prepared, iterations: int, out: Path, backend: str = "fbgemm") -> float:
    """The same job through `qaas quantize` (the same sandboxed runner, no server): its wall time."""
    options, _ = _job_options(prepared, iterations)
    command = [
        sys.executable, "-m", "qaas", "quantize", str(prepared.model_path), "--mode", prepared.case.mode,
        "--backend", backend, "--calib", str(prepared.calibration),
        "--calibration-batches", str(options["calibration_batches"]), "--batch-size", str(options["batch_size"]),
        "--batch-sizes", "1", "--iterations", str(iterations), "--threads", "1", "-o", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"qaas quantize failed ({done.returncode}): {done.stderr[-800:]}")
    return elapsed


def run_engine_job(prepared: Prepared, iterations: int, out: Path, backend: str = "fbgemm") -> float:
    """The same job by the engine in this process: its wall time (no runner process, no second check)."""
    from qaas.contract.jobs import BenchmarkConfig, StaticConfig
    from workers.engine.api import quantize

    options, _ = _job_options(prepared, iterations)
    config = StaticConfig(
        backend=backend,
        calibration_batches=options["calibration_batches"],
        batch_size=options["batch_size"],
        benchmark=BenchmarkConfig(batch_sizes=(1,), threads=1, iterations=iterations),
    )
    started = time.perf_counter()
    quantize(prepared.model_path, config, out_dir=out, calibration=prepared.calibration)
    return time.perf_counter() - started


def service_overhead(server: Server, prepared: Prepared, settings: Settings, work: Path) -> ServiceResult:
    """One static fbgemm job through the service and `qaas quantize`, alternating (1 round with --quick, 2
    otherwise: a job's time varies by seconds on a shared machine), then once by the engine in-process."""
    iterations, rounds = (5, 1) if settings.quick else (10, 2)
    result = ServiceResult(prepared.case.name)
    try:
        model_id, dataset_id, result.upload_s = upload(server, prepared)
    except Exception as exc:
        result.errors.append(f"upload: {type(exc).__name__}: {exc}")
        return result
    fastest = float("inf")
    for i in range(rounds):
        try:
            job, seconds = run_service_job(server, prepared, (model_id, dataset_id), iterations)
            result.service_s.append(seconds)
            result.job_id = job["id"]
            if seconds < fastest:
                fastest = seconds
                result.queued_s = _seconds_between(job.get("created_at"), job.get("started_at"))
                result.worker_s = _seconds_between(job.get("started_at"), job.get("finished_at"))
        except Exception as exc:
            result.errors.append(f"service job: {type(exc).__name__}: {exc}")
        try:
            result.cli_s.append(run_cli_job(prepared, iterations, work / f"cli-out-{i}"))
        except Exception as exc:
            result.errors.append(f"qaas quantize: {type(exc).__name__}: {exc}")
    try:
        result.engine_s = run_engine_job(prepared, iterations, work / "engine-out")
    except Exception as exc:
        result.errors.append(f"engine in-process: {type(exc).__name__}: {exc}")
    return result


def _fastest(values: list[float], note: str) -> str:
    """The note of a row that shows the fastest of several runs, listing them all."""
    if len(values) < 2:
        return note
    return f"fastest of {', '.join(f'{v:.2f}' for v in values)}; {note}"


def service_table(result: ServiceResult) -> tuple[Table, Target]:
    table = Table("Service overhead (one static fbgemm job, seconds)", ["measure", "seconds", "note"])
    service, cli = result.service_s, result.cli_s
    table.add("upload model + dataset, until both are ready", result.upload_s, "not part of the job")
    table.add(
        "service: submit -> succeeded (client)",
        min(service) if service else None,
        _fastest(service, "Python client polling every 0.1 s"),
    )
    table.add("  of which queued (created -> started)", result.queued_s, "job row timestamps")
    table.add("  of which running (started -> finished)", result.worker_s, "job row timestamps")
    table.add(
        "qaas quantize (same runner, no server)",
        min(cli) if cli else None,
        _fastest(cli, "subprocess wall time"),
    )
    table.add("engine in-process (quantize())", result.engine_s, "no runner process, no recheck")
    table.add("overhead: service - qaas quantize", result.overhead_s, f"{fmt(result.overhead_pct, 1)} %")
    table.notes = [
        f"model: {result.model}; the service and `qaas quantize` jobs alternate, one after the other",
        *result.errors,
    ]
    overhead, pct = result.overhead_s, result.overhead_pct
    met = None if overhead is None else overhead <= OVERHEAD_TARGET_S or (pct or 0) <= OVERHEAD_TARGET_PCT
    target = Target(
        "service overhead (vs qaas quantize)",
        f"<= {OVERHEAD_TARGET_PCT:.0f} % or <= {OVERHEAD_TARGET_S:.0f} s",
        "-" if overhead is None else f"{overhead:.2f} s ({fmt(pct, 1)} %)",
        met,
    )
    return table, target
